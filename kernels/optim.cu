// AdamW over one flat parameter buffer, and the global gradient norm, f32.
//
// adamw_f32 (PyTorch torch.optim.AdamW semantics, step t >= 1; the launcher
//   computes the bias-corrected scalars on the host in f64, as the CPU twin does):
//   p <- p * decay - step * m / (sqrt(v) * inv_bc2_sqrt + eps)   after
//   m <- b1 * m + ob1 * g ;  v <- b2 * v + ob2 * g^2
//   with decay = 1 - lr * wd, step = lr / (1 - beta1^t),
//   inv_bc2_sqrt = 1 / sqrt(1 - beta2^t), ob1 = 1 - beta1, ob2 = 1 - beta2.
// Shapes: params, grads, m, v [n].
// Launch: one thread per element, block = 256, grid = ceil(n / 256) capped at
//   65536 with a grid-stride loop (64-bit indices).
// CPU twin: aha_tensor::cpu::adamw_step.
//
// grad_norm_sq_f32 + grad_norm_sq_reduce_f64: sum of squares of x [n], in f64
//   (as the CPU twin aha_tensor::cpu::global_norm accumulates).
//   Pass 1: grid = G = min(ceil(n / 256), 1024) blocks of 256 threads; each
//   thread sums its grid-stride elements in f64, the block reduces with warp
//   shuffles, and block b writes partial[b].
//   Pass 2: one block of 256 threads sums partial[0..G) into out[0].
//   Two passes instead of an atomicAdd: a fixed order, so the norm is the
//   same bits on every run for a given n. The launcher reads out[0] back
//   (one 8-byte copy, which synchronises) and returns sqrt.
// CPU twin: aha_tensor::cpu::global_norm (scaling for clipping: scale_f32 in
//   elementwise.cu).

#include "common.cuh"

// One element of the update (shared by both AdamW kernels); returns the new
// parameter.
__device__ __forceinline__ float aha_adamw_one(
    float* __restrict__ params,
    float* __restrict__ m,
    float* __restrict__ v,
    const float* __restrict__ grads,
    unsigned long long i,
    float b1,
    float b2,
    float ob1,
    float ob2,
    float decay,
    float step,
    float inv_bc2_sqrt,
    float eps)
{
    const float g = grads[i];
    const float mi = b1 * m[i] + ob1 * g;
    const float vi = b2 * v[i] + ob2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const float p = params[i] * decay - step * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
    params[i] = p;
    return p;
}

extern "C" __global__ void adamw_f32(
    float* __restrict__ params,
    float* __restrict__ m,
    float* __restrict__ v,
    const float* __restrict__ grads,
    unsigned long long n,
    float b1,
    float b2,
    float ob1,
    float ob2,
    float decay,
    float step,
    float inv_bc2_sqrt,
    float eps)
{
    AHA_GRID_STRIDE(i, n) {
        aha_adamw_one(params, m, v, grads, i, b1, b2, ob1, ob2, decay, step, inv_bc2_sqrt, eps);
    }
}

// adamw_f32 that also writes the bf16 copy of each updated parameter
// (round to nearest even, NaN kept quiet: as cast_f32_to_bf16), so the copy
// the bf16 products read is refreshed by the same pass over the weights.
// Shapes: params, m, v, grads [n] f32; copy [n] bf16 bits.
// CPU twin: aha_tensor::cpu::adamw_step, then half::bf16::from_f32.
extern "C" __global__ void adamw_copy_bf16_f32(
    float* __restrict__ params,
    float* __restrict__ m,
    float* __restrict__ v,
    unsigned short* __restrict__ copy,
    const float* __restrict__ grads,
    unsigned long long n,
    float b1,
    float b2,
    float ob1,
    float ob2,
    float decay,
    float step,
    float inv_bc2_sqrt,
    float eps)
{
    AHA_GRID_STRIDE(i, n) {
        const float p = aha_adamw_one(params, m, v, grads, i, b1, b2, ob1, ob2, decay, step, inv_bc2_sqrt, eps);
        copy[i] = aha_f32_to_bf16(p);
    }
}

__device__ __forceinline__ double aha_warp_sum_f64(double v) {
    for (int o = AHA_WARP / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); valid in thread 0.
__device__ __forceinline__ double aha_block_sum_f64(double v) {
    __shared__ double partial[1024 / AHA_WARP];
    v = aha_warp_sum_f64(v);
    const int lane = threadIdx.x % AHA_WARP;
    const int warp = threadIdx.x / AHA_WARP;
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    double t = 0.0;
    if (warp == 0) {
        const int nwarps = (blockDim.x + AHA_WARP - 1) / AHA_WARP;
        t = lane < nwarps ? partial[lane] : 0.0;
        t = aha_warp_sum_f64(t);
    }
    return t;
}

extern "C" __global__ void grad_norm_sq_f32(
    double* __restrict__ partial,
    const float* __restrict__ x,
    unsigned long long n)
{
    double s = 0.0;
    AHA_GRID_STRIDE(i, n) {
        const double g = (double)x[i];
        s += g * g;
    }
    s = aha_block_sum_f64(s);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
    }
}

extern "C" __global__ void grad_norm_sq_reduce_f64(
    double* __restrict__ out,
    const double* __restrict__ partial,
    int g)
{
    double s = 0.0;
    for (int i = threadIdx.x; i < g; i += blockDim.x) {
        s += partial[i];
    }
    s = aha_block_sum_f64(s);
    if (threadIdx.x == 0) {
        out[0] = s;
    }
}
