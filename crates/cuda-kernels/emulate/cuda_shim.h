// The CUDA surface aha's kernels use, on the CPU, so that a kernels/*.cu file
// can be compiled by g++ and run as written on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack;
// blocks run one after another. __syncthreads is a barrier over the block's
// threads, __syncwarp one over the warp's; the shuffles and ballots exchange
// through per-warp slots between two warp barriers. __shared__ variables are
// function statics (one block lives at a time) in their own linker section,
// dynamic shared memory is one static arena. Atomics are plain
// read-modify-writes (fibers switch only at barriers). The fast-math
// intrinsics are the exact libm functions.
//
// Thread order (AHA_EMU_ORDER): between barriers a block's threads run one
// after another, in ascending id (`forward`, the default), descending
// (`reverse`) or a seeded shuffle drawn again at every barrier
// (`random:SEED`). A barrier missing between a write to shared memory and a
// read of another thread's element shows up in one of the orders as a wrong
// result, whichever thread the read targets.
//
// Shared memory starts each block as 0xFF bytes (a NaN in every float
// width, 0xffffffff in every unsigned), static and dynamic alike, so a read
// of an element no thread of the block wrote is visible. The dynamic arena
// is followed by a guard of GUARD_BYTES, also 0xFF: a write into it fails
// the launch, naming the kernel; a read from it yields the NaN poison.
//
// What this checks: indexing, bounds, masking, tie breaking, scans, the
// placement of barriers (a barrier some threads of a block skip is reported
// and exits 2), reads of unwritten shared memory, dynamic shared memory
// overruns, and the arithmetic. What it does not: the memory model, races
// between blocks, register limits, timing.
//
// Use: #include "cuda_shim.h", then the .cu file, then
//   emu::launch({gx, gy, gz}, threads, [&] { kernel(args...); });
// or emu::launch_checked(...) with the dynamic size and the kernel's name,
// which returns an error code instead of exiting.

#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// Built with AddressSanitizer (AHA_EMU_SANITIZE=1), every fiber switch is
// announced to ASan, and a fiber's stack is unpoisoned before it is reused,
// so that switching stacks raises no false reports.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define AHA_EMU_ASAN 1
#endif

using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

#define __global__
#define __device__
#define __host__
// Internal linkage, so that a helper's static __shared__ (optim.cu's block
// sum) is an ordinary static in the shared section, not a COMDAT one.
#define __forceinline__ static inline
#define __restrict__
// GCC honours the section for statics of ordinary functions (every kernel
// is extern "C"); a static __shared__ inside a template would land in a
// COMDAT section instead and escape the poisoning.
#define __shared__ static __attribute__((section("aha_shared")))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Kernel files test this to call the emulated tensor-core product below.
#define AHA_EMULATE 1

namespace emu {

constexpr unsigned MAX_THREADS = 1024;
constexpr size_t STACK_BYTES = 256 * 1024;

struct Fiber {
    void* sp = nullptr;  // saved stack pointer (x86-64 switch)
    ucontext_t ctx;      // saved context (portable switch)
    unsigned tid = 0;
    bool done = true;
    std::vector<char> stack;
    void* fake_stack = nullptr;  // ASan's fake stack while switched out
};
struct Barrier {
    int count = 0, gen = 0, n = 0;
};

inline ucontext_t g_sched;
inline void* g_sched_sp = nullptr;
inline Fiber* g_cur = nullptr;
// The scheduler's stack, as ASan reports it at the first switch into a fiber.
inline const void* g_sched_bottom = nullptr;
inline size_t g_sched_size = 0;
inline void* g_sched_fake = nullptr;
inline Dim3 g_block_idx, g_block_dim, g_grid_dim;
inline Barrier g_block_bar;
inline Barrier g_warp_bar[MAX_THREADS / 32];
inline uint64_t g_slots[MAX_THREADS];
// The sm_90 opt-in maximum of dynamic shared memory per block, and the
// guard after the requested bytes.
constexpr size_t MAX_DYN_SMEM = 227 * 1024;
constexpr size_t GUARD_BYTES = 4096;
constexpr unsigned char POISON = 0xFF;
alignas(16) inline unsigned char g_dyn_smem[MAX_DYN_SMEM + GUARD_BYTES];
inline std::function<void()> g_body;

#if defined(__x86_64__)
// A fiber switch without a system call (swapcontext saves the signal mask
// with one per switch, which made the emulation ~10x slower): push the
// callee-saved registers, swap stack pointers, pop, return.
extern "C" void aha_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl aha_emu_switch
    .type aha_emu_switch, @function
aha_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size aha_emu_switch, .-aha_emu_switch
)");
constexpr bool FAST_SWITCH = true;
#else
inline void aha_emu_switch(void**, void*) {}
constexpr bool FAST_SWITCH = false;
#endif

inline void yield() {
#if defined(AHA_EMU_ASAN)
    Fiber* me = g_cur;
    // A finished fiber is never resumed: its fake stack may go.
    __sanitizer_start_switch_fiber(me->done ? nullptr : &me->fake_stack, g_sched_bottom, g_sched_size);
#endif
    if (FAST_SWITCH) {
        aha_emu_switch(&g_cur->sp, g_sched_sp);
    } else {
        swapcontext(&g_cur->ctx, &g_sched);
    }
#if defined(AHA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(me->fake_stack, &g_sched_bottom, &g_sched_size);
#endif
}

inline void wait(Barrier& b) {
    const int g = b.gen;
    if (++b.count == b.n) {
        b.count = 0;
        b.gen++;
    } else {
        while (b.gen == g) yield();
    }
}

inline unsigned warp_size_of(unsigned t) {
    const unsigned w0 = t / 32 * 32;
    return std::min(32u, g_block_dim.x * g_block_dim.y * g_block_dim.z - w0);
}

// Exchanges a 64-bit payload within the warp: each lane publishes `v`, then
// reads lane `src`'s.
inline uint64_t exchange(uint64_t v, unsigned src) {
    const unsigned t = g_cur->tid, w = t / 32;
    g_slots[t] = v;
    wait(g_warp_bar[w]);
    const uint64_t r = g_slots[w * 32 + (src & 31)];
    wait(g_warp_bar[w]);
    return r;
}

template <class T>
inline T shfl(T v, unsigned src) {
    static_assert(sizeof(T) <= 8, "shuffle payload");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    u = exchange(u, src);
    T r;
    memcpy(&r, &u, sizeof(T));
    return r;
}

[[noreturn]] inline void fiber_entry() {
#if defined(AHA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
    g_body();
    g_cur->done = true;
    for (;;) yield();  // never resumed once done
}

// Prepares fiber f to start in fiber_entry on its own stack.
inline void start(Fiber& f) {
#if defined(AHA_EMU_ASAN)
    // The frames of the fiber's previous run were abandoned, not returned
    // from: clear their redzones.
    __asan_unpoison_memory_region(f.stack.data(), f.stack.size());
#endif
    if (FAST_SWITCH) {
        // The stack as aha_emu_switch leaves it: six saved registers, then
        // the return address; after `ret`, rsp % 16 == 8 as after a call.
        uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size());
        top &= ~uintptr_t(15);
        void** sp = reinterpret_cast<void**>(top) - 2;  // ret addr at 16k - 16: rsp after ret = 16k - 8
        sp[0] = reinterpret_cast<void*>(&fiber_entry);
        sp[1] = nullptr;
        sp -= 6;
        for (int i = 0; i < 6; i++) sp[i] = nullptr;
        f.sp = sp;
    } else {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_entry, 0);
    }
}

inline void resume(Fiber& f) {
    g_cur = &f;
#if defined(AHA_EMU_ASAN)
    __sanitizer_start_switch_fiber(&g_sched_fake, f.stack.data(), f.stack.size());
#endif
    if (FAST_SWITCH) {
        aha_emu_switch(&g_sched_sp, f.sp);
    } else {
        swapcontext(&g_sched, &f.ctx);
    }
#if defined(AHA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
}

// The order threads run in between barriers, from AHA_EMU_ORDER.
struct Order {
    int kind = 0;  // 0 forward, 1 reverse, 2 random
    uint64_t seed = 0;
};
inline Order order_from_env() {
    Order o;
    const char* v = getenv("AHA_EMU_ORDER");
    if (v == nullptr || *v == '\0' || strcmp(v, "forward") == 0) return o;
    if (strcmp(v, "reverse") == 0) {
        o.kind = 1;
    } else if (strncmp(v, "random:", 7) == 0 && v[7] != '\0') {
        char* end = nullptr;
        o.kind = 2;
        o.seed = strtoull(v + 7, &end, 10);
        if (*end != '\0') o.kind = -1;
    } else {
        o.kind = -1;
    }
    if (o.kind < 0) {
        fprintf(stderr, "AHA_EMU_ORDER=%s: expected forward, reverse or random:SEED\n", v);
        exit(2);
    }
    return o;
}
inline const Order& order() {
    static const Order o = order_from_env();
    return o;
}
inline uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

}  // namespace emu

// The bounds of the static __shared__ section (weak: a program without one
// sees null).
extern "C" unsigned char __start_aha_shared[] __attribute__((weak));
extern "C" unsigned char __stop_aha_shared[] __attribute__((weak));

namespace emu {

// Fills the block's shared memory with the poison: every static __shared__
// variable and `dyn` bytes of the dynamic arena plus the guard.
inline void poison_shared(size_t dyn) {
    if (__start_aha_shared != nullptr && __stop_aha_shared > __start_aha_shared)
        memset(__start_aha_shared, POISON, (size_t)(__stop_aha_shared - __start_aha_shared));
    memset(g_dyn_smem, POISON, std::min(dyn + GUARD_BYTES, sizeof(g_dyn_smem)));
}

// Launches counted, so that the random order differs between launches.
inline uint64_t g_launches = 0;

// Runs `body` as every thread of every block of `grid`, `threads` threads a
// block (x only), with `dyn` bytes of dynamic shared memory (SIZE_MAX: not
// known, the whole arena, no guard). Returns 0, or 1 (invalid value: a bad
// block size or dynamic size) or 700 (illegal address: the guard after the
// dynamic shared memory was written) after printing what happened, naming
// `name`. A divergent barrier still exits 2: the fibers cannot be unwound.
inline int launch_checked(Dim3 grid, unsigned threads, size_t dyn, const char* name,
                          const std::function<void()>& body) {
    if (threads == 0 || threads > MAX_THREADS) {
        fprintf(stderr, "%s: %u threads per block\n", name, threads);
        return 1;
    }
    const bool guarded = dyn != SIZE_MAX;
    if (!guarded) dyn = MAX_DYN_SMEM;
    if (dyn > MAX_DYN_SMEM) {
        fprintf(stderr, "%s: %zu bytes of dynamic shared memory\n", name, dyn);
        return 1;
    }
    g_body = body;
    g_grid_dim = grid;
    g_block_dim = Dim3{threads, 1, 1};
    static std::vector<Fiber> fibers(MAX_THREADS);
    std::vector<unsigned> ord(threads);
    const Order& o = order();
    uint64_t rng = o.seed ^ (0x5851f42d4c957f2dull * ++g_launches);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g_block_idx = Dim3{x, y, z};
                g_block_bar = Barrier{0, 0, (int)threads};
                for (unsigned w = 0; w * 32 < threads; w++) g_warp_bar[w] = Barrier{0, 0, (int)warp_size_of(w * 32)};
                poison_shared(dyn);
                for (unsigned t = 0; t < threads; t++) {
                    Fiber& f = fibers[t];
                    if (f.stack.empty()) f.stack.resize(STACK_BYTES);
                    f.tid = t;
                    f.done = false;
                    start(f);
                    ord[t] = o.kind == 1 ? threads - 1 - t : t;
                }
                for (unsigned live = threads; live > 0;) {
                    if (o.kind == 2)
                        for (unsigned i = threads - 1; i > 0; i--) std::swap(ord[i], ord[splitmix(rng) % (i + 1)]);
                    live = 0;
                    for (unsigned t : ord) {
                        Fiber& f = fibers[t];
                        if (f.done) continue;
                        resume(f);
                        live += !f.done;
                    }
                    // Threads still waiting at a barrier that finished threads
                    // will never reach: a divergent __syncthreads.
                    if (live > 0 && live < threads && g_block_bar.count == (int)live) {
                        fprintf(stderr, "%s: divergent __syncthreads in block (%u,%u,%u)\n", name, x, y, z);
                        exit(2);
                    }
                }
                if (guarded) {
                    size_t bad = 0, first = 0;
                    for (size_t i = 0; i < GUARD_BYTES && dyn + i < sizeof(g_dyn_smem); i++)
                        if (g_dyn_smem[dyn + i] != POISON && bad++ == 0) first = i;
                    if (bad > 0) {
                        fprintf(stderr,
                                "%s: block (%u,%u,%u) wrote %zu bytes past its %zu bytes of dynamic shared "
                                "memory (first at +%zu)\n",
                                name, x, y, z, bad, dyn, first);
                        return 700;
                    }
                }
            }
    return 0;
}

// launch_checked with the dynamic size unknown; exits 2 on any failure (the
// driver programs' way).
inline void launch(Dim3 grid, unsigned threads, const std::function<void()>& body, size_t dyn = SIZE_MAX,
                   const char* name = "emu::launch") {
    if (launch_checked(grid, threads, dyn, name, body) != 0) exit(2);
}

}  // namespace emu

inline Dim3 emu_thread_idx() { return Dim3{emu::g_cur->tid, 0, 0}; }
#define threadIdx (emu_thread_idx())
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

// The block's dynamic shared memory (kernels declare it through this macro).
#define AHA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::g_dyn_smem)

inline void __syncthreads() { emu::wait(emu::g_block_bar); }
namespace emu {
// A block-wide vote: every thread publishes p, then all read every slot.
inline int block_vote(int p, int mode) {
    const unsigned t = g_cur->tid, n = g_block_dim.x;
    g_slots[t] = p != 0;
    wait(g_block_bar);
    int count = 0;
    for (unsigned i = 0; i < n; i++) count += (int)g_slots[i];
    wait(g_block_bar);
    return mode == 0 ? (count > 0) : mode == 1 ? (count == (int)n) : count;
}
}  // namespace emu
inline int __syncthreads_or(int p) { return emu::block_vote(p, 0); }
inline int __syncthreads_and(int p) { return emu::block_vote(p, 1); }
inline int __syncthreads_count(int p) { return emu::block_vote(p, 2); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::g_warp_bar[emu::g_cur->tid / 32]); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
    return emu::shfl(v, (unsigned)src);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    return emu::shfl(v, (emu::g_cur->tid & 31) ^ (unsigned)o);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, int d) {
    const unsigned lane = emu::g_cur->tid & 31;
    const T r = emu::shfl(v, lane >= (unsigned)d ? lane - (unsigned)d : lane);
    return lane >= (unsigned)d ? r : v;
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, int d) {
    const unsigned lane = emu::g_cur->tid & 31;
    const T r = emu::shfl(v, std::min(lane + (unsigned)d, 31u));
    return lane + (unsigned)d < 32 ? r : v;
}
inline unsigned __ballot_sync(unsigned, int p) {
    const unsigned t = emu::g_cur->tid, w = t / 32;
    emu::g_slots[t] = p ? 1 : 0;
    emu::wait(emu::g_warp_bar[w]);
    unsigned m = 0;
    for (unsigned l = 0; l < emu::warp_size_of(t); l++) m |= (unsigned)(emu::g_slots[w * 32 + l] != 0) << l;
    emu::wait(emu::g_warp_bar[w]);
    return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

template <class T>
inline T atomicAdd(T* p, T v) {
    const T o = *p;
    *p = o + v;
    return o;
}
template <class T>
inline T atomicMin(T* p, T v) {
    const T o = *p;
    *p = std::min(o, v);
    return o;
}
template <class T>
inline T atomicMax(T* p, T v) {
    const T o = *p;
    *p = std::max(o, v);
    return o;
}

template <class To, class From>
inline To emu_bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "bit cast");
    To t;
    memcpy(&t, &f, sizeof(To));
    return t;
}
inline float __int_as_float(int i) { return emu_bits<float>(i); }
inline float __uint_as_float(unsigned i) { return emu_bits<float>(i); }
inline int __float_as_int(float f) { return emu_bits<int>(f); }
inline unsigned __float_as_uint(float f) { return emu_bits<unsigned>(f); }
inline double __longlong_as_double(long long i) { return emu_bits<double>(i); }
inline long long __double_as_longlong(double d) { return emu_bits<long long>(d); }
// The fast-math intrinsics, as inexact as the hardware's: each is computed
// the way the GPU computes it (ex2.approx of x * log2(e) rounded to float,
// lg2.approx times ln 2, the reciprocal approximation) with the approximate
// instruction's documented error applied as a deterministic offset drawn
// from the input's bits (the same input always gives the same result, so no
// test becomes flaky; a tolerance that holds here holds for errors up to the
// documented bound). Bounds, from the CUDA programming guide's intrinsic
// table: __expf 2 + floor(|1.173 x|) ulp (the 2 from ex2.approx, the rest
// from rounding x * log2(e), which this reproduces); __logf an absolute
// 2^-21.41 for x in [0.5, 2], else 3 ulp; __fdividef 2 ulp for |y| in
// [2^-126, 2^126], 0 beyond; rsqrtf 2 ulp. Kernels are compiled with
// --use_fast_math, so their expf and logf are these too (the macros at the
// end of this file). Not modelled: the fast-math division operator and
// sqrtf (2 and 1 ulp on sm_90; exact here) and the flushing of subnormals
// to zero.
namespace emu {
// An offset in [-1, 1] from the bits of the inputs and the function.
inline double fast_math_noise(float x, float y, unsigned fn) {
    uint64_t s = ((uint64_t)emu_bits<unsigned>(x) << 32 | emu_bits<unsigned>(y)) ^ ((uint64_t)fn << 56);
    return (double)(splitmix(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}
// `r` moved by up to `ulps` units in its last place, by the noise.
inline float off_by_ulps(float r, double ulps, double noise) {
    if (!std::isfinite(r)) return r;
    const long k = std::lround(noise * ulps);
    for (long i = 0; i < std::labs(k); i++) r = std::nextafter(r, k > 0 ? INFINITY : -INFINITY);
    return r;
}
}  // namespace emu
inline float __expf(float x) {
    const float t = x * 1.44269504f;  // rounded to float, as on the GPU
    return emu::off_by_ulps((float)std::exp2((double)t), 2.0, emu::fast_math_noise(x, 0.0f, 1));
}
inline float __logf(float x) {
    const double exact = std::log((double)x);
    const double noise = emu::fast_math_noise(x, 0.0f, 2);
    if (x >= 0.5f && x <= 2.0f) return (float)(exact + noise * 3.6e-7);  // 2^-21.41
    return emu::off_by_ulps((float)exact, 3.0, noise);
}
inline float __fdividef(float a, float b) {
    if (std::fabs(b) > 8.507059e37f) return a * 0.0f;  // |b| > 2^126: 0 (NaN for an infinite a)
    return emu::off_by_ulps(a / b, 2.0, emu::fast_math_noise(a, b, 3));
}
inline float rsqrtf(float x) {
    return emu::off_by_ulps((float)(1.0 / std::sqrt((double)x)), 2.0, emu::fast_math_noise(x, 0.0f, 4));
}

namespace emu {
inline unsigned g_mma_a[MAX_THREADS][4], g_mma_b[MAX_THREADS][2];
inline float bf16_bits_to_float(unsigned b) { return emu_bits<float>(b << 16); }
}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for one warp, from the
// PTX ISA's fragment layouts (g = lane / 4, t = lane % 4): A register i holds
// row g + 8 (i % 2), columns 8 (i / 2) + 2t (low half) and +1 (high half); B
// register i holds rows 8 i + 2t and +1 of column g; D element e is row
// g + 8 (e / 2), column 2t + e % 2. Every lane posts its fragments, the warp
// meets, each lane computes its four D elements, the warp meets again.
// Kernel files call it in place of their inline asm under AHA_EMULATE.
inline void aha_emu_mma_m16n8k16_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    using namespace emu;
    const unsigned tid = g_cur->tid, w = tid / 32, lane = tid % 32;
    for (int i = 0; i < 4; i++) g_mma_a[tid][i] = a[i];
    g_mma_b[tid][0] = b0;
    g_mma_b[tid][1] = b1;
    wait(g_warp_bar[w]);
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; L++) {
        const int lg = L >> 2, lt = L & 3;
        for (int i = 0; i < 4; i++) {
            const unsigned x = g_mma_a[w * 32 + L][i];
            const int r = lg + 8 * (i % 2), c = 8 * (i / 2) + 2 * lt;
            A[r][c] = bf16_bits_to_float(x & 0xffffu);
            A[r][c + 1] = bf16_bits_to_float(x >> 16);
        }
        for (int i = 0; i < 2; i++) {
            const unsigned x = g_mma_b[w * 32 + L][i];
            B[8 * i + 2 * lt][lg] = bf16_bits_to_float(x & 0xffffu);
            B[8 * i + 2 * lt + 1][lg] = bf16_bits_to_float(x >> 16);
        }
    }
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; e++) {
        const int r = g + 8 * (e / 2), c = 2 * t + e % 2;
        float acc = 0.0f;
        for (int kk = 0; kk < 16; kk++) acc += A[r][kk] * B[kk][c];
        d[e] += acc;
    }
    wait(g_warp_bar[w]);
}

// --use_fast_math turns the kernels' expf and logf into the intrinsics.
#define expf(x) __expf(x)
#define logf(x) __logf(x)
