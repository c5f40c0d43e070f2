// The GRPO math on the device: group-relative advantages and the loss family
// of aha-grpo (grpo, bnpo, dr_grpo, dapo, cispo; token or sequence (GSPO)
// ratios; delta clipping; k1/k2/k3 KL; entropy bonus and top-entropy mask)
// with d loss / d logp and TRL's metrics. CPU twins: aha_grpo::compute_advantages
// and aha_grpo::grpo_loss, whose formulas (module docs of crates/grpo/src/loss.rs)
// these kernels follow term by term. All arithmetic is f64; per-token inputs
// are the model's f32 log-probs. Sums run per sequence (one block each, a
// fixed tree), then over sequences in order on one thread: deterministic.
//
// Layouts: per-token [B, T] row-major, mask as bytes (1 = completion token);
// adv [B] f64; seq [B, 2] (token count, mean log-ratio); scal [2] (token
// total, entropy threshold); acc [B, GR_ACC]; out [GR_OUT].

#define GR_BLOCK 256
#define GR_ACC 9
#define GR_OUT 9

// Loss types and KL estimators, as the launcher numbers them.
#define GR_GRPO 0
#define GR_BNPO 1
#define GR_DR_GRPO 2
#define GR_DAPO 3
#define GR_CISPO 4

struct GrpoParams {
    int loss_type;       // GR_*
    int kl;              // 1, 2, 3 (k1, k2, k3); 0 = no reference
    int seq_level;       // 1 = GSPO sequence ratios
    int has_delta;       // delta clipping on
    int has_entropy;     // entropy given
    int quantile_on;     // top_entropy_quantile < 1
    int has_num_items;   // num_items_in_batch given
    int pad;
    double beta, eps_low, eps_high, delta, max_len, entropy_coef, quantile, num_items;
};

// Sums the GR_BLOCK values of `v` (shared) into v[0] with a fixed tree.
__device__ void gr_tree(double* v) {
    for (int s = GR_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) v[threadIdx.x] += v[threadIdx.x + s];
        __syncthreads();
    }
}

// seq[row] = (completion tokens, masked mean of logp - old); one block per row.
extern "C" __global__ void grpo_seq_stats_f32(
    double* __restrict__ seq, const float* __restrict__ logp, const float* __restrict__ old,
    const unsigned char* __restrict__ mask, int T) {
    __shared__ double sl[GR_BLOCK];
    __shared__ double sr[GR_BLOCK];
    const long long base = (long long)blockIdx.x * T;
    double l = 0.0, r = 0.0;
    for (int j = threadIdx.x; j < T; j += GR_BLOCK) {
        if (mask[base + j]) {
            l += 1.0;
            r += (double)logp[base + j] - (double)old[base + j];
        }
    }
    sl[threadIdx.x] = l;
    sr[threadIdx.x] = r;
    __syncthreads();
    gr_tree(sl);
    gr_tree(sr);
    if (threadIdx.x == 0) {
        seq[2 * blockIdx.x] = sl[0];
        seq[2 * blockIdx.x + 1] = sr[0] / fmax(sl[0], 1.0);
    }
}

// Order-preserving unsigned key of a float (NaN above +inf).
__device__ __forceinline__ unsigned int gr_key(float f) {
    unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float gr_unkey(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The k-th smallest (0-based) entropy among the n masked tokens, by radix
// selection over the keys' bytes (integer histograms: order-independent).
__device__ float gr_select(const float* __restrict__ h, const unsigned char* __restrict__ mask, long long n,
                           unsigned long long k, unsigned int* hist, unsigned int* shared_prefix) {
    unsigned int prefix = 0, prefix_mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += GR_BLOCK) hist[b] = 0;
        __syncthreads();
        for (long long i = threadIdx.x; i < n; i += GR_BLOCK) {
            if (!mask[i]) continue;
            unsigned int key = gr_key(h[i]);
            if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long below = 0;
            unsigned int b = 0;
            for (; b < 255; b++) {
                if (below + hist[b] > k) break;
                below += hist[b];
            }
            k -= below;
            shared_prefix[0] = (unsigned int)k;
            shared_prefix[1] = b;
        }
        __syncthreads();
        k = shared_prefix[0];
        prefix |= shared_prefix[1] << shift;
        prefix_mask |= 255u << shift;
        __syncthreads();
    }
    return gr_unkey(prefix);
}

// scal[0] = completion tokens of the batch; scal[1] = the entropy threshold
// of the top-entropy mask (torch.quantile with linear interpolation at
// 1 - quantile over the completion tokens; +inf when there are none).
// One block.
extern "C" __global__ void grpo_batch_stats_f32(
    double* __restrict__ scal, const double* __restrict__ seq, const float* __restrict__ entropy,
    const unsigned char* __restrict__ mask, int B, int T, int quantile_on, double quantile) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int sp[2];
    __shared__ double total_sh;
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int b = 0; b < B; b++) t += seq[2 * b];
        total_sh = t;
        scal[0] = t;
        scal[1] = 0.0;
    }
    __syncthreads();
    if (!quantile_on) return;
    const double count = total_sh;
    if (count < 1.0) {
        if (threadIdx.x == 0) scal[1] = __longlong_as_double(0x7ff0000000000000LL);
        return;
    }
    const long long n = (long long)B * T;
    const double pos = (1.0 - quantile) * (count - 1.0);
    const double lo = floor(pos), hi = ceil(pos);
    const float vlo = gr_select(entropy, mask, n, (unsigned long long)lo, hist, sp);
    const float vhi = gr_select(entropy, mask, n, (unsigned long long)hi, hist, sp);
    if (threadIdx.x == 0) scal[1] = (double)vlo + ((double)vhi - (double)vlo) * (pos - lo);
}

__device__ __forceinline__ double gr_clamp(double x, double lo, double hi) {
    return x != x ? x : fmin(fmax(x, lo), hi);
}

// Per-token loss terms, d loss / d logp, d loss / d entropy, and the row's
// partial sums acc[row] = (loss, sum of d loss / d ratio, kl, entropy, low,
// high, region, cispo clip (each times the mask), first-token flags).
// One block per row.
extern "C" __global__ void grpo_token_loss_f32(
    float* __restrict__ dlogp, float* __restrict__ dent, double* __restrict__ acc,
    const double* __restrict__ seq, const double* __restrict__ scal, const double* __restrict__ adv,
    const float* __restrict__ logp, const float* __restrict__ old, const float* __restrict__ refp,
    const unsigned char* __restrict__ mask, const float* __restrict__ entropy, int B, int T, GrpoParams p) {
    __shared__ double red[GR_BLOCK];
    __shared__ double out_sh[GR_ACC - 1];
    const int row = blockIdx.x;
    const long long base = (long long)row * T;
    const double a = adv[row];
    const double len = seq[2 * row];
    const double total = scal[0], thr = scal[1];
    const double lo = 1.0 - p.eps_low, hi = 1.0 + p.eps_high;
    double w_unit;  // the aggregation weight of a completion token
    switch (p.loss_type) {
        case GR_GRPO: w_unit = 1.0 / fmax(len, 1.0) / (double)max(B, 1); break;
        case GR_BNPO: w_unit = 1.0 / fmax(total, 1.0); break;
        case GR_DR_GRPO: w_unit = 1.0 / ((double)max(B, 1) * p.max_len); break;
        default: w_unit = 1.0 / fmax(p.has_num_items ? p.num_items : total, 1.0); break;
    }
    double s[GR_ACC - 1];
    for (int q = 0; q < GR_ACC - 1; q++) s[q] = 0.0;
    double flags = 0.0;
    for (int j = threadIdx.x; j < T; j += GR_BLOCK) {
        const long long i = base + j;
        const double m = mask[i] ? 1.0 : 0.0;
        const double lp = (double)logp[i];
        const double log_iw = p.seq_level ? seq[2 * row + 1] : lp - (double)old[i];
        const double coef1 = exp(log_iw);
        double pl, dpr, dpl, ratio = coef1;
        if (p.loss_type == GR_CISPO) {
            const double c = fmin(coef1, p.eps_high);
            pl = -c * a * lp;
            dpr = 0.0;
            dpl = -c * a;
        } else {
            const double c2 = gr_clamp(coef1, lo, hi);
            double c1 = coef1, dc1 = 1.0;
            if (p.has_delta) {
                c1 = fmin(coef1, p.delta);
                dc1 = coef1 <= p.delta ? 1.0 : 0.0;
            }
            ratio = c1;
            const double l1 = c1 * a, l2 = c2 * a;
            const double g1 = l1 < l2 ? -1.0 : (l2 < l1 ? 0.0 : -0.5);
            const double g2 = l1 < l2 ? 0.0 : (l2 < l1 ? -1.0 : -0.5);
            const double dc2 = (coef1 >= lo && coef1 <= hi) ? 1.0 : 0.0;
            pl = -fmin(l1, l2);
            dpr = (g1 * dc1 + g2 * dc2) * a;
            dpl = 0.0;
        }
        const double h = p.has_entropy ? (double)entropy[i] : 0.0;
        const double em = p.quantile_on ? ((mask[i] && h >= thr) ? 1.0 : 0.0) : 1.0;
        double ptl = pl * em;
        dpr *= em;
        dpl *= em;
        double klv = 0.0;
        if (p.kl) {
            const double d = (double)refp[i] - lp;
            double dk;
            if (p.kl == 1) {
                klv = -d;
                dk = 1.0;
            } else if (p.kl == 2) {
                klv = 0.5 * d * d;
                dk = -d;
            } else {
                const double e = exp(d);
                klv = e - d - 1.0;
                dk = 1.0 - e;
            }
            ptl += p.beta * klv;
            dpl += p.beta * dk;
        }
        const double w = m * w_unit;
        double loss = w * ptl;
        const double dr = w * dpr;
        double g = w * dpl;
        if (!p.seq_level) g += dr * coef1;
        float de = 0.0f;
        if (p.entropy_coef != 0.0 && p.has_entropy) {
            loss -= p.entropy_coef * w * h;
            de = (float)(-p.entropy_coef * w);
        }
        dlogp[i] = mask[i] ? (float)g : 0.0f;
        dent[i] = de;
        const bool low = ratio < lo && a < 0.0, high = ratio > hi && a > 0.0;
        const bool cispo = ratio > p.eps_high && a > 0.0;
        s[0] += loss;
        s[1] += dr;
        s[2] += klv * m;
        s[3] += h * m;
        s[4] += low ? m : 0.0;
        s[5] += high ? m : 0.0;
        s[6] += (low || high) ? m : 0.0;
        s[7] += cispo ? m : 0.0;
        if (j == 0) flags = (low ? 1.0 : 0.0) + (high ? 2.0 : 0.0) + ((low || high) ? 4.0 : 0.0) + (cispo ? 8.0 : 0.0);
    }
    for (int q = 0; q < GR_ACC - 1; q++) {
        red[threadIdx.x] = s[q];
        __syncthreads();
        gr_tree(red);
        if (threadIdx.x == 0) out_sh[q] = red[0];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        for (int q = 0; q < GR_ACC - 1; q++) acc[(long long)row * GR_ACC + q] = out_sh[q];
        acc[(long long)row * GR_ACC + GR_ACC - 1] = flags;
    }
    // Sequence-level ratios: chain the row's ratio gradient through
    // d ratio / d logp = ratio * mask / len.
    if (p.seq_level && T > 0) {
        const double g = out_sh[1] * exp(seq[2 * row + 1]) / fmax(len, 1.0);
        for (int j = threadIdx.x; j < T; j += GR_BLOCK) {
            const long long i = base + j;
            if (mask[i]) dlogp[i] = (float)((double)dlogp[i] + g);
        }
    }
}

// out = (loss, kl, entropy, clip_ratio/low_mean, low_min, high_mean,
// high_max, region_mean, cispo_clip_ratio) from the rows' partial sums, in
// row order, on one thread (B is the number of completions: small).
extern "C" __global__ void grpo_finalize_f64(
    double* __restrict__ out, const double* __restrict__ acc, const double* __restrict__ seq,
    const double* __restrict__ scal, int B, int T, int seq_level) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    const double total = fmax(scal[0], 1.0);
    double loss = 0.0, kl = 0.0, ent = 0.0;
    double sum[4] = {0.0, 0.0, 0.0, 0.0};            // low, high, region, cispo (batch)
    double lmin = nan, hmax = nan;
    int rows = 0;
    for (int b = 0; b < B; b++) {
        const double* r = acc + (long long)b * GR_ACC;
        loss += r[0];
        kl += r[2];
        ent += r[3];
        const double len = seq[2 * b];
        if (seq_level) {
            const int f = (int)r[GR_ACC - 1];
            const double ind[4] = {T > 0 && (f & 1) ? 1.0 : 0.0, T > 0 && (f & 2) ? 1.0 : 0.0,
                                   T > 0 && (f & 4) ? 1.0 : 0.0, T > 0 && (f & 8) ? 1.0 : 0.0};
            for (int q = 0; q < 4; q++) sum[q] += ind[q];
            lmin = fmin(lmin, ind[0]);
            hmax = fmax(hmax, ind[1]);
            rows++;
        } else {
            for (int q = 0; q < 4; q++) sum[q] += r[4 + q];
            if (len > 0.0) {
                lmin = fmin(lmin, r[4] / len);
                hmax = fmax(hmax, r[5] / len);
            }
        }
    }
    out[0] = loss;
    out[1] = kl / total;
    out[2] = ent / total;
    const double denom = seq_level ? (rows > 0 ? (double)rows : nan) : total;
    out[3] = sum[0] / denom;
    out[4] = lmin;
    out[5] = sum[1] / denom;
    out[6] = hmax;
    out[7] = sum[2] / denom;
    out[8] = sum[3] / denom;
}

// Group-relative advantages of rewards [n] (groups of group_size consecutive
// completions; NaN = unscored: left out of the statistics, advantage 0).
// est: 0 group, 1 batch, 2 none, 3 rloo, 4 reinforce++ baseline.
// adv, gmean, gstd [n]; summary = (frac_reward_zero_std, reward_mean,
// reward_std). One block; a thread per group, batch statistics on thread 0,
// every sum in the CPU twin's order.
__device__ void gr_stats(const double* x, long long n, double* mean, double* std, long long* valid) {
    long long c = 0;
    double s = 0.0;
    for (long long i = 0; i < n; i++) {
        if (isfinite(x[i])) {
            c++;
            s += x[i];
        }
    }
    if (c == 0) {
        *mean = __longlong_as_double(0x7ff8000000000000LL);
        *std = 0.0;
        *valid = 0;
        return;
    }
    const double m = s / (double)c;
    double q = 0.0;
    if (c >= 2)
        for (long long i = 0; i < n; i++)
            if (isfinite(x[i])) q += (x[i] - m) * (x[i] - m);
    *mean = m;
    *std = c < 2 ? 0.0 : sqrt(q / (double)(c - 1));
    *valid = c;
}

extern "C" __global__ void grpo_advantages_f64(
    double* __restrict__ adv, double* __restrict__ gmean, double* __restrict__ gstd,
    double* __restrict__ summary, const double* __restrict__ rewards, int n, int group_size, int est) {
    __shared__ double batch_std;
    __shared__ long long zero_std_groups;
    const int groups = n / group_size;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        double m, s;
        long long c;
        gr_stats(rewards + (long long)g * group_size, group_size, &m, &s, &c);
        for (int i = g * group_size; i < (g + 1) * group_size; i++) {
            gmean[i] = m;
            gstd[i] = s;
            // the centred reward, kept in adv until the second pass
            adv[i] = isfinite(rewards[i]) ? rewards[i] - m : __longlong_as_double(0x7ff8000000000000LL);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double m, s;
        long long c;
        if (est == 1) {
            gr_stats(rewards, n, &m, &s, &c);
        } else if (est == 4) {
            gr_stats(adv, n, &m, &s, &c);
        } else {
            s = 0.0;
        }
        batch_std = s;
        // TRL tests isclose(std, 0) with torch's defaults (atol 1e-8).
        long long zero = 0;
        for (int g = 0; g < groups; g++)
            if (fabs(gstd[(long long)g * group_size]) <= 1e-8) zero++;
        zero_std_groups = zero;
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        long long valid = 0;
        for (int i = g * group_size; i < (g + 1) * group_size; i++) valid += isfinite(rewards[i]) ? 1 : 0;
        for (int i = g * group_size; i < (g + 1) * group_size; i++) {
            const double c = adv[i];
            double v;
            switch (est) {
                case 0: v = c / (gstd[i] + 1e-4); break;
                case 1: v = c / (batch_std + 1e-4); break;
                case 2: v = c; break;
                case 3: v = valid < 2 ? 0.0 : c * (double)valid / (double)(valid - 1); break;
                default: v = c / (batch_std + 1e-4); break;
            }
            adv[i] = isfinite(v) ? v : 0.0;
            if (est == 1 || est == 4) gstd[i] = batch_std;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        long long valid = 0;
        double rs = 0.0, ss = 0.0;
        for (int i = 0; i < n; i++) {
            if (!isfinite(rewards[i])) continue;
            valid++;
            rs += rewards[i];
            ss += gstd[i];
        }
        const double nan = __longlong_as_double(0x7ff8000000000000LL);
        summary[0] = groups == 0 ? 0.0 : (double)zero_std_groups / (double)groups;
        summary[1] = valid == 0 ? nan : rs / (double)valid;
        summary[2] = valid == 0 ? nan : ss / (double)valid;
    }
}
