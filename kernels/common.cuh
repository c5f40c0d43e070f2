// What the kernel files share: warp reductions, bf16 <-> f32 bit
// conversions, the m16n8k16 tensor-core fragment product, the dynamic
// shared-memory declaration and the grid-stride loop.
//
// Included as "common.cuh": NVRTC gets it as an embedded header
// (aha_cuda_kernels::registry::HEADERS, passed to nvrtcCreateProgram), the
// CPU emulation (aha_cuda_kernels::emulate) writes it beside the kernel
// files. Everything here is __forceinline__ (or a macro), so a kernel
// compiles to the same code as when each file carried its own copy.
// No <cuda_bf16.h>: the bit manipulation is a few lines and keeps every file
// compiling where NVRTC finds no CUDA headers (a driver-only machine).

#ifndef AHA_COMMON_CUH
#define AHA_COMMON_CUH

#define AHA_WARP 32

// The block's dynamic shared memory as a T array (the CPU emulation,
// aha_cuda_kernels::emulate, supplies its own definition of the macro).
#ifndef AHA_DYNAMIC_SHARED
#define AHA_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// for (i = global thread id; i < n; i += threads in the grid), 64-bit
// indices: element-wise kernels launched with a capped grid.
#define AHA_GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// The sum of v over the warp's 32 lanes (xor butterfly: every lane gets the
// same value, summed in the same order). All lanes must take part.
__device__ __forceinline__ float aha_warp_sum(float v) {
    for (int o = AHA_WARP / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// The maximum of v over the warp's 32 lanes (xor butterfly, fmaxf: a NaN
// lane loses to a number). All lanes must take part.
__device__ __forceinline__ float aha_warp_max(float v) {
    for (int o = AHA_WARP / 2; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// bf16 bits to f32, exact (a signalling NaN stays signalling; cast.cu's
// cast_bf16_to_f32 quiets it as the CPU twin does).
__device__ __forceinline__ float aha_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// f32 to bf16 bits, round to nearest even, NaN kept (quieted), as
// half::bf16::from_f32.
__device__ __forceinline__ unsigned short aha_f32_to_bf16(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Two consecutive bf16 values (4-byte aligned) as one 32-bit register, the
// operand form of the tensor-core fragments.
__device__ __forceinline__ unsigned aha_ld32(const unsigned short* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

// d[0..4) += A (16 x 16, bf16, row fragment a[0..4)) x B (16 x 8, bf16,
// column fragment b0, b1), f32 accumulation: one warp-wide
// mma.sync.aligned.m16n8k16 (sm_80+), fragment layouts as in the PTX ISA.
// Under AHA_EMULATE (the CPU emulation) the product is the emulation's.
__device__ __forceinline__ void aha_mma16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef AHA_EMULATE
    aha_emu_mma_m16n8k16_bf16(d, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#endif  // AHA_COMMON_CUH
