// Runs kernels/lmhead.cu, logprob.cu and grpo.cu on the CPU through cuda_shim.h,
// launched as their Rust launchers launch them (aha_cuda_kernels::lmhead,
// ::grpo), with a plain triple loop standing in for the cuBLAS products.
// Reads one job from stdin and writes its outputs to stdout, as
// whitespace-separated numbers (%.17g); the Rust tests
// (aha-tensor tests/emulated_lmhead.rs, aha-grpo tests/emulated_grpo.rs)
// compare them with the CPU twins.
//
// Jobs:
//   lmhead n c v chunk rows temperature  hidden[n*c] weight[v*c] targets[n] dlogp[n] dentropy[n]
//     -> logp[n] entropy[n] lse[n] dhidden[n*c] dweight[v*c]
//   grpo B T  loss_type kl seq_level has_delta has_entropy quantile_on has_num_items
//        beta eps_low eps_high delta max_len entropy_coef quantile num_items  has_old
//        logp[B*T] old[B*T if has_old] ref[B*T] mask[B*T] adv[B] entropy[B*T if has_entropy]
//     -> out[9] dlogp[B*T] dentropy[B*T]
//   adv n group_size estimator rewards[n]
//     -> adv[n] group_mean[n] std[n] summary[3]
//   logprob n v logits[n*v] targets[n]      (kernels/logprob.cu's forward)
//     -> logp[n] lse[n]

#include "cuda_shim.h"

#include "lmhead.cu"
#include "logprob.cu"
#include "grpo.cu"

#include <iostream>
#include <string>

template <class T>
static std::vector<T> read(size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) {
        // strtod, not operator>>: it reads nan and inf.
        std::string w;
        char* end = nullptr;
        double d = 0.0;
        if (std::cin >> w) d = strtod(w.c_str(), &end);
        if (end == nullptr || *end != '\0') {
            fprintf(stderr, "lmhead_grpo: input ended early or %s is not a number\n", w.c_str());
            exit(2);
        }
        x = (T)d;
    }
    return v;
}

template <class T>
static void write(const std::vector<T>& v) {
    for (const auto& x : v) printf("%.17g\n", (double)x);
}

// out [rows, vc] = hidden[r0 ..] · weight[v0 ..]ᵀ, f32 accumulation like SGEMM.
static void chunk_logits(std::vector<float>& out, const std::vector<float>& h, const std::vector<float>& w, size_t c,
                         size_t r0, size_t rows, size_t v0, size_t vc) {
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < vc; j++) {
            float acc = 0.0f;
            for (size_t k = 0; k < c; k++) acc += h[(r0 + r) * c + k] * w[(v0 + j) * c + k];
            out[r * vc + j] = acc;
        }
}

static void lmhead_job() {
    size_t n, c, v, chunk, rows_per;
    float temp;
    std::cin >> n >> c >> v >> chunk >> rows_per >> temp;
    auto h = read<float>(n * c), w = read<float>(v * c);
    auto t = read<unsigned>(n);
    auto dl = read<float>(n), de = read<float>(n);
    std::vector<float> state(4 * n), buf(rows_per * std::min(chunk, v)), logp(n), ent(n), lse(n);
    std::vector<float> dh(n * c, 0.0f), dw(v * c, 0.0f);
    const float inv_t = 1.0f / temp;
    for (size_t r0 = 0; r0 < n; r0 += rows_per) {
        const size_t rows = std::min(rows_per, n - r0);
        for (size_t v0 = 0, ci = 0; v0 < v; v0 += chunk, ci++) {
            const size_t vc = std::min(chunk, v - v0);
            chunk_logits(buf, h, w, c, r0, rows, v0, vc);
            emu::launch({(unsigned)rows, 1, 1}, 256, [&] {
                lmhead_chunk_stats_f32(state.data() + 4 * r0, buf.data(), t.data() + r0, vc, v0, inv_t, ci == 0);
            });
        }
    }
    emu::launch({(unsigned)((n + 255) / 256), 1, 1}, 256,
                [&] { lmhead_finish_f32(logp.data(), ent.data(), lse.data(), state.data(), n); });
    for (size_t r0 = 0; r0 < n; r0 += rows_per) {
        const size_t rows = std::min(rows_per, n - r0);
        for (size_t v0 = 0; v0 < v; v0 += chunk) {
            const size_t vc = std::min(chunk, v - v0);
            chunk_logits(buf, h, w, c, r0, rows, v0, vc);
            const size_t total = rows * vc;
            // A small grid, so that the grid-stride loop runs more than once.
            const unsigned blocks = (unsigned)std::min<size_t>((total + 255) / 256, 3);
            emu::launch({blocks, 1, 1}, 256, [&] {
                lmhead_chunk_grad_f32(buf.data(), lse.data() + r0, ent.data() + r0, dl.data() + r0, de.data() + r0,
                                      t.data() + r0, rows, vc, v0, inv_t);
            });
            for (size_t r = 0; r < rows; r++)
                for (size_t k = 0; k < c; k++) {
                    float acc = 0.0f;
                    for (size_t j = 0; j < vc; j++) acc += buf[r * vc + j] * w[(v0 + j) * c + k];
                    dh[(r0 + r) * c + k] += acc;
                }
            for (size_t j = 0; j < vc; j++)
                for (size_t k = 0; k < c; k++) {
                    float acc = 0.0f;
                    for (size_t r = 0; r < rows; r++) acc += buf[r * vc + j] * h[(r0 + r) * c + k];
                    dw[(v0 + j) * c + k] += acc;
                }
        }
    }
    write(logp);
    write(ent);
    write(lse);
    write(dh);
    write(dw);
}

static void grpo_job() {
    int B, T;
    GrpoParams p{};
    int has_old;
    std::cin >> B >> T >> p.loss_type >> p.kl >> p.seq_level >> p.has_delta >> p.has_entropy >> p.quantile_on >>
        p.has_num_items >> p.beta >> p.eps_low >> p.eps_high >> p.delta >> p.max_len >> p.entropy_coef >>
        p.quantile >> p.num_items >> has_old;
    const size_t n = (size_t)B * T;
    auto logp = read<float>(n);
    auto old = has_old ? read<float>(n) : logp;
    auto refp = read<float>(n);
    auto mask = read<unsigned char>(n);
    auto adv = read<double>(B);
    auto ent = p.has_entropy ? read<float>(n) : logp;
    std::vector<double> seq(2 * B), scal(2), acc((size_t)GR_ACC * B), out(GR_OUT);
    std::vector<float> dlogp(n), dent(n);
    emu::launch({(unsigned)B, 1, 1}, GR_BLOCK,
                [&] { grpo_seq_stats_f32(seq.data(), logp.data(), old.data(), mask.data(), T); });
    emu::launch({1, 1, 1}, GR_BLOCK, [&] {
        grpo_batch_stats_f32(scal.data(), seq.data(), ent.data(), mask.data(), B, T, p.quantile_on, p.quantile);
    });
    emu::launch({(unsigned)B, 1, 1}, GR_BLOCK, [&] {
        grpo_token_loss_f32(dlogp.data(), dent.data(), acc.data(), seq.data(), scal.data(), adv.data(), logp.data(),
                            old.data(), refp.data(), mask.data(), ent.data(), B, T, p);
    });
    emu::launch({1, 1, 1}, GR_BLOCK,
                [&] { grpo_finalize_f64(out.data(), acc.data(), seq.data(), scal.data(), B, T, p.seq_level); });
    write(out);
    write(dlogp);
    write(dent);
}

static void adv_job() {
    int n, g, est;
    std::cin >> n >> g >> est;
    auto r = read<double>(n);
    std::vector<double> adv(n), mean(n), std_(n), summary(3);
    emu::launch({1, 1, 1}, GR_BLOCK, [&] {
        grpo_advantages_f64(adv.data(), mean.data(), std_.data(), summary.data(), r.data(), n, g, est);
    });
    write(adv);
    write(mean);
    write(std_);
    write(summary);
}

static void logprob_job() {
    size_t n, v;
    std::cin >> n >> v;
    auto x = read<float>(n * v);
    auto t = read<unsigned>(n);
    std::vector<float> logp(n), lse(n);
    emu::launch({(unsigned)n, 1, 1}, LP_BLOCK,
                [&] { token_logprob_forward_f32(logp.data(), lse.data(), x.data(), t.data(), v); });
    write(logp);
    write(lse);
}

int main() {
    std::string job;
    if (!(std::cin >> job)) return 2;
    if (job == "lmhead") {
        lmhead_job();
    } else if (job == "grpo") {
        grpo_job();
    } else if (job == "adv") {
        adv_job();
    } else if (job == "logprob") {
        logprob_job();
    } else {
        fprintf(stderr, "lmhead_grpo: unknown job %s\n", job.c_str());
        return 2;
    }
    return 0;
}
