// SiLU and SwiGLU, forward and backward, f32. Element-wise over n elements.
//
// Math (s = sigmoid(x) = 1 / (1 + exp(-x))):
//   silu_forward_f32:    out = x * s
//   silu_backward_f32:   dx = dout * (s + x * s * (1 - s))                (assigned)
//   swiglu_forward_f32:  out = silu(gate) * up
//   swiglu_backward_f32: dgate = dout * up * (s + gate * s * (1 - s)),
//                        dup = dout * gate * s                            (assigned)
//                        with s = sigmoid(gate)
// Shapes: every buffer [n] (for SwiGLU, n = N * F: tokens times MLP width).
// Launch: one thread per element, block = 256, grid = ceil(n / 256) capped at
//   65536 with a grid-stride loop (64-bit indices).
// exp is __expf under --use_fast_math (2 ulp + range error near overflow);
//   sigmoid(-100) = 1 / (1 + inf) = 0 still, as on the CPU.
// CPU twins: aha_tensor::cpu::silu, silu_backward, swiglu, swiglu_backward.

__device__ __forceinline__ float aha_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}

#include "common.cuh"

extern "C" __global__ void silu_forward_f32(
    float* __restrict__ out,
    const float* __restrict__ x,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        const float v = x[i];
        out[i] = v * aha_sigmoid(v);
    }
}

extern "C" __global__ void silu_backward_f32(
    float* __restrict__ dx,
    const float* __restrict__ dout,
    const float* __restrict__ x,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        const float v = x[i];
        const float s = aha_sigmoid(v);
        dx[i] = dout[i] * (s + v * s * (1.0f - s));
    }
}

extern "C" __global__ void swiglu_forward_f32(
    float* __restrict__ out,
    const float* __restrict__ gate,
    const float* __restrict__ up,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        const float g = gate[i];
        out[i] = g * aha_sigmoid(g) * up[i];
    }
}

extern "C" __global__ void swiglu_backward_f32(
    float* __restrict__ dgate,
    float* __restrict__ dup,
    const float* __restrict__ dout,
    const float* __restrict__ gate,
    const float* __restrict__ up,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        const float g = gate[i];
        const float d = dout[i];
        const float s = aha_sigmoid(g);
        dup[i] = d * g * s;
        dgate[i] = d * up[i] * (s + g * s * (1.0f - s));
    }
}
