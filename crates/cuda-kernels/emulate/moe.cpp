// Runs kernels/moe.cu on the CPU, as written, through cuda_shim.h (every
// CUDA thread a fiber; mma.sync from the PTX fragment layouts), and checks
// each kernel against a plain C++ reference written from its header comment
// (the contract its Rust CPU twin in aha_tensor::cpu::moe also implements):
// routing with ties, permutation with empty experts and all tokens on one
// expert, the grouped products on both paths, combine and the backward, in
// bf16 and in f32 storage (the `_f32` instantiations of the same templates).
// Prints a summary with "all ok", or exits non-zero. Run by
// crates/cuda-kernels/tests/moe_emulation.rs through aha_cuda_kernels::emulate.

#include "cuda_shim.h"

#include <numeric>
#include <random>
#include <string>

#include "moe.cu"

static void launch(Dim3 grid, unsigned block, const std::function<void()>& body) { emu::launch(grid, block, body); }

// ---- checks ----
static int g_fail = 0, g_checks = 0;
static void expect(bool ok, const std::string& what) {
    g_checks++;
    if (!ok) {
        g_fail++;
        if (g_fail < 30) fprintf(stderr, "FAIL %s\n", what.c_str());
    }
}
template <class T>
static void same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
    size_t bad = 0, first = got.size();
    for (size_t i = 0; i < got.size() && i < want.size(); i++)
        if (!(got[i] == want[i])) {
            bad++;
            if (first == got.size()) first = i;
        }
    expect(bad == 0 && got.size() == want.size(),
           what + " (" + std::to_string(bad) + " differ, first at " + std::to_string(first) + ")");
}
static void close(const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol,
                  const std::string& what) {
    size_t bad = 0;
    double worst = 0;
    for (size_t i = 0; i < got.size(); i++) {
        const double d = std::fabs(got[i] - want[i]);
        if (!(d <= atol + rtol * std::fabs(want[i]))) {
            bad++;
            worst = std::max(worst, d);
        }
    }
    expect(bad == 0 && got.size() == want.size(),
           what + " (" + std::to_string(bad) + " outside tolerance, worst " + std::to_string(worst) + ")");
}
static unsigned short to_bf16(float x) {
    const unsigned u = __float_as_uint(x);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }

static std::mt19937_64 rng(12345);
static float uni(float s) { return std::uniform_real_distribution<float>(-s, s)(rng); }
static std::vector<float> uvec(size_t n, float s) {
    std::vector<float> v(n);
    for (auto& x : v) x = uni(s);
    return v;
}
static std::vector<unsigned short> bvec(size_t n, float s) {
    std::vector<unsigned short> v(n);
    for (auto& x : v) x = to_bf16(uni(s));
    return v;
}

// The selection contract: k passes of "largest untaken, ties to the lower
// index", NaN below everything (float comparisons, as the twins).
static std::vector<int> take_top(const float* v, int n, int k) {
    std::vector<int> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    auto key = [&](int i) { return std::isnan(v[i]) ? -INFINITY : v[i]; };
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) > key(b); });
    idx.resize(k);
    return idx;
}

static void check_route_softmax(int n, int e, int k, int renorm, bool ties) {
    std::vector<float> logits(n * e);
    for (auto& x : logits) x = ties ? (float)(rng() % 4) : uni(3.0f);
    std::vector<float> probs(n * e), w(n * k), denom(n);
    std::vector<unsigned> ids(n * k);
    launch({(unsigned)n, 1, 1}, 32, [&] {
        moe_route_softmax_f32(probs.data(), ids.data(), w.data(), denom.data(), logits.data(), n, e, k, renorm);
    });
    std::vector<double> pref(n * e), wref(n * k), dref(n);
    std::vector<unsigned> iref(n * k);
    for (int t = 0; t < n; t++) {
        double m = -INFINITY, s = 0;
        for (int i = 0; i < e; i++) m = std::max(m, (double)logits[t * e + i]);
        for (int i = 0; i < e; i++) s += std::exp(logits[t * e + i] - m);
        for (int i = 0; i < e; i++) pref[t * e + i] = std::exp(logits[t * e + i] - m) / s;
        // Selection on the kernel's own probabilities (exact tie behaviour).
        const auto top = take_top(&probs[t * e], e, k);
        float d = 0.0f;
        for (int j = 0; j < k; j++) d += probs[t * e + top[j]];
        for (int j = 0; j < k; j++) {
            iref[t * k + j] = top[j];
            const float p = probs[t * e + top[j]];
            wref[t * k + j] = renorm ? p / d : p;
        }
        dref[t] = renorm ? d : 1.0;
    }
    const std::string tag = "softmax n " + std::to_string(n) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            (renorm ? " renorm" : "") + (ties ? " ties" : "");
    close(probs, pref, 1e-7, 1e-5, "probs " + tag);
    same(ids, iref, "ids " + tag);
    close(w, wref, 0, 0, "w " + tag);
    close(denom, dref, 0, 0, "denom " + tag);
}

static void check_route_sigmoid(int n, int e, int k, int g, int tg, int renorm, bool with_bias, bool ties) {
    std::vector<float> logits(n * e), bias(e);
    for (auto& x : logits) x = ties ? (float)(rng() % 3) - 1.0f : uni(4.0f);
    for (auto& b : bias) b = ties ? 0.0f : uni(0.1f);
    const float rsf = 2.5f;
    std::vector<float> scores(n * e), w(n * k), denom(n);
    std::vector<unsigned> ids(n * k);
    launch({(unsigned)n, 1, 1}, 32, [&] {
        moe_route_sigmoid_group_f32(scores.data(), ids.data(), w.data(), denom.data(), logits.data(),
                                    with_bias ? bias.data() : nullptr, n, e, k, g, tg, renorm, rsf);
    });
    const int per = e / g;
    std::vector<double> sref(n * e), wref(n * k), dref(n);
    std::vector<unsigned> iref(n * k);
    for (int t = 0; t < n; t++) {
        const float* s = &scores[t * e];
        std::vector<float> choice(e), gs(g);
        for (int i = 0; i < e; i++) {
            sref[t * e + i] = 1.0 / (1.0 + std::exp(-(double)logits[t * e + i]));
            choice[i] = s[i] + (with_bias ? bias[i] : 0.0f);
        }
        for (int q = 0; q < g; q++) {
            const auto two = take_top(&choice[q * per], per, 2);
            gs[q] = choice[q * per + two[0]] + choice[q * per + two[1]];
        }
        const auto kept = take_top(gs.data(), g, tg);
        for (int i = 0; i < e; i++)
            if (std::find(kept.begin(), kept.end(), i / per) == kept.end()) choice[i] = 0.0f;
        const auto top = take_top(choice.data(), e, k);
        float d = 1.0f;
        if (renorm) {
            d = 0.0f;
            for (int j = 0; j < k; j++) d += s[top[j]];
            d += 1e-20f;
        }
        for (int j = 0; j < k; j++) {
            iref[t * k + j] = top[j];
            const float v = renorm ? s[top[j]] / d : s[top[j]];
            wref[t * k + j] = v * rsf;
        }
        dref[t] = d;
    }
    const std::string tag = "sigmoid n " + std::to_string(n) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            " g " + std::to_string(g) + "/" + std::to_string(tg) + (renorm ? " renorm" : "") +
                            (with_bias ? " bias" : "") + (ties ? " ties" : "");
    close(scores, sref, 1e-7, 1e-6, "scores " + tag);
    same(ids, iref, "ids " + tag);
    close(w, wref, 0, 0, "w " + tag);
    close(denom, dref, 0, 0, "denom " + tag);
}

static void check_route_backward(int n, int e, int k, int sigmoid, int renorm, bool aux_on) {
    // A valid forward state: probabilities, distinct ids, weights, denominators.
    std::vector<float> probs(n * e), w(n * k), denom(n), dw = uvec(n * k, 1.0f), aux = uvec(e, 0.1f);
    std::vector<unsigned> ids(n * k);
    const float rsf = sigmoid ? 2.5f : 1.0f;
    for (int t = 0; t < n; t++) {
        float s = 0;
        for (int i = 0; i < e; i++) s += probs[t * e + i] = 0.05f + (uni(1.0f) + 1.0f) * 0.4f;
        if (!sigmoid)
            for (int i = 0; i < e; i++) probs[t * e + i] /= s;
        std::vector<int> p(e);
        std::iota(p.begin(), p.end(), 0);
        std::shuffle(p.begin(), p.end(), rng);
        float d = 0;
        for (int j = 0; j < k; j++) d += probs[t * e + p[j]];
        denom[t] = renorm ? d : 1.0f;
        for (int j = 0; j < k; j++) {
            ids[t * k + j] = p[j];
            w[t * k + j] = probs[t * e + p[j]] / denom[t] * rsf;
        }
    }
    std::vector<float> dl(n * e);
    launch({(unsigned)n, 1, 1}, 32, [&] {
        moe_route_backward_f32(dl.data(), dw.data(), w.data(), ids.data(), probs.data(), denom.data(),
                               aux_on ? aux.data() : nullptr, n, e, k, sigmoid, renorm, rsf);
    });
    std::vector<double> ref(n * e);
    for (int t = 0; t < n; t++) {
        std::vector<double> dp(e, 0.0);
        if (!sigmoid && aux_on)
            for (int i = 0; i < e; i++) dp[i] = aux[i];
        double corr = 0;
        if (renorm)
            for (int j = 0; j < k; j++) corr += (double)dw[t * k + j] * w[t * k + j];
        for (int j = 0; j < k; j++) {
            const double gj = sigmoid ? (double)dw[t * k + j] * rsf : dw[t * k + j];
            dp[ids[t * k + j]] += (gj - corr) / denom[t];
        }
        double dot = 0;
        for (int i = 0; i < e; i++) dot += dp[i] * probs[t * e + i];
        for (int i = 0; i < e; i++) {
            const double p = probs[t * e + i];
            ref[t * e + i] = sigmoid ? dp[i] * p * (1 - p) : p * (dp[i] - dot);
        }
    }
    close(dl, ref, 1e-6, 1e-5,
          "route backward n " + std::to_string(n) + " e " + std::to_string(e) + (sigmoid ? " sigmoid" : " softmax") +
              (renorm ? " renorm" : "") + (aux_on ? " aux" : ""));
}

// Distinct experts per token; `hot` >= 0 forces it as every token's first.
static std::vector<unsigned> rand_ids(int n, int e, int k, int hot) {
    std::vector<unsigned> ids;
    std::vector<unsigned> all(e);
    for (int t = 0; t < n; t++) {
        std::iota(all.begin(), all.end(), 0u);
        std::shuffle(all.begin(), all.end(), rng);
        if (hot >= 0) std::swap(all[0], *std::find(all.begin(), all.end(), (unsigned)hot));
        ids.insert(ids.end(), all.begin(), all.begin() + k);
    }
    return ids;
}

struct Perm {
    std::vector<unsigned> counts, offsets, tiles, tok, slot, inv;
    std::vector<float> frac;
};

static Perm run_permute(const std::vector<unsigned>& ids, int e, int k) {
    const size_t m = ids.size();
    Perm p{std::vector<unsigned>(e), std::vector<unsigned>(e + 1), std::vector<unsigned>(e + 1),
           std::vector<unsigned>(m),  std::vector<unsigned>(m),     std::vector<unsigned>(m),
           std::vector<float>(e)};
    launch({1, 1, 1}, 1024, [&] {
        moe_count_u32(p.counts.data(), p.offsets.data(), p.tiles.data(), p.frac.data(), ids.data(), m, e);
    });
    if (m > 0)
        launch({(unsigned)e, 1, 1}, 256, [&] {
            moe_scatter_u32(p.tok.data(), p.slot.data(), p.inv.data(), ids.data(), p.offsets.data(), m, k);
        });
    return p;
}

static void check_permute(int n, int e, int k, int hot) {
    const auto ids = rand_ids(n, e, k, hot);
    const Perm p = run_permute(ids, e, k);
    const size_t m = ids.size();
    std::vector<unsigned> counts(e), off(e + 1), tiles(e + 1), tok(m), slot(m), inv(m);
    std::vector<double> frac(e);
    for (auto x : ids) counts[x]++;
    for (int x = 0; x < e; x++) {
        off[x + 1] = off[x] + counts[x];
        tiles[x + 1] = tiles[x] + (counts[x] + 63) / 64;
        frac[x] = m ? (float)((double)counts[x] / m) : 0.0f;
    }
    std::vector<unsigned> next(off.begin(), off.end() - 1);
    for (size_t r = 0; r < m; r++) {
        const unsigned q = next[ids[r]]++;
        tok[q] = r / k;
        slot[q] = r % k;
        inv[r] = q;
    }
    const std::string tag = "permute n " + std::to_string(n) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            " hot " + std::to_string(hot);
    same(p.counts, counts, "counts " + tag);
    same(p.offsets, off, "offsets " + tag);
    same(p.tiles, tiles, "tile_off " + tag);
    close(p.frac, frac, 0, 0, "frac " + tag);
    same(p.tok, tok, "tok " + tag);
    same(p.slot, slot, "slot " + tag);
    same(p.inv, inv, "inv " + tag);
}

static void check_elementwise(int n, int e, int k, int c) {
    const auto ids = rand_ids(n, e, k, -1);
    const Perm p = run_permute(ids, e, k);
    const size_t m = (size_t)n * k;
    const auto x = uvec(n * c, 2.0f), w = uvec(m, 1.0f), ye = uvec(m * c, 1.0f), dy = uvec(n * c, 1.0f);
    const auto y0 = uvec(n * c, 1.0f), da = uvec(m * c, 1.0f), g = uvec(m * c, 4.0f), u = uvec(m * c, 2.0f);
    std::vector<unsigned short> xe(m * c), dye(m * c), dg(m * c), du(m * c);
    std::vector<float> y(n * c), yacc = y0, dwt(m);
    const unsigned long long mm = m, cc = c, nn = n;
    launch({(unsigned)((m * c + 255) / 256), 1, 1}, 256,
           [&] { moe_gather_bf16(xe.data(), x.data(), p.tok.data(), mm, cc); });
    launch({(unsigned)((n * c + 255) / 256), 1, 1}, 256,
           [&] { moe_combine_f32(y.data(), ye.data(), w.data(), p.inv.data(), nn, cc, k, 0); });
    launch({(unsigned)((n * c + 255) / 256), 1, 1}, 256,
           [&] { moe_combine_f32(yacc.data(), ye.data(), nullptr, p.inv.data(), nn, cc, k, 1); });
    launch({(unsigned)n, 1, 1}, 256, [&] {
        moe_combine_backward_bf16(dwt.data(), dye.data(), dy.data(), ye.data(), w.data(), p.inv.data(), n, c, k);
    });
    launch({(unsigned)((m * c + 255) / 256), 1, 1}, 256,
           [&] { moe_swiglu_backward_bf16(dg.data(), du.data(), da.data(), g.data(), u.data(), mm * cc); });
    // The f32-storage instantiations.
    std::vector<float> xe32(m * c), dye32(m * c), dg32(m * c), du32(m * c), dwt32(m);
    launch({(unsigned)((m * c + 255) / 256), 1, 1}, 256,
           [&] { moe_gather_f32(xe32.data(), x.data(), p.tok.data(), mm, cc); });
    launch({(unsigned)n, 1, 1}, 256, [&] {
        moe_combine_backward_f32(dwt32.data(), dye32.data(), dy.data(), ye.data(), w.data(), p.inv.data(), n, c, k);
    });
    launch({(unsigned)((m * c + 255) / 256), 1, 1}, 256,
           [&] { moe_swiglu_backward_f32(dg32.data(), du32.data(), da.data(), g.data(), u.data(), mm * cc); });
    std::vector<unsigned short> xe_r(m * c), dye_r(m * c);
    std::vector<float> xe32_r(m * c), dye32_r(m * c);
    std::vector<double> y_r(n * c), yacc_r(n * c), dw_r(m), dg_r(m * c), du_r(m * c);
    for (size_t q = 0; q < m; q++)
        for (int i = 0; i < c; i++) {
            xe_r[q * c + i] = to_bf16(x[p.tok[q] * c + i]);
            xe32_r[q * c + i] = x[p.tok[q] * c + i];
        }
    for (int t = 0; t < n; t++)
        for (int i = 0; i < c; i++) {
            double a = 0, b = 0;
            for (int j = 0; j < k; j++) {
                const size_t r = p.inv[t * k + j];
                a += (double)w[t * k + j] * ye[r * c + i];
                b += ye[r * c + i];
            }
            y_r[t * c + i] = a;
            yacc_r[t * c + i] = y0[t * c + i] + b;
        }
    for (int t = 0; t < n; t++)
        for (int j = 0; j < k; j++) {
            const size_t r = p.inv[t * k + j];
            double s = 0;
            for (int i = 0; i < c; i++) {
                s += (double)dy[t * c + i] * ye[r * c + i];
                dye_r[r * c + i] = to_bf16(w[t * k + j] * dy[t * c + i]);
                dye32_r[r * c + i] = w[t * k + j] * dy[t * c + i];
            }
            dw_r[t * k + j] = s;
        }
    for (size_t i = 0; i < m * c; i++) {
        const double s = 1 / (1 + std::exp(-(double)g[i]));
        du_r[i] = da[i] * g[i] * s;
        dg_r[i] = da[i] * u[i] * (s + g[i] * s * (1 - s));
    }
    auto f32 = [](const std::vector<unsigned short>& v) {
        std::vector<float> o(v.size());
        for (size_t i = 0; i < v.size(); i++) o[i] = from_bf16(v[i]);
        return o;
    };
    const std::string tag = "n " + std::to_string(n) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            " c " + std::to_string(c);
    same(xe, xe_r, "gather " + tag);
    close(y, y_r, 1e-6 * k, 1e-6, "combine " + tag);
    close(yacc, yacc_r, 1e-6 * k, 1e-6, "combine acc " + tag);
    close(dwt, dw_r, 2e-7 * c, 1e-6, "combine bwd dw " + tag);
    same(dye, dye_r, "combine bwd dye " + tag);
    close(f32(dg), dg_r, 1e-6, 1.0 / 128, "swiglu bwd dg " + tag);
    close(f32(du), du_r, 1e-6, 1.0 / 128, "swiglu bwd du " + tag);
    same(xe32, xe32_r, "gather f32 " + tag);
    close(dwt32, dw_r, 2e-7 * c, 1e-6, "combine bwd dw (f32) " + tag);
    same(dye32, dye32_r, "combine bwd dye f32 " + tag);
    close(dg32, dg_r, 1e-6, 1e-6, "swiglu bwd dg f32 " + tag);
    close(du32, du_r, 1e-6, 1e-6, "swiglu bwd du f32 " + tag);
    // Bias update.
    std::vector<float> bias = uvec(e, 0.1f), b0 = bias;
    launch({1, 1, 1}, 256, [&] { moe_bias_update_f32(bias.data(), p.counts.data(), e, 0.001f); });
    unsigned long long tot = 0;
    for (auto cnt : p.counts) tot += cnt;
    std::vector<double> bref(e);
    for (int i = 0; i < e; i++) {
        const unsigned long long cv = (unsigned long long)p.counts[i] * e;
        bref[i] = cv > tot ? b0[i] - 0.001f : cv < tot ? b0[i] + 0.001f : b0[i];
    }
    close(bias, bref, 0, 0, "bias update " + tag);
}

// Offsets with expert 0 empty, expert 1 holding about half the rows.
static std::vector<unsigned> rand_offsets(int e, int m, std::vector<unsigned>& tiles) {
    std::vector<unsigned> cnt(e), off(e + 1);
    for (int r = 0; r < m; r++) {
        const int x = (e < 3) ? e - 1 : (rng() % 2 ? 1 : 2 + (int)(rng() % (e - 2)));
        cnt[x]++;
    }
    tiles.assign(e + 1, 0);
    for (int x = 0; x < e; x++) {
        off[x + 1] = off[x] + cnt[x];
        tiles[x + 1] = tiles[x] + (cnt[x] + 63) / 64;
    }
    return off;
}

static void check_grouped(int m, int e, int k, int n) {
    std::vector<unsigned> tiles;
    const auto off = rand_offsets(e, m, tiles);
    const auto a = bvec((size_t)m * k, 1.0f), bt = bvec((size_t)e * n * k, 1.0f), b2 = bvec((size_t)e * n * k, 1.0f);
    const auto gb = bvec((size_t)m * n, 1.0f);
    const auto out0 = uvec((size_t)m * n, 1.0f), dw0 = uvec((size_t)e * k * n, 1.0f);
    std::vector<float> o1(m * n, 7.0f), o2 = out0, g(m * n), u(m * n), dw = dw0;
    std::vector<unsigned short> act(m * n);
    const Dim3 grid{(unsigned)((n + 63) / 64), (unsigned)((m + 63) / 64 + e), 1};
    launch(grid, 256, [&] {
        moe_grouped_gemm_bf16(o1.data(), a.data(), bt.data(), off.data(), tiles.data(), e, k, n, 1, 0);
    });
    launch(grid, 256, [&] {
        moe_grouped_gemm_bf16(o2.data(), a.data(), b2.data(), off.data(), tiles.data(), e, k, n, 0, 1);
    });
    launch(grid, 256, [&] {
        moe_grouped_gate_up_bf16(g.data(), u.data(), act.data(), a.data(), bt.data(), b2.data(), off.data(),
                                 tiles.data(), e, k, n);
    });
    launch({(unsigned)((n + 63) / 64), (unsigned)((k + 63) / 64), (unsigned)e}, 256,
           [&] { moe_grouped_wgrad_bf16(dw.data(), a.data(), gb.data(), off.data(), k, n); });
    // The tensor-core kernels, same arguments, 128 threads.
    std::vector<float> t1(m * n, 7.0f), t2 = out0, tg(m * n), tu(m * n), tdw = dw0;
    std::vector<unsigned short> tact(m * n);
    launch(grid, 128, [&] {
        moe_grouped_gemm_mma_bf16(t1.data(), a.data(), bt.data(), off.data(), tiles.data(), e, k, n, 1, 0);
    });
    launch(grid, 128, [&] {
        moe_grouped_gemm_mma_bf16(t2.data(), a.data(), b2.data(), off.data(), tiles.data(), e, k, n, 0, 1);
    });
    launch(grid, 128, [&] {
        moe_grouped_gate_up_mma_bf16(tg.data(), tu.data(), tact.data(), a.data(), bt.data(), b2.data(), off.data(),
                                     tiles.data(), e, k, n);
    });
    launch({(unsigned)((n + 63) / 64), (unsigned)((k + 63) / 64), (unsigned)e}, 128,
           [&] { moe_grouped_wgrad_mma_bf16(tdw.data(), a.data(), gb.data(), off.data(), k, n); });
    std::vector<double> r1(m * n), r2(m * n), rg(m * n), ru(m * n), ract(m * n), rdw(dw0.begin(), dw0.end());
    for (int x = 0; x < e; x++)
        for (unsigned r = off[x]; r < off[x + 1]; r++)
            for (int c = 0; c < n; c++) {
                double s1 = 0, s2 = 0;
                for (int l = 0; l < k; l++) {
                    const double av = from_bf16(a[(size_t)r * k + l]);
                    s1 += av * from_bf16(bt[((size_t)x * n + c) * k + l]);
                    s2 += av * from_bf16(b2[((size_t)x * k + l) * n + c]);
                }
                double s3 = 0;
                for (int l = 0; l < k; l++)
                    s3 += (double)from_bf16(a[(size_t)r * k + l]) * from_bf16(b2[((size_t)x * n + c) * k + l]);
                r1[(size_t)r * n + c] = s1;
                r2[(size_t)r * n + c] = out0[(size_t)r * n + c] + s2;
                rg[(size_t)r * n + c] = s1;
                ru[(size_t)r * n + c] = s3;
                ract[(size_t)r * n + c] = s1 / (1 + std::exp(-s1)) * s3;
            }
    for (int x = 0; x < e; x++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (unsigned r = off[x]; r < off[x + 1]; r++)
                    s += (double)from_bf16(a[(size_t)r * k + i]) * from_bf16(gb[(size_t)r * n + j]);
                rdw[((size_t)x * k + i) * n + j] += s;
            }
    std::vector<float> actf(m * n);
    for (size_t i = 0; i < act.size(); i++) actf[i] = from_bf16(act[i]);
    const std::string tag = "m " + std::to_string(m) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            " n " + std::to_string(n);
    const double atol = 1.2e-7 * k;
    close(o1, r1, atol, 1e-6, "grouped a B^T " + tag);
    close(o2, r2, atol, 1e-6, "grouped out + a B " + tag);
    close(g, rg, atol, 1e-6, "gate " + tag);
    close(u, ru, atol, 1e-6, "up " + tag);
    close(actf, ract, atol * k, 1.0 / 128, "act " + tag);
    close(dw, rdw, 1.2e-7 * m, 1e-6, "wgrad " + tag);
    std::vector<float> tactf(m * n);
    for (size_t i = 0; i < tact.size(); i++) tactf[i] = from_bf16(tact[i]);
    close(t1, r1, atol, 1e-6, "mma grouped a B^T " + tag);
    close(t2, r2, atol, 1e-6, "mma grouped out + a B " + tag);
    close(tg, rg, atol, 1e-6, "mma gate " + tag);
    close(tu, ru, atol, 1e-6, "mma up " + tag);
    close(tactf, ract, atol * k, 1.0 / 128, "mma act " + tag);
    close(tdw, rdw, 1.2e-7 * m, 1e-6, "mma wgrad " + tag);
}

// The f32-storage grouped products (SIMT only) against double references,
// on f32 data that are not bf16 values.
static void check_grouped_f32(int m, int e, int k, int n) {
    std::vector<unsigned> tiles;
    const auto off = rand_offsets(e, m, tiles);
    const auto a = uvec((size_t)m * k, 1.0f), bt = uvec((size_t)e * n * k, 1.0f), b2 = uvec((size_t)e * n * k, 1.0f);
    const auto gb = uvec((size_t)m * n, 1.0f);
    const auto out0 = uvec((size_t)m * n, 1.0f), dw0 = uvec((size_t)e * k * n, 1.0f);
    std::vector<float> o1(m * n, 7.0f), o2 = out0, g(m * n), u(m * n), act(m * n), dw = dw0;
    const Dim3 grid{(unsigned)((n + 63) / 64), (unsigned)((m + 63) / 64 + e), 1};
    launch(grid, 256, [&] {
        moe_grouped_gemm_f32(o1.data(), a.data(), bt.data(), off.data(), tiles.data(), e, k, n, 1, 0);
    });
    launch(grid, 256, [&] {
        moe_grouped_gemm_f32(o2.data(), a.data(), b2.data(), off.data(), tiles.data(), e, k, n, 0, 1);
    });
    launch(grid, 256, [&] {
        moe_grouped_gate_up_f32(g.data(), u.data(), act.data(), a.data(), bt.data(), b2.data(), off.data(),
                                tiles.data(), e, k, n);
    });
    launch({(unsigned)((n + 63) / 64), (unsigned)((k + 63) / 64), (unsigned)e}, 256,
           [&] { moe_grouped_wgrad_f32(dw.data(), a.data(), gb.data(), off.data(), k, n); });
    std::vector<double> r1(m * n), r2(m * n), ru(m * n), ract(m * n), rdw(dw0.begin(), dw0.end());
    for (int x = 0; x < e; x++)
        for (unsigned r = off[x]; r < off[x + 1]; r++)
            for (int c = 0; c < n; c++) {
                double s1 = 0, s2 = 0, s3 = 0;
                for (int l = 0; l < k; l++) {
                    const double av = a[(size_t)r * k + l];
                    s1 += av * bt[((size_t)x * n + c) * k + l];
                    s2 += av * b2[((size_t)x * k + l) * n + c];
                    s3 += av * b2[((size_t)x * n + c) * k + l];
                }
                r1[(size_t)r * n + c] = s1;
                r2[(size_t)r * n + c] = out0[(size_t)r * n + c] + s2;
                ru[(size_t)r * n + c] = s3;
                ract[(size_t)r * n + c] = s1 / (1 + std::exp(-s1)) * s3;
            }
    for (int x = 0; x < e; x++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (unsigned r = off[x]; r < off[x + 1]; r++) s += (double)a[(size_t)r * k + i] * gb[(size_t)r * n + j];
                rdw[((size_t)x * k + i) * n + j] += s;
            }
    const std::string tag = "f32 m " + std::to_string(m) + " e " + std::to_string(e) + " k " + std::to_string(k) +
                            " n " + std::to_string(n);
    const double atol = 1.2e-7 * k;
    close(o1, r1, atol, 1e-6, "grouped a B^T " + tag);
    close(o2, r2, atol, 1e-6, "grouped out + a B " + tag);
    close(g, r1, atol, 1e-6, "gate " + tag);
    close(u, ru, atol, 1e-6, "up " + tag);
    close(act, ract, atol * k, 1e-5, "act " + tag);
    close(dw, rdw, 1.2e-7 * m, 1e-6, "wgrad " + tag);
}

int main() {
    for (int renorm = 0; renorm < 2; renorm++) {
        check_route_softmax(37, 60, 4, renorm, false);
        check_route_softmax(9, 8, 8, renorm, false);
        check_route_softmax(5, 128, 8, renorm, true);
        check_route_softmax(3, 1024, 32, renorm, false);
        check_route_softmax(4, 5, 2, renorm, true);
    }
    for (int renorm = 0; renorm < 2; renorm++)
        for (int bias = 0; bias < 2; bias++) {
            check_route_sigmoid(29, 64, 6, 8, 3, renorm, bias, false);
            check_route_sigmoid(11, 16, 4, 4, 2, renorm, bias, true);
            check_route_sigmoid(5, 256, 8, 8, 4, renorm, bias, false);
            check_route_sigmoid(3, 1024, 32, 32, 32, renorm, bias, false);
            check_route_sigmoid(7, 6, 3, 3, 1, renorm, bias, true);
        }
    for (int sigmoid = 0; sigmoid < 2; sigmoid++)
        for (int renorm = 0; renorm < 2; renorm++) {
            check_route_backward(13, 40, 4, sigmoid, renorm, true);
            check_route_backward(6, 100, 8, sigmoid, renorm, false);
        }
    check_permute(200, 16, 4, -1);
    check_permute(300, 8, 1, 5);
    check_permute(257, 64, 4, 0);
    check_permute(3, 64, 2, -1);
    check_permute(40, 1024, 32, -1);
    check_permute(1, 8, 8, -1);
    check_permute(0, 8, 2, -1);
    check_elementwise(1, 4, 1, 1);
    check_elementwise(37, 8, 2, 300);
    check_elementwise(20, 16, 16, 64);
    check_grouped(300, 8, 48, 130);
    check_grouped(17, 4, 5, 3);
    check_grouped(128, 2, 64, 64);
    check_grouped(200, 16, 33, 200);
    check_grouped(70, 1, 16, 65);
    check_grouped_f32(300, 8, 48, 130);
    check_grouped_f32(17, 4, 5, 3);
    check_grouped_f32(70, 1, 16, 65);
    printf("moe_emulate: %d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
