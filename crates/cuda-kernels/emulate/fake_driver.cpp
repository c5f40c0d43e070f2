// An emulated GPU: the subset of the CUDA driver API that cudarc calls,
// implemented on the CPU, with every kernel of kernels/*.cu run as written
// through cuda_shim.h. Built as libcuda.so (soname libcuda.so) by
// aha_cuda_kernels::emulate::install_emulated_gpu and loaded before cudarc
// looks for the driver, so the unchanged Rust launchers, the GPU model and
// the GPU tests run against it (AHA_EMULATED_GPU=1).
//
// Device memory is host memory (a CUdeviceptr is a host address); copies are
// memcpy; streams and events exist but everything runs synchronously at the
// call. cuModuleLoadData ignores the cubin (NVRTC still compiles it for the
// reported sm_90) and cuModuleGetFunction looks the name up in the table of
// kernels (kernel_table.inc, generated from the registry). cuLaunchKernel
// unpacks the kernel parameters from their void** array by the kernel's own
// C++ signature, exactly as the real driver reads them, so a launcher that
// passes arguments in the wrong order or of the wrong size fails here too.
// Only one-dimensional blocks are supported (all of aha's launches).
//
// cuLaunchKernel refuses what an sm_90 device refuses, with the real
// driver's codes: a block of more than 1024 threads, gridDim.x above
// 2^31 - 1 or gridDim.y / z above 65,535 (CUDA_ERROR_INVALID_VALUE); more
// dynamic shared memory than the function's
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (48 KB less its static
// shared memory until cuFuncSetAttribute raises it; raising it past 227 KB
// less the static size is itself refused) (CUDA_ERROR_INVALID_VALUE); and,
// where the kernel's register count is known (aha_fake_set_kernel_resources,
// fed from NVRTC's ptxas report), more than 65,536 registers a block at the
// hardware's allocation granularity (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES).
// A write past the requested dynamic shared memory (the shim's guard) is a
// kernel fault: like an illegal address on a GPU it is reported
// asynchronously, by the next synchronising call (context, stream or event
// synchronise, a copy to the host), as CUDA_ERROR_ILLEGAL_ADDRESS; unlike a
// GPU, the context stays usable after it has been reported once. Every
// refusal and fault is also printed on stderr with the kernel's name.

#include "cuda_shim.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "activation.cu"
#include "attention.cu"
#include "cast.cu"
#include "elementwise.cu"
#include "embedding.cu"
#include "flash_attention.cu"
#include "grpo.cu"
#include "lmhead.cu"
#include "logprob.cu"
#include "moe.cu"
#include "optim.cu"
#include "rmsnorm.cu"
#include "rope.cu"
#include "sampling.cu"

namespace fake {

// Calls kernel k with its parameters read from the driver's void** array.
template <class... A, size_t... I>
void invoke_impl(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <class... A>
void invoke(void (*k)(A...), void** p) {
    invoke_impl(k, p, std::index_sequence_for<A...>{});
}
// The sizes of kernel k's parameters (a captured launch copies them).
template <class... A>
void param_sizes(void (*)(A...), std::vector<size_t>& out) {
    out = {sizeof(std::remove_cv_t<std::remove_reference_t<A>>)...};
}

struct Kernel {
    const char* name;
    void (*call)(void**);
    void (*sizes)(std::vector<size_t>&);
};

#define AHA_KERNEL(name) \
    Kernel{#name, [](void** p) { invoke(&name, p); }, [](std::vector<size_t>& s) { param_sizes(&name, s); }},
const Kernel TABLE[] = {
#include "kernel_table.inc"
};
#undef AHA_KERNEL

// A kernel's resources from ptxas (-1: unknown).
struct Resources {
    int regs = -1;
    int static_smem = 0;
};
std::map<std::string, Resources> g_resources;

// A module's function: the kernel and its attribute.
struct Function {
    const Kernel* kernel;
    int max_dynamic_smem;
};

struct Object {
    int kind;  // 1 context, 2 stream, 3 event, 4 module
    std::map<std::string, Function*> functions;  // modules only
};
Object g_context{1};

std::mutex g_mu;
// A fault of an earlier launch, reported by the next synchronising call.
std::atomic<int> g_pending{0};

constexpr int DEFAULT_DYNAMIC_SMEM = 48 * 1024;
constexpr int MAX_SMEM_PER_BLOCK = 227 * 1024;
constexpr int REGS_PER_BLOCK = 65536;

Resources resources_of(const char* name) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_resources.find(name);
    return it == g_resources.end() ? Resources{} : it->second;
}

int take_pending() { return g_pending.exchange(0); }
std::map<uintptr_t, size_t> g_allocs;
size_t g_allocated = 0;
constexpr size_t TOTAL_MEMORY = size_t(64) << 30;

}  // namespace fake

namespace fake {

// AHA_EMU_PROFILE=1: seconds, launches and threads per kernel, printed on
// stderr at exit, slowest first (where the emulation's time goes).
struct Prof {
    double s = 0;
    unsigned long long launches = 0, threads = 0;
};
inline std::map<std::string, Prof>* profile_table() {
    static const bool on = [] {
        const char* v = getenv("AHA_EMU_PROFILE");
        return v != nullptr && strcmp(v, "1") == 0;
    }();
    if (!on) return nullptr;
    static auto* t = [] {
        auto* m = new std::map<std::string, Prof>();
        atexit([] {
            auto* m = profile_table();
            std::vector<std::pair<std::string, Prof>> v(m->begin(), m->end());
            std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second.s > b.second.s; });
            fprintf(stderr, "emulated GPU profile (kernel, seconds, launches, threads):\n");
            for (auto& [name, p] : v) fprintf(stderr, "  %-40s %9.3f %8llu %12llu\n", name.c_str(), p.s, p.launches, p.threads);
        });
        return m;
    }();
    return t;
}
template <class D>
void profile_add(const char* name, D d, unsigned long long threads) {
    if (auto* t = profile_table()) {
        Prof& p = (*t)[name];
        p.s += std::chrono::duration<double>(d).count();
        p.launches += 1;
        p.threads += threads;
    }
}

// Driver calls by kind and calling thread, counted always
// (ahaEmuDriverCounts): kernel launches, allocations, frees, host-to-device,
// device-to-host and device-to-device copies, memsets. What a step costs in
// calls is the same on a GPU, where each is host time that a CUDA graph
// would save. Per thread, so that tests running side by side do not count
// each other's calls.
enum Count { LAUNCH, ALLOC, FREE, HTOD, DTOH, DTOD, MEMSET, GRAPH_LAUNCH, NCOUNT };
inline thread_local unsigned long long t_counts[NCOUNT] = {};
inline void count(Count c) { t_counts[c] += 1; }

// Stream capture and graphs (cuStreamBeginCapture .. cuGraphLaunch), with
// the real driver's rules where aha could break them: while a thread
// captures, the work it issues on the captured stream is recorded, not run
// (launches with a copy of their parameters, memsets, device copies, copies
// from page-locked host memory, and the emulated cuBLAS's products through
// ahaEmuCaptureHook); a stream-ordered allocation made during the capture
// belongs to the graph (its address stays valid for every replay, as a
// graph's memory node keeps its address) and its free is part of the graph.
// Refused during a capture, as on a GPU, and the capture invalidated
// (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, then
// CUDA_ERROR_STREAM_CAPTURE_INVALIDATED from cuStreamEndCapture):
// synchronising calls, copies to the host, copies from pageable host memory
// (the copy would read it at replay, after the caller has moved on),
// synchronous allocations and frees, and freeing, inside the graph, memory
// allocated outside it (a second replay would free it twice).
struct Node {
    enum Kind { KERNEL, MEMSET, COPY, HOST } kind;
    const Function* f = nullptr;
    unsigned grid[3] = {0, 0, 0}, block[3] = {0, 0, 0}, smem = 0;
    std::vector<std::vector<char>> params;
    uintptr_t dst = 0, src = 0;
    size_t n = 0;
    unsigned char value = 0;
    int (*run)(void*) = nullptr;
    std::shared_ptr<void> ctx;
};
struct Graph {
    std::vector<Node> nodes;
    std::vector<void*> owned;  // memory allocated during the capture
    ~Graph();
};
struct Capture {
    void* stream = nullptr;
    std::shared_ptr<Graph> graph;
    bool invalid = false;
};
inline thread_local Capture* t_capture = nullptr;
// Page-locked host allocations (start -> bytes), for the pageable check.
std::map<uintptr_t, size_t> g_pinned;
// Device memory owned by a graph: freed when the graph goes, not before.
std::map<uintptr_t, size_t> g_graph_owned;

// The capture the calling thread's work on `stream` goes to, if any.
inline Capture* capturing(void* stream) {
    Capture* c = t_capture;
    return c != nullptr && c->stream == stream ? c : nullptr;
}
// A call that a capture forbids: invalidates it (with the reason on
// stderr). Returns the code to give the caller (0: not capturing).
inline int forbid(const char* what) {
    Capture* c = t_capture;
    if (c == nullptr) return 0;
    if (!c->invalid) fprintf(stderr, "stream capture: %s is not allowed while capturing; capture invalidated\n", what);
    c->invalid = true;
    return 900;  // CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
}
// Runs `f` (a synchronous twin) as if no capture were on.
template <class F>
int uncaptured(F f) {
    Capture* saved = t_capture;
    t_capture = nullptr;
    const int r = f();
    t_capture = saved;
    return r;
}
inline void record(Capture* c, Node n) { c->graph->nodes.push_back(std::move(n)); }
inline bool is_pinned(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_pinned.upper_bound((uintptr_t)p);
    if (it == g_pinned.begin()) return false;
    --it;
    return (uintptr_t)p + n <= it->first + it->second;
}

}  // namespace fake

extern "C" {

// The calling thread's driver call counts, in the order of fake::Count
// (n of them at most).
void ahaEmuDriverCounts(unsigned long long* out, int n) {
    for (int i = 0; i < n && i < fake::NCOUNT; i++) out[i] = fake::t_counts[i];
}

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef fake::Function* CUfunction;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_FOUND = 500,
    ERR_ILLEGAL_ADDRESS = 700,
    ERR_LAUNCH_OUT_OF_RESOURCES = 701,
    ERR_NOT_SUPPORTED = 801,
};

// Records ptxas's register count and static shared memory for a kernel
// (called by aha_cuda_kernels::emulate after loading this library).
void aha_fake_set_kernel_resources(const char* name, int regs, int static_smem) {
    std::lock_guard<std::mutex> g(fake::g_mu);
    fake::g_resources[name] = fake::Resources{regs, static_smem};
}

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return ERR_INVALID_VALUE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "aha CPU emulation");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = fake::TOTAL_MEMORY;
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;              // max threads per block
        case 2: case 3: case 4: *v = 65535; break;
        case 5: *v = 2147483647; break;        // max grid x
        case 8: *v = 48 * 1024; break;         // shared memory per block
        case 10: *v = 32; break;               // warp size
        case 16: *v = 132; break;              // multiprocessors
        case 41: *v = 1; break;                // unified addressing
        case 75: *v = 9; break;                // compute capability major
        case 76: *v = 0; break;                // minor
        case 97: *v = 227 * 1024; break;       // shared memory per block, opt-in
        case 115: *v = 1; break;               // memory pools: yes (stream-ordered allocations)
        default: *v = 0;
    }
    return OK;
}
CUresult cuDeviceGetUuid(void* uuid, CUdevice) {
    memset(uuid, 0, 16);
    return OK;
}
CUresult cuDeviceGetUuid_v2(void* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &fake::g_context;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
CUresult cuCtxSetCurrent(CUcontext) { return OK; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &fake::g_context;
    return OK;
}
CUresult cuCtxSynchronize() {
    if (int e = fake::forbid("cuCtxSynchronize")) return e;
    return fake::take_pending();
}
CUresult cuCtxSetFlags(unsigned) { return OK; }
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    *lo = 0;
    *hi = 0;
    return OK;
}

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new fake::Object{2};
    return OK;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream s) {
    delete static_cast<fake::Object*>(s);
    return OK;
}
CUresult cuStreamSynchronize(CUstream) {
    if (int e = fake::forbid("cuStreamSynchronize")) return e;
    return fake::take_pending();
}
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return OK; }
CUresult cuStreamIsCapturing(CUstream s, int* status) {
    const fake::Capture* c = fake::capturing(s);
    *status = c == nullptr ? 0 : c->invalid ? 2 : 1;  // none, active, invalidated
    return OK;
}
CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new fake::Object{3};
    return OK;
}
CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<fake::Object*>(e);
    return OK;
}
CUresult cuEventRecord(CUevent, CUstream) { return OK; }
CUresult cuEventSynchronize(CUevent) {
    if (int e = fake::forbid("cuEventSynchronize")) return e;
    return fake::take_pending();
}
CUresult cuEventQuery(CUevent) { return OK; }
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    *ms = 0.0f;
    return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    fake::count(fake::ALLOC);
    if (int e = fake::forbid("a synchronous allocation (cuMemAlloc)")) return e;
    std::lock_guard<std::mutex> g(fake::g_mu);
    if (fake::g_allocated + bytes > fake::TOTAL_MEMORY) return ERR_OUT_OF_MEMORY;
    void* m = aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
    if (!m) return ERR_OUT_OF_MEMORY;
    *p = (CUdeviceptr)(uintptr_t)m;
    fake::g_allocs[(uintptr_t)m] = bytes;
    fake::g_allocated += bytes;
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    fake::count(fake::FREE);
    if (int e = fake::forbid("a synchronous free (cuMemFree)")) return e;
    std::lock_guard<std::mutex> g(fake::g_mu);
    // A graph's memory lives as long as the graph.
    if (fake::g_graph_owned.count((uintptr_t)p)) return OK;
    auto it = fake::g_allocs.find((uintptr_t)p);
    if (it == fake::g_allocs.end()) return ERR_INVALID_VALUE;
    fake::g_allocated -= it->second;
    fake::g_allocs.erase(it);
    free((void*)(uintptr_t)p);
    return OK;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    fake::Capture* c = fake::capturing(s);
    fake::Capture* saved = fake::t_capture;
    fake::t_capture = nullptr;
    const CUresult r = cuMemAlloc_v2(p, bytes);
    fake::t_capture = saved;
    if (r == OK && c != nullptr) {
        std::lock_guard<std::mutex> g(fake::g_mu);
        fake::g_graph_owned[(uintptr_t)*p] = bytes;
        c->graph->owned.push_back((void*)(uintptr_t)*p);
    }
    return r;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    if (fake::capturing(s) != nullptr) {
        fake::count(fake::FREE);
        bool owned;
        {
            std::lock_guard<std::mutex> g(fake::g_mu);
            owned = fake::g_graph_owned.count((uintptr_t)p) != 0;
        }
        return owned ? OK : fake::forbid("freeing, inside a graph, memory allocated outside it");
    }
    fake::Capture* saved = fake::t_capture;
    fake::t_capture = nullptr;
    const CUresult r = cuMemFree_v2(p);
    fake::t_capture = saved;
    return r;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(fake::g_mu);
    *free_bytes = fake::TOTAL_MEMORY - fake::g_allocated;
    *total = fake::TOTAL_MEMORY;
    return OK;
}
// Page-locked host memory (cuMemHostAlloc and friends): plain aligned host
// memory here, since the "device" is the same address space. Not counted
// against the device's memory.
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    void* m = aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
    if (!m) return ERR_OUT_OF_MEMORY;
    *p = m;
    std::lock_guard<std::mutex> g(fake::g_mu);
    fake::g_pinned[(uintptr_t)m] = bytes;
    return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    {
        std::lock_guard<std::mutex> g(fake::g_mu);
        fake::g_pinned.erase((uintptr_t)p);
    }
    free(p);
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    fake::count(fake::HTOD);
    if (int e = fake::forbid("a synchronous copy (cuMemcpyHtoD)")) return e;
    if (n) memcpy((void*)(uintptr_t)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    fake::count(fake::DTOH);
    if (int e = fake::forbid("a copy to the host")) return e;
    if (n) memcpy(dst, (const void*)(uintptr_t)src, n);
    return fake::take_pending();
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    fake::count(fake::DTOD);
    if (int e = fake::forbid("a synchronous copy (cuMemcpyDtoD)")) return e;
    if (n) memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    if (fake::Capture* c = fake::capturing(s)) {
        fake::count(fake::HTOD);
        if (!fake::is_pinned(src, n)) return fake::forbid("a copy from pageable host memory");
        fake::Node node{fake::Node::COPY};
        node.dst = dst;
        node.src = (uintptr_t)src;
        node.n = n;
        fake::record(c, std::move(node));
        return OK;
    }
    return fake::uncaptured([&] { return cuMemcpyHtoD_v2(dst, src, n); });
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    if (fake::Capture* c = fake::capturing(s)) {
        fake::count(fake::DTOD);
        fake::Node node{fake::Node::COPY};
        node.dst = dst;
        node.src = src;
        node.n = n;
        fake::record(c, std::move(node));
        return OK;
    }
    return fake::uncaptured([&] { return cuMemcpyDtoD_v2(dst, src, n); });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    fake::count(fake::MEMSET);
    if (int e = fake::forbid("a synchronous memset")) return e;
    if (n) memset((void*)(uintptr_t)dst, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    if (fake::Capture* c = fake::capturing(s)) {
        fake::count(fake::MEMSET);
        fake::Node node{fake::Node::MEMSET};
        node.dst = dst;
        node.value = v;
        node.n = n;
        fake::record(c, std::move(node));
        return OK;
    }
    return fake::uncaptured([&] { return cuMemsetD8_v2(dst, v, n); });
}

CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = new fake::Object{4};
    return OK;
}
CUresult cuModuleUnload(CUmodule m) {
    auto* o = static_cast<fake::Object*>(m);
    for (auto& [name, f] : o->functions) delete f;
    delete o;
    return OK;
}
// One function object per (module, name), as the driver returns the same
// handle for the same name, so that attributes set on it stay with it.
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    auto* mod = static_cast<fake::Object*>(m);
    std::lock_guard<std::mutex> g(fake::g_mu);
    if (auto it = mod->functions.find(name); it != mod->functions.end()) {
        *f = it->second;
        return OK;
    }
    for (const auto& k : fake::TABLE) {
        if (strcmp(k.name, name) == 0) {
            const auto r = fake::g_resources.find(name);
            const int st = r == fake::g_resources.end() ? 0 : r->second.static_smem;
            auto* fn = new fake::Function{&k, std::max(0, fake::DEFAULT_DYNAMIC_SMEM - st)};
            mod->functions[name] = fn;
            *f = fn;
            return OK;
        }
    }
    return ERR_NOT_FOUND;
}
CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
    if (!f) return ERR_INVALID_VALUE;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        const int st = fake::resources_of(f->kernel->name).static_smem;
        if (value < 0 || value > fake::MAX_SMEM_PER_BLOCK - st) {
            fprintf(stderr, "cuFuncSetAttribute(%s): %d bytes of dynamic shared memory exceed the %d bytes sm_90 allows\n",
                    f->kernel->name, value, fake::MAX_SMEM_PER_BLOCK - st);
            return ERR_INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    if (!f) return ERR_INVALID_VALUE;
    const fake::Resources r = fake::resources_of(f->kernel->name);
    switch (attr) {
        case 0: *v = 1024; break;  // max threads per block
        case 1: *v = r.static_smem; break;
        case 4: *v = std::max(r.regs, 0); break;
        case 8: *v = f->max_dynamic_smem; break;
        default: *v = 0;
    }
    return OK;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return OK; }

namespace fake {
// Why a launch is refused (nullptr: it is not), and the code for it.
const char* refusal(const Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    unsigned smem, int* code) {
    *code = ERR_INVALID_VALUE;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0) return "an empty grid or block";
    if (gx > 2147483647u) return "gridDim.x above 2^31 - 1";
    if (gy > 65535 || gz > 65535) return "gridDim.y or gridDim.z above 65,535";
    if (bx > 1024 || by > 1024 || bz > 64 || threads > 1024) return "more than 1024 threads a block";
    if ((int)smem > f->max_dynamic_smem)
        return "more dynamic shared memory than CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES allows (48 KB "
               "less the static size unless raised, at most 227 KB)";
    const Resources r = resources_of(f->kernel->name);
    if (r.regs > 0) {
        // Registers are allocated per warp in units of 256.
        const unsigned long long per_warp = ((unsigned long long)r.regs * 32 + 255) / 256 * 256;
        if ((threads + 31) / 32 * per_warp > (unsigned long long)REGS_PER_BLOCK) {
            *code = ERR_LAUNCH_OUT_OF_RESOURCES;
            return "more than 65,536 registers a block";
        }
    }
    if (by != 1 || bz != 1) {
        *code = ERR_NOT_SUPPORTED;
        return "a block of more than one dimension (the emulation runs x only)";
    }
    return nullptr;
}
}  // namespace fake

namespace fake {
int run_kernel(const Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void** params);
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream stream, void** params, void** extra) {
    if (!f || extra != nullptr) return ERR_INVALID_VALUE;
    fake::count(fake::LAUNCH);
    int code = OK;
    if (const char* why = fake::refusal(f, gx, gy, gz, bx, by, bz, smem, &code)) {
        const fake::Resources r = fake::resources_of(f->kernel->name);
        fprintf(stderr, "cuLaunchKernel(%s, grid (%u,%u,%u), block (%u,%u,%u), %u bytes dynamic shared, %d registers): %s\n",
                f->kernel->name, gx, gy, gz, bx, by, bz, smem, r.regs, why);
        return code;
    }
    if (fake::Capture* c = fake::capturing(stream)) {
        // The parameters are copied now, as the driver copies them into
        // the kernel node: later changes to the caller's variables do not
        // reach the replay.
        std::vector<size_t> sizes;
        f->kernel->sizes(sizes);
        fake::Node node{fake::Node::KERNEL};
        node.f = f;
        node.grid[0] = gx, node.grid[1] = gy, node.grid[2] = gz;
        node.block[0] = bx, node.block[1] = by, node.block[2] = bz;
        node.smem = smem;
        for (size_t i = 0; i < sizes.size(); i++) {
            const char* a = static_cast<const char*>(params[i]);
            node.params.emplace_back(a, a + sizes[i]);
        }
        fake::record(c, std::move(node));
        return OK;
    }
    return fake::run_kernel(f, gx, gy, gz, bx, smem, params);
}

namespace fake {
int run_kernel(const Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void** params) {
    // One launch at a time: the emulation's fibers, barriers and __shared__
    // statics are process-wide (test threads launch concurrently).
    static std::mutex launch_mu;
    std::lock_guard<std::mutex> g(launch_mu);
    const fake::Kernel* k = f->kernel;
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = emu::launch_checked(Dim3{gx, gy, gz}, bx, smem, k->name, [&] { k->call(params); });
    fake::profile_add(k->name, std::chrono::steady_clock::now() - t0, (unsigned long long)gx * gy * gz * bx);
    if (rc == ERR_ILLEGAL_ADDRESS) {
        fake::g_pending.store(rc);
        return OK;
    }
    return rc;
}

Graph::~Graph() {
    std::lock_guard<std::mutex> g(g_mu);
    for (void* p : owned) {
        auto it = g_allocs.find((uintptr_t)p);
        if (it != g_allocs.end()) {
            g_allocated -= it->second;
            g_allocs.erase(it);
        }
        g_graph_owned.erase((uintptr_t)p);
        free(p);
    }
}

// A graph's executable: the recorded nodes, run in order.
struct Exec {
    std::shared_ptr<Graph> graph;
};
}  // namespace fake

// Records `run(ctx)` as a node of the calling thread's capture and returns
// 1 (the graph then owns ctx and releases it with `release`), or returns 0
// when no capture is on (the caller runs it now). The emulated cuBLAS
// records its products through it.
int ahaEmuCaptureHook(int (*run)(void*), void* ctx, void (*release)(void*)) {
    fake::Capture* c = fake::t_capture;
    if (c == nullptr) return 0;
    fake::Node node{fake::Node::HOST};
    node.run = run;
    node.ctx = std::shared_ptr<void>(ctx, release);
    fake::record(c, std::move(node));
    return 1;
}

typedef void* CUgraph;
typedef void* CUgraphExec;

CUresult cuStreamBeginCapture_v2(CUstream s, int) {
    if (fake::t_capture != nullptr) return ERR_INVALID_VALUE;
    fake::t_capture = new fake::Capture{s, std::make_shared<fake::Graph>(), false};
    return OK;
}
CUresult cuStreamEndCapture(CUstream s, CUgraph* out) {
    fake::Capture* c = fake::t_capture;
    *out = nullptr;
    if (c == nullptr || c->stream != s) return ERR_INVALID_VALUE;
    fake::t_capture = nullptr;
    if (c->invalid) {
        delete c;
        return 901;  // CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    }
    *out = new std::shared_ptr<fake::Graph>(c->graph);
    delete c;
    return OK;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
    if (graph == nullptr) return ERR_INVALID_VALUE;
    *exec = new fake::Exec{*static_cast<std::shared_ptr<fake::Graph>*>(graph)};
    return OK;
}
CUresult cuGraphUpload(CUgraphExec, CUstream) { return OK; }
CUresult cuGraphExecDestroy(CUgraphExec exec) {
    delete static_cast<fake::Exec*>(exec);
    return OK;
}
CUresult cuGraphDestroy(CUgraph graph) {
    delete static_cast<std::shared_ptr<fake::Graph>*>(graph);
    return OK;
}
CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    if (exec == nullptr) return ERR_INVALID_VALUE;
    if (fake::capturing(s) != nullptr) return fake::forbid("launching a graph into a capture");
    fake::count(fake::GRAPH_LAUNCH);
    for (const fake::Node& n : static_cast<fake::Exec*>(exec)->graph->nodes) {
        switch (n.kind) {
            case fake::Node::KERNEL: {
                std::vector<void*> p;
                for (const auto& a : n.params) p.push_back(const_cast<char*>(a.data()));
                const int rc = fake::run_kernel(n.f, n.grid[0], n.grid[1], n.grid[2], n.block[0], n.smem, p.data());
                if (rc != OK) return rc;
                break;
            }
            case fake::Node::MEMSET:
                if (n.n) memset((void*)n.dst, n.value, n.n);
                break;
            case fake::Node::COPY:
                if (n.n) memmove((void*)n.dst, (const void*)n.src, n.n);
                break;
            case fake::Node::HOST:
                if (const int rc = n.run(n.ctx.get())) return rc;
                break;
        }
    }
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case ERR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case ERR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case ERR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case ERR_ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case ERR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        default: *s = "CUDA_ERROR_NOT_SUPPORTED";
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

}  // extern "C"
