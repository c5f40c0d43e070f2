// Runs the kernels of the CUDA backend's first part on the CPU through
// cuda_shim.h, each launched with its Rust launcher's geometry
// (aha_cuda_kernels::launch): RMSNorm forward and backward (two passes),
// causal attention forward, backward (dsum, dq, dkv) and KV-cache decode,
// RoPE both ways, the bf16 casts, the gradient norm (two passes), the
// sampling kernel, SiLU / SwiGLU, embedding, AdamW, add / scale, bias add
// and gradient, and the token log-prob backward. Reads one job on stdin, prints its outputs (%.17g, one
// per line); aha-tensor's tests/emulated_kernels.rs and aha-sampler's
// tests/gpu_sampling.rs compare them with the CPU twins.
//
// Jobs (inputs after the sizes, in this order):
//   rmsnorm rows c eps  inp weight dout          -> out rstd dinp dweight
//   attention B T H Hk Dk Dv scale  q k v dout   -> out lse dq dk dv
//   decode start n P H Hk Dk Dv scale  q kc vc   -> out
//   rope tokens width head_dim rot_offset rot_dim interleaved max_pos  inp cos sin pos
//                                                -> out (forward) din (backward of inp as dout)
//   cast n  x                                    -> bits (f32 -> bf16) back (bf16 bits -> f32)
//   gradnorm n  x                                -> sum of squares (f64)
//   sample rows v temperature top_k top_p min_p  logits u -> token logprob trunc_log (per row)
//   act n  gate up dout                          -> silu(gate) dsilu swiglu dgate dup
//   embedding tokens vocab c  table ids dout     -> out dtable (from zeros)
//   adamw n b1 b2 ob1 ob2 decay step inv_bc2_sqrt eps  params m v grads -> params m v
//   elementwise n s  a b                         -> a + b, a (+= b), (a + b) * s in place
//   bias rows c  x bias dy                       -> x + bias, dbias (from zeros)
//   logprob_bwd n v  logits targets dlogp lse    -> dlogits

#include "cuda_shim.h"

#include "rmsnorm.cu"
#include "attention.cu"
#include "rope.cu"
#include "cast.cu"
#include "optim.cu"
#include "sampling.cu"
#include "activation.cu"
#include "embedding.cu"
#include "elementwise.cu"
#include "logprob.cu"

#include <iostream>
#include <string>

template <class T>
static std::vector<T> read(size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) {
        std::string w;
        char* end = nullptr;
        double d = 0.0;
        if (std::cin >> w) d = strtod(w.c_str(), &end);
        if (end == nullptr || *end != '\0') {
            fprintf(stderr, "core: input ended early or %s is not a number\n", w.c_str());
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

// The element-wise launch geometry of launch/mod.rs (grid_1d): 256 threads,
// ceil(n / 256) blocks capped at 65536 -- capped here at 4 so that the grid
// stride loops run more than once in the emulation.
static Dim3 grid_1d(unsigned long long n) {
    const unsigned long long b = std::max(1ull, std::min((n + 255) / 256, 4ull));
    return Dim3{(unsigned)b, 1, 1};
}

static void rmsnorm_job() {
    int rows, c;
    float eps;
    std::cin >> rows >> c >> eps;
    auto x = read<float>((size_t)rows * c), w = read<float>(c), g = read<float>((size_t)rows * c);
    std::vector<float> out((size_t)rows * c), rstd(rows), dx((size_t)rows * c), dw(c, 0.0f);
    emu::launch({(unsigned)rows, 1, 1}, 256,
                [&] { rmsnorm_forward_f32(out.data(), rstd.data(), x.data(), w.data(), rows, c, eps); });
    const int blocks = std::min(rows, 1024);
    std::vector<float> partial((size_t)blocks * c);
    emu::launch({(unsigned)blocks, 1, 1}, 256, [&] {
        rmsnorm_backward_f32(dx.data(), partial.data(), g.data(), x.data(), w.data(), rstd.data(), rows, c);
    });
    emu::launch({(unsigned)((c + 255) / 256), 1, 1}, 256,
                [&] { rmsnorm_dweight_reduce_f32(dw.data(), partial.data(), blocks, c); });
    write(out);
    write(rstd);
    write(dx);
    write(dw);
}

static void attention_job() {
    int B, T, H, Hk, Dk, Dv;
    float scale;
    std::cin >> B >> T >> H >> Hk >> Dk >> Dv >> scale;
    const size_t nq = (size_t)B * T * H, nk = (size_t)B * T * Hk;
    auto q = read<float>(nq * Dk), k = read<float>(nk * Dk), v = read<float>(nk * Dv), dout = read<float>(nq * Dv);
    std::vector<float> out(nq * Dv), lse(nq), dsum(nq), dq(nq * Dk), dk(nk * Dk), dv(nk * Dv);
    const unsigned threads = 32 * ATT_WARPS;
    const Dim3 qgrid{(unsigned)((nq + ATT_WARPS - 1) / ATT_WARPS), 1, 1};
    const Dim3 kgrid{(unsigned)((nk + ATT_WARPS - 1) / ATT_WARPS), 1, 1};
    emu::launch(qgrid, threads, [&] {
        attention_forward_f32(out.data(), lse.data(), q.data(), k.data(), v.data(), B, T, H, Hk, Dk, Dv, scale);
    });
    emu::launch(qgrid, threads, [&] { attention_dsum_f32(dsum.data(), dout.data(), out.data(), B, T, H, Dv); });
    emu::launch(qgrid, threads, [&] {
        attention_backward_dq_f32(dq.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(), dsum.data(), B, T,
                                  H, Hk, Dk, Dv, scale);
    });
    emu::launch(kgrid, threads, [&] {
        attention_backward_dkv_f32(dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(),
                                   dsum.data(), B, T, H, Hk, Dk, Dv, scale);
    });
    write(out);
    write(lse);
    write(dq);
    write(dk);
    write(dv);
}

static void decode_job() {
    int start, n, P, H, Hk, Dk, Dv;
    float scale;
    std::cin >> start >> n >> P >> H >> Hk >> Dk >> Dv >> scale;
    auto q = read<float>((size_t)n * H * Dk), kc = read<float>((size_t)P * Hk * Dk), vc = read<float>((size_t)P * Hk * Dv);
    std::vector<float> out((size_t)n * H * Dv);
    const size_t rows = (size_t)n * H;
    emu::launch({(unsigned)((rows + ATT_WARPS - 1) / ATT_WARPS), 1, 1}, 32 * ATT_WARPS, [&] {
        attention_decode_f32(out.data(), q.data(), kc.data(), vc.data(), start, n, H, Hk, Dk, Dv, scale);
    });
    write(out);
}

static void rope_job() {
    unsigned long long n;
    int width, head_dim, rot_offset, rot_dim, interleaved;
    unsigned max_pos;
    std::cin >> n >> width >> head_dim >> rot_offset >> rot_dim >> interleaved >> max_pos;
    const size_t half = rot_dim / 2;
    auto x = read<float>(n * width), co = read<float>(max_pos * half), si = read<float>(max_pos * half);
    auto pos = read<unsigned>(n);
    std::vector<float> out(n * width), din(n * width);
    const unsigned long long total = n * width;
    emu::launch(grid_1d(total), 256, [&] {
        rope_forward_f32(out.data(), x.data(), co.data(), si.data(), pos.data(), total, width, head_dim, rot_offset,
                         rot_dim, interleaved, max_pos);
    });
    emu::launch(grid_1d(total), 256, [&] {
        rope_backward_f32(din.data(), x.data(), co.data(), si.data(), pos.data(), total, width, head_dim, rot_offset,
                          rot_dim, interleaved, max_pos);
    });
    write(out);
    write(din);
}

static void cast_job() {
    unsigned long long n;
    std::cin >> n;
    auto x = read<float>(n);
    std::vector<unsigned short> bits(n);
    std::vector<float> back(n);
    emu::launch(grid_1d(n), 256, [&] { cast_f32_to_bf16(bits.data(), x.data(), n); });
    emu::launch(grid_1d(n), 256, [&] { cast_bf16_to_f32(back.data(), bits.data(), n); });
    write(bits);
    write(back);
}

static void gradnorm_job() {
    unsigned long long n;
    std::cin >> n;
    auto x = read<float>(n);
    // grad_norm_f32's geometry: 256 threads, at most 1024 blocks (4 here).
    const unsigned blocks = (unsigned)std::max(1ull, std::min((n + 255) / 256, 4ull));
    std::vector<double> partial(blocks), out(1);
    emu::launch({blocks, 1, 1}, 256, [&] { grad_norm_sq_f32(partial.data(), x.data(), n); });
    emu::launch({1, 1, 1}, 256, [&] { grad_norm_sq_reduce_f64(out.data(), partial.data(), (int)blocks); });
    write(out);
}

static void sample_job() {
    int rows, top_k;
    unsigned long long v;
    float temperature, top_p, min_p;
    std::cin >> rows >> v >> temperature >> top_k >> top_p >> min_p;
    auto logits = read<float>((size_t)rows * v);
    auto u = read<double>(rows);
    std::vector<float> w((size_t)rows * v), lp(rows), tl(rows);
    std::vector<int> token(rows);
    emu::launch({(unsigned)rows, 1, 1}, SAMPLE_BLOCK, [&] {
        sample_f32(token.data(), lp.data(), tl.data(), w.data(), logits.data(), u.data(), v, temperature, top_k, top_p,
                   min_p);
    });
    for (int r = 0; r < rows; r++) printf("%d\n%.17g\n%.17g\n", token[r], (double)lp[r], (double)tl[r]);
}

static void act_job() {
    unsigned long long n;
    std::cin >> n;
    auto gate = read<float>(n), up = read<float>(n), dout = read<float>(n);
    std::vector<float> silu(n), dsilu(n), sw(n), dg(n), du(n);
    emu::launch(grid_1d(n), 256, [&] { silu_forward_f32(silu.data(), gate.data(), n); });
    emu::launch(grid_1d(n), 256, [&] { silu_backward_f32(dsilu.data(), dout.data(), gate.data(), n); });
    emu::launch(grid_1d(n), 256, [&] { swiglu_forward_f32(sw.data(), gate.data(), up.data(), n); });
    emu::launch(grid_1d(n), 256,
                [&] { swiglu_backward_f32(dg.data(), du.data(), dout.data(), gate.data(), up.data(), n); });
    write(silu);
    write(dsilu);
    write(sw);
    write(dg);
    write(du);
}

static void embedding_job() {
    unsigned long long tokens;
    unsigned vocab;
    int c;
    std::cin >> tokens >> vocab >> c;
    auto table = read<float>((size_t)vocab * c);
    auto ids = read<unsigned>(tokens);
    auto dout = read<float>(tokens * c);
    std::vector<float> out(tokens * c), dtable((size_t)vocab * c, 0.0f);
    const unsigned long long n = tokens * c;
    emu::launch(grid_1d(n), 256, [&] { embedding_forward_f32(out.data(), table.data(), ids.data(), n, vocab, c); });
    emu::launch(grid_1d(n), 256,
                [&] { embedding_backward_f32(dtable.data(), dout.data(), ids.data(), n, vocab, c); });
    write(out);
    write(dtable);
}

static void adamw_job() {
    unsigned long long n;
    float b1, b2, ob1, ob2, decay, step, inv, eps;
    std::cin >> n >> b1 >> b2 >> ob1 >> ob2 >> decay >> step >> inv >> eps;
    auto p = read<float>(n), m = read<float>(n), v = read<float>(n), g = read<float>(n);
    emu::launch(grid_1d(n), 256, [&] {
        adamw_f32(p.data(), m.data(), v.data(), g.data(), n, b1, b2, ob1, ob2, decay, step, inv, eps);
    });
    write(p);
    write(m);
    write(v);
}

static void elementwise_job() {
    unsigned long long n;
    float sc;
    std::cin >> n >> sc;
    auto a = read<float>(n), b = read<float>(n);
    std::vector<float> sum(n), acc = a;
    emu::launch(grid_1d(n), 256, [&] { add_f32(sum.data(), a.data(), b.data(), n); });
    emu::launch(grid_1d(n), 256, [&] { add_inplace_f32(acc.data(), b.data(), n); });
    write(sum);
    write(acc);
    emu::launch(grid_1d(n), 256, [&] { scale_f32(acc.data(), sc, n); });
    write(acc);
}

static void bias_job() {
    unsigned long long rows, c;
    std::cin >> rows >> c;
    auto x = read<float>(rows * c), bias = read<float>(c), dy = read<float>(rows * c);
    std::vector<float> db(c, 0.0f);
    emu::launch(grid_1d(rows * c), 256, [&] { add_bias_f32(x.data(), bias.data(), rows, c); });
    emu::launch(grid_1d(c), 256, [&] { bias_grad_f32(db.data(), dy.data(), rows, c); });
    write(x);
    write(db);
}

static void logprob_bwd_job() {
    unsigned long long n, v;
    std::cin >> n >> v;
    auto x = read<float>(n * v);
    auto t = read<unsigned>(n);
    auto dl = read<float>(n), lse = read<float>(n);
    std::vector<float> dx(n * v);
    emu::launch(grid_1d(n * v), 256, [&] {
        token_logprob_backward_f32(dx.data(), dl.data(), x.data(), lse.data(), t.data(), n, v);
    });
    write(dx);
}

// The sanitizer's canary: the rmsnorm forward over an input one float short,
// so its last block reads past the end of the buffer. A sanitized build must
// die here with a heap-buffer-overflow; a plain build reads one stray float.
static void canary_job() {
    const int rows = 2, c = 64;
    std::vector<float> x((size_t)rows * c - 1, 1.0f), w(c, 1.0f), out((size_t)rows * c), rstd(rows);
    emu::launch({(unsigned)rows, 1, 1}, 256,
                [&] { rmsnorm_forward_f32(out.data(), rstd.data(), x.data(), w.data(), rows, c, 1e-6f); });
    write(out);
}

int main() {
    std::string job;
    if (!(std::cin >> job)) return 2;
    if (job == "rmsnorm") rmsnorm_job();
    else if (job == "attention") attention_job();
    else if (job == "decode") decode_job();
    else if (job == "rope") rope_job();
    else if (job == "cast") cast_job();
    else if (job == "gradnorm") gradnorm_job();
    else if (job == "sample") sample_job();
    else if (job == "act") act_job();
    else if (job == "embedding") embedding_job();
    else if (job == "adamw") adamw_job();
    else if (job == "elementwise") elementwise_job();
    else if (job == "bias") bias_job();
    else if (job == "logprob_bwd") logprob_bwd_job();
    else if (job == "canary") canary_job();
    else {
        fprintf(stderr, "core: unknown job %s\n", job.c_str());
        return 2;
    }
    return 0;
}
