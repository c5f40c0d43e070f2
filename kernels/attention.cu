// Causal scaled-dot-product attention with grouped-query heads: the simple,
// correct kernels the dense models use until the flash-attention issue lands.
// CPU twins: aha_tensor::cpu::attention_forward / attention_backward.
//
// Layouts (row-major):  q, dq [B, T, H, Dk]   k, dk [B, T, Hk, Dk]
//                       v, dv [B, T, Hk, Dv]  out, dout [B, T, H, Dv]
//                       lse [B, H, T]         dsum [B, H, T]
// Query head h reads key/value head h / (H / Hk). Dk, Dv <= ATT_MAX_D.
//
// One warp per row (a query row for the forward and dQ, a key row for dK and
// dV); each lane holds ATT_PER_LANE elements of the row's vectors, dot
// products reduce with shuffles. Softmax is online (running max and sum), so
// memory is O(1) per row whatever T is; work is O(T^2 D) -- correct, not fast.
// The backward recomputes probabilities from lse and needs no atomics, so it
// is deterministic.

#include "common.cuh"

#define ATT_MAX_D 256
#define ATT_PER_LANE (ATT_MAX_D / 32)
#define ATT_WARPS 4

// Loads row `p` of width d into the lane's slots (zero past d).
__device__ __forceinline__ void att_load(float* r, const float* p, int d, int lane) {
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) {
        int c = lane + 32 * s;
        r[s] = c < d ? p[c] : 0.0f;
    }
}

__device__ __forceinline__ float att_dot(const float* a, const float* p, int d, int lane) {
    float acc = 0.0f;
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) {
        int c = lane + 32 * s;
        if (c < d) acc += a[s] * p[c];
    }
    return aha_warp_sum(acc);
}

__device__ __forceinline__ void att_store(float* p, const float* r, int d, int lane) {
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) {
        int c = lane + 32 * s;
        if (c < d) p[c] = r[s];
    }
}

// Online-softmax attention of one query row (qr, in the lane slots) over
// `count` key/value rows kv0, kv0 + step, ... of k [*, Dk] and v [*, Dv]:
// writes the normalised output into the lane slots o and returns the
// row's log-sum-exp of scaled scores.
__device__ float att_online(float* o, const float* qr, const float* __restrict__ k,
                            const float* __restrict__ v, long long kv0, long long step, int count,
                            int Dk, int Dv, float scale, int lane) {
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) o[s] = 0.0f;
    float m = -3.0e38f, l = 0.0f;
    for (int j = 0; j < count; j++) {
        const long long kv = kv0 + (long long)j * step;
        float sc = att_dot(qr, k + kv * Dk, Dk, lane) * scale;
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), p = __expf(sc - mn);
        l = l * corr + p;
        const float* vr = v + kv * Dv;
#pragma unroll
        for (int s = 0; s < ATT_PER_LANE; s++) {
            int c = lane + 32 * s;
            o[s] = o[s] * corr + (c < Dv ? p * vr[c] : 0.0f);
        }
        m = mn;
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) o[s] *= inv;
    return m + __logf(l);
}

// out and lse; one warp per (b, i, h) query row.
extern "C" __global__ void attention_forward_f32(
    float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
    const float* __restrict__ k, const float* __restrict__ v, int B, int T, int H, int Hk,
    int Dk, int Dv, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)B * T * H) return;
    const int h = (int)(row % H);
    const int i = (int)((row / H) % T);
    const int b = (int)(row / ((long long)H * T));
    const int kh = h / (H / Hk);
    float qr[ATT_PER_LANE], o[ATT_PER_LANE];
    att_load(qr, q + row * Dk, Dk, lane);
    float l = att_online(o, qr, k, v, (long long)b * T * Hk + kh, Hk, i + 1, Dk, Dv, scale, lane);
    att_store(out + row * Dv, o, Dv, lane);
    if (lane == 0) lse[((long long)b * H + h) * T + i] = l;
}

// dsum[b, h, i] = dout[b, i, h, :] . out[b, i, h, :]; one warp per row.
extern "C" __global__ void attention_dsum_f32(
    float* __restrict__ dsum, const float* __restrict__ dout, const float* __restrict__ out,
    int B, int T, int H, int Dv) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)B * T * H) return;
    const int h = (int)(row % H);
    const int i = (int)((row / H) % T);
    const int b = (int)(row / ((long long)H * T));
    float a[ATT_PER_LANE];
    att_load(a, dout + row * Dv, Dv, lane);
    float d = att_dot(a, out + row * Dv, Dv, lane);
    if (lane == 0) dsum[((long long)b * H + h) * T + i] = d;
}

// dq for one query row (b, i, h): sum over j <= i of ds_ij k_j.
extern "C" __global__ void attention_backward_dq_f32(
    float* __restrict__ dq, const float* __restrict__ dout, const float* __restrict__ q,
    const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, int B, int T, int H, int Hk, int Dk, int Dv, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)B * T * H) return;
    const int h = (int)(row % H);
    const int i = (int)((row / H) % T);
    const int b = (int)(row / ((long long)H * T));
    const int kh = h / (H / Hk);
    const long long bh = ((long long)b * H + h) * T + i;
    const float li = lse[bh], di = dsum[bh];
    float qr[ATT_PER_LANE], dor[ATT_PER_LANE], acc[ATT_PER_LANE];
    att_load(qr, q + row * Dk, Dk, lane);
    att_load(dor, dout + row * Dv, Dv, lane);
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) acc[s] = 0.0f;
    for (int j = 0; j <= i; j++) {
        const long long kv = ((long long)b * T + j) * Hk + kh;
        const float* kr = k + kv * Dk;
        float p = __expf(att_dot(qr, kr, Dk, lane) * scale - li);
        float dp = att_dot(dor, v + kv * Dv, Dv, lane);
        float ds = p * (dp - di) * scale;
#pragma unroll
        for (int s = 0; s < ATT_PER_LANE; s++) {
            int c = lane + 32 * s;
            if (c < Dk) acc[s] += ds * kr[c];
        }
    }
    att_store(dq + row * Dk, acc, Dk, lane);
}

// dk and dv for one key row (b, j, kh): sums over the query heads of the
// group and over i >= j.
extern "C" __global__ void attention_backward_dkv_f32(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ lse, const float* __restrict__ dsum, int B, int T, int H, int Hk,
    int Dk, int Dv, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)B * T * Hk) return;
    const int kh = (int)(row % Hk);
    const int j = (int)((row / Hk) % T);
    const int b = (int)(row / ((long long)Hk * T));
    const int group = H / Hk;
    float kr[ATT_PER_LANE], vr[ATT_PER_LANE], dka[ATT_PER_LANE], dva[ATT_PER_LANE];
    att_load(kr, k + row * Dk, Dk, lane);
    att_load(vr, v + row * Dv, Dv, lane);
#pragma unroll
    for (int s = 0; s < ATT_PER_LANE; s++) { dka[s] = 0.0f; dva[s] = 0.0f; }
    for (int g = 0; g < group; g++) {
        const int h = kh * group + g;
        for (int i = j; i < T; i++) {
            const long long qrow = ((long long)b * T + i) * H + h;
            const long long bh = ((long long)b * H + h) * T + i;
            const float* qp = q + qrow * Dk;
            const float* dop = dout + qrow * Dv;
            float p = __expf(att_dot(kr, qp, Dk, lane) * scale - lse[bh]);
            float dp = att_dot(vr, dop, Dv, lane);
            float ds = p * (dp - dsum[bh]) * scale;
#pragma unroll
            for (int s = 0; s < ATT_PER_LANE; s++) {
                int c = lane + 32 * s;
                if (c < Dv) dva[s] += p * dop[c];
                if (c < Dk) dka[s] += ds * qp[c];
            }
        }
    }
    att_store(dk + row * Dk, dka, Dk, lane);
    att_store(dv + row * Dv, dva, Dv, lane);
}

// Decode against a KV cache: n new query tokens of one sequence at positions
// start .. start + n attend to cached positions 0 ..= their own (the new
// tokens' keys and values are already written into the cache).
//   q, out [n, H, Dk | Dv]   kc [P, Hk, Dk]   vc [P, Hk, Dv]   (P >= start + n)
// One warp per (token, head); online softmax as in the forward.
extern "C" __global__ void attention_decode_f32(
    float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ kc,
    const float* __restrict__ vc, int start, int n, int H, int Hk, int Dk, int Dv, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (row >= (long long)n * H) return;
    const int h = (int)(row % H);
    const int i = (int)(row / H);
    const int kh = h / (H / Hk);
    float qr[ATT_PER_LANE], o[ATT_PER_LANE];
    att_load(qr, q + row * Dk, Dk, lane);
    att_online(o, qr, kc, vc, kh, Hk, start + i + 1, Dk, Dv, scale, lane);
    att_store(out + row * Dv, o, Dv, lane);
}
