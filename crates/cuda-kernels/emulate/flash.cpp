// Runs kernels/flash_attention.cu on the CPU, as written, through
// cuda_shim.h (every CUDA thread a fiber; mma.sync from the PTX fragment
// layouts), and checks every kernel of the file against a naive causal
// attention in double: forward, backward, the tensor-core paths, paged
// decode with splits. Prints one line per check and "all ok" at the end, or
// exits non-zero. Run by crates/cuda-kernels/tests/flash_emulation.rs
// through aha_cuda_kernels::emulate. Not a substitute for a GPU (see the
// shim's header).

#include "cuda_shim.h"

#include <random>
#include <string>

#include "flash_attention.cu"

#define FA_EMU_THREADS 128

// Every kernel of the file runs with FA_EMU_THREADS threads a block.
static void launch(Dim3 grid, const std::function<void()>& body) { emu::launch(grid, FA_EMU_THREADS, body); }

// ---- inputs and the naive reference ----
static unsigned short to_bf16(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }

struct Bf {
    std::vector<unsigned short> bits;
    std::vector<double> val;
};
static Bf rand_bf(std::mt19937& rng, size_t n) {
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    Bf r;
    for (size_t i = 0; i < n; i++) {
        unsigned short b = to_bf16(d(rng));
        r.bits.push_back(b);
        r.val.push_back(from_bf16(b));
    }
    return r;
}

static int g_fail = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double atol,
                  double rtol) {
    size_t bad = 0, first = 0;
    double worst = 0;
    for (size_t i = 0; i < want.size(); i++) {
        double e = fabs(got[i] - want[i]);
        worst = fmax(worst, e);
        if (!(e <= atol + rtol * fabs(want[i]))) {
            if (!bad) first = i;
            bad++;
        }
    }
    double big = 0;
    for (double w : want) big = fmax(big, fabs(w));
    printf("%-48s %s  max err %.2e of max %.2e (%zu values)\n", what, bad ? "FAIL" : "ok  ", worst, big, want.size());
    if (bad) {
        printf("   %zu bad, first [%zu] got %.7g want %.7g\n", bad, first, got[first], want[first]);
        g_fail++;
    }
}

// Naive causal attention of row i (sequence offset a) for head h: fills p
// (probabilities over keys 0..=i) and returns lse.
static double naive_row(std::vector<double>& p, const Bf& q, const Bf& k, int a, int i, int h, int H, int Hk, int dk,
                        double scale) {
    const int kh = h / (H / Hk);
    p.assign(i + 1, 0.0);
    double m = -1e300;
    for (int j = 0; j <= i; j++) {
        double s = 0;
        for (int c = 0; c < dk; c++)
            s += q.val[((size_t)(a + i) * H + h) * dk + c] * k.val[((size_t)(a + j) * Hk + kh) * dk + c];
        p[j] = s * scale;
        m = fmax(m, p[j]);
    }
    double sum = 0;
    for (auto& x : p) sum += (x = exp(x - m));
    for (auto& x : p) x /= sum;
    return m + log(sum);
}

typedef void (*MmaFwd)(float*, float*, const fa_u16*, const fa_u16*, const fa_u16*, const int*, int, int, int,
                       float);
typedef void (*MmaDq)(float*, const float*, const fa_u16*, const fa_u16*, const fa_u16*, const float*,
                      const float*, const int*, int, int, int, float);
typedef void (*MmaDkv)(float*, float*, const float*, const fa_u16*, const fa_u16*, const fa_u16*, const float*,
                       const float*, const int*, int, int, int, float);

template <class Fwd, class Dq, class Dkv>
static void test_varlen(const char* name, Fwd fwd, Dq dq_k, Dkv dkv_k, int R, std::vector<int> lens, int H, int Hk,
                        int dk, int dv, MmaFwd mma_fwd = nullptr, MmaDq mma_dq = nullptr, MmaDkv mma_dkv = nullptr,
                        float scale0 = 0.0f) {
    std::mt19937 rng(lens.size() * 131 + dk * 7 + dv);
    const int nseq = lens.size();
    std::vector<int> cu{0};
    for (int l : lens) cu.push_back(cu.back() + l);
    const int total = cu.back();
    int maxlen = 0;
    for (int l : lens) maxlen = l > maxlen ? l : maxlen;
    const float scale = scale0 > 0.0f ? scale0 : 1.0f / sqrtf((float)dk);
    Bf q = rand_bf(rng, (size_t)total * H * dk), k = rand_bf(rng, (size_t)total * Hk * dk),
       v = rand_bf(rng, (size_t)total * Hk * dv);
    std::vector<float> dout(total * H * dv);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (auto& x : dout) x = d(rng);
    // Reference.
    std::vector<double> out(total * H * dv, 0.0), lse(H * total), dq(total * H * dk, 0.0), dkr(total * Hk * dk, 0.0),
        dvr(total * Hk * dv, 0.0);
    std::vector<double> p;
    const int group = H / Hk;
    for (int s = 0; s < nseq; s++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < lens[s]; i++) {
                const int a = cu[s], kh = h / group;
                lse[(size_t)h * total + a + i] = naive_row(p, q, k, a, i, h, H, Hk, dk, scale);
                double* o = &out[((size_t)(a + i) * H + h) * dv];
                for (int j = 0; j <= i; j++)
                    for (int c = 0; c < dv; c++) o[c] += p[j] * v.val[((size_t)(a + j) * Hk + kh) * dv + c];
                double D = 0;
                for (int c = 0; c < dv; c++) D += dout[((size_t)(a + i) * H + h) * dv + c] * o[c];
                for (int j = 0; j <= i; j++) {
                    double dp = 0;
                    for (int c = 0; c < dv; c++)
                        dp += dout[((size_t)(a + i) * H + h) * dv + c] * v.val[((size_t)(a + j) * Hk + kh) * dv + c];
                    const double ds = p[j] * (dp - D) * scale;
                    for (int c = 0; c < dk; c++) {
                        dq[((size_t)(a + i) * H + h) * dk + c] += ds * k.val[((size_t)(a + j) * Hk + kh) * dk + c];
                        dkr[((size_t)(a + j) * Hk + kh) * dk + c] += ds * q.val[((size_t)(a + i) * H + h) * dk + c];
                    }
                    for (int c = 0; c < dv; c++)
                        dvr[((size_t)(a + j) * Hk + kh) * dv + c] += p[j] * dout[((size_t)(a + i) * H + h) * dv + c];
                }
            }
    // The kernels.
    std::vector<float> o(total * H * dv, -7.0f), l(H * total, -7.0f), dsum(H * total), gq(total * H * dk, -7.0f),
        gk(total * Hk * dk, -7.0f), gv(total * Hk * dv, -7.0f);
    const unsigned tiles = (maxlen + 4 * R - 1) / (4 * R);
    launch(Dim3{tiles, (unsigned)H, (unsigned)nseq}, [&] {
        fwd(o.data(), l.data(), q.bits.data(), k.bits.data(), v.bits.data(), cu.data(), total, H, Hk, dk, dv, scale);
    });
    launch(Dim3{(unsigned)((total * H + 3) / 4), 1, 1},
           [&] { flash_bwd_dsum_f32(dsum.data(), dout.data(), o.data(), total, H, dv); });
    launch(Dim3{tiles, (unsigned)H, (unsigned)nseq}, [&] {
        dq_k(gq.data(), dout.data(), q.bits.data(), k.bits.data(), v.bits.data(), l.data(), dsum.data(), cu.data(),
             total, H, Hk, dk, dv, scale);
    });
    launch(Dim3{tiles, (unsigned)Hk, (unsigned)nseq}, [&] {
        dkv_k(gk.data(), gv.data(), dout.data(), q.bits.data(), k.bits.data(), v.bits.data(), l.data(), dsum.data(),
              cu.data(), total, H, Hk, dk, dv, scale);
    });
    char what[160];
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    const std::vector<float>* got[] = {&o, &l, &gq, &gk, &gv};
    const std::vector<double>* want[] = {&out, &lse, &dq, &dkr, &dvr};
    for (int t = 0; t < 5; t++) {
        snprintf(what, sizeof what, "%s lens %d.. H %d/%d d %d/%d s %.2f %s", name, lens[0], H, Hk, dk, dv, scale,
                 names[t]);
        check(what, *got[t], *want[t], t < 2 ? 2e-5 : 1e-4, 1e-4);
    }
    if (!mma_dq) return;
    // The tensor-core backward from the tensor-core forward's out and lse
    // (as a training step on tensor cores runs them): P, dS and dO are
    // rounded to bf16 (2^-9 relative each) before their products.
    const unsigned mtiles = (maxlen + 63) / 64;
    launch(Dim3{mtiles, (unsigned)H, (unsigned)nseq}, [&] {
        mma_fwd(o.data(), l.data(), q.bits.data(), k.bits.data(), v.bits.data(), cu.data(), total, H, Hk, scale);
    });
    launch(Dim3{(unsigned)((total * H + 3) / 4), 1, 1},
           [&] { flash_bwd_dsum_f32(dsum.data(), dout.data(), o.data(), total, H, dv); });
    std::fill(gq.begin(), gq.end(), -7.0f);
    std::fill(gk.begin(), gk.end(), -7.0f);
    std::fill(gv.begin(), gv.end(), -7.0f);
    launch(Dim3{mtiles, (unsigned)H, (unsigned)nseq}, [&] {
        mma_dq(gq.data(), dout.data(), q.bits.data(), k.bits.data(), v.bits.data(), l.data(), dsum.data(), cu.data(),
               total, H, Hk, scale);
    });
    launch(Dim3{mtiles, (unsigned)Hk, (unsigned)nseq}, [&] {
        mma_dkv(gk.data(), gv.data(), dout.data(), q.bits.data(), k.bits.data(), v.bits.data(), l.data(),
                dsum.data(), cu.data(), total, H, Hk, scale);
    });
    for (int t = 2; t < 5; t++) {
        snprintf(what, sizeof what, "%s mma lens %d.. H %d/%d d %d/%d s %.2f %s", name, lens[0], H, Hk, dk, dv,
                 scale, names[t]);
        // bf16 operands (8-bit mantissas) summed in f32: errors near 2^-8 of
        // the gradient's scale; 1e-2 of its largest value leaves 2.5x.
        double big = 0;
        for (double w : *want[t]) big = fmax(big, fabs(w));
        check(what, *got[t], *want[t], 1e-2 * big, 2e-2);
    }
}

// The tensor-core forward against the naive double forward; P is rounded to
// bf16 before the P V product, so out gets 4e-3 (2^-8 of |v| <= 1).
template <class Fwd>
static void test_mma(const char* name, Fwd fwd, std::vector<int> lens, int H, int Hk, int dk, int dv) {
    std::mt19937 rng(lens.size() * 71 + dk * 3 + dv);
    const int nseq = lens.size();
    std::vector<int> cu{0};
    for (int l : lens) cu.push_back(cu.back() + l);
    const int total = cu.back();
    int maxlen = 0;
    for (int l : lens) maxlen = l > maxlen ? l : maxlen;
    const float scale = 1.0f / sqrtf((float)dk);
    Bf q = rand_bf(rng, (size_t)total * H * dk), k = rand_bf(rng, (size_t)total * Hk * dk),
       v = rand_bf(rng, (size_t)total * Hk * dv);
    std::vector<double> out(total * H * dv, 0.0), lse(H * total), p;
    for (int s = 0; s < nseq; s++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < lens[s]; i++) {
                const int a = cu[s], kh = h / (H / Hk);
                lse[(size_t)h * total + a + i] = naive_row(p, q, k, a, i, h, H, Hk, dk, scale);
                for (int j = 0; j <= i; j++)
                    for (int c = 0; c < dv; c++)
                        out[((size_t)(a + i) * H + h) * dv + c] += p[j] * v.val[((size_t)(a + j) * Hk + kh) * dv + c];
            }
    std::vector<float> o(total * H * dv, -7.0f), l(H * total, -7.0f);
    launch(Dim3{(unsigned)((maxlen + 63) / 64), (unsigned)H, (unsigned)nseq},
           [&] { fwd(o.data(), l.data(), q.bits.data(), k.bits.data(), v.bits.data(), cu.data(), total, H, Hk, scale); });
    char what[160];
    snprintf(what, sizeof what, "%s lens %d.. H %d/%d d %d/%d out", name, lens[0], H, Hk, dk, dv);
    check(what, o, out, 4e-3, 0.0);
    snprintf(what, sizeof what, "%s lens %d.. H %d/%d d %d/%d lse", name, lens[0], H, Hk, dk, dv);
    check(what, l, lse, 2e-5, 1e-4);
}

template <class Dec>
static void test_decode(const char* name, Dec dec, int R, std::vector<int> ctxs, std::vector<int> news, int H, int Hk,
                        int dk, int dv, int bs, int split_len) {
    std::mt19937 rng(ctxs.size() * 17 + dk + split_len);
    const int nseq = ctxs.size();
    int maxctx = 0;
    for (int c : ctxs) maxctx = c > maxctx ? c : maxctx;
    const int max_blocks = (maxctx + bs - 1) / bs + 1, num_blocks = nseq * max_blocks + 2;
    std::vector<int> pool(num_blocks);
    for (int i = 0; i < num_blocks; i++) pool[i] = i;
    std::shuffle(pool.begin(), pool.end(), rng);
    std::vector<int> tables(pool.begin(), pool.begin() + nseq * max_blocks);
    std::vector<int> qcu{0};
    for (int n : news) qcu.push_back(qcu.back() + n);
    const int total_q = qcu.back();
    const float scale = 1.0f / sqrtf((float)dk);
    Bf kc = rand_bf(rng, (size_t)num_blocks * bs * Hk * dk), vc = rand_bf(rng, (size_t)num_blocks * bs * Hk * dv),
       q = rand_bf(rng, (size_t)total_q * H * dk);
    std::vector<double> out(total_q * H * dv, 0.0), lse(H * total_q);
    const int group = H / Hk;
    for (int s = 0; s < nseq; s++)
        for (int t = 0; t < news[s]; t++)
            for (int h = 0; h < H; h++) {
                const int row = qcu[s] + t, pos = ctxs[s] - news[s] + t, kh = h / group;
                std::vector<double> p(pos + 1);
                double m = -1e300;
                auto at = [&](int j) {
                    return ((size_t)tables[s * max_blocks + j / bs] * bs + j % bs) * Hk + kh;
                };
                for (int j = 0; j <= pos; j++) {
                    double sc = 0;
                    for (int c = 0; c < dk; c++) sc += q.val[((size_t)row * H + h) * dk + c] * kc.val[at(j) * dk + c];
                    p[j] = sc * scale;
                    m = fmax(m, p[j]);
                }
                double sum = 0;
                for (auto& x : p) sum += (x = exp(x - m));
                lse[(size_t)h * total_q + row] = m + log(sum);
                for (int j = 0; j <= pos; j++)
                    for (int c = 0; c < dv; c++)
                        out[((size_t)row * H + h) * dv + c] += p[j] / sum * vc.val[at(j) * dv + c];
            }
    const int splits = (maxctx + split_len - 1) / split_len;
    std::vector<float> opart((size_t)splits * total_q * H * dv, -7.0f), lpart((size_t)splits * total_q * H, -7.0f),
        o(total_q * H * dv, -7.0f), l(H * total_q, -7.0f);
    launch(Dim3{(unsigned)splits, (unsigned)Hk, (unsigned)nseq}, [&] {
        dec(opart.data(), lpart.data(), q.bits.data(), kc.bits.data(), vc.bits.data(), tables.data(), max_blocks,
            ctxs.data(), qcu.data(), total_q, H, Hk, dk, dv, bs, split_len, scale);
    });
    launch(Dim3{(unsigned)((total_q * H + 3) / 4), 1, 1}, [&] {
        flash_decode_combine_f32(o.data(), l.data(), opart.data(), lpart.data(), splits, total_q, H, dv);
    });
    char what[160];
    snprintf(what, sizeof what, "%s ctx %d.. H %d/%d d %d/%d split %d out", name, ctxs[0], H, Hk, dk, dv, split_len);
    check(what, o, out, 2e-5, 1e-4);
    snprintf(what, sizeof what, "%s ctx %d.. H %d/%d d %d/%d split %d lse", name, ctxs[0], H, Hk, dk, dv, split_len);
    check(what, l, lse, 2e-5, 1e-4);
    (void)R;
}

int main() {
    test_varlen("d64", flash_fwd_d64_bf16, flash_bwd_dq_d64_bf16, flash_bwd_dkv_d64_bf16, 8, {5, 0, 37, 1, 70}, 4, 2, 64,
                64, flash_fwd_mma_d64_bf16, flash_bwd_dq_mma_d64_bf16, flash_bwd_dkv_mma_d64_bf16);
    test_varlen("d128", flash_fwd_d128_bf16, flash_bwd_dq_d128_bf16, flash_bwd_dkv_d128_bf16, 8, {70, 3}, 2, 1, 128,
                128, flash_fwd_mma_d128_bf16, flash_bwd_dq_mma_d128_bf16, flash_bwd_dkv_mma_d128_bf16);
    test_varlen("d192v128", flash_fwd_d192v128_bf16, flash_bwd_dq_d192v128_bf16, flash_bwd_dkv_d192v128_bf16, 8,
                {33, 9}, 2, 2, 192, 128, flash_fwd_mma_d192v128_bf16, flash_bwd_dq_mma_d192v128_bf16, flash_bwd_dkv_mma_d192v128_bf16);
    test_varlen("any", flash_fwd_any_bf16, flash_bwd_dq_any_bf16, flash_bwd_dkv_any_bf16, 4, {9, 40, 17}, 6, 2, 24,
                16);
    // A sharp softmax (scale 1: scores up to ~15).
    test_varlen("d128", flash_fwd_d128_bf16, flash_bwd_dq_d128_bf16, flash_bwd_dkv_d128_bf16, 8, {70, 3}, 2, 1, 128,
                128, flash_fwd_mma_d128_bf16, flash_bwd_dq_mma_d128_bf16, flash_bwd_dkv_mma_d128_bf16, 1.0f);
    test_varlen("any", flash_fwd_any_bf16, flash_bwd_dq_any_bf16, flash_bwd_dkv_any_bf16, 4, {1}, 1, 1, 1, 1);
    test_decode("decode d64", flash_decode_d64_bf16, 8, {1, 37, 100}, {1, 2, 3}, 8, 2, 64, 64, 16, 32);
    test_decode("decode d64", flash_decode_d64_bf16, 8, {1, 37, 100}, {1, 2, 3}, 8, 2, 64, 64, 16, 128);
    test_decode("decode d128", flash_decode_d128_bf16, 8, {70}, {1}, 4, 4, 128, 128, 32, 64);
    test_decode("decode d192v128", flash_decode_d192v128_bf16, 8, {50, 65}, {2, 1}, 4, 1, 192, 128, 16, 32);
    test_decode("decode any", flash_decode_any_bf16, 4, {5, 40}, {3, 1}, 6, 3, 24, 8, 8, 32);
    test_mma("mma d64", flash_fwd_mma_d64_bf16, {5, 0, 70, 1, 130}, 4, 2, 64, 64);
    test_mma("mma d128", flash_fwd_mma_d128_bf16, {100, 3}, 2, 1, 128, 128);
    test_mma("mma d192v128", flash_fwd_mma_d192v128_bf16, {66, 9}, 2, 2, 192, 128);
    printf("%s\n", g_fail ? "FAILED" : "all ok");
    return g_fail ? 1 : 0;
}
