// Per-token log-probabilities of chosen targets over full logit rows, and
// their backward; plus the bias add and bias gradient of linear layers.
// CPU twins: aha_tensor::cpu::token_logprob_forward / token_logprob_backward;
// the bias kernels mirror aha-moe-model's linear layer (out += bias;
// dbias += column sums of dout).
//
// token_logprob_forward_f32: one block of LP_BLOCK threads per row n of
//   logits [N, V]: lse[n] = log sum_j exp(x_j), logp[n] = x[t] - lse (at most
//   0; a NaN stays NaN). Sums in f32 over strided lanes, then a tree.
// token_logprob_backward_f32: dlogits[n, j] = -dlogp[n] exp(x_j - lse[n]),
//   plus dlogp[n] at j = t. One thread per element.
// add_bias_f32: x [rows, c] += bias [c], one thread per element.
// bias_grad_f32: dbias [c] += sum over rows of dy [rows, c], one thread per
//   column summing in row order (deterministic).

#define LP_BLOCK 256

extern "C" __global__ void token_logprob_forward_f32(
    float* __restrict__ logp, float* __restrict__ lse, const float* __restrict__ logits,
    const unsigned int* __restrict__ targets, unsigned long long v) {
    __shared__ float sh[LP_BLOCK];
    const unsigned long long row = blockIdx.x;
    const float* x = logits + row * v;
    float m = __int_as_float(0xff800000);
    for (unsigned long long j = threadIdx.x; j < v; j += LP_BLOCK) {
        float xj = x[j];
        m = (xj > m || xj != xj) ? xj : m;
    }
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int s = LP_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float a = sh[threadIdx.x], b = sh[threadIdx.x + s];
            sh[threadIdx.x] = (b > a || b != b) ? b : a;
        }
        __syncthreads();
    }
    m = sh[0];
    __syncthreads();
    float acc = 0.0f;
    for (unsigned long long j = threadIdx.x; j < v; j += LP_BLOCK) acc += __expf(x[j] - m);
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = LP_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float l = m + __logf(sh[0]);
        float d = x[targets[row]] - l;
        lse[row] = l;
        logp[row] = d > 0.0f ? 0.0f : d;
    }
}

extern "C" __global__ void token_logprob_backward_f32(
    float* __restrict__ dlogits, const float* __restrict__ dlogp, const float* __restrict__ logits,
    const float* __restrict__ lse, const unsigned int* __restrict__ targets,
    unsigned long long n, unsigned long long v) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * v) return;
    const unsigned long long row = i / v, j = i % v;
    const float g = dlogp[row];
    float d = -g * __expf(logits[i] - lse[row]);
    if (j == targets[row]) d += g;
    dlogits[i] = d;
}

extern "C" __global__ void add_bias_f32(
    float* __restrict__ x, const float* __restrict__ bias, unsigned long long rows, unsigned long long c) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * c) x[i] += bias[i % c];
}

extern "C" __global__ void bias_grad_f32(
    float* __restrict__ dbias, const float* __restrict__ dy, unsigned long long rows, unsigned long long c) {
    const unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = 0.0f;
    for (unsigned long long r = 0; r < rows; r++) acc += dy[r * c + j];
    dbias[j] += acc;
}
