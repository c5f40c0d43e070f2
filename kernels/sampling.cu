// Sampling one token per row of logits for the rollout engine: temperature,
// then top-k, then top-p over the top-k set, then min-p, then a draw with a
// given uniform number. CPU twin: aha_sampler::sample_with_uniform.
//
// One block of SAMPLE_BLOCK threads per row. The kept set after top-k and
// top-p is always a prefix of the tokens ranked by (weight desc, id asc), so
// it is found as a threshold value tau and a count c of the tokens equal to
// tau that are kept (the lowest ids): both by radix selection over the bits
// of the weights (positive floats order like their bits), 8 bits per pass,
// with a 256-bin histogram of counts (top-k) or masses (top-p) in shared
// memory. No sort of the vocabulary. The draw then scans the kept tokens in
// id order (block-wide prefix sums, tile by tile) and takes the first whose
// cumulative weight exceeds u times the kept mass.
//
// Inputs  logits [rows, v] f32, u [rows] f64 in [0, 1).
// Scratch w [rows, v] f32 (the weights exp((x - max) / T)).
// Outputs token [rows] i32 (-1: a row with NaN or no finite logit),
//         logprob [rows] f32 = log softmax(logits / T)[token] (T = 1 greedy),
//         trunc_log [rows] f32 = ln(kept mass / total mass).
// temperature <= 0 means greedy (argmax, lowest id on ties).

#define SAMPLE_BLOCK 512
#define WARPS (SAMPLE_BLOCK / 32)

__device__ __forceinline__ double warp_sum_d(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    return x;
}

// Block-wide sum; every thread gets the result.
__device__ double block_sum_d(double x, double* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    x = warp_sum_d(x);
    __syncthreads();
    if (lane == 0) sh[wid] = x;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x < 32) {
        t = threadIdx.x < WARPS ? sh[threadIdx.x] : 0.0;
        t = warp_sum_d(t);
        if (threadIdx.x == 0) sh[0] = t;
    }
    __syncthreads();
    t = sh[0];
    __syncthreads();
    return t;
}

// Inclusive block scan (per thread value x, T = double or int); returns the
// thread's inclusive prefix and writes the block total to *total.
template <typename T>
__device__ T block_scan(T x, T* sh, T* total) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) sh[wid] = x;
    __syncthreads();
    if (threadIdx.x < 32) {
        T t = threadIdx.x < WARPS ? sh[threadIdx.x] : T(0);
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        if (threadIdx.x < WARPS) sh[threadIdx.x] = t;
    }
    __syncthreads();
    if (wid > 0) x += sh[wid - 1];
    *total = sh[WARPS - 1];
    __syncthreads();
    return x;
}

extern "C" __global__ void sample_f32(
    int* __restrict__ token, float* __restrict__ logprob, float* __restrict__ trunc_log,
    float* __restrict__ w, const float* __restrict__ logits, const double* __restrict__ u,
    unsigned long long v, float temperature, int top_k, float top_p, float min_p) {
    __shared__ double shd[WARPS];
    __shared__ int shi[WARPS];
    __shared__ unsigned int cnt[256];
    __shared__ double mass[256];
    __shared__ float shf[WARPS];
    __shared__ int sel_i[WARPS];
    __shared__ unsigned int s_prefix, s_mask, s_rem_k;
    __shared__ double s_rem_mass, s_above;
    __shared__ int s_found, s_last;

    const unsigned long long row = blockIdx.x;
    const float* x = logits + row * v;
    float* e = w + row * v;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;

    // 1. Max (ignoring nothing: any NaN poisons the row), and argmax with
    //    the lowest id on ties.
    float m = __int_as_float(0xff800000);  // -inf
    int arg = 0x7fffffff;
    int nan = 0;
    for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
        float xi = x[i];
        if (xi != xi) nan = 1;
        if (xi > m || (xi == m && (int)i < arg)) { m = xi; arg = (int)i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float mo = __shfl_down_sync(0xffffffffu, m, o);
        int ao = __shfl_down_sync(0xffffffffu, arg, o);
        if (mo > m || (mo == m && ao < arg)) { m = mo; arg = ao; }
    }
    nan = __syncthreads_or(nan);
    if (lane == 0) { shf[wid] = m; sel_i[wid] = arg; }
    __syncthreads();
    if (tid == 0) {
        for (int k = 1; k < WARPS; k++)
            if (shf[k] > shf[0] || (shf[k] == shf[0] && sel_i[k] < sel_i[0])) { shf[0] = shf[k]; sel_i[0] = sel_i[k]; }
    }
    __syncthreads();
    m = shf[0];
    arg = sel_i[0];
    __syncthreads();
    if (nan || !isfinite(m)) {
        if (tid == 0) { token[row] = -1; logprob[row] = __int_as_float(0x7fc00000); trunc_log[row] = __int_as_float(0x7fc00000); }
        return;
    }

    const int greedy = !(temperature > 0.0f);
    const float inv_t = greedy ? 1.0f : 1.0f / temperature;
    // 2. Weights and their sum; the largest weight (exp(0) = 1 up to rounding).
    double zs = 0.0;
    float emax = 0.0f;
    for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
        float ei = __expf((x[i] - m) * inv_t);
        e[i] = ei;
        zs += (double)ei;
        emax = fmaxf(emax, ei);
    }
    const double z = block_sum_d(zs, shd);
    for (int o = 16; o > 0; o >>= 1) emax = fmaxf(emax, __shfl_down_sync(0xffffffffu, emax, o));
    if (lane == 0) shf[wid] = emax;
    __syncthreads();
    if (tid == 0) for (int k = 1; k < WARPS; k++) shf[0] = fmaxf(shf[0], shf[k]);
    __syncthreads();
    emax = shf[0];
    __syncthreads();
    const double lse = log(z);
    if (greedy) {
        if (tid == 0) {
            token[row] = arg;
            logprob[row] = (float)(((double)x[arg] - (double)m) - lse);
            trunc_log[row] = 0.0f;
        }
        return;
    }

    // 3. Top-k by count: the k-th largest weight tau_k and how many of the
    //    tokens equal to it are kept (c_k, lowest ids).
    const int limit_k = top_k > 0 && (unsigned long long)top_k < v;
    unsigned int tau_k = 0, c_k = 0;
    if (limit_k) {
        if (tid == 0) { s_prefix = 0; s_mask = 0; s_rem_k = (unsigned int)top_k; }
        __syncthreads();
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += SAMPLE_BLOCK) cnt[b] = 0;
            __syncthreads();
            const unsigned int prefix = s_prefix, mask = s_mask;
            for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
                unsigned int bits = __float_as_uint(e[i]);
                if ((bits & mask) == prefix) atomicAdd(&cnt[(bits >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                unsigned int acc = 0;
                for (int b = 255; b >= 0; b--) {
                    if (acc + cnt[b] >= s_rem_k) {
                        s_rem_k -= acc;
                        s_prefix |= (unsigned int)b << shift;
                        s_mask |= 255u << shift;
                        break;
                    }
                    acc += cnt[b];
                }
            }
            __syncthreads();
        }
        tau_k = s_prefix;
        c_k = s_rem_k;
    }
    const float tau_kf = __uint_as_float(tau_k);
    // In the top-k set? (ties at tau_k are counted as a group of c_k.)
    #define IN_K(bits) (!limit_k || (bits) > tau_k)

    // Mass of the top-k set.
    double mk = 0.0;
    for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
        unsigned int bits = __float_as_uint(e[i]);
        if (IN_K(bits)) mk += (double)e[i];
    }
    double mass_k = block_sum_d(mk, shd);
    if (limit_k) mass_k += (double)c_k * (double)tau_kf;

    // 4. Top-p over the top-k set: the threshold tau and the kept ties c.
    int limit = limit_k;
    unsigned int tau = tau_k, c = c_k;
    if (top_p < 1.0f) {
        const double target = (double)top_p * mass_k;
        if (tid == 0) { s_prefix = 0; s_mask = 0; s_rem_mass = target; s_above = 0.0; s_rem_k = 0; }
        __syncthreads();
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += SAMPLE_BLOCK) { cnt[b] = 0; mass[b] = 0.0; }
            __syncthreads();
            const unsigned int prefix = s_prefix, mask = s_mask;
            for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
                unsigned int bits = __float_as_uint(e[i]);
                if (IN_K(bits) && (bits & mask) == prefix) {
                    unsigned int b = (bits >> shift) & 255u;
                    atomicAdd(&cnt[b], 1u);
                    atomicAdd(&mass[b], (double)e[i]);
                }
            }
            __syncthreads();
            if (tid == 0) {
                if (limit_k && (tau_k & mask) == prefix) {
                    unsigned int b = (tau_k >> shift) & 255u;
                    cnt[b] += c_k;
                    mass[b] += (double)c_k * (double)tau_kf;
                }
                double acc = 0.0;
                for (int b = 255; b >= 0; b--) {
                    if (acc + mass[b] >= s_rem_mass || b == 0) {
                        s_rem_mass -= acc;
                        s_above += acc;
                        s_prefix |= (unsigned int)b << shift;
                        s_mask |= 255u << shift;
                        s_rem_k = cnt[b];
                        break;
                    }
                    acc += mass[b];
                }
            }
            __syncthreads();
        }
        tau = s_prefix;
        const float tf = __uint_as_float(tau);
        // Ties at tau needed to reach the target, at least one, at most all.
        double need = tf > 0.0f ? ceil((target - s_above) / (double)tf) : (double)s_rem_k;
        if (need < 1.0) need = 1.0;
        c = (unsigned int)fmin(need, (double)s_rem_k);
        limit = 1;
    }
    #undef IN_K
    const float tauf = __uint_as_float(tau);
    const float floor_p = min_p > 0.0f ? min_p * emax : 0.0f;

    // 5. Kept mass: above tau (and >= floor), plus the kept ties.
    double km = 0.0;
    for (unsigned long long i = tid; i < v; i += SAMPLE_BLOCK) {
        float ei = e[i];
        unsigned int bits = __float_as_uint(ei);
        if ((!limit || bits > tau) && ei >= floor_p) km += (double)ei;
    }
    double kept = block_sum_d(km, shd);
    if (limit && tauf >= floor_p) kept += (double)c * (double)tauf;

    // 6. The draw, in id order, tile by tile.
    const double target = u[row] * kept;
    if (tid == 0) { s_found = 0x7fffffff; s_last = -1; }
    __syncthreads();
    double before = 0.0;
    int ties_before = 0;
    for (unsigned long long base = 0; base < v; base += SAMPLE_BLOCK) {
        unsigned long long i = base + tid;
        float ei = i < v ? e[i] : 0.0f;
        unsigned int bits = __float_as_uint(ei);
        int tie = (i < v && limit && bits == tau) ? 1 : 0;
        int tie_total;
        int tie_rank = block_scan<int>(tie, shi, &tie_total) - tie + ties_before;
        int keep = i < v && ei >= floor_p && (!limit || bits > tau || (tie && (unsigned int)tie_rank < c));
        double wi = keep ? (double)ei : 0.0;
        double tile_total;
        double incl = block_scan<double>(wi, shd, &tile_total) + before;
        if (keep && wi > 0.0) {
            atomicMax(&s_last, (int)i);
            if (incl > target) atomicMin(&s_found, (int)i);
        }
        __syncthreads();
        if (s_found != 0x7fffffff) break;
        before += tile_total;
        ties_before += tie_total;
    }
    if (tid == 0) {
        int t = s_found != 0x7fffffff ? s_found : s_last;
        if (t < 0) t = arg;
        token[row] = t;
        logprob[row] = (float)((((double)x[t] - (double)m) * (double)inv_t) - lse);
        trunc_log[row] = (float)log(kept / z);
    }
}
