// Element-wise add and scale, f32 (residual stream, gradient accumulation,
// gradient clipping).
//
// Math:
//   add_f32:         out = a + b
//   add_inplace_f32: acc += x
//   scale_f32:       x *= s   (in place: clipping scales the gradient buffer
//                             by max_norm / (norm + 1e-6))
// Shapes: every buffer [n].
// Launch: one thread per element, block = 256, grid = ceil(n / 256) capped at
//   65536 with a grid-stride loop (64-bit indices).
// CPU twins: aha_tensor::cpu::add, add_inplace, scale (with out = a; the
//   multiply of aha_tensor::cpu::clip_grad_norm).

#define AHA_GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void add_f32(
    float* __restrict__ out,
    const float* __restrict__ a,
    const float* __restrict__ b,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        out[i] = a[i] + b[i];
    }
}

extern "C" __global__ void add_inplace_f32(
    float* __restrict__ acc,
    const float* __restrict__ x,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        acc[i] += x[i];
    }
}

extern "C" __global__ void scale_f32(
    float* __restrict__ x,
    float s,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        x[i] *= s;
    }
}
