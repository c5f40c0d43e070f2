// RMSNorm forward, f32.
//
// Math (per row r of C channels, eps > 0):
//   rstd[r]   = 1 / sqrt(mean_c(inp[r, c]^2) + eps)
//   out[r, c] = inp[r, c] * rstd[r] * weight[c]
// Shapes: out [R, C], rstd [R], inp [R, C], weight [C]. All contiguous, f32.
// Launch: one block per row (grid = R), block = 256 threads (any multiple of
//   32 up to 1024 works); each thread strides over the row, the sum of squares
//   is reduced with warp shuffles and then across warps in shared memory.
// CPU twin: aha_tensor::cpu::rmsnorm_forward.

#include "common.cuh"

extern "C" __global__ void rmsnorm_forward_f32(
    float* __restrict__ out,
    float* __restrict__ rstd,
    const float* __restrict__ inp,
    const float* __restrict__ weight,
    int rows,
    int c,
    float eps)
{
    __shared__ float partial[1024 / AHA_WARP];
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float* x = inp + (size_t)r * c;
    float* y = out + (size_t)r * c;

    float ss = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = x[i];
        ss += v * v;
    }
    ss = aha_warp_sum(ss);
    const int lane = threadIdx.x % AHA_WARP;
    const int warp = threadIdx.x / AHA_WARP;
    if (lane == 0) {
        partial[warp] = ss;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + AHA_WARP - 1) / AHA_WARP;
        float t = lane < nwarps ? partial[lane] : 0.0f;
        t = aha_warp_sum(t);
        if (lane == 0) {
            partial[0] = t;
        }
    }
    __syncthreads();
    const float s = rsqrtf(partial[0] / (float)c + eps);
    if (threadIdx.x == 0) {
        rstd[r] = s;
    }
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        y[i] = x[i] * s * weight[i];
    }
}

// Block-wide sum for any blockDim.x that is a multiple of 32 (<= 1024).
// `scratch` holds 33 floats. Starts with a barrier so that it can be called in
// a loop: no thread still reads the previous result when it is overwritten.
__device__ __forceinline__ float aha_block_sum(float v, float* scratch) {
    __syncthreads();
    v = aha_warp_sum(v);
    const int lane = threadIdx.x % AHA_WARP;
    const int warp = threadIdx.x / AHA_WARP;
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + AHA_WARP - 1) / AHA_WARP;
        float t = lane < nwarps ? scratch[lane] : 0.0f;
        t = aha_warp_sum(t);
        if (lane == 0) {
            scratch[32] = t;
        }
    }
    __syncthreads();
    return scratch[32];
}

// RMSNorm backward, pass 1 of 2, f32.
//
// Math (per row r, with xhat = inp * rstd[r], g = dout):
//   dot[r]     = mean_c(g[r, c] * weight[c] * xhat[r, c])
//   dinp[r, c] = rstd[r] * (g[r, c] * weight[c] - xhat[r, c] * dot[r])   (assigned)
//   dweight[c] += sum_r g[r, c] * xhat[r, c]                              (accumulated, pass 2)
// Shapes: dinp [R, C], partial [G, C] (scratch), dout [R, C], inp [R, C],
//   weight [C], rstd [R] (saved by rmsnorm_forward_f32). Contiguous f32.
// Launch: grid = G = min(R, 1024) blocks, block = 256 threads, dynamic shared
//   memory = C floats (the launcher caps C at 12032 so that it fits the 48 KiB
//   available without opt-in). Block b takes rows b, b + G, b + 2G, ... and
//   sums its rows' g * xhat per channel in shared memory (each channel is
//   owned by one thread, so no atomics), then writes partial[b, :].
// Why two passes and not atomicAdd on dweight: the result is then
//   deterministic (fixed summation order for a given R), which the bit-identical
//   rerun tests of the trainer rely on; the scratch costs G * C * 8 bytes of
//   extra traffic, a few percent of the 3 * R * C * 4 of the pass itself.
// CPU twin: aha_tensor::cpu::rmsnorm_backward.
extern "C" __global__ void rmsnorm_backward_f32(
    float* __restrict__ dinp,
    float* __restrict__ partial,
    const float* __restrict__ dout,
    const float* __restrict__ inp,
    const float* __restrict__ weight,
    const float* __restrict__ rstd,
    int rows,
    int c)
{
    AHA_DYNAMIC_SHARED(float, dw);
    __shared__ float red[33];
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        dw[i] = 0.0f;
    }
    const float inv_c = 1.0f / (float)c;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* x = inp + (size_t)r * c;
        const float* g = dout + (size_t)r * c;
        float* dx = dinp + (size_t)r * c;
        const float s = rstd[r];
        float d = 0.0f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            d += g[i] * weight[i] * x[i];
        }
        const float dot = aha_block_sum(d, red) * s * inv_c;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            const float xhat = x[i] * s;
            const float gi = g[i];
            dx[i] = s * (gi * weight[i] - xhat * dot);
            dw[i] += gi * xhat;
        }
    }
    float* p = partial + (size_t)blockIdx.x * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        p[i] = dw[i];
    }
}

// RMSNorm backward, pass 2 of 2: dweight[c] += sum_g partial[g, c], summed in
// block order g = 0, 1, ..., G-1 (deterministic).
// Shapes: dweight [C], partial [G, C].
// Launch: one thread per channel, block = 256, grid = ceil(C / 256); reads of
//   partial are coalesced across the threads of a warp.
// CPU twin: the final `dweight += partials` loop of aha_tensor::cpu::rmsnorm_backward.
extern "C" __global__ void rmsnorm_dweight_reduce_f32(
    float* __restrict__ dweight,
    const float* __restrict__ partial,
    int g,
    int c)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) {
        return;
    }
    float acc = 0.0f;
    for (int b = 0; b < g; ++b) {
        acc += partial[(size_t)b * c + i];
    }
    dweight[i] += acc;
}
