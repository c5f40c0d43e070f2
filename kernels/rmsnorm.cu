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

#define AHA_WARP 32

__device__ __forceinline__ float aha_warp_sum(float v) {
    for (int o = AHA_WARP / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

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
