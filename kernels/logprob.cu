// Per-token log-probabilities of chosen targets over full logit rows, and
// their backward; plus the bias add and bias gradient of linear layers.
// CPU twins: aha_tensor::cpu::token_logprob_forward / token_logprob_backward;
// the bias kernels mirror aha-moe-model's linear layer (out += bias;
// dbias += column sums of dout).
//
// token_logprob_forward_f32: one block of LP_BLOCK threads per row n of
//   logits [N, V]: lse[n] = log sum_j exp(x_j), logp[n] = x[t] - lse (at most
//   0; a NaN stays NaN). One read of the row: an online max and sum per
//   strided lane, merged in a fixed tree.
// token_logprob_backward_f32: dlogits[n, j] = -dlogp[n] exp(x_j - lse[n]),
//   plus dlogp[n] at j = t. One thread per element, grid-stride.
// add_bias_f32: x [rows, c] += bias [c], one thread per element, grid-stride.
// bias_grad_f32: dbias [c] += sum over rows of dy [rows, c], one thread per
//   column summing in row order (deterministic), grid-stride.
// (The grid-stride loops matter: the launchers cap the grid at 65,536 blocks
// of 256, so one thread per element stopped at 16.7M elements -- 111 rows of
// a 151,936-word vocabulary. Found by the CPU emulation, which caps the grid
// at 4 blocks.)

#define LP_BLOCK 256

extern "C" __global__ void token_logprob_forward_f32(
    float* __restrict__ logp, float* __restrict__ lse, const float* __restrict__ logits,
    const unsigned int* __restrict__ targets, unsigned long long v) {
    // One pass over the row: each thread keeps an online (max, sum of
    // exp(x - max)); the block then merges the pairs in a fixed tree.
    __shared__ float sh_m[LP_BLOCK];
    __shared__ float sh_s[LP_BLOCK];
    const unsigned long long row = blockIdx.x;
    const float* x = logits + row * v;
    float m = __int_as_float(0xff800000), acc = 0.0f;
    for (unsigned long long j = threadIdx.x; j < v; j += LP_BLOCK) {
        const float xj = x[j];
        if (xj != xj) {
            m = xj;  // NaN: sticks, and poisons the sum below
            acc = xj;
        } else if (xj > m) {
            acc = acc * __expf(m - xj) + 1.0f;
            m = xj;
        } else if (xj > __int_as_float(0xff800000)) {
            acc += __expf(xj - m);  // -inf adds nothing (and -inf - -inf is NaN)
        }
    }
    sh_m[threadIdx.x] = m;
    sh_s[threadIdx.x] = acc;
    __syncthreads();
    for (int s = LP_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ma = sh_m[threadIdx.x], mb = sh_m[threadIdx.x + s];
            const float sa = sh_s[threadIdx.x], sb = sh_s[threadIdx.x + s];
            // -inf on both sides (a thread with no elements): keep the sum 0.
            const float mn = (mb > ma || mb != mb) ? mb : ma;
            const float ea = sa == 0.0f ? 0.0f : sa * __expf(ma - mn);
            const float eb = sb == 0.0f ? 0.0f : sb * __expf(mb - mn);
            sh_m[threadIdx.x] = mn;
            sh_s[threadIdx.x] = ea + eb;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float l = sh_m[0] + __logf(sh_s[0]);
        float d = x[targets[row]] - l;
        lse[row] = l;
        logp[row] = d > 0.0f ? 0.0f : d;
    }
}

extern "C" __global__ void token_logprob_backward_f32(
    float* __restrict__ dlogits, const float* __restrict__ dlogp, const float* __restrict__ logits,
    const float* __restrict__ lse, const unsigned int* __restrict__ targets,
    unsigned long long n, unsigned long long v) {
    // Grid-stride: the launcher caps the grid at 65,536 blocks.
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n * v;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long row = i / v, j = i % v;
        const float g = dlogp[row];
        float d = -g * __expf(logits[i] - lse[row]);
        if (j == targets[row]) d += g;
        dlogits[i] = d;
    }
}

extern "C" __global__ void add_bias_f32(
    float* __restrict__ x, const float* __restrict__ bias, unsigned long long rows, unsigned long long c) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * c;
         i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] += bias[i % c];
}

extern "C" __global__ void bias_grad_f32(
    float* __restrict__ dbias, const float* __restrict__ dy, unsigned long long rows, unsigned long long c) {
    for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (unsigned long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (unsigned long long r = 0; r < rows; r++) acc += dy[r * c + j];
        dbias[j] += acc;
    }
}
