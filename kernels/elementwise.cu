// Element-wise add and scale, f32 (residual stream, gradient accumulation,
// gradient clipping).
//
// Math:
//   add_f32:         out = a + b
//   add_inplace_f32: acc += x
//   scale_f32:       x *= s   (in place: clipping scales the gradient buffer
//                             by max_norm / (norm + 1e-6))
//   mul_inplace_f32: x *= m   (element-wise: LoRA dropout's scaled mask)
// Shapes: every buffer [n].
// Launch: one thread per element, block = 256, grid = ceil(n / 256) capped at
//   65536 with a grid-stride loop (64-bit indices).
// CPU twins: aha_tensor::cpu::add, add_inplace, scale (with out = a; the
//   multiply of aha_tensor::cpu::clip_grad_norm), and for mul_inplace_f32
//   aha_tensor::cpu::mul with out = x (what aha_moe_model::lora's dropout
//   computes on the CPU); aha-tensor's tests/gpu_kernels.rs compares them.

#include "common.cuh"

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

extern "C" __global__ void mul_inplace_f32(
    float* __restrict__ x,
    const float* __restrict__ m,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        x[i] *= m[i];
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

// Strided blocks of columns: the splits and joins of the MLA layer (the
// compressed kv and the rotary key out of kv_a's output, the per-head keys
// and values out of kv_b's, the shared rotary key into every head) and their
// backward.
//
// Math, for r < rows, j < cols:
//   out[r * os + oo + j]  (=, or += when accumulate)
//       sum_{q < group} inp[((r / rep) * group + q) * is + io + j]
//   rep > 1 repeats one input row over rep consecutive output rows (a
//   broadcast); group > 1 sums group consecutive input rows into one output
//   row (the broadcast's backward). The sum runs in q order.
// Shapes: out [rows, os] with oo + cols <= os; inp [rows / rep * group, is]
//   with io + cols <= is (the launcher checks both lengths).
// Launch: one thread per output element, block = 256, grid-stride over
//   rows * cols (grid <= 65536). One writer per element, no atomics:
//   deterministic.
// CPU twin: aha_tensor::cpu::copy_cols.
extern "C" __global__ void copy_cols_f32(
    float* __restrict__ out,
    const float* __restrict__ inp,
    unsigned long long rows,
    unsigned long long cols,
    unsigned long long os,
    unsigned long long oo,
    unsigned long long is,
    unsigned long long io,
    unsigned long long rep,
    unsigned long long group,
    int accumulate)
{
    AHA_GRID_STRIDE(e, rows * cols) {
        const unsigned long long r = e / cols;
        const unsigned long long j = e - r * cols;
        const unsigned long long base = (r / rep) * group;
        float s = 0.0f;
        for (unsigned long long q = 0; q < group; ++q) {
            s += inp[(base + q) * is + io + j];
        }
        float* o = out + r * os + oo + j;
        *o = accumulate ? *o + s : s;
    }
}
