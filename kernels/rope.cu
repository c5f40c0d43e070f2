// Rotary position embedding, forward and backward, f32, both pair layouts and
// partial rotation (only dims rot_offset .. rot_offset + R of each head turn).
//
// Math (token t at position p = pos[t], head h, pair i < R/2 with dims (a, b)):
//   half-split  (interleaved = 0): a = rot_offset + i,  b = a + R/2
//   interleaved (interleaved = 1): a = rot_offset + 2i, b = a + 1
//   out[t, h, a] = x_a * cos[p, i] - x_b * sgn * sin[p, i]
//   out[t, h, b] = x_b * cos[p, i] + x_a * sgn * sin[p, i]
//   other dims:   out[t, h, d] = x[t, h, d]
//   sgn = +1 forward; -1 backward (dinp = the inverse rotation of dout).
// Shapes: out, inp [N, H, D]; pos [N] (u32); cos, sin [P, R/2]. Contiguous.
//   A position >= P has no table row: its rotated dims are written as NaN
//   (the launcher cannot check device-resident positions without a copy), so
//   the mistake shows instead of reading out of bounds.
// Launch: one thread per output element (N * H * D), block = 256, grid =
//   ceil(N * H * D / 256) capped at 65536 with a grid-stride loop. Each thread
//   reads its own element and its pair partner; the table rows are shared by
//   all heads of a token and stay in L1/L2.
// CPU twin: aha_tensor::cpu::rope_forward / rope_backward.

__device__ __forceinline__ void aha_rope(
    float* __restrict__ out,
    const float* __restrict__ inp,
    const float* __restrict__ cos_t,
    const float* __restrict__ sin_t,
    const unsigned int* __restrict__ pos,
    unsigned long long n,
    int width,
    int head_dim,
    int rot_offset,
    int rot_dim,
    int interleaved,
    unsigned int max_pos,
    float sgn)
{
    const int half = rot_dim / 2;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const int d = (int)(e % (unsigned long long)head_dim);
        const int j = d - rot_offset;
        if (j < 0 || j >= rot_dim) {
            out[e] = inp[e];
            continue;
        }
        const unsigned long long t = e / (unsigned long long)width;
        const unsigned int p = pos[t];
        if (p >= max_pos) {
            out[e] = __int_as_float(0x7fc00000);
            continue;
        }
        int i;
        bool is_a;
        long long partner;
        if (interleaved) {
            i = j >> 1;
            is_a = (j & 1) == 0;
            partner = is_a ? 1 : -1;
        } else {
            is_a = j < half;
            i = is_a ? j : j - half;
            partner = is_a ? half : -half;
        }
        const float co = cos_t[(size_t)p * half + i];
        const float si = sgn * sin_t[(size_t)p * half + i];
        const float x = inp[e];
        const float y = inp[(long long)e + partner];
        // a: x_a co - x_b si; b: x_b co + x_a si.
        out[e] = is_a ? x * co - y * si : x * co + y * si;
    }
}

extern "C" __global__ void rope_forward_f32(
    float* __restrict__ out,
    const float* __restrict__ inp,
    const float* __restrict__ cos_t,
    const float* __restrict__ sin_t,
    const unsigned int* __restrict__ pos,
    unsigned long long n,
    int width,
    int head_dim,
    int rot_offset,
    int rot_dim,
    int interleaved,
    unsigned int max_pos)
{
    aha_rope(out, inp, cos_t, sin_t, pos, n, width, head_dim, rot_offset, rot_dim, interleaved, max_pos, 1.0f);
}

extern "C" __global__ void rope_backward_f32(
    float* __restrict__ dinp,
    const float* __restrict__ dout,
    const float* __restrict__ cos_t,
    const float* __restrict__ sin_t,
    const unsigned int* __restrict__ pos,
    unsigned long long n,
    int width,
    int head_dim,
    int rot_offset,
    int rot_dim,
    int interleaved,
    unsigned int max_pos)
{
    aha_rope(dinp, dout, cos_t, sin_t, pos, n, width, head_dim, rot_offset, rot_dim, interleaved, max_pos, -1.0f);
}
