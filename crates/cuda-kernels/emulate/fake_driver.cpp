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

#include "cuda_shim.h"

#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

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

struct Kernel {
    const char* name;
    void (*call)(void**);
};

#define AHA_KERNEL(name) Kernel{#name, [](void** p) { invoke(&name, p); }},
const Kernel TABLE[] = {
#include "kernel_table.inc"
};
#undef AHA_KERNEL

struct Object {
    int kind;  // 1 context, 2 stream, 3 event, 4 module
};
Object g_context{1};

std::mutex g_mu;
std::map<uintptr_t, size_t> g_allocs;
size_t g_allocated = 0;
constexpr size_t TOTAL_MEMORY = size_t(64) << 30;

}  // namespace fake

extern "C" {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef const fake::Kernel* CUfunction;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_FOUND = 500,
    ERR_NOT_SUPPORTED = 801,
};

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
        case 115: *v = 0; break;               // memory pools: no
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
CUresult cuCtxSynchronize() { return OK; }
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
CUresult cuStreamSynchronize(CUstream) { return OK; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return OK; }
CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = 0;
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
CUresult cuEventSynchronize(CUevent) { return OK; }
CUresult cuEventQuery(CUevent) { return OK; }
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    *ms = 0.0f;
    return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
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
    std::lock_guard<std::mutex> g(fake::g_mu);
    auto it = fake::g_allocs.find((uintptr_t)p);
    if (it == fake::g_allocs.end()) return ERR_INVALID_VALUE;
    fake::g_allocated -= it->second;
    fake::g_allocs.erase(it);
    free((void*)(uintptr_t)p);
    return OK;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(fake::g_mu);
    *free_bytes = fake::TOTAL_MEMORY - fake::g_allocated;
    *total = fake::TOTAL_MEMORY;
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (n) memcpy((void*)(uintptr_t)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (n) memcpy(dst, (const void*)(uintptr_t)src, n);
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n) memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) { return cuMemcpyHtoD_v2(dst, src, n); }
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpyDtoD_v2(dst, src, n); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (n) memset((void*)(uintptr_t)dst, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(dst, v, n); }

CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = new fake::Object{4};
    return OK;
}
CUresult cuModuleUnload(CUmodule m) {
    delete static_cast<fake::Object*>(m);
    return OK;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    for (const auto& k : fake::TABLE) {
        if (strcmp(k.name, name) == 0) {
            *f = &k;
            return OK;
        }
    }
    return ERR_NOT_FOUND;
}
CUresult cuFuncSetAttribute(CUfunction, int, int) { return OK; }
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction) {
    *v = attr == 0 ? 1024 : 0;  // max threads per block; sizes 0
    return OK;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return OK; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
    if (!f || by != 1 || bz != 1 || bx == 0 || bx > emu::MAX_THREADS || extra != nullptr) return ERR_INVALID_VALUE;
    if (smem > sizeof(emu::g_dyn_smem)) return ERR_INVALID_VALUE;
    if ((unsigned long long)gx * gy * gz == 0) return ERR_INVALID_VALUE;
    // One launch at a time: the emulation's fibers, barriers and __shared__
    // statics are process-wide (test threads launch concurrently).
    static std::mutex launch_mu;
    std::lock_guard<std::mutex> g(launch_mu);
    emu::launch(Dim3{gx, gy, gz}, bx, [&] { f->call(params); });
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case ERR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case ERR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case ERR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        default: *s = "CUDA_ERROR_NOT_SUPPORTED";
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

}  // extern "C"
