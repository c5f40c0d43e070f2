// Flash attention: tiled, online-softmax, causal attention with grouped-query
// heads over variable-length sequences packed into one batch, its backward
// (dQ, dK, dV without a T x T matrix; deterministic) and paged decode with
// the key range split across blocks (flash-decoding) plus a combine kernel.
// CUDA-core kernels (f32 FMAs) for everything, and tensor-core forward and
// backward (mma.sync m16n8k16 bf16, *_mma_*; see their sections below).
// CPU twins: aha_tensor::cpu::flash_forward / flash_backward /
// flash_decode_paged (and attention_forward / attention_backward per sequence).
//
// Layouts (row-major; "total" = tokens of all sequences, packed):
//   q [total, H, Dk] bf16     k [total, Hk, Dk] bf16     v [total, Hk, Dv] bf16
//   out, dout [total, H, Dv] f32    lse, dsum [H, total] f32
//   dq [total, H, Dk] f32     dk [total, Hk, Dk] f32     dv [total, Hk, Dv] f32
//   cu_seqlens [nseq + 1] int32: sequence s holds rows cu[s] .. cu[s + 1]
//   (cu[0] = 0, non-decreasing, cu[nseq] <= total; rows past cu[nseq] are
//   not touched). Causal within each sequence: row i sees keys 0 ..= i.
//   bf16 is carried as its 16 bits (unsigned short); no <cuda_bf16.h>.
// Query head h reads key/value head h / (H / Hk). Scores are
// (q . k) * scale; lse[h, row] = log sum_j exp(score_j), saved for the
// backward.
//
// Head widths: each kernel body is a template on (DK, DV, R): DK, DV are the
// compile-time widths of the shared-memory rows and register accumulators
// (the runtime dk <= DK, dv <= DV; columns past them are zero in shared
// memory), R the rows each warp owns. Specialisations, by symbol suffix:
//   _d64    DK = DV = 64,   R = 8      _d128  DK = DV = 128, R = 8
//   _d192v128  DK = 192, DV = 128, R = 8 (DeepSeek-V3 MLA)
//   _any    DK = DV = 256, R = 4 (any dk, dv in 1..=256: fixtures, odd widths)
//
// Launch geometry (block = 128 threads = 4 warps; key/query tiles of 32 =
// one per lane; dynamic shared memory, sizes in the launcher's plan, above
// 48 KiB with the opt-in attribute set by the launcher):
//   flash_fwd_*        grid (ceil(max_seqlen / 4R), H, nseq). A block owns 4R
//                      query rows of one head (R per warp) kept in shared f32;
//                      it walks key tiles 0 .. its last row (causal tile
//                      skipping), each K/V tile converted to f32 in shared
//                      memory. Lane j scores key j of the tile for the warp's
//                      R rows; running max / sum per row in registers; lane c
//                      owns output columns c, c + 32, ...
//   flash_fwd_mma_*    grid (ceil(max_seqlen / 64), H, nseq); 64 query rows
//                      (16 per warp), tensor cores: see fa_fwd_mma below.
//   flash_bwd_dq_mma_* / flash_bwd_dkv_mma_*  as their CUDA-core versions with
//                      64 rows (16 per warp) a block; see fa_bwd_dq_mma below.
//   flash_bwd_dsum_f32 one warp per (row, head): dsum = dout . out.
//   flash_bwd_dq_*     grid as the forward; recomputes P from lse and
//                      dS = P (dO V^T - dsum) scale per key tile and adds
//                      dS K into registers: dQ without atomics.
//   flash_bwd_dkv_*    grid (ceil(max_seqlen / 4R), Hk, nseq). A block owns 4R
//                      keys of one key/value head and walks the query heads of
//                      its group and the query tiles at or after its keys:
//                      dV += P^T dO, dK += dS^T Q in registers.
//                      Every output element is written by one thread in a
//                      fixed order: the backward is deterministic.
//   flash_decode_*     grid (splits, Hk, nseq). A block owns one key range
//                      (split) of one sequence's paged cache and all query
//                      rows (new tokens x heads of the group) of one
//                      key/value head, 4R at a time; writes a partial output
//                      and lse per split (lse = -inf and 0 output for a row
//                      that sees no key of the split).
//                      flash_decode_latent576_bf16 is the one for MLA's
//                      latent cache (keys = values, widths up to 576): the
//                      key tile doubles as the value tile.
//   flash_decode_combine_f32  one warp per (token, head): merges the splits.
// Memory is linear in sequence length; work is O(T^2 D) per sequence, halved
// by causality.
// Written without a GPU: checked by NVRTC (sm_80, sm_90, no spills), by the
// fiber emulation of this file on the CPU (crates/cuda-kernels/emulate/flash.cpp
// through aha_cuda_kernels::emulate, run by tests/flash_emulation.rs;
// AHA_EMULATE swaps the mma.sync asm for the emulation's) and, on a GPU, by crates/tensor/tests/gpu_flash.rs.

#include "common.cuh"

#define FA_WARPS 4
#define FA_THREADS (32 * FA_WARPS)
#define FA_BC 32
#define FA_NEG (-1.0e30f)
#define FA_INF __int_as_float(0x7f800000)
#define FA_FULL 0xffffffffu

typedef unsigned short fa_u16;

AHA_DYNAMIC_SHARED(float4, fa_smem4);

// Rows row0 .. row0 + n of a [*, nh, d] tensor at head hh into dst (row
// stride `stride`, DCAP columns): zero past d and for rows >= nvalid.
template <int DCAP>
__device__ __forceinline__ void fa_load_bf16(float* dst, int stride, const fa_u16* __restrict__ src,
                                             long long row0, int n, int nvalid, int nh, int hh, int d) {
    for (int idx = threadIdx.x; idx < n * DCAP; idx += FA_THREADS) {
        const int r = idx / DCAP, c = idx % DCAP;
        float x = 0.0f;
        if (r < nvalid && c < d) x = aha_bf16_to_f32(src[((row0 + r) * nh + hh) * (long long)d + c]);
        dst[r * stride + c] = x;
    }
}

template <int DCAP>
__device__ __forceinline__ void fa_load_f32(float* dst, int stride, const float* __restrict__ src,
                                            long long row0, int n, int nvalid, int nh, int hh, int d) {
    for (int idx = threadIdx.x; idx < n * DCAP; idx += FA_THREADS) {
        const int r = idx / DCAP, c = idx % DCAP;
        float x = 0.0f;
        if (r < nvalid && c < d) x = src[((row0 + r) * nh + hh) * (long long)d + c];
        dst[r * stride + c] = x;
    }
}

// s[r] = a_r . b_lane over DCAP columns: rows a_r (row0 + r of a, stride DCAP,
// read as broadcast float4s) against the lane's row of b (stride DCAP + 1,
// so the 32 lanes hit 32 banks).
template <int DCAP, int R>
__device__ __forceinline__ void fa_scores(float* s, const float* a, const float* b_lane) {
#pragma unroll
    for (int r = 0; r < R; r++) s[r] = 0.0f;
#pragma unroll 2
    for (int d = 0; d < DCAP; d += 4) {
        const float b0 = b_lane[d], b1 = b_lane[d + 1], b2 = b_lane[d + 2], b3 = b_lane[d + 3];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float4 x = *reinterpret_cast<const float4*>(a + r * DCAP + d);
            s[r] += x.x * b0 + x.y * b1 + x.z * b2 + x.w * b3;
        }
    }
}

// acc[r][c] += sum_t shfl(w[r], t) * rows[t][lane + 32 c] over the 32 rows of
// a tile (row stride `stride`).
template <int DCAP, int R>
__device__ __forceinline__ void fa_accumulate(float (*acc)[DCAP / 32], const float* w, const float* rows,
                                              int stride, int lane) {
#pragma unroll 4
    for (int t = 0; t < FA_BC; t++) {
        float x[DCAP / 32];
#pragma unroll
        for (int c = 0; c < DCAP / 32; c++) x[c] = rows[t * stride + lane + 32 * c];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float p = __shfl_sync(FA_FULL, w[r], t);
#pragma unroll
            for (int c = 0; c < DCAP / 32; c++) acc[r][c] += p * x[c];
        }
    }
}

// One online-softmax step for the warp's R rows over a key tile: x[r] holds
// the lane's masked, scaled score (-inf where masked) and becomes its
// probability relative to the new running max; acc and the lane's partial
// sums are rescaled.
template <int DV, int R>
__device__ __forceinline__ void fa_online(float* x, float* m, float* l, float (*acc)[DV / 32]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float mn = fmaxf(m[r], aha_warp_max(x[r]));
        const float corr = __expf(m[r] - mn);
        const float p = __expf(x[r] - mn);
        l[r] = l[r] * corr + p;
        m[r] = mn;
#pragma unroll
        for (int c = 0; c < DV / 32; c++) acc[r][c] *= corr;
        x[r] = p;
    }
}

template <int DK, int DV, int R>
__device__ __forceinline__ void fa_fwd(float* __restrict__ out, float* __restrict__ lse,
                                       const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                       const fa_u16* __restrict__ v, const int* __restrict__ cu, int total,
                                       int H, int Hk, int dk, int dv, float scale) {
    constexpr int BR = FA_WARPS * R;
    float* qs = reinterpret_cast<float*>(fa_smem4);  // [BR][DK]
    float* ks = qs + BR * DK;                          // [BC][DK + 1]
    float* vs = ks + FA_BC * (DK + 1);                 // [BC][DV]
    const int seq = blockIdx.z, h = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int i0 = blockIdx.x * BR;
    if (i0 >= len) return;
    const int kh = h / (H / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    fa_load_bf16<DK>(qs, DK, q, start + i0, BR, len - i0, H, h, dk);
    float acc[R][DV / 32], m[R], l[R], x[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        m[r] = FA_NEG;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DV / 32; c++) acc[r][c] = 0.0f;
    }
    const int kend = min(len, i0 + BR);
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        fa_load_bf16<DK>(ks, DK + 1, k, start + j0, FA_BC, len - j0, Hk, kh, dk);
        fa_load_bf16<DV>(vs, DV, v, start + j0, FA_BC, len - j0, Hk, kh, dv);
        __syncthreads();
        fa_scores<DK, R>(x, qs + warp * R * DK, ks + lane * (DK + 1));
        const int j = j0 + lane;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = i0 + warp * R + r;
            x[r] = (j <= i && j < len) ? x[r] * scale : -FA_INF;
        }
        fa_online<DV, R>(x, m, l, acc);
        fa_accumulate<DV, R>(acc, x, vs, DV, lane);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = i0 + warp * R + r;
        const float sum = aha_warp_sum(l[r]);
        if (i >= len) continue;
        const float inv = 1.0f / sum;
        const long long row = start + i;
        float* o = out + (row * H + h) * (long long)dv;
#pragma unroll
        for (int c = 0; c < DV / 32; c++) {
            const int col = lane + 32 * c;
            if (col < dv) o[col] = acc[r][c] * inv;
        }
        if (lane == 0) lse[(long long)h * total + row] = m[r] + __logf(sum);
    }
}

template <int DK, int DV, int R>
__device__ __forceinline__ void fa_bwd_dq(float* __restrict__ dq, const float* __restrict__ dout,
                                          const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                          const fa_u16* __restrict__ v, const float* __restrict__ lse,
                                          const float* __restrict__ dsum, const int* __restrict__ cu, int total,
                                          int H, int Hk, int dk, int dv, float scale) {
    constexpr int BR = FA_WARPS * R;
    float* qs = reinterpret_cast<float*>(fa_smem4);  // [BR][DK]
    float* dos = qs + BR * DK;                         // [BR][DV]
    float* ks = dos + BR * DV;                         // [BC][DK + 1]
    float* vs = ks + FA_BC * (DK + 1);                 // [BC][DV + 1]
    const int seq = blockIdx.z, h = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int i0 = blockIdx.x * BR;
    if (i0 >= len) return;
    const int kh = h / (H / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    fa_load_bf16<DK>(qs, DK, q, start + i0, BR, len - i0, H, h, dk);
    fa_load_f32<DV>(dos, DV, dout, start + i0, BR, len - i0, H, h, dv);
    float acc[R][DK / 32], li[R], di[R], s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = i0 + warp * R + r;
        const long long at = (long long)h * total + start + min(i, len - 1);
        li[r] = lse[at];
        di[r] = dsum[at];
#pragma unroll
        for (int c = 0; c < DK / 32; c++) acc[r][c] = 0.0f;
    }
    const int kend = min(len, i0 + BR);
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        fa_load_bf16<DK>(ks, DK + 1, k, start + j0, FA_BC, len - j0, Hk, kh, dk);
        fa_load_bf16<DV>(vs, DV + 1, v, start + j0, FA_BC, len - j0, Hk, kh, dv);
        __syncthreads();
        fa_scores<DK, R>(s, qs + warp * R * DK, ks + lane * (DK + 1));
        fa_scores<DV, R>(dp, dos + warp * R * DV, vs + lane * (DV + 1));
        const int j = j0 + lane;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int i = i0 + warp * R + r;
            const float p = (j <= i && j < len) ? __expf(s[r] * scale - li[r]) : 0.0f;
            s[r] = p * (dp[r] - di[r]) * scale;
        }
        fa_accumulate<DK, R>(acc, s, ks, DK + 1, lane);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = i0 + warp * R + r;
        if (i >= len) continue;
        float* o = dq + ((long long)(start + i) * H + h) * dk;
#pragma unroll
        for (int c = 0; c < DK / 32; c++) {
            const int col = lane + 32 * c;
            if (col < dk) o[col] = acc[r][c];
        }
    }
}

template <int DK, int DV, int R>
__device__ __forceinline__ void fa_bwd_dkv(float* __restrict__ dk, float* __restrict__ dv,
                                           const float* __restrict__ dout, const fa_u16* __restrict__ q,
                                           const fa_u16* __restrict__ k, const fa_u16* __restrict__ v,
                                           const float* __restrict__ lse, const float* __restrict__ dsum,
                                           const int* __restrict__ cu, int total, int H, int Hk, int dkw, int dvw,
                                           float scale) {
    constexpr int BK = FA_WARPS * R;
    float* ks = reinterpret_cast<float*>(fa_smem4);  // [BK][DK]
    float* vs = ks + BK * DK;                          // [BK][DV]
    float* qs = vs + BK * DV;                          // [BC][DK + 1]
    float* dos = qs + FA_BC * (DK + 1);                // [BC][DV + 1]
    float* ls = dos + FA_BC * (DV + 1);                // [BC]
    float* ds = ls + FA_BC;                            // [BC]
    const int seq = blockIdx.z, kh = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int j0 = blockIdx.x * BK;
    if (j0 >= len) return;
    const int group = H / Hk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    fa_load_bf16<DK>(ks, DK, k, start + j0, BK, len - j0, Hk, kh, dkw);
    fa_load_bf16<DV>(vs, DV, v, start + j0, BK, len - j0, Hk, kh, dvw);
    float ak[R][DK / 32], av[R][DV / 32], s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int c = 0; c < DK / 32; c++) ak[r][c] = 0.0f;
#pragma unroll
        for (int c = 0; c < DV / 32; c++) av[r][c] = 0.0f;
    }
    for (int g = 0; g < group; g++) {
        const int h = kh * group + g;
        for (int i0 = j0; i0 < len; i0 += FA_BC) {
            __syncthreads();
            fa_load_bf16<DK>(qs, DK + 1, q, start + i0, FA_BC, len - i0, H, h, dkw);
            fa_load_f32<DV>(dos, DV + 1, dout, start + i0, FA_BC, len - i0, H, h, dvw);
            if (threadIdx.x < FA_BC) {
                const int i = i0 + threadIdx.x;
                const long long at = (long long)h * total + start + i;
                ls[threadIdx.x] = i < len ? lse[at] : 0.0f;
                ds[threadIdx.x] = i < len ? dsum[at] : 0.0f;
            }
            __syncthreads();
            fa_scores<DK, R>(s, ks + warp * R * DK, qs + lane * (DK + 1));
            fa_scores<DV, R>(dp, vs + warp * R * DV, dos + lane * (DV + 1));
            const int i = i0 + lane;
            const float li = ls[lane], di = ds[lane];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int j = j0 + warp * R + r;
                const float p = (i < len && i >= j) ? __expf(s[r] * scale - li) : 0.0f;
                s[r] = p;
                dp[r] = p * (dp[r] - di) * scale;
            }
            fa_accumulate<DV, R>(av, s, dos, DV + 1, lane);
            fa_accumulate<DK, R>(ak, dp, qs, DK + 1, lane);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int j = j0 + warp * R + r;
        if (j >= len) continue;
        const long long row = (long long)(start + j) * Hk + kh;
#pragma unroll
        for (int c = 0; c < DK / 32; c++) {
            const int col = lane + 32 * c;
            if (col < dkw) dk[row * dkw + col] = ak[r][c];
        }
#pragma unroll
        for (int c = 0; c < DV / 32; c++) {
            const int col = lane + 32 * c;
            if (col < dvw) dv[row * dvw + col] = av[r][c];
        }
    }
}

// ---- Tensor-core forward (mma.sync m16n8k16, bf16 x bf16 -> f32) ----
// Same contract as fa_fwd for (DK, DV) in {(64, 64), (128, 128), (192, 128)}.
// A block owns 64 query rows (16 per warp) of one head; key tiles of 32.
// Shared memory holds bf16: Q [64][DK + 8], K [32][DK + 8] and V transposed
// [DV][32 + 8] (the +8 pads make the fragment loads conflict-free). Each
// warp keeps its Q fragments in registers, computes S = Q K^T for the tile
// with DK / 16 x 4 mma, masks and scales it, updates the running max and
// sums of its two rows per thread (shuffles within the 4-lane groups),
// rounds P to bf16 in registers (the S accumulator layout is the A operand
// layout) and adds P V with 2 x DV / 8 mma. The output is normalised by the
// sum of the rounded P (a convex combination of V rows whatever the
// rounding); lse uses the f32 sum. Fragment layouts (PTX ISA, mma.m16n8k16,
// g = lane / 4, t = lane % 4): A reg i holds row g + 8 (i % 2), columns
// 8 (i / 2) + 2t, +1; B reg i holds rows (k) 8 i + 2t, +1 of column g;
// C element e is row g + 8 (e / 2), column 2t + e % 2. The mma is
// aha_mma16816 (common.cuh), the emulation's under AHA_EMULATE.
#define FA_MMA_BR 64
#define FA_MMA_VS (FA_BC + 8)

// Rounds x to bf16 (nearest even; finite inputs) and returns its bits.
__device__ __forceinline__ unsigned fa_round_bf16(float x) {
    const unsigned u = __float_as_uint(x);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Packs bf16(lo) in the low half and bf16(hi) in the high half; adds the
// rounded values to *sum.
__device__ __forceinline__ unsigned fa_pack_p(float lo, float hi, float* sum) {
    const unsigned a = fa_round_bf16(lo), b = fa_round_bf16(hi);
    *sum += aha_bf16_to_f32((fa_u16)a) + aha_bf16_to_f32((fa_u16)b);
    return a | (b << 16);
}

template <int DK, int DV>
__device__ __forceinline__ void fa_fwd_mma(float* __restrict__ out, float* __restrict__ lse,
                                           const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                           const fa_u16* __restrict__ v, const int* __restrict__ cu, int total,
                                           int H, int Hk, float scale) {
    constexpr int QS = DK + 8;
    fa_u16* qs = reinterpret_cast<fa_u16*>(fa_smem4);  // [64][QS]
    fa_u16* ks = qs + FA_MMA_BR * QS;                   // [32][QS]
    fa_u16* vt = ks + FA_BC * QS;                        // [DV][VS]
    const int seq = blockIdx.z, h = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int i0 = blockIdx.x * FA_MMA_BR;
    if (i0 >= len) return;
    const int kh = h / (H / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // Q tile, as 32-bit pairs (DK is even, rows start 4-byte aligned).
    for (int idx = threadIdx.x; idx < FA_MMA_BR * (DK / 2); idx += FA_THREADS) {
        const int r = idx / (DK / 2), c2 = idx % (DK / 2);
        unsigned x = 0;
        if (r < len - i0) x = aha_ld32(q + ((long long)(start + i0 + r) * H + h) * DK + 2 * c2);
        *reinterpret_cast<unsigned*>(qs + r * QS + 2 * c2) = x;
    }
    __syncthreads();
    unsigned qf[DK / 16][4];
    const int r0 = warp * 16 + g;
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++) {
        qf[kk][0] = aha_ld32(qs + r0 * QS + kk * 16 + 2 * t);
        qf[kk][1] = aha_ld32(qs + (r0 + 8) * QS + kk * 16 + 2 * t);
        qf[kk][2] = aha_ld32(qs + r0 * QS + kk * 16 + 8 + 2 * t);
        qf[kk][3] = aha_ld32(qs + (r0 + 8) * QS + kk * 16 + 8 + 2 * t);
    }
    float o[DV / 8][4];
#pragma unroll
    for (int n = 0; n < DV / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {FA_NEG, FA_NEG}, l[2] = {0.0f, 0.0f}, lr[2] = {0.0f, 0.0f};
    const int row[2] = {i0 + r0, i0 + r0 + 8};
    const int kend = min(len, i0 + FA_MMA_BR);
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < FA_BC * (DK / 2); idx += FA_THREADS) {
            const int r = idx / (DK / 2), c2 = idx % (DK / 2);
            unsigned x = 0;
            if (j0 + r < len) x = aha_ld32(k + ((long long)(start + j0 + r) * Hk + kh) * DK + 2 * c2);
            *reinterpret_cast<unsigned*>(ks + r * QS + 2 * c2) = x;
        }
        for (int idx = threadIdx.x; idx < FA_BC * (DV / 2); idx += FA_THREADS) {
            const int r = idx / (DV / 2), c2 = idx % (DV / 2);
            unsigned x = 0;
            if (j0 + r < len) x = aha_ld32(v + ((long long)(start + j0 + r) * Hk + kh) * DV + 2 * c2);
            vt[(2 * c2) * FA_MMA_VS + r] = (fa_u16)(x & 0xffffu);
            vt[(2 * c2 + 1) * FA_MMA_VS + r] = (fa_u16)(x >> 16);
        }
        __syncthreads();
        // Every row of this warp is before the tile: nothing to add.
        if (i0 + warp * 16 + 15 < j0) continue;
        float s[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++) {
#pragma unroll
            for (int n = 0; n < 4; n++) {
                const fa_u16* kr = ks + (n * 8 + g) * QS + kk * 16 + 2 * t;
                aha_mma16816(s[n], qf[kk], aha_ld32(kr), aha_ld32(kr + 8));
            }
        }
        float mx[2] = {-FA_INF, -FA_INF};
#pragma unroll
        for (int n = 0; n < 4; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = j0 + n * 8 + 2 * t + (e & 1);
                const int rw = row[e >> 1];
                s[n][e] = (col <= rw && col < len) ? s[n][e] * scale : -FA_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        }
        float corr[2];
#pragma unroll
        for (int x = 0; x < 2; x++) {
            mx[x] = fmaxf(mx[x], __shfl_xor_sync(FA_FULL, mx[x], 1));
            mx[x] = fmaxf(mx[x], __shfl_xor_sync(FA_FULL, mx[x], 2));
            const float mn = fmaxf(m[x], mx[x]);
            corr[x] = __expf(m[x] - mn);
            m[x] = mn;
            l[x] *= corr[x];
            lr[x] *= corr[x];
        }
#pragma unroll
        for (int n = 0; n < DV / 8; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
#pragma unroll
        for (int n = 0; n < 4; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] = __expf(s[n][e] - m[e >> 1]);
                l[e >> 1] += s[n][e];
            }
        }
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; kk++) {
            unsigned a[4];
            a[0] = fa_pack_p(s[2 * kk][0], s[2 * kk][1], &lr[0]);
            a[1] = fa_pack_p(s[2 * kk][2], s[2 * kk][3], &lr[1]);
            a[2] = fa_pack_p(s[2 * kk + 1][0], s[2 * kk + 1][1], &lr[0]);
            a[3] = fa_pack_p(s[2 * kk + 1][2], s[2 * kk + 1][3], &lr[1]);
#pragma unroll
            for (int n = 0; n < DV / 8; n++) {
                const fa_u16* vr = vt + (n * 8 + g) * FA_MMA_VS + kk * 16 + 2 * t;
                aha_mma16816(o[n], a, aha_ld32(vr), aha_ld32(vr + 8));
            }
        }
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        l[x] += __shfl_xor_sync(FA_FULL, l[x], 1);
        l[x] += __shfl_xor_sync(FA_FULL, l[x], 2);
        lr[x] += __shfl_xor_sync(FA_FULL, lr[x], 1);
        lr[x] += __shfl_xor_sync(FA_FULL, lr[x], 2);
        if (row[x] >= len) continue;
        const float inv = 1.0f / lr[x];
        float* orow = out + ((long long)(start + row[x]) * H + h) * DV;
#pragma unroll
        for (int n = 0; n < DV / 8; n++) {
            orow[n * 8 + 2 * t] = o[n][2 * x] * inv;
            orow[n * 8 + 2 * t + 1] = o[n][2 * x + 1] * inv;
        }
        if (t == 0) lse[(long long)h * total + start + row[x]] = m[x] + __logf(l[x]);
    }
}

// ---- Tensor-core backward (mma.sync m16n8k16) ----
// Same contract as fa_bwd_dq / fa_bwd_dkv for the same widths as the
// tensor-core forward; deterministic (no atomics). dO is rounded to bf16 on
// its way into shared memory, and P and dS are rounded to bf16 in registers
// before their products, as FlashAttention-2 does; dsum stays f32 (from
// flash_bwd_dsum_f32). A operands (Q, dO, K, V rows of the warp) are read
// from shared memory as fragments; B operands come from row-major tiles
// (for S, dP) or transposed tiles [width][32 + 8] (for the products over
// the tile's rows), both padded so the 32-bit fragment loads are
// conflict-free. Accumulator fragments of S / dP are the A fragments of
// the next product, so no intermediate goes through shared memory.

// Rows row0 .. row0 + n of a [*, nh, D] bf16 tensor at head hh, as bf16
// rows [n][D + 8] (rs != 0) and/or transposed [D][32 + 8] (ts != 0); zero
// for rows >= nvalid. D even.
template <int D>
__device__ __forceinline__ void fa_tile_bf16(fa_u16* rs, fa_u16* ts, const fa_u16* __restrict__ src,
                                             long long row0, int n, int nvalid, int nh, int hh) {
    for (int idx = threadIdx.x; idx < n * (D / 2); idx += FA_THREADS) {
        const int r = idx / (D / 2), c2 = idx % (D / 2);
        unsigned x = 0;
        if (r < nvalid) x = aha_ld32(src + ((row0 + r) * nh + hh) * D + 2 * c2);
        if (rs) *reinterpret_cast<unsigned*>(rs + r * (D + 8) + 2 * c2) = x;
        if (ts) {
            ts[(2 * c2) * FA_MMA_VS + r] = (fa_u16)(x & 0xffffu);
            ts[(2 * c2 + 1) * FA_MMA_VS + r] = (fa_u16)(x >> 16);
        }
    }
}

// The same from an f32 tensor, rounded to bf16.
template <int D>
__device__ __forceinline__ void fa_tile_f32(fa_u16* rs, fa_u16* ts, const float* __restrict__ src, long long row0,
                                            int n, int nvalid, int nh, int hh) {
    for (int idx = threadIdx.x; idx < n * (D / 2); idx += FA_THREADS) {
        const int r = idx / (D / 2), c2 = idx % (D / 2);
        unsigned lo = 0, hi = 0;
        if (r < nvalid) {
            const float* p = src + ((row0 + r) * nh + hh) * D + 2 * c2;
            lo = fa_round_bf16(p[0]);
            hi = fa_round_bf16(p[1]);
        }
        if (rs) *reinterpret_cast<unsigned*>(rs + r * (D + 8) + 2 * c2) = lo | (hi << 16);
        if (ts) {
            ts[(2 * c2) * FA_MMA_VS + r] = (fa_u16)lo;
            ts[(2 * c2 + 1) * FA_MMA_VS + r] = (fa_u16)hi;
        }
    }
}

// acc[n] (16 x 8 blocks, n < 4) += A rows (16 from `a`, row stride D + 8,
// from row ar0) times B^T where B rows are `b` (row stride D + 8): the
// 16 x 32 product of the warp's rows with a tile's 32 rows over D columns.
template <int D>
__device__ __forceinline__ void fa_mma_rows(float (*acc)[4], const fa_u16* a, const fa_u16* b, int g, int t) {
    // Partly unrolled: the accumulators of the dK/dV kernel leave few registers.
#pragma unroll 2
    for (int kk = 0; kk < D / 16; kk++) {
        unsigned af[4];
        const fa_u16* ar = a + g * (D + 8) + kk * 16 + 2 * t;
        af[0] = aha_ld32(ar);
        af[1] = aha_ld32(ar + 8 * (D + 8));
        af[2] = aha_ld32(ar + 8);
        af[3] = aha_ld32(ar + 8 * (D + 8) + 8);
#pragma unroll
        for (int n = 0; n < 4; n++) {
            const fa_u16* br = b + (n * 8 + g) * (D + 8) + kk * 16 + 2 * t;
            aha_mma16816(acc[n], af, aha_ld32(br), aha_ld32(br + 8));
        }
    }
}

// acc[n] (n < D / 8) += W (16 x 32 in accumulator layout w[4][4], rounded
// to bf16 here) times the tile's 32 rows, read transposed from ts [D][40].
template <int D>
__device__ __forceinline__ void fa_mma_tile(float (*acc)[4], float (*w)[4], const fa_u16* ts, int g, int t) {
    float unused = 0.0f;
#pragma unroll
    for (int kk = 0; kk < FA_BC / 16; kk++) {
        unsigned a[4];
        a[0] = fa_pack_p(w[2 * kk][0], w[2 * kk][1], &unused);
        a[1] = fa_pack_p(w[2 * kk][2], w[2 * kk][3], &unused);
        a[2] = fa_pack_p(w[2 * kk + 1][0], w[2 * kk + 1][1], &unused);
        a[3] = fa_pack_p(w[2 * kk + 1][2], w[2 * kk + 1][3], &unused);
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            const fa_u16* br = ts + (n * 8 + g) * FA_MMA_VS + kk * 16 + 2 * t;
            aha_mma16816(acc[n], a, aha_ld32(br), aha_ld32(br + 8));
        }
    }
}

template <int DK, int DV>
__device__ __forceinline__ void fa_bwd_dq_mma(float* __restrict__ dq, const float* __restrict__ dout,
                                              const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                              const fa_u16* __restrict__ v, const float* __restrict__ lse,
                                              const float* __restrict__ dsum, const int* __restrict__ cu, int total,
                                              int H, int Hk, float scale) {
    fa_u16* qs = reinterpret_cast<fa_u16*>(fa_smem4);  // [64][DK + 8]
    fa_u16* dos = qs + FA_MMA_BR * (DK + 8);            // [64][DV + 8]
    fa_u16* ks = dos + FA_MMA_BR * (DV + 8);            // [32][DK + 8]
    fa_u16* vs = ks + FA_BC * (DK + 8);                  // [32][DV + 8]
    fa_u16* kt = vs + FA_BC * (DV + 8);                  // [DK][40]
    const int seq = blockIdx.z, h = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int i0 = blockIdx.x * FA_MMA_BR;
    if (i0 >= len) return;
    const int kh = h / (H / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    fa_tile_bf16<DK>(qs, nullptr, q, start + i0, FA_MMA_BR, len - i0, H, h);
    fa_tile_f32<DV>(dos, nullptr, dout, start + i0, FA_MMA_BR, len - i0, H, h);
    const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    float li[2], di[2];
#pragma unroll
    for (int x = 0; x < 2; x++) {
        const long long at = (long long)h * total + start + min(row[x], len - 1);
        li[x] = lse[at];
        di[x] = dsum[at];
    }
    float acc[DK / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int kend = min(len, i0 + FA_MMA_BR);
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        fa_tile_bf16<DK>(ks, kt, k, start + j0, FA_BC, len - j0, Hk, kh);
        fa_tile_bf16<DV>(vs, nullptr, v, start + j0, FA_BC, len - j0, Hk, kh);
        __syncthreads();
        if (i0 + warp * 16 + 15 < j0) continue;
        float s[4][4], dp[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
        }
        fa_mma_rows<DK>(s, qs + warp * 16 * (DK + 8), ks, g, t);
        fa_mma_rows<DV>(dp, dos + warp * 16 * (DV + 8), vs, g, t);
#pragma unroll
        for (int n = 0; n < 4; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = j0 + n * 8 + 2 * t + (e & 1), x = e >> 1;
                const float p = (col <= row[x] && col < len) ? __expf(s[n][e] * scale - li[x]) : 0.0f;
                s[n][e] = p * (dp[n][e] - di[x]) * scale;
            }
        }
        fa_mma_tile<DK>(acc, s, kt, g, t);
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        if (row[x] >= len) continue;
        float* o = dq + ((long long)(start + row[x]) * H + h) * DK;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            o[n * 8 + 2 * t] = acc[n][2 * x];
            o[n * 8 + 2 * t + 1] = acc[n][2 * x + 1];
        }
    }
}

template <int DK, int DV>
__device__ __forceinline__ void fa_bwd_dkv_mma(float* __restrict__ dk, float* __restrict__ dv,
                                               const float* __restrict__ dout, const fa_u16* __restrict__ q,
                                               const fa_u16* __restrict__ k, const fa_u16* __restrict__ v,
                                               const float* __restrict__ lse, const float* __restrict__ dsum,
                                               const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_u16* ksm = reinterpret_cast<fa_u16*>(fa_smem4);  // [64][DK + 8]
    fa_u16* vsm = ksm + FA_MMA_BR * (DK + 8);            // [64][DV + 8]
    fa_u16* qs = vsm + FA_MMA_BR * (DV + 8);             // [32][DK + 8]
    fa_u16* qt = qs + FA_BC * (DK + 8);                   // [DK][40]
    fa_u16* dos = qt + DK * FA_MMA_VS;                    // [32][DV + 8]
    fa_u16* dot = dos + FA_BC * (DV + 8);                 // [DV][40]
    float* ls = reinterpret_cast<float*>(dot + DV * FA_MMA_VS);  // [32]
    float* dsm = ls + FA_BC;                                      // [32]
    const int seq = blockIdx.z, kh = blockIdx.y;
    const int start = cu[seq];
    const int len = min(cu[seq + 1], total) - start;
    const int j0 = blockIdx.x * FA_MMA_BR;
    if (j0 >= len) return;
    const int group = H / Hk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    fa_tile_bf16<DK>(ksm, nullptr, k, start + j0, FA_MMA_BR, len - j0, Hk, kh);
    fa_tile_bf16<DV>(vsm, nullptr, v, start + j0, FA_MMA_BR, len - j0, Hk, kh);
    const int key[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
    float ak[DK / 8][4], av[DV / 8][4];
#pragma unroll
    for (int n = 0; n < DK / 8; n++) ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = 0.0f;
#pragma unroll
    for (int n = 0; n < DV / 8; n++) av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.0f;
    for (int gi = 0; gi < group; gi++) {
        const int h = kh * group + gi;
        for (int i0 = j0; i0 < len; i0 += FA_BC) {
            __syncthreads();
            fa_tile_bf16<DK>(qs, qt, q, start + i0, FA_BC, len - i0, H, h);
            fa_tile_f32<DV>(dos, dot, dout, start + i0, FA_BC, len - i0, H, h);
            if (threadIdx.x < FA_BC) {
                const int i = i0 + threadIdx.x;
                const long long at = (long long)h * total + start + i;
                ls[threadIdx.x] = i < len ? lse[at] : 0.0f;
                dsm[threadIdx.x] = i < len ? dsum[at] : 0.0f;
            }
            __syncthreads();
            // Every query of the tile is before this warp's keys.
            if (i0 + FA_BC - 1 < j0 + warp * 16) continue;
            float s[4][4], dp[4][4];
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.0f;
            }
            fa_mma_rows<DK>(s, ksm + warp * 16 * (DK + 8), qs, g, t);
            fa_mma_rows<DV>(dp, vsm + warp * 16 * (DV + 8), dos, g, t);
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = n * 8 + 2 * t + (e & 1), i = i0 + c;
                    const float p = (i < len && i >= key[e >> 1]) ? __expf(s[n][e] * scale - ls[c]) : 0.0f;
                    s[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - dsm[c]) * scale;
                }
            }
            fa_mma_tile<DV>(av, s, dot, g, t);
            fa_mma_tile<DK>(ak, dp, qt, g, t);
        }
    }
#pragma unroll
    for (int x = 0; x < 2; x++) {
        if (key[x] >= len) continue;
        const long long r = (long long)(start + key[x]) * Hk + kh;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
            dk[r * DK + n * 8 + 2 * t] = ak[n][2 * x];
            dk[r * DK + n * 8 + 2 * t + 1] = ak[n][2 * x + 1];
        }
#pragma unroll
        for (int n = 0; n < DV / 8; n++) {
            dv[r * DV + n * 8 + 2 * t] = av[n][2 * x];
            dv[r * DV + n * 8 + 2 * t + 1] = av[n][2 * x + 1];
        }
    }
}

// Positions p0 .. p0 + n of one sequence's paged cache [blocks, bs, Hk, d]
// at head kh into dst (zero past d and for positions >= pend).
template <int DCAP>
__device__ __forceinline__ void fa_load_paged(float* dst, int stride, const fa_u16* __restrict__ cache,
                                              const int* __restrict__ table, int bs, int p0, int n, int pend,
                                              int Hk, int kh, int d) {
    for (int idx = threadIdx.x; idx < n * DCAP; idx += FA_THREADS) {
        const int r = idx / DCAP, c = idx % DCAP;
        const int p = p0 + r;
        float x = 0.0f;
        if (p < pend && c < d) {
            const long long slot = (long long)table[p / bs] * bs + p % bs;
            x = aha_bf16_to_f32(cache[(slot * Hk + kh) * (long long)d + c]);
        }
        dst[r * stride + c] = x;
    }
}

// SAME_KV: the values are the keys (MLA's latent cache, where each cached
// entry [c ; k_rope] serves as both; kc == vc, dv == dk): the key tile in
// shared memory serves the value products too, which halves the kernel's
// shared memory (the 576-wide variant needs it to stay under 99 KiB).
template <int DK, int DV, int R, bool SAME_KV = false>
__device__ __forceinline__ void fa_decode(float* __restrict__ opart, float* __restrict__ lpart,
                                          const fa_u16* __restrict__ q, const fa_u16* __restrict__ kc,
                                          const fa_u16* __restrict__ vc, const int* __restrict__ tables,
                                          int max_blocks, const int* __restrict__ ctx_lens,
                                          const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
                                          int bs, int split_len, float scale) {
    constexpr int BR = FA_WARPS * R;
    float* qs = reinterpret_cast<float*>(fa_smem4);  // [BR][DK]
    float* ks = qs + BR * DK;                          // [BC][DK + 1]
    float* vs = ks + FA_BC * (DK + 1);                 // [BC][DV] (unused when SAME_KV)
    static_assert(!SAME_KV || DK == DV, "shared keys and values have one width");
    const int split = blockIdx.x, kh = blockIdx.y, seq = blockIdx.z;
    const int qstart = qcu[seq];
    const int n = min(qcu[seq + 1], total_q) - qstart;
    if (n <= 0) return;
    const int ctx = ctx_lens[seq];
    const int* table = tables + (long long)seq * max_blocks;
    const int k0 = split * split_len;
    const int k1 = min(ctx, k0 + split_len);
    const int group = H / Hk, rows = n * group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int rho0 = 0; rho0 < rows; rho0 += BR) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < BR * DK; idx += FA_THREADS) {
            const int r = idx / DK, c = idx % DK, rho = rho0 + r;
            float x = 0.0f;
            if (rho < rows && c < dk) {
                const long long row = (long long)(qstart + rho / group) * H + kh * group + rho % group;
                x = aha_bf16_to_f32(q[row * dk + c]);
            }
            qs[idx] = x;
        }
        float acc[R][DV / 32], m[R], l[R], x[R];
        int pos[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            m[r] = FA_NEG;
            l[r] = 0.0f;
            // The new tokens are the last n positions of the context.
            pos[r] = ctx - n + (rho0 + warp * R + r) / group;
#pragma unroll
            for (int c = 0; c < DV / 32; c++) acc[r][c] = 0.0f;
        }
        for (int j0 = k0; j0 < k1; j0 += FA_BC) {
            __syncthreads();
            fa_load_paged<DK>(ks, DK + 1, kc, table, bs, j0, FA_BC, k1, Hk, kh, dk);
            if (!SAME_KV) fa_load_paged<DV>(vs, DV, vc, table, bs, j0, FA_BC, k1, Hk, kh, dv);
            __syncthreads();
            fa_scores<DK, R>(x, qs + warp * R * DK, ks + lane * (DK + 1));
            const int j = j0 + lane;
#pragma unroll
            for (int r = 0; r < R; r++) x[r] = (j < k1 && j <= pos[r]) ? x[r] * scale : -FA_INF;
            fa_online<DV, R>(x, m, l, acc);
            if (SAME_KV) {
                fa_accumulate<DV, R>(acc, x, ks, DK + 1, lane);
            } else {
                fa_accumulate<DV, R>(acc, x, vs, DV, lane);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int rho = rho0 + warp * R + r;
            const float sum = aha_warp_sum(l[r]);
            if (rho >= rows) continue;
            const long long row = ((long long)split * total_q + qstart + rho / group) * H + kh * group + rho % group;
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
            for (int c = 0; c < DV / 32; c++) {
                const int col = lane + 32 * c;
                if (col < dv) opart[row * dv + col] = acc[r][c] * inv;
            }
            if (lane == 0) lpart[row] = sum > 0.0f ? m[r] + __logf(sum) : -FA_INF;
        }
    }
}

// The entry points: one per kernel and head-width specialisation (see the top).
extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_d64_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv, float scale) {
    fa_fwd<64, 64, 8>(out, lse, q, k, v, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_d128_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv, float scale) {
    fa_fwd<128, 128, 8>(out, lse, q, k, v, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_d192v128_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv, float scale) {
    fa_fwd<192, 128, 8>(out, lse, q, k, v, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_any_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv, float scale) {
    fa_fwd<256, 256, 4>(out, lse, q, k, v, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_d64_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv,
    float scale) {
    fa_bwd_dq<64, 64, 8>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_d128_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv,
    float scale) {
    fa_bwd_dq<128, 128, 8>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_d192v128_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv,
    float scale) {
    fa_bwd_dq<192, 128, 8>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_any_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dk, int dv,
    float scale) {
    fa_bwd_dq<256, 256, 4>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, dk, dv, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_d64_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dkw, int dvw,
    float scale) {
    fa_bwd_dkv<64, 64, 8>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, dkw, dvw, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_d128_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dkw, int dvw,
    float scale) {
    fa_bwd_dkv<128, 128, 8>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, dkw, dvw, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_d192v128_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dkw, int dvw,
    float scale) {
    fa_bwd_dkv<192, 128, 8>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, dkw, dvw, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_any_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, int dkw, int dvw,
    float scale) {
    fa_bwd_dkv<256, 256, 4>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, dkw, dvw, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_d64_bf16(
    float* __restrict__ opart, float* __restrict__ lpart, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ kc, const fa_u16* __restrict__ vc, const int* __restrict__ tables, int max_blocks,
    const int* __restrict__ ctx_lens, const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
    int bs, int split_len, float scale) {
    fa_decode<64, 64, 8>(opart, lpart, q, kc, vc, tables, max_blocks, ctx_lens, qcu, total_q, H, Hk, dk, dv,
                              bs, split_len, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_d128_bf16(
    float* __restrict__ opart, float* __restrict__ lpart, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ kc, const fa_u16* __restrict__ vc, const int* __restrict__ tables, int max_blocks,
    const int* __restrict__ ctx_lens, const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
    int bs, int split_len, float scale) {
    fa_decode<128, 128, 8>(opart, lpart, q, kc, vc, tables, max_blocks, ctx_lens, qcu, total_q, H, Hk, dk, dv,
                              bs, split_len, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_d192v128_bf16(
    float* __restrict__ opart, float* __restrict__ lpart, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ kc, const fa_u16* __restrict__ vc, const int* __restrict__ tables, int max_blocks,
    const int* __restrict__ ctx_lens, const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
    int bs, int split_len, float scale) {
    fa_decode<192, 128, 8>(opart, lpart, q, kc, vc, tables, max_blocks, ctx_lens, qcu, total_q, H, Hk, dk, dv,
                              bs, split_len, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_any_bf16(
    float* __restrict__ opart, float* __restrict__ lpart, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ kc, const fa_u16* __restrict__ vc, const int* __restrict__ tables, int max_blocks,
    const int* __restrict__ ctx_lens, const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
    int bs, int split_len, float scale) {
    fa_decode<256, 256, 4>(opart, lpart, q, kc, vc, tables, max_blocks, ctx_lens, qcu, total_q, H, Hk, dk, dv,
                              bs, split_len, scale);
}

// MLA's latent cache at DeepSeek-V3's width (kv_lora_rank 512 + rope 64):
// keys = values (kc == vc), any width up to 576, 2 rows per warp.
extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_latent576_bf16(
    float* __restrict__ opart, float* __restrict__ lpart, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ kc, const fa_u16* __restrict__ vc, const int* __restrict__ tables, int max_blocks,
    const int* __restrict__ ctx_lens, const int* __restrict__ qcu, int total_q, int H, int Hk, int dk, int dv,
    int bs, int split_len, float scale) {
    fa_decode<576, 576, 2, true>(opart, lpart, q, kc, vc, tables, max_blocks, ctx_lens, qcu, total_q, H, Hk, dk,
                                 dv, bs, split_len, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_mma_d64_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_fwd_mma<64, 64>(out, lse, q, k, v, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_mma_d128_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_fwd_mma<128, 128>(out, lse, q, k, v, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_fwd_mma_d192v128_bf16(
    float* __restrict__ out, float* __restrict__ lse, const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
    const fa_u16* __restrict__ v, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_fwd_mma<192, 128>(out, lse, q, k, v, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_mma_d64_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dq_mma<64, 64>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_mma_d64_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dkv_mma<64, 64>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_mma_d128_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dq_mma<128, 128>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_mma_d128_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dkv_mma<128, 128>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dq_mma_d192v128_bf16(
    float* __restrict__ dq, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dq_mma<192, 128>(dq, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dkv_mma_d192v128_bf16(
    float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout, const fa_u16* __restrict__ q,
    const fa_u16* __restrict__ k, const fa_u16* __restrict__ v, const float* __restrict__ lse,
    const float* __restrict__ dsum, const int* __restrict__ cu, int total, int H, int Hk, float scale) {
    fa_bwd_dkv_mma<192, 128>(dk, dv, dout, q, k, v, lse, dsum, cu, total, H, Hk, scale);
}

// dsum[h, row] = dout[row, h, :] . out[row, h, :] for rows 0 .. total (all
// rows; rows outside every sequence are harmless). One warp per (row, head).
extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_bwd_dsum_f32(
    float* __restrict__ dsum, const float* __restrict__ dout, const float* __restrict__ out, int total, int H,
    int dv) {
    const int lane = threadIdx.x & 31;
    const long long w = (long long)blockIdx.x * FA_WARPS + (threadIdx.x >> 5);
    if (w >= (long long)total * H) return;
    const long long row = w / H;
    const int h = (int)(w % H);
    const float* a = dout + w * dv;
    const float* b = out + w * dv;
    float acc = 0.0f;
    for (int c = lane; c < dv; c += 32) acc += a[c] * b[c];
    acc = aha_warp_sum(acc);
    if (lane == 0) dsum[(long long)h * total + row] = acc;
}

// out[row, h, :] = sum_s exp(lpart[s] - lse) opart[s, row, h, :] and
// lse[h, row] = log sum_s exp(lpart[s]), over the splits s; a row no split
// saw (context 0) gets 0 and -inf. opart [splits, total_q, H, dv],
// lpart [splits, total_q, H]. One warp per (row, head).
extern "C" __global__ __launch_bounds__(FA_THREADS, 1) void flash_decode_combine_f32(
    float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ opart,
    const float* __restrict__ lpart, int splits, int total_q, int H, int dv) {
    const int lane = threadIdx.x & 31;
    const long long w = (long long)blockIdx.x * FA_WARPS + (threadIdx.x >> 5);
    const long long rows = (long long)total_q * H;
    if (w >= rows) return;
    float mx = -FA_INF;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, lpart[s * rows + w]);
    float sum = 0.0f;
    if (mx != -FA_INF) {
        for (int s = 0; s < splits; s++) sum += __expf(lpart[s * rows + w] - mx);
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int c = lane; c < dv; c += 32) {
        float acc = 0.0f;
        if (sum > 0.0f) {
            for (int s = 0; s < splits; s++) {
                const float ls = lpart[s * rows + w];
                if (ls != -FA_INF) acc += __expf(ls - mx) * inv * opart[(s * rows + w) * dv + c];
            }
        }
        out[w * dv + c] = acc;
    }
    if (lane == 0) lse[(long long)(w % H) * total_q + w / H] = sum > 0.0f ? mx + __logf(sum) : -FA_INF;
}
