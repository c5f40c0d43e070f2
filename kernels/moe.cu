// Mixture-of-experts layer kernels: routing (two gating rules), the
// permutation of token rows into expert-contiguous segments, grouped bf16
// matrix products over those segments with f32 accumulation, the combine and
// the backward of all of it. Nothing here needs the per-expert counts on the
// host: every kernel reads the segment offsets (and the tile list) from the
// device, so a whole layer runs with no copy to the host.
//
// Sizes: N tokens, C hidden, E experts (<= 1024), K experts per token
// (<= 32), F expert width, M = N * K permuted rows.
// Buffers:
//   logits, probs [N, E] f32        ids [N, K] u32, w [N, K] f32, denom [N] f32
//   counts [E] u32, frac [E] f32, offsets [E + 1] u32, tile_off [E + 1] u32
//   tok, slot [M] u32 (token and slot of permuted row r), inv [N * K] u32
//   (permuted row of (token, slot)); xe, act [M, *] stored; g, u, ye [M, *]
//   f32; expert weights (PyTorch's [out, in] per expert): w_gate, w_up
//   [E, F, C], w_down [E, C, F], stored.
// "Stored" buffers (xe, act, dye, dg, du and the expert weights) are bf16 or
// f32: the kernels that read or write them are templates over the element
// type (moe_ld / moe_st below) with one extern "C" entry point per type,
// `..._bf16` and `..._f32`, sharing one body. bf16 travels as its 16 bits in
// an unsigned short; f32 -> bf16 rounds to nearest even with bit operations
// (as kernels/cast.cu, no <cuda_bf16.h>). The tensor-core (mma) kernels are
// bf16 only.
// CPU twins: aha_tensor::cpu::moe (one function per kernel, named alike).
// Determinism: no floating-point atomics anywhere; every sum has a fixed
// order, so reruns give identical bits. The only atomics are the integer
// counts in moe_count_u32.

#include "common.cuh"

#define MOE_WARP 32
#define MOE_MAX_E 1024
#define MOE_MAX_K 32
#define MOE_NEG_INF __int_as_float(0xff800000)
// Rows per tile of the grouped products; the tile list of moe_count_u32 is
// counted in these.
#define MOE_TM 64
#define MOE_TN 64
#define MOE_TK 16

// Loads and stores of a stored buffer's element i as f32: bf16 rounds to
// nearest even on store, f32 is kept as is.
__device__ __forceinline__ float moe_ld(const unsigned short* p, size_t i) {
    return aha_bf16_to_f32(p[i]);
}

__device__ __forceinline__ float moe_ld(const float* p, size_t i) {
    return p[i];
}

__device__ __forceinline__ void moe_st(unsigned short* p, size_t i, float v) {
    p[i] = aha_f32_to_bf16(v);
}

__device__ __forceinline__ void moe_st(float* p, size_t i, float v) {
    p[i] = v;
}

// NaN sorts below every number (as aha_tensor::cpu::topk).
__device__ __forceinline__ float moe_key(float v) {
    return v != v ? MOE_NEG_INF : v;
}

// The largest untaken value of v[0..n) over the warp; ties (and -inf) go to
// the lower index. Marks the winner taken and returns its index. `taken` is a
// bitmask of n bits in shared memory. Every lane returns the same index.
__device__ int moe_warp_argmax_take(const float* v, unsigned* taken, int n) {
    const int lane = threadIdx.x % MOE_WARP;
    float best = 0.0f;
    int bi = -1;
    for (int i = lane; i < n; i += MOE_WARP) {
        if ((taken[i >> 5] >> (i & 31)) & 1u) {
            continue;
        }
        const float x = moe_key(v[i]);
        if (bi < 0 || x > best) {
            best = x;
            bi = i;
        }
    }
    for (int o = MOE_WARP / 2; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        const bool better = oi >= 0 && (bi < 0 || ob > best || (ob == best && oi < bi));
        if (better) {
            best = ob;
            bi = oi;
        }
    }
    __syncwarp();
    if (lane == 0 && bi >= 0) {
        taken[bi >> 5] |= 1u << (bi & 31);
    }
    __syncwarp();
    return bi;
}

// Softmax top-k routing (Qwen3-MoE), f32.
//
// Math (per token t): probs[t] = softmax(logits[t]); ids[t, 0..K) = the K
//   largest probs, descending, ties to the lower index; w[t, j] =
//   probs[t, ids[t, j]]; when renorm: denom[t] = sum_j w[t, j] (summed in j
//   order) and w[t, j] /= denom[t], else denom[t] = 1.
// Shapes: probs, logits [N, E]; ids, w [N, K]; denom [N].
// Launch: one warp per token: grid = N, block = 32, dynamic shared memory
//   E floats (E <= 1024, K <= min(E, 32), checked by the launcher).
// CPU twin: aha_tensor::cpu::moe_route_softmax.
extern "C" __global__ void moe_route_softmax_f32(
    float* __restrict__ probs,
    unsigned* __restrict__ ids,
    float* __restrict__ w,
    float* __restrict__ denom,
    const float* __restrict__ logits,
    int n,
    int e,
    int k,
    int renorm)
{
    AHA_DYNAMIC_SHARED(float, p);
    __shared__ unsigned taken[MOE_MAX_E / 32];
    __shared__ int chosen[MOE_MAX_K];
    const int t = blockIdx.x;
    const int lane = threadIdx.x;
    if (t >= n) {
        return;
    }
    const float* x = logits + (size_t)t * e;
    float m = MOE_NEG_INF;
    for (int i = lane; i < e; i += MOE_WARP) {
        m = fmaxf(m, x[i]);
    }
    m = aha_warp_max(m);
    float s = 0.0f;
    for (int i = lane; i < e; i += MOE_WARP) {
        const float v = m == MOE_NEG_INF ? 0.0f : expf(x[i] - m);
        p[i] = v;
        s += v;
    }
    s = aha_warp_sum(s);
    const float inv = m == MOE_NEG_INF ? 0.0f : 1.0f / s;
    for (int i = lane; i < e; i += MOE_WARP) {
        const float v = p[i] * inv;
        p[i] = v;
        probs[(size_t)t * e + i] = v;
    }
    for (int i = lane; i < (e + 31) / 32; i += MOE_WARP) {
        taken[i] = 0u;
    }
    __syncwarp();
    for (int j = 0; j < k; ++j) {
        const int bi = moe_warp_argmax_take(p, taken, e);
        if (lane == 0) {
            chosen[j] = bi;
        }
    }
    __syncwarp();
    if (lane == 0) {
        float d = 1.0f;
        if (renorm) {
            d = 0.0f;
            for (int j = 0; j < k; ++j) {
                d += p[chosen[j]];
            }
        }
        for (int j = 0; j < k; ++j) {
            const int id = chosen[j];
            ids[(size_t)t * k + j] = (unsigned)id;
            w[(size_t)t * k + j] = renorm ? p[id] / d : p[id];
        }
        denom[t] = d;
    }
}

// DeepSeek-V3 routing: sigmoid scores, correction bias for the choice only,
// group-limited top-k, renormalisation and routed scaling, f32.
//
// Math (per token t, P = E / G experts per group):
//   scores[t, i] = sigmoid(logits[t, i]); choice[i] = scores[t, i] + bias[i]
//   (bias may be null: 0);
//   group score[g] = sum of the two largest choices of group g;
//   the topk_group best groups are kept (ties to the lower group), every
//   other expert's choice is set to 0 (not -inf: as the CPU layer and
//   transformers' masked_fill with 0.0);
//   ids[t] = the K largest choices, descending, ties to the lower index;
//   w[t, j] = scores[t, ids[t, j]]; when renorm: denom[t] = sum_j w + 1e-20
//   and w /= denom[t] (else denom[t] = 1); then w *= rsf.
// Shapes: scores, logits [N, E]; bias [E]; ids, w [N, K]; denom [N].
// Launch: one warp per token: grid = N, block = 32, dynamic shared memory
//   E + G floats (E <= 1024, G divides E, P >= 2, topk_group <= min(G, 32),
//   K <= min(E, 32)).
// CPU twin: aha_tensor::cpu::moe_route_sigmoid_group.
extern "C" __global__ void moe_route_sigmoid_group_f32(
    float* __restrict__ scores,
    unsigned* __restrict__ ids,
    float* __restrict__ w,
    float* __restrict__ denom,
    const float* __restrict__ logits,
    const float* __restrict__ bias,
    int n,
    int e,
    int k,
    int n_group,
    int topk_group,
    int renorm,
    float rsf)
{
    AHA_DYNAMIC_SHARED(float, sh);
    float* choice = sh;
    float* gscore = sh + e;
    __shared__ unsigned taken[MOE_MAX_E / 32];
    __shared__ unsigned kept[MOE_MAX_E / 32];
    __shared__ int chosen[MOE_MAX_K];
    const int t = blockIdx.x;
    const int lane = threadIdx.x;
    if (t >= n) {
        return;
    }
    const int per = e / n_group;
    const float* x = logits + (size_t)t * e;
    float* st = scores + (size_t)t * e;
    for (int i = lane; i < e; i += MOE_WARP) {
        const float s = 1.0f / (1.0f + expf(-x[i]));
        st[i] = s;
        choice[i] = s + (bias ? bias[i] : 0.0f);
    }
    for (int i = lane; i < (e + 31) / 32; i += MOE_WARP) {
        taken[i] = 0u;
        kept[i] = 0u;
    }
    __syncwarp();
    for (int g = lane; g < n_group; g += MOE_WARP) {
        float b1 = MOE_NEG_INF, b2 = MOE_NEG_INF;
        for (int i = g * per; i < (g + 1) * per; ++i) {
            const float v = moe_key(choice[i]);
            if (v > b1) {
                b2 = b1;
                b1 = v;
            } else if (v > b2) {
                b2 = v;
            }
        }
        gscore[g] = b1 + b2;
    }
    __syncwarp();
    for (int j = 0; j < topk_group; ++j) {
        // Reuses `taken` over the first G bits, then clears it.
        const int g = moe_warp_argmax_take(gscore, taken, n_group);
        if (lane == 0) {
            kept[g >> 5] |= 1u << (g & 31);
        }
    }
    __syncwarp();
    for (int i = lane; i < (e + 31) / 32; i += MOE_WARP) {
        taken[i] = 0u;
    }
    __syncwarp();
    for (int i = lane; i < e; i += MOE_WARP) {
        const int g = i / per;
        if (!((kept[g >> 5] >> (g & 31)) & 1u)) {
            choice[i] = 0.0f;
        }
    }
    __syncwarp();
    for (int j = 0; j < k; ++j) {
        const int bi = moe_warp_argmax_take(choice, taken, e);
        if (lane == 0) {
            chosen[j] = bi;
        }
    }
    __syncwarp();
    if (lane == 0) {
        float d = 1.0f;
        if (renorm) {
            d = 0.0f;
            for (int j = 0; j < k; ++j) {
                d += st[chosen[j]];
            }
            d += 1e-20f;
        }
        for (int j = 0; j < k; ++j) {
            const int id = chosen[j];
            ids[(size_t)t * k + j] = (unsigned)id;
            const float v = renorm ? st[id] / d : st[id];
            w[(size_t)t * k + j] = v * rsf;
        }
        denom[t] = d;
    }
}

// Backward of both routing kernels to the router logits, f32 (the choice of
// experts is not differentiated; weights are).
//
// Math (per token t; dw [N, K] is d loss / d w):
//   softmax: corr = renorm ? sum_j dw_j w_j : 0;
//     dp[i] = (aux ? aux[i] : 0) + sum_{j: ids_j = i} (dw_j - corr) / denom;
//     dlogits[t, i] = p_i (dp_i - sum_l dp_l p_l)                  (assigned)
//   sigmoid (rsf != 0): du_j = dw_j rsf; corr = renorm ? sum_j du_j w_j / rsf : 0;
//     dlogits[t, i] = sum_{j: ids_j = i} (du_j - corr) / denom * s_i (1 - s_i),
//     0 for experts not chosen                                      (assigned)
//   `aux` [E] (may be null) is a gradient on every token's probabilities
//   (the Switch load-balancing loss); softmax only, as the CPU layer.
// Shapes: dlogits, probs [N, E] (probs or scores from the forward);
//   dw, w, ids [N, K]; denom [N]; aux [E].
// Launch: one warp per token: grid = N, block = 32, dynamic shared memory
//   E floats.
// CPU twin: aha_tensor::cpu::moe_route_backward.
extern "C" __global__ void moe_route_backward_f32(
    float* __restrict__ dlogits,
    const float* __restrict__ dw,
    const float* __restrict__ w,
    const unsigned* __restrict__ ids,
    const float* __restrict__ probs,
    const float* __restrict__ denom,
    const float* __restrict__ aux,
    int n,
    int e,
    int k,
    int sigmoid,
    int renorm,
    float rsf)
{
    AHA_DYNAMIC_SHARED(float, dp);
    const int t = blockIdx.x;
    const int lane = threadIdx.x;
    if (t >= n) {
        return;
    }
    const float* pr = probs + (size_t)t * e;
    float* dl = dlogits + (size_t)t * e;
    const float* dwt = dw + (size_t)t * k;
    const float* wt = w + (size_t)t * k;
    const unsigned* it = ids + (size_t)t * k;
    const float d = denom[t];
    for (int i = lane; i < e; i += MOE_WARP) {
        dp[i] = (!sigmoid && aux) ? aux[i] : 0.0f;
    }
    __syncwarp();
    if (lane == 0) {
        float corr = 0.0f;
        if (renorm) {
            for (int j = 0; j < k; ++j) {
                corr += sigmoid ? dwt[j] * rsf * wt[j] / rsf : dwt[j] * wt[j];
            }
        }
        for (int j = 0; j < k; ++j) {
            const unsigned i = it[j];
            if (i < (unsigned)e) {
                const float g = sigmoid ? dwt[j] * rsf : dwt[j];
                dp[i] += (g - corr) / d;
            }
        }
    }
    __syncwarp();
    if (sigmoid) {
        for (int i = lane; i < e; i += MOE_WARP) {
            const float s = pr[i];
            dl[i] = dp[i] * (s * (1.0f - s));
        }
        return;
    }
    float dot = 0.0f;
    for (int i = lane; i < e; i += MOE_WARP) {
        dot += dp[i] * pr[i];
    }
    dot = aha_warp_sum(dot);
    for (int i = lane; i < e; i += MOE_WARP) {
        dl[i] = pr[i] * (dp[i] - dot);
    }
}

// Per-expert counts, their exclusive scan, the tile list of the grouped
// products and the load fractions, all on the device.
//
// Math: counts[x] = #{r < M : ids[r] = x}; offsets[0] = 0, offsets[x + 1] =
//   offsets[x] + counts[x]; tile_off[0] = 0, tile_off[x + 1] = tile_off[x] +
//   ceil(counts[x] / 64); frac[x] = counts[x] / M (0 when M = 0).
//   Ids >= E are not counted (the routing kernels never produce them).
// Shapes: counts, frac [E]; offsets, tile_off [E + 1]; ids [M].
// Launch: one block of 1024 threads (grid = 1); the counts are integer
//   shared-memory atomics (exact, so deterministic); thread 0 scans.
// CPU twin: aha_tensor::cpu::moe_count.
extern "C" __global__ void moe_count_u32(
    unsigned* __restrict__ counts,
    unsigned* __restrict__ offsets,
    unsigned* __restrict__ tile_off,
    float* __restrict__ frac,
    const unsigned* __restrict__ ids,
    unsigned long long m,
    int e)
{
    __shared__ unsigned c[MOE_MAX_E];
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        c[i] = 0u;
    }
    __syncthreads();
    for (unsigned long long r = threadIdx.x; r < m; r += blockDim.x) {
        const unsigned x = ids[r];
        if (x < (unsigned)e) {
            atomicAdd(&c[x], 1u);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        counts[i] = c[i];
        frac[i] = m > 0 ? (float)((double)c[i] / (double)m) : 0.0f;
    }
    if (threadIdx.x == 0) {
        unsigned o = 0u, to = 0u;
        offsets[0] = 0u;
        tile_off[0] = 0u;
        for (int i = 0; i < e; ++i) {
            o += c[i];
            to += (c[i] + MOE_TM - 1) / MOE_TM;
            offsets[i + 1] = o;
            tile_off[i + 1] = to;
        }
    }
}

// Stable scatter of the (token, slot) pairs into expert-contiguous order and
// the inverse map.
//
// Math: for r = t * K + j in increasing r with ids[r] = x, the i-th such r
//   gets row p = offsets[x] + i: tok[p] = t, slot[p] = j, inv[r] = p. Stable:
//   within an expert, rows keep the token order.
// Shapes: tok, slot [M]; inv, ids [M = N * K]; offsets [E + 1].
// Launch: one block per expert (grid = E), block = 256; each block walks all
//   M ids in chunks of 256 and ranks its matches with warp ballots and a
//   shared prefix over the 8 warps (no atomics, so the order is fixed).
// CPU twin: aha_tensor::cpu::moe_permute.
extern "C" __global__ void moe_scatter_u32(
    unsigned* __restrict__ tok,
    unsigned* __restrict__ slot,
    unsigned* __restrict__ inv,
    const unsigned* __restrict__ ids,
    const unsigned* __restrict__ offsets,
    unsigned long long m,
    int k)
{
    __shared__ unsigned wsum[8];
    const unsigned x = blockIdx.x;
    const int lane = threadIdx.x % MOE_WARP;
    const int warp = threadIdx.x / MOE_WARP;
    unsigned base = offsets[x];
    for (unsigned long long c0 = 0; c0 < m; c0 += 256) {
        const unsigned long long r = c0 + threadIdx.x;
        const bool hit = r < m && ids[r] == x;
        const unsigned ballot = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) {
            wsum[warp] = __popc(ballot);
        }
        __syncthreads();
        unsigned before = 0u, total = 0u;
        for (int i = 0; i < 8; ++i) {
            const unsigned s = wsum[i];
            before += i < warp ? s : 0u;
            total += s;
        }
        if (hit) {
            const unsigned p = base + before + __popc(ballot & ((1u << lane) - 1u));
            tok[p] = (unsigned)(r / (unsigned)k);
            slot[p] = (unsigned)(r % (unsigned)k);
            inv[r] = p;
        }
        base += total;
        __syncthreads();
    }
}

// Gathers token rows into the permuted, expert-contiguous buffer, stored as
// T: xe[p, :] = store(x[tok[p], :]) (bf16 rounds, f32 copies).
// Shapes: xe [M, C] (T), x [N, C] f32, tok [M].
// Launch: grid-stride over M * C elements, block = 256, grid <= 65536.
// Entry points: moe_gather_bf16, moe_gather_f32.
// CPU twin: aha_tensor::cpu::moe_gather (with Store::Bf16 / Store::F32).
template <class T>
__device__ __forceinline__ void moe_gather(
    T* __restrict__ xe,
    const float* __restrict__ x,
    const unsigned* __restrict__ tok,
    unsigned long long m,
    unsigned long long c)
{
    AHA_GRID_STRIDE(i, m * c) {
        const unsigned long long p = i / c;
        const unsigned long long col = i - p * c;
        moe_st(xe, i, x[(unsigned long long)tok[p] * c + col]);
    }
}

extern "C" __global__ void moe_gather_bf16(
    unsigned short* __restrict__ xe, const float* __restrict__ x, const unsigned* __restrict__ tok,
    unsigned long long m, unsigned long long c)
{
    moe_gather(xe, x, tok, m, c);
}

extern "C" __global__ void moe_gather_f32(
    float* __restrict__ xe, const float* __restrict__ x, const unsigned* __restrict__ tok,
    unsigned long long m, unsigned long long c)
{
    moe_gather(xe, x, tok, m, c);
}

// Weighted un-permute and combine by a gather through the inverse map:
//   out[t, c] (= or +=) sum_{j < K} wt(t, j) * src[inv[t * K + j], c],
//   summed in j order, with wt = w[t, j], or 1 when w is null (which makes
//   it the backward of the gather: dx += sum_j dxe[inv[t, j]]).
// Shapes: out [N, C], src [M, C], w and inv [N, K].
// Launch: grid-stride over N * C elements, block = 256, grid <= 65536.
// CPU twin: aha_tensor::cpu::moe_combine.
extern "C" __global__ void moe_combine_f32(
    float* __restrict__ out,
    const float* __restrict__ src,
    const float* __restrict__ w,
    const unsigned* __restrict__ inv,
    unsigned long long n,
    unsigned long long c,
    int k,
    int accumulate)
{
    AHA_GRID_STRIDE(i, n * c) {
        const unsigned long long t = i / c;
        const unsigned long long col = i - t * c;
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const unsigned long long r = inv[t * k + j];
            const float wt = w ? w[t * k + j] : 1.0f;
            acc += wt * src[r * c + col];
        }
        out[i] = accumulate ? out[i] + acc : acc;
    }
}

// Backward of moe_combine_f32 with weights:
//   dw[t, j] = sum_c dy[t, c] * ye[inv[t, j], c]                 (assigned)
//   dye[inv[t, j], c] = store(w[t, j] * dy[t, c])                (assigned)
// Shapes: dw, w, inv [N, K]; dye [M, C] (T); dy [N, C]; ye [M, C].
// Launch: one block per token (grid = N), block = 256; the dot product is a
//   block reduction with a fixed order (warp shuffles, then warp 0).
// Entry points: moe_combine_backward_bf16, moe_combine_backward_f32.
// CPU twin: aha_tensor::cpu::moe_combine_backward (with Store::Bf16 / F32).
template <class T>
__device__ __forceinline__ void moe_combine_backward(
    float* __restrict__ dw,
    T* __restrict__ dye,
    const float* __restrict__ dy,
    const float* __restrict__ ye,
    const float* __restrict__ w,
    const unsigned* __restrict__ inv,
    int n,
    int c,
    int k)
{
    __shared__ float red[MOE_WARP];
    const int t = blockIdx.x;
    if (t >= n) {
        return;
    }
    const int lane = threadIdx.x % MOE_WARP;
    const int warp = threadIdx.x / MOE_WARP;
    const int nwarps = blockDim.x / MOE_WARP;
    const float* g = dy + (size_t)t * c;
    for (int j = 0; j < k; ++j) {
        const size_t r = inv[(size_t)t * k + j];
        const float wt = w[(size_t)t * k + j];
        const float* yr = ye + r * c;
        T* dr = dye + r * c;
        float s = 0.0f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) {
            const float gi = g[i];
            s += gi * yr[i];
            moe_st(dr, i, wt * gi);
        }
        s = aha_warp_sum(s);
        if (lane == 0) {
            red[warp] = s;
        }
        __syncthreads();
        if (warp == 0) {
            float v = lane < nwarps ? red[lane] : 0.0f;
            v = aha_warp_sum(v);
            if (lane == 0) {
                dw[(size_t)t * k + j] = v;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void moe_combine_backward_bf16(
    float* __restrict__ dw, unsigned short* __restrict__ dye, const float* __restrict__ dy,
    const float* __restrict__ ye, const float* __restrict__ w, const unsigned* __restrict__ inv, int n, int c, int k)
{
    moe_combine_backward(dw, dye, dy, ye, w, inv, n, c, k);
}

extern "C" __global__ void moe_combine_backward_f32(
    float* __restrict__ dw, float* __restrict__ dye, const float* __restrict__ dy,
    const float* __restrict__ ye, const float* __restrict__ w, const unsigned* __restrict__ inv, int n, int c, int k)
{
    moe_combine_backward(dw, dye, dy, ye, w, inv, n, c, k);
}

// SwiGLU backward for the expert rows, with outputs stored as T for the
// grouped products that follow (s = sigmoid(g)):
//   dg = store(da * u * (s + g s (1 - s))), du = store(da * g * s)  (assigned)
// Shapes: every buffer [M * F].
// Launch: grid-stride, block = 256, grid <= 65536.
// Entry points: moe_swiglu_backward_bf16, moe_swiglu_backward_f32.
// CPU twin: aha_tensor::cpu::moe_swiglu_backward (with Store::Bf16 / F32).
template <class T>
__device__ __forceinline__ void moe_swiglu_backward(
    T* __restrict__ dg,
    T* __restrict__ du,
    const float* __restrict__ da,
    const float* __restrict__ g,
    const float* __restrict__ u,
    unsigned long long n)
{
    AHA_GRID_STRIDE(i, n) {
        const float gv = g[i];
        const float d = da[i];
        const float s = 1.0f / (1.0f + expf(-gv));
        moe_st(du, i, d * gv * s);
        moe_st(dg, i, d * u[i] * (s + gv * s * (1.0f - s)));
    }
}

extern "C" __global__ void moe_swiglu_backward_bf16(
    unsigned short* __restrict__ dg, unsigned short* __restrict__ du, const float* __restrict__ da,
    const float* __restrict__ g, const float* __restrict__ u, unsigned long long n)
{
    moe_swiglu_backward(dg, du, da, g, u, n);
}

extern "C" __global__ void moe_swiglu_backward_f32(
    float* __restrict__ dg, float* __restrict__ du, const float* __restrict__ da,
    const float* __restrict__ g, const float* __restrict__ u, unsigned long long n)
{
    moe_swiglu_backward(dg, du, da, g, u, n);
}

// Aux-loss-free balancing (DeepSeek-V3): bias[x] -= speed when counts[x] is
// above the mean count, += speed when below (compared exactly in integers:
// counts[x] * E vs sum of counts).
// Shapes: bias, counts [E].
// Launch: one block of 256 threads (grid = 1); thread 0 sums the counts.
// CPU twin: aha_tensor::cpu::moe_bias_update.
extern "C" __global__ void moe_bias_update_f32(
    float* __restrict__ bias,
    const unsigned* __restrict__ counts,
    int e,
    float speed)
{
    __shared__ unsigned long long total;
    if (threadIdx.x == 0) {
        unsigned long long s = 0;
        for (int i = 0; i < e; ++i) {
            s += counts[i];
        }
        total = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        const unsigned long long c = (unsigned long long)counts[i] * (unsigned long long)e;
        if (c > total) {
            bias[i] -= speed;
        } else if (c < total) {
            bias[i] += speed;
        }
    }
}

// ---------------------------------------------------------------------------
// Grouped products. A 64 x 64 output tile per block of 256 threads, each
// thread 4 x 4 outputs strided by 16 (rows ty + 16 i, columns tx + 16 j, so
// shared-memory reads are broadcasts or consecutive), k in steps of 16
// through shared memory as f32. Portable SIMT code (sm_80 and up); the
// tensor-core twins with the same contracts are at the end of the file.

// The expert owning tile `tile` of the device tile list: the x with
// tile_off[x] <= tile < tile_off[x + 1] (experts with no rows own no tile).
__device__ __forceinline__ int moe_tile_expert(const unsigned* tile_off, int e, unsigned tile) {
    int lo = 0, hi = e;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (tile_off[mid] <= tile) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// Loads a [TK, TM] tile of rows r0..r1 (exclusive bound) and depth k0.. of a
// row-major [*, ld] stored matrix, transposed into s[kk][row].
template <class T>
__device__ __forceinline__ void moe_load_rows(
    float (*s)[MOE_TM + 1], const T* a, size_t r0, size_t r1, int k0, int kdim, int ld)
{
    for (int idx = threadIdx.x; idx < MOE_TM * MOE_TK; idx += 256) {
        const int row = idx / MOE_TK;
        const int kk = idx % MOE_TK;
        const size_t r = r0 + row;
        const int kc = k0 + kk;
        s[kk][row] = (r < r1 && kc < kdim) ? moe_ld(a, r * ld + kc) : 0.0f;
    }
}

// Loads a [TK, TN] tile of an expert's weight: columns n0.., depth k0..;
// stored [n, k] (trans) or [k, n].
template <class T>
__device__ __forceinline__ void moe_load_weight(
    float (*s)[MOE_TN + 1], const T* b, int n0, int k0, int n, int kdim, int trans)
{
    for (int idx = threadIdx.x; idx < MOE_TN * MOE_TK; idx += 256) {
        int col, kk;
        if (trans) {
            col = idx / MOE_TK;
            kk = idx % MOE_TK;
        } else {
            kk = idx / MOE_TN;
            col = idx % MOE_TN;
        }
        const int nc = n0 + col;
        const int kc = k0 + kk;
        float v = 0.0f;
        if (nc < n && kc < kdim) {
            v = moe_ld(b, trans ? (size_t)nc * kdim + kc : (size_t)kc * n + nc);
        }
        s[kk][col] = v;
    }
}

// Grouped product: for every expert x and row r of its segment
// offsets[x]..offsets[x + 1]:
//   out[r, c] (= or +=) sum_l a[r, l] * B_x[l, c],   B_x = b + x * n * k,
//   stored [n, k] when trans_b (so B_x[l, c] = b_x[c, l]) or [k, n].
// a [M, k] and b [E, n, k] or [E, k, n] stored as T (bf16 or f32), out f32
// [M, n]; f32 sums in k order within each thread.
// Uses: the forward down projection (a = act, b = w_down, trans), the
//   backward dact = dye w_down (no trans), dxe = dg w_gate + du w_up (no
//   trans, the second accumulating).
// Launch: grid = (ceil(n / 64), tiles, 1) with tiles >= tile_off[E] (the
//   launcher uses the bound ceil(M / 64) + E, known without the counts);
//   block = 256. Blocks past tile_off[E] exit at once.
// Entry points: moe_grouped_gemm_bf16, moe_grouped_gemm_f32.
// CPU twin: aha_tensor::cpu::moe_grouped_matmul.
template <class T>
__device__ __forceinline__ void moe_grouped_gemm(
    float* __restrict__ out,
    const T* __restrict__ a,
    const T* __restrict__ b,
    const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off,
    int e,
    int k,
    int n,
    int trans_b,
    int accumulate)
{
    __shared__ float as[MOE_TK][MOE_TM + 1];
    __shared__ float bs[MOE_TK][MOE_TN + 1];
    const unsigned tile = blockIdx.y;
    if (tile >= tile_off[e]) {
        return;
    }
    const int x = moe_tile_expert(tile_off, e, tile);
    const size_t r0 = (size_t)offsets[x] + (size_t)(tile - tile_off[x]) * MOE_TM;
    const size_t r1 = offsets[x + 1];
    const int n0 = blockIdx.x * MOE_TN;
    const T* bx = b + (size_t)x * n * k;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }
    for (int k0 = 0; k0 < k; k0 += MOE_TK) {
        moe_load_rows(as, a, r0, r1, k0, k, k);
        moe_load_weight(bs, bx, n0, k0, n, k, trans_b);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MOE_TK; ++kk) {
            float av[4], bv[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = as[kk][ty + 16 * i];
                bv[i] = bs[kk][tx + 16 * i];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const size_t r = r0 + ty + 16 * i;
        if (r >= r1) {
            continue;
        }
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col < n) {
                float* o = out + r * n + col;
                *o = accumulate ? *o + acc[i][j] : acc[i][j];
            }
        }
    }
}

extern "C" __global__ __launch_bounds__(256) void moe_grouped_gemm_bf16(
    float* __restrict__ out, const unsigned short* __restrict__ a, const unsigned short* __restrict__ b,
    const unsigned* __restrict__ offsets, const unsigned* __restrict__ tile_off, int e, int k, int n, int trans_b,
    int accumulate)
{
    moe_grouped_gemm(out, a, b, offsets, tile_off, e, k, n, trans_b, accumulate);
}

extern "C" __global__ __launch_bounds__(256) void moe_grouped_gemm_f32(
    float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b,
    const unsigned* __restrict__ offsets, const unsigned* __restrict__ tile_off, int e, int k, int n, int trans_b,
    int accumulate)
{
    moe_grouped_gemm(out, a, b, offsets, tile_off, e, k, n, trans_b, accumulate);
}

// Fused gate and up projections with SwiGLU, forward:
//   g[r, f] = sum_c xe[r, c] w_gate[x, f, c], u[r, f] = sum_c xe[r, c] w_up[x, f, c],
//   act[r, f] = store(silu(g) * u)      for r in expert x's segment.
// Shapes: g, u f32 [M, F]; act, xe, w_gate, w_up stored as T (bf16 or f32):
//   act [M, F], xe [M, C], w_gate, w_up [E, F, C]; offsets, tile_off [E + 1].
// Launch: as moe_grouped_gemm_bf16 with n = F, k = C; __launch_bounds__
//   (256, 2) lets ptxas use up to 128 registers (two 4 x 4 accumulator sets;
//   with the default bound it spilled 16 bytes on sm_80).
// Entry points: moe_grouped_gate_up_bf16, moe_grouped_gate_up_f32.
// CPU twin: aha_tensor::cpu::moe_grouped_gate_up (with Store::Bf16 / F32).
template <class T>
__device__ __forceinline__ void moe_grouped_gate_up(
    float* __restrict__ g,
    float* __restrict__ u,
    T* __restrict__ act,
    const T* __restrict__ xe,
    const T* __restrict__ w_gate,
    const T* __restrict__ w_up,
    const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off,
    int e,
    int c,
    int f)
{
    __shared__ float as[MOE_TK][MOE_TM + 1];
    __shared__ float gs[MOE_TK][MOE_TN + 1];
    __shared__ float us[MOE_TK][MOE_TN + 1];
    const unsigned tile = blockIdx.y;
    if (tile >= tile_off[e]) {
        return;
    }
    const int x = moe_tile_expert(tile_off, e, tile);
    const size_t r0 = (size_t)offsets[x] + (size_t)(tile - tile_off[x]) * MOE_TM;
    const size_t r1 = offsets[x + 1];
    const int n0 = blockIdx.x * MOE_TN;
    const T* wg = w_gate + (size_t)x * f * c;
    const T* wu = w_up + (size_t)x * f * c;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float ag[4][4], au[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            ag[i][j] = 0.0f;
            au[i][j] = 0.0f;
        }
    }
    for (int k0 = 0; k0 < c; k0 += MOE_TK) {
        moe_load_rows(as, xe, r0, r1, k0, c, c);
        moe_load_weight(gs, wg, n0, k0, f, c, 1);
        moe_load_weight(us, wu, n0, k0, f, c, 1);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MOE_TK; ++kk) {
            float av[4], gv[4], uv[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = as[kk][ty + 16 * i];
                gv[i] = gs[kk][tx + 16 * i];
                uv[i] = us[kk][tx + 16 * i];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    ag[i][j] = fmaf(av[i], gv[j], ag[i][j]);
                    au[i][j] = fmaf(av[i], uv[j], au[i][j]);
                }
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const size_t r = r0 + ty + 16 * i;
        if (r >= r1) {
            continue;
        }
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col < f) {
                const size_t o = r * f + col;
                const float gv = ag[i][j];
                const float uv = au[i][j];
                g[o] = gv;
                u[o] = uv;
                moe_st(act, o, gv / (1.0f + expf(-gv)) * uv);
            }
        }
    }
}

extern "C" __global__ __launch_bounds__(256, 2) void moe_grouped_gate_up_bf16(
    float* __restrict__ g, float* __restrict__ u, unsigned short* __restrict__ act,
    const unsigned short* __restrict__ xe, const unsigned short* __restrict__ w_gate,
    const unsigned short* __restrict__ w_up, const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off, int e, int c, int f)
{
    moe_grouped_gate_up(g, u, act, xe, w_gate, w_up, offsets, tile_off, e, c, f);
}

extern "C" __global__ __launch_bounds__(256, 2) void moe_grouped_gate_up_f32(
    float* __restrict__ g, float* __restrict__ u, float* __restrict__ act, const float* __restrict__ xe,
    const float* __restrict__ w_gate, const float* __restrict__ w_up, const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off, int e, int c, int f)
{
    moe_grouped_gate_up(g, u, act, xe, w_gate, w_up, offsets, tile_off, e, c, f);
}

// Grouped weight gradient: for every expert x with segment rows R_x,
//   dw[x, i, j] += sum_{r in R_x} a[r, i] * b[r, j]      (accumulated)
// summed over r in row order within each thread (deterministic).
// Uses: d w_gate = dg^T xe, d w_up = du^T xe (i over F, j over C),
//   d w_down = dye^T act (i over C, j over F).
// Shapes: dw f32 [E, n1, n2]; a [M, n1] and b [M, n2] stored as T (bf16 or
//   f32); offsets [E + 1].
// Launch: grid = (ceil(n2 / 64), ceil(n1 / 64), E), block = 256; experts
//   with no rows return at once.
// Entry points: moe_grouped_wgrad_bf16, moe_grouped_wgrad_f32.
// CPU twin: aha_tensor::cpu::moe_grouped_wgrad.
template <class T>
__device__ __forceinline__ void moe_grouped_wgrad(
    float* __restrict__ dw,
    const T* __restrict__ a,
    const T* __restrict__ b,
    const unsigned* __restrict__ offsets,
    int n1,
    int n2)
{
    __shared__ float as[MOE_TK][MOE_TM + 1];
    __shared__ float bs[MOE_TK][MOE_TN + 1];
    const int x = blockIdx.z;
    const size_t r0 = offsets[x];
    const size_t r1 = offsets[x + 1];
    if (r0 >= r1) {
        return;
    }
    const int i0 = blockIdx.y * MOE_TM;
    const int j0 = blockIdx.x * MOE_TN;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }
    for (size_t q0 = r0; q0 < r1; q0 += MOE_TK) {
        for (int idx = threadIdx.x; idx < MOE_TK * MOE_TM; idx += 256) {
            const int rr = idx / MOE_TM;
            const int col = idx % MOE_TM;
            const size_t r = q0 + rr;
            const int ia = i0 + col;
            const int jb = j0 + col;
            as[rr][col] = (r < r1 && ia < n1) ? moe_ld(a, r * n1 + ia) : 0.0f;
            bs[rr][col] = (r < r1 && jb < n2) ? moe_ld(b, r * n2 + jb) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < MOE_TK; ++rr) {
            float av[4], bv[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                av[i] = as[rr][ty + 16 * i];
                bv[i] = bs[rr][tx + 16 * i];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
    float* dx = dw + (size_t)x * n1 * n2;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int ii = i0 + ty + 16 * i;
        if (ii >= n1) {
            continue;
        }
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int jj = j0 + tx + 16 * j;
            if (jj < n2) {
                dx[(size_t)ii * n2 + jj] += acc[i][j];
            }
        }
    }
}

extern "C" __global__ __launch_bounds__(256) void moe_grouped_wgrad_bf16(
    float* __restrict__ dw, const unsigned short* __restrict__ a, const unsigned short* __restrict__ b,
    const unsigned* __restrict__ offsets, int n1, int n2)
{
    moe_grouped_wgrad(dw, a, b, offsets, n1, n2);
}

extern "C" __global__ __launch_bounds__(256) void moe_grouped_wgrad_f32(
    float* __restrict__ dw, const float* __restrict__ a, const float* __restrict__ b,
    const unsigned* __restrict__ offsets, int n1, int n2)
{
    moe_grouped_wgrad(dw, a, b, offsets, n1, n2);
}

// ---------------------------------------------------------------------------
// Tensor-core grouped products (mma.sync m16n8k16, bf16 x bf16 -> f32;
// sm_80 and up). The same contracts as the SIMT kernels above; a 64 x 64
// output tile per block of 128 threads (4 warps, 2 x 2, each 32 x 32 = 2 x 4
// mma tiles), depth in chunks of 32 staged in shared memory as bf16 with
// the depth contiguous for both operands ([64][32 + 8]: the +8 pad makes
// the fragment loads conflict-free). Fragment layouts (PTX ISA, g = lane / 4,
// t = lane % 4): A reg i = row g + 8 (i % 2), depth 8 (i / 2) + 2t, +1;
// B reg i = depth 8 i + 2t, +1 of column g; D element q = row g + 8 (q / 2),
// column 2t + q % 2. The sums run in another order than the SIMT kernels'
// (per 16-deep mma), so the two agree to f32 rounding, not bit for bit.
// The mma is aha_mma16816 (common.cuh), the emulation's under AHA_EMULATE.

#define MOE_MK 32
#define MOE_MS (MOE_MK + 8)

// acc[mi][ni][q] += the warp's 32 x 32 part of as (rows) x bs^T (columns)
// over one MOE_MK-deep chunk; both tiles [64][MOE_MS], depth contiguous.
__device__ __forceinline__ void moe_mma_chunk(
    float (*acc)[4][4], const unsigned short (*as)[MOE_MS], const unsigned short (*bs)[MOE_MS], int wm, int wn)
{
    const int lane = threadIdx.x % MOE_WARP;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int ks = 0; ks < MOE_MK; ks += 16) {
        unsigned af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const int r = wm * 32 + mi * 16 + g;
            af[mi][0] = aha_ld32(&as[r][ks + 2 * t]);
            af[mi][1] = aha_ld32(&as[r + 8][ks + 2 * t]);
            af[mi][2] = aha_ld32(&as[r][ks + 8 + 2 * t]);
            af[mi][3] = aha_ld32(&as[r + 8][ks + 8 + 2 * t]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int cn = wn * 32 + ni * 8 + g;
            const unsigned b0 = aha_ld32(&bs[cn][ks + 2 * t]);
            const unsigned b1 = aha_ld32(&bs[cn][ks + 8 + 2 * t]);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                aha_mma16816(acc[mi][ni], af[mi], b0, b1);
            }
        }
    }
}

// s[row][kk] = m[(r0 + row) * ld + k0 + kk] for rows r0..r1 (exclusive) and
// depth k0..kdim: a row-major operand whose depth is contiguous. When the
// depth and the row stride are multiples of 8 and the base is 16-byte
// aligned (every model shape), 8 elements move per 16-byte load (2 per
// thread); otherwise element by element.
__device__ __forceinline__ void moe_stage_rows(
    unsigned short (*s)[MOE_MS], const unsigned short* m, size_t r0, size_t r1, int k0, int kdim, size_t ld)
{
    if ((kdim % 8) == 0 && (ld % 8) == 0 && (((size_t)m) % 16) == 0) {
        for (int idx = threadIdx.x; idx < 64 * (MOE_MK / 8); idx += 128) {
            const int row = idx / (MOE_MK / 8);
            const int kk = (idx % (MOE_MK / 8)) * 8;
            const size_t r = r0 + row;
            const int kc = k0 + kk;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (r < r1 && kc < kdim) {
                v = *reinterpret_cast<const uint4*>(m + r * ld + kc);
            }
            *reinterpret_cast<uint4*>(&s[row][kk]) = v;
        }
        return;
    }
    for (int idx = threadIdx.x; idx < 64 * MOE_MK; idx += 128) {
        const int row = idx / MOE_MK;
        const int kk = idx % MOE_MK;
        const size_t r = r0 + row;
        const int kc = k0 + kk;
        s[row][kk] = (r < r1 && kc < kdim) ? m[r * ld + kc] : (unsigned short)0;
    }
}

// s[col][kk] = m[(q0 + kk) * ld + c0 + col] for depth rows q0..q1
// (exclusive) and columns c0..cdim: an operand whose columns are
// contiguous, transposed into depth-contiguous shared memory.
__device__ __forceinline__ void moe_stage_cols(
    unsigned short (*s)[MOE_MS], const unsigned short* m, size_t q0, size_t q1, int c0, int cdim, size_t ld)
{
    for (int idx = threadIdx.x; idx < 64 * MOE_MK; idx += 128) {
        const int kk = idx / 64;
        const int col = idx % 64;
        const size_t q = q0 + kk;
        const int cc = c0 + col;
        s[col][kk] = (q < q1 && cc < cdim) ? m[q * ld + cc] : (unsigned short)0;
    }
}

__device__ __forceinline__ void moe_zero_acc(float (*acc)[4][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                acc[mi][ni][q] = 0.0f;
            }
        }
    }
}

// Tensor-core twin of moe_grouped_gemm_bf16 (same arguments and contract).
// Launch: grid = (ceil(n / 64), tiles, 1) as there, block = 128;
//   __launch_bounds__(128, 4) holds it to 128 registers (4 blocks an SM;
//   166 without, no spills either way).
// CPU twin: aha_tensor::cpu::moe_grouped_matmul.
extern "C" __global__ __launch_bounds__(128, 4) void moe_grouped_gemm_mma_bf16(
    float* __restrict__ out,
    const unsigned short* __restrict__ a,
    const unsigned short* __restrict__ b,
    const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off,
    int e,
    int k,
    int n,
    int trans_b,
    int accumulate)
{
    __shared__ __align__(16) unsigned short as[64][MOE_MS];
    __shared__ __align__(16) unsigned short bs[64][MOE_MS];
    const unsigned tile = blockIdx.y;
    if (tile >= tile_off[e]) {
        return;
    }
    const int x = moe_tile_expert(tile_off, e, tile);
    const size_t r0 = (size_t)offsets[x] + (size_t)(tile - tile_off[x]) * MOE_TM;
    const size_t r1 = offsets[x + 1];
    const int n0 = blockIdx.x * 64;
    const unsigned short* bx = b + (size_t)x * n * k;
    const int warp = threadIdx.x / MOE_WARP;
    const int wm = warp / 2, wn = warp % 2;
    float acc[2][4][4];
    moe_zero_acc(acc);
    for (int k0 = 0; k0 < k; k0 += MOE_MK) {
        moe_stage_rows(as, a, r0, r1, k0, k, (size_t)k);
        if (trans_b) {
            moe_stage_rows(bs, bx, (size_t)n0, (size_t)n, k0, k, (size_t)k);
        } else {
            moe_stage_cols(bs, bx, (size_t)k0, (size_t)k, n0, n, (size_t)n);
        }
        __syncthreads();
        moe_mma_chunk(acc, as, bs, wm, wn);
        __syncthreads();
    }
    const int lane = threadIdx.x % MOE_WARP;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const size_t r = r0 + wm * 32 + mi * 16 + g + 8 * (q / 2);
                const int col = n0 + wn * 32 + ni * 8 + 2 * t + q % 2;
                if (r < r1 && col < n) {
                    float* o = out + r * n + col;
                    *o = accumulate ? *o + acc[mi][ni][q] : acc[mi][ni][q];
                }
            }
        }
    }
}

// Tensor-core twin of moe_grouped_gate_up_bf16 (same arguments and contract).
// Launch: as moe_grouped_gemm_mma_bf16 with n = F, k = C; block = 128;
//   two accumulator sets (64 floats a thread): 166 registers, 3 blocks an SM.
// CPU twin: aha_tensor::cpu::moe_grouped_gate_up.
extern "C" __global__ __launch_bounds__(128, 3) void moe_grouped_gate_up_mma_bf16(
    float* __restrict__ g,
    float* __restrict__ u,
    unsigned short* __restrict__ act,
    const unsigned short* __restrict__ xe,
    const unsigned short* __restrict__ w_gate,
    const unsigned short* __restrict__ w_up,
    const unsigned* __restrict__ offsets,
    const unsigned* __restrict__ tile_off,
    int e,
    int c,
    int f)
{
    __shared__ __align__(16) unsigned short as[64][MOE_MS];
    __shared__ __align__(16) unsigned short gs[64][MOE_MS];
    __shared__ __align__(16) unsigned short us[64][MOE_MS];
    const unsigned tile = blockIdx.y;
    if (tile >= tile_off[e]) {
        return;
    }
    const int x = moe_tile_expert(tile_off, e, tile);
    const size_t r0 = (size_t)offsets[x] + (size_t)(tile - tile_off[x]) * MOE_TM;
    const size_t r1 = offsets[x + 1];
    const int n0 = blockIdx.x * 64;
    const unsigned short* wg = w_gate + (size_t)x * f * c;
    const unsigned short* wu = w_up + (size_t)x * f * c;
    const int warp = threadIdx.x / MOE_WARP;
    const int wm = warp / 2, wn = warp % 2;
    float ag[2][4][4], au[2][4][4];
    moe_zero_acc(ag);
    moe_zero_acc(au);
    for (int k0 = 0; k0 < c; k0 += MOE_MK) {
        moe_stage_rows(as, xe, r0, r1, k0, c, (size_t)c);
        moe_stage_rows(gs, wg, (size_t)n0, (size_t)f, k0, c, (size_t)c);
        moe_stage_rows(us, wu, (size_t)n0, (size_t)f, k0, c, (size_t)c);
        __syncthreads();
        moe_mma_chunk(ag, as, gs, wm, wn);
        moe_mma_chunk(au, as, us, wm, wn);
        __syncthreads();
    }
    const int lane = threadIdx.x % MOE_WARP;
    const int gl = lane / 4, t = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const size_t r = r0 + wm * 32 + mi * 16 + gl + 8 * (q / 2);
                const int col = n0 + wn * 32 + ni * 8 + 2 * t + q % 2;
                if (r < r1 && col < f) {
                    const size_t o = r * f + col;
                    const float gv = ag[mi][ni][q];
                    const float uv = au[mi][ni][q];
                    g[o] = gv;
                    u[o] = uv;
                    act[o] = aha_f32_to_bf16(gv / (1.0f + expf(-gv)) * uv);
                }
            }
        }
    }
}

// Tensor-core twin of moe_grouped_wgrad_bf16 (same arguments and contract:
// dw[x] += a_x^T b_x over the expert's rows, in a fixed order).
// Launch: grid = (ceil(n2 / 64), ceil(n1 / 64), E), block = 128.
// CPU twin: aha_tensor::cpu::moe_grouped_wgrad.
extern "C" __global__ __launch_bounds__(128) void moe_grouped_wgrad_mma_bf16(
    float* __restrict__ dw,
    const unsigned short* __restrict__ a,
    const unsigned short* __restrict__ b,
    const unsigned* __restrict__ offsets,
    int n1,
    int n2)
{
    __shared__ __align__(16) unsigned short as[64][MOE_MS];
    __shared__ __align__(16) unsigned short bs[64][MOE_MS];
    const int x = blockIdx.z;
    const size_t r0 = offsets[x];
    const size_t r1 = offsets[x + 1];
    if (r0 >= r1) {
        return;
    }
    const int i0 = blockIdx.y * 64;
    const int j0 = blockIdx.x * 64;
    const int warp = threadIdx.x / MOE_WARP;
    const int wm = warp / 2, wn = warp % 2;
    float acc[2][4][4];
    moe_zero_acc(acc);
    for (size_t q0 = r0; q0 < r1; q0 += MOE_MK) {
        moe_stage_cols(as, a, q0, r1, i0, n1, (size_t)n1);
        moe_stage_cols(bs, b, q0, r1, j0, n2, (size_t)n2);
        __syncthreads();
        moe_mma_chunk(acc, as, bs, wm, wn);
        __syncthreads();
    }
    float* dx = dw + (size_t)x * n1 * n2;
    const int lane = threadIdx.x % MOE_WARP;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int ii = i0 + wm * 32 + mi * 16 + g + 8 * (q / 2);
                const int jj = j0 + wn * 32 + ni * 8 + 2 * t + q % 2;
                if (ii < n1 && jj < n2) {
                    dx[(size_t)ii * n2 + jj] += acc[mi][ni][q];
                }
            }
        }
    }
}
