// Casts between f32 and bf16 (bf16 carried as its 16 bits in a u16), and
// the same stores scattered by row into a paged KV cache.
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
//
// kv_write_bf16 / kv_write_f32: pool[slots[r] * w + j] = src[r * w + j]
//   (rounded to bf16 by the first), for rows r < rows and columns j < w:
//   the keys or values of a decode step's packed tokens stored into their
//   cache slots (slot = block * block_size + position % block_size) in one
//   launch, the cast fused. The launcher checks on the host that every slot
//   is inside the pool and that no two rows share one (the writes do not
//   race). Same launch shape, over rows * w elements.
//   CPU twin: aha_tensor::cpu::kv_write.

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

extern "C" __global__ void kv_write_bf16(
    unsigned short* __restrict__ pool,
    const float* __restrict__ src,
    const unsigned int* __restrict__ slots,
    unsigned long long n,
    unsigned long long w)
{
    AHA_GRID_STRIDE(i, n) {
        unsigned long long r = i / w;
        pool[(unsigned long long)slots[r] * w + (i - r * w)] = aha_f32_to_bf16(src[i]);
    }
}

extern "C" __global__ void kv_write_f32(
    float* __restrict__ pool,
    const float* __restrict__ src,
    const unsigned int* __restrict__ slots,
    unsigned long long n,
    unsigned long long w)
{
    AHA_GRID_STRIDE(i, n) {
        unsigned long long r = i / w;
        pool[(unsigned long long)slots[r] * w + (i - r * w)] = src[i];
    }
}
