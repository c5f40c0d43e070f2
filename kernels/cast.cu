// Casts between f32 and bf16 (bf16 carried as its 16 bits in a u16).
//
// Math:
//   cast_f32_to_bf16: round to nearest, ties to even, on the upper 16 bits;
//                     NaN stays NaN (quiet bit set, sign kept); overflow
//                     rounds to +-inf; subnormals are rounded like any value
//                     (bit operations only, so --use_fast_math's flush to
//                     zero does not touch them).
//   cast_bf16_to_f32: exact: the bits shifted into the upper half (a
//                     signalling NaN is quieted, as half::bf16::to_f32 does;
//                     found by running this file on the emulated GPU).
// Shapes: out, inp [n].
// Launch: one thread per element, block = 256, grid = ceil(n / 256) capped at
//   65536 with a grid-stride loop (64-bit indices).
// No <cuda_bf16.h>: the bit manipulation is a few lines and keeps the file
//   compiling where NVRTC finds no CUDA headers (a driver-only machine).
// CPU twin: half::bf16::from_f32 / to_f32 (aha_tensor::CpuStorage::to_dtype).

#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(
    unsigned short* __restrict__ out,
    const float* __restrict__ inp,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        out[i] = aha_f32_to_bf16(inp[i]);
    }
}

extern "C" __global__ void cast_bf16_to_f32(
    float* __restrict__ out,
    const unsigned short* __restrict__ inp,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        unsigned int b = inp[i];
        // A signalling NaN comes out quiet, as the CPU twin (half) makes it.
        if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu)) b |= 0x40u;
        out[i] = __uint_as_float(b << 16);
    }
}
