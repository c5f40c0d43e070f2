// The lm head's log-probabilities, entropies and their backward, one
// vocabulary chunk at a time, so that logits for the whole vocabulary never
// exist for the batch. The chunk's logits come from a cuBLAS product
// (hidden [N, C] x W[v0 .. v0 + vc, C]^T); these kernels do the rest.
// CPU twin: aha_tensor::cpu::lm_head_logprob_forward / _backward (same
// chunking, same merge rule).
//
// With x = logit / temperature over the whole vocabulary:
//   lse = log sum_j exp(x_j)       logp = x_t - lse (at most 0; NaN stays NaN)
//   entropy = lse - sum_j p_j x_j  (p = softmax(x))
// The running state of a row, [N, 4] f32: m (max so far), s = sum exp(x - m),
// u = sum exp(x - m) x, xt (the target's x once its chunk has been seen).
//
// lmhead_chunk_stats_f32: one block of LM_BLOCK threads per row; reduces the
//   chunk's max, then its two sums against that max, and merges them into
//   the row's state (`first` = 1 on the first chunk initialises it).
// lmhead_finish_f32: one thread per row: logp, entropy, lse from the state.
// lmhead_chunk_grad_f32: in place over the chunk's logits g [N, vc]:
//   g = (dlogp (onehot_t - p) - dent p (x - (lse - entropy))) / temperature,
//   one thread per element (grid stride).

#define LM_BLOCK 256

__device__ __forceinline__ float lm_nanmax(float a, float b) { return (b > a || b != b) ? b : a; }

extern "C" __global__ void lmhead_chunk_stats_f32(
    float* __restrict__ state, const float* __restrict__ logits, const unsigned int* __restrict__ targets,
    unsigned long long vc, unsigned long long v0, float inv_temp, int first) {
    __shared__ float sh_a[LM_BLOCK];
    __shared__ float sh_b[LM_BLOCK];
    const unsigned long long row = blockIdx.x;
    const float* x = logits + row * vc;
    float m = __int_as_float(0xff800000);
    for (unsigned long long j = threadIdx.x; j < vc; j += LM_BLOCK) m = lm_nanmax(m, x[j] * inv_temp);
    sh_a[threadIdx.x] = m;
    __syncthreads();
    for (int s = LM_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh_a[threadIdx.x] = lm_nanmax(sh_a[threadIdx.x], sh_a[threadIdx.x + s]);
        __syncthreads();
    }
    const float mc = sh_a[0];
    __syncthreads();
    float sa = 0.0f, sb = 0.0f;
    for (unsigned long long j = threadIdx.x; j < vc; j += LM_BLOCK) {
        float xj = x[j] * inv_temp;
        float e = __expf(xj - mc);
        sa += e;
        sb += e * xj;
    }
    sh_a[threadIdx.x] = sa;
    sh_b[threadIdx.x] = sb;
    __syncthreads();
    for (int s = LM_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh_a[threadIdx.x] += sh_a[threadIdx.x + s];
            sh_b[threadIdx.x] += sh_b[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float* st = state + row * 4;
        const unsigned long long t = targets[row];
        const bool has_t = t >= v0 && t < v0 + vc;
        const float xt = has_t ? x[t - v0] * inv_temp : 0.0f;
        if (first) {
            st[0] = mc;
            st[1] = sh_a[0];
            st[2] = sh_b[0];
            st[3] = xt;
        } else {
            const float mo = st[0];
            const float mn = lm_nanmax(mo, mc);
            const float co = __expf(mo - mn), cc = __expf(mc - mn);
            st[0] = mn;
            st[1] = st[1] * co + sh_a[0] * cc;
            st[2] = st[2] * co + sh_b[0] * cc;
            if (has_t) st[3] = xt;
        }
    }
}

extern "C" __global__ void lmhead_finish_f32(
    float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ lse,
    const float* __restrict__ state, unsigned long long n) {
    const unsigned long long row = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    const float* st = state + row * 4;
    const float l = st[0] + __logf(st[1]);
    const float d = st[3] - l;
    lse[row] = l;
    logp[row] = d > 0.0f ? 0.0f : d;
    entropy[row] = l - st[2] / st[1];
}

extern "C" __global__ void lmhead_chunk_grad_f32(
    float* __restrict__ g, const float* __restrict__ lse, const float* __restrict__ entropy,
    const float* __restrict__ dlogp, const float* __restrict__ dent, const unsigned int* __restrict__ targets,
    unsigned long long n, unsigned long long vc, unsigned long long v0, float inv_temp) {
    const unsigned long long total = n * vc;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long row = i / vc, j = i % vc;
        const float x = g[i] * inv_temp;
        const float l = lse[row];
        const float p = __expf(x - l);
        const float dl = dlogp[row];
        float d = -dl * p - dent[row] * p * (x - (l - entropy[row]));
        if (v0 + j == targets[row]) d += dl;
        g[i] = d * inv_temp;
    }
}
