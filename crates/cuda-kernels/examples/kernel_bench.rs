//! Times every kernel of `launch` on model-sized shapes and prints a table:
//! kernel, shape, time per launch, effective GB/s (bytes each kernel must move
//! at least, over its time) and the fraction of 3.0 TB/s, the H100's measured
//! device-to-device copy bandwidth. The stream is synchronised before each
//! clock read. Prints "skipped: no GPU" and exits 0 where there is none.
//!
//! `cargo run --release -p aha-cuda-kernels --example kernel_bench [-- ITERS]`

use std::time::Instant;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch::{self, AdamwScalars, RopeGeometry, TokenIds};
use aha_cuda_kernels::{Gpu, Result};

/// The H100's measured device-copy bandwidth, bytes per second.
const PEAK: f64 = 3.0e12;

struct Bench<'g> {
    gpu: &'g Gpu,
    iters: usize,
}

impl Bench<'_> {
    /// Runs `f` 3 times to warm up (compilation, caches), then `iters` times
    /// between two stream synchronisations, and prints one table row.
    fn run(&self, kernel: &str, shape: &str, bytes: f64, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        for _ in 0..3 {
            f()?;
        }
        self.gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..self.iters {
            f()?;
        }
        self.gpu.synchronize()?;
        let secs = t.elapsed().as_secs_f64() / self.iters as f64;
        let gbs = bytes / secs / 1e9;
        println!(
            "| {kernel:<22} | {shape:<28} | {:>10.1} | {gbs:>8.0} | {:>5.1}% |",
            secs * 1e6,
            100.0 * bytes / secs / PEAK
        );
        Ok(())
    }
}

fn zeros(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    gpu.zeros::<f32>(n)
}

/// Values in [-1, 1) that vary, so no kernel sees only zeros.
fn ramp(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    let v: Vec<f32> = (0..n).map(|i| ((i % 2001) as f32 - 1000.0) / 1000.0).collect();
    gpu.upload(&v)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        println!("kernel_bench: skipped: no GPU ({reason})");
        return Ok(());
    }
    let iters = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let gpu = Gpu::get(0)?;
    println!(
        "{gpu:?}, {iters} iterations per row, fraction of {:.1} TB/s",
        PEAK / 1e12
    );
    println!("| kernel                 | shape                        |  time (us) |     GB/s |  peak |");
    println!("|---|---|---:|---:|---:|");
    let b = Bench { gpu: &gpu, iters };
    let f4 = 4.0f64;

    // Norms: N = 8192 tokens (batch 8 x 1024), C = 4096 (Qwen3-8B) and 7168 (DeepSeek-V3).
    for (rows, c) in [(8192usize, 4096usize), (8192, 7168)] {
        let n = rows * c;
        let (x, w, g) = (ramp(&gpu, n)?, ramp(&gpu, c)?, ramp(&gpu, n)?);
        let (mut y, mut rstd, mut dx, mut dw) = (zeros(&gpu, n)?, zeros(&gpu, rows)?, zeros(&gpu, n)?, zeros(&gpu, c)?);
        let shape = format!("[{rows}, {c}]");
        b.run("rmsnorm_forward_f32", &shape, 2.0 * f4 * n as f64, || {
            launch::rmsnorm_forward_f32(&gpu, &mut y, &mut rstd, &x, &w, rows, c, 1e-6)
        })?;
        let scratch = 2.0 * f4 * (rows.min(1024) * c) as f64;
        b.run("rmsnorm_backward_f32", &shape, 3.0 * f4 * n as f64 + scratch, || {
            launch::rmsnorm_backward_f32(&gpu, &mut dx, &mut dw, &g, &x, &w, &rstd, rows, c)
        })?;
    }

    // RoPE on queries: 8192 tokens x 32 heads x 128 (half-split, full), and
    // DeepSeek-V3's 128 heads x 192 with a 64-wide interleaved part.
    let max_pos = 4096;
    for (heads, head_dim, rot_offset, rot_dim, interleaved) in [(32, 128, 0, 128, false), (128, 192, 128, 64, true)] {
        let tokens = 8192usize;
        let n = tokens * heads * head_dim;
        let x = ramp(&gpu, n)?;
        let mut y = zeros(&gpu, n)?;
        let table = ramp(&gpu, max_pos * rot_dim / 2)?;
        let pos: Vec<u32> = (0..tokens as u32).map(|t| t % max_pos as u32).collect();
        let pos = gpu.upload(&pos)?;
        let geo = RopeGeometry {
            heads,
            head_dim,
            rot_offset,
            rot_dim,
            interleaved,
        };
        let shape = format!("[{tokens}, {heads}, {head_dim}] r{rot_dim}");
        b.run("rope_forward_f32", &shape, 2.0 * f4 * n as f64, || {
            launch::rope_forward_f32(&gpu, &mut y, &x, &table, &table, &pos, tokens, &geo)
        })?;
        b.run("rope_backward_f32", &shape, 2.0 * f4 * n as f64, || {
            launch::rope_backward_f32(&gpu, &mut y, &x, &table, &table, &pos, tokens, &geo)
        })?;
    }

    // MLP activations: 8192 tokens x 12288 (Qwen3-8B intermediate).
    {
        let n = 8192usize * 12288;
        let shape = "[8192, 12288]";
        let (gate, up, dout) = (ramp(&gpu, n)?, ramp(&gpu, n)?, ramp(&gpu, n)?);
        let (mut o1, mut o2) = (zeros(&gpu, n)?, zeros(&gpu, n)?);
        let nf = n as f64 * f4;
        b.run("silu_forward_f32", shape, 2.0 * nf, || {
            launch::silu_forward_f32(&gpu, &mut o1, &gate, n)
        })?;
        b.run("silu_backward_f32", shape, 3.0 * nf, || {
            launch::silu_backward_f32(&gpu, &mut o1, &dout, &gate, n)
        })?;
        b.run("swiglu_forward_f32", shape, 3.0 * nf, || {
            launch::swiglu_forward_f32(&gpu, &mut o1, &gate, &up, n)
        })?;
        b.run("swiglu_backward_f32", shape, 5.0 * nf, || {
            launch::swiglu_backward_f32(&gpu, &mut o1, &mut o2, &dout, &gate, &up, n)
        })?;
        b.run("add_f32", shape, 3.0 * nf, || {
            launch::add_f32(&gpu, &mut o1, &gate, &up, n)
        })?;
        b.run("add_inplace_f32", shape, 3.0 * nf, || {
            launch::add_inplace_f32(&gpu, &mut o1, &gate, n)
        })?;
        b.run("scale_f32", shape, 2.0 * nf, || {
            launch::scale_f32(&gpu, &mut o1, 0.999, n)
        })?;
        let mut h = gpu.zeros::<u16>(n)?;
        b.run("cast_f32_to_bf16", shape, 6.0 * n as f64, || {
            launch::cast_f32_to_bf16(&gpu, &mut h, &gate, n)
        })?;
        b.run("cast_bf16_to_f32", shape, 6.0 * n as f64, || {
            launch::cast_bf16_to_f32(&gpu, &mut o1, &h, n)
        })?;
    }

    // Embedding: Qwen3's vocabulary 151936 x 4096, 8192 tokens.
    {
        let (tokens, vocab, c) = (8192usize, 151_936usize, 4096usize);
        let table = zeros(&gpu, vocab * c)?;
        let mut dtable = zeros(&gpu, vocab * c)?;
        let ids: Vec<u32> = (0..tokens).map(|t| ((t * 7919) % vocab) as u32).collect();
        let ids = gpu.upload(&ids)?;
        let (dout, mut out) = (ramp(&gpu, tokens * c)?, zeros(&gpu, tokens * c)?);
        let shape = format!("{tokens} of [{vocab}, {c}]");
        let nf = (tokens * c) as f64 * f4;
        b.run("embedding_forward_f32", &shape, 2.0 * nf, || {
            launch::embedding_forward_f32(&gpu, &mut out, &table, TokenIds::Device(&ids), tokens, vocab, c)
        })?;
        b.run("embedding_backward_f32", &shape, 3.0 * nf, || {
            launch::embedding_backward_f32(&gpu, &mut dtable, &dout, TokenIds::Device(&ids), tokens, vocab, c)
        })?;
    }

    // Optimizer over 256M parameters (f32 params, grads, m, v: 4 GiB).
    {
        let n = 256usize << 20;
        let shape = "256M params";
        let grads = ramp(&gpu, n)?;
        let (mut p, mut m, mut v) = (ramp(&gpu, n)?, zeros(&gpu, n)?, zeros(&gpu, n)?);
        let h = AdamwScalars::new(1e-4, 0.9, 0.95, 1e-8, 0.1, 10)?;
        b.run("adamw_f32", shape, 7.0 * f4 * n as f64, || {
            launch::adamw_f32(&gpu, &mut p, &mut m, &mut v, &grads, n, &h)
        })?;
        b.run("grad_norm_f32 (+sync)", shape, f4 * n as f64, || {
            launch::grad_norm_f32(&gpu, &grads, n).map(|_| ())
        })?;
    }
    // Sampling: 64 rows over Qwen's vocabulary (reads the logits, writes and
    // re-reads the weights a few times: counted as one read + one write).
    {
        let (rows, v) = (64usize, 151_936usize);
        let logits = ramp(&gpu, rows * v)?;
        let u: Vec<f64> = (0..rows).map(|r| (r as f64 + 0.5) / rows as f64).collect();
        for (name, p) in [
            (
                "sample_f32 (plain)",
                launch::SampleParams {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                },
            ),
            (
                "sample_f32 (top-p .95)",
                launch::SampleParams {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 0.95,
                    min_p: 0.0,
                },
            ),
        ] {
            b.run(name, "64 x 151936", 2.0 * f4 * (rows * v) as f64, || {
                launch::sample_f32(&gpu, &logits, rows, v, &u, &p).map(|_| ())
            })?;
        }
    }
    println!("(bytes: the minimum each kernel must read and write; scratch passes included)");
    // Matrix products through cuBLAS, in TFLOP/s against the H100's ~800
    // TFLOP/s for a dense bf16 product (f32 runs on the f32 units).
    println!();
    println!("| product                | m x k x n                    |  time (us) |   TFLOP/s | of 800 |");
    println!("|---|---|---:|---:|---:|");
    for (m, k, n) in [
        (4096usize, 4096usize, 4096usize),
        (16384, 2048, 2048),
        (16, 2048, 151_936),
    ] {
        use aha_cuda_kernels::blas::{self, MatmulShape};
        let s = MatmulShape {
            m,
            k,
            n,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        let flops = 2.0 * (m * k * n) as f64;
        let (a, w, mut o) = (ramp(&gpu, m * k)?, ramp(&gpu, n * k)?, zeros(&gpu, m * n)?);
        let (a16, w16, mut o16) = (
            gpu.zeros::<u16>(m * k)?,
            gpu.zeros::<u16>(n * k)?,
            gpu.zeros::<u16>(m * n)?,
        );
        let mut a16 = a16;
        let mut w16 = w16;
        launch::cast_f32_to_bf16(&gpu, &mut a16, &a, m * k)?;
        launch::cast_f32_to_bf16(&gpu, &mut w16, &w, n * k)?;
        for (name, bf16) in [("cublas f32", false), ("cublas bf16 (f32 acc)", true)] {
            for _ in 0..3 {
                if bf16 {
                    blas::matmul_bf16(&gpu, &mut o16, &a16, &w16, s)?;
                } else {
                    blas::matmul_f32(&gpu, &mut o, &a, &w, s)?;
                }
            }
            gpu.synchronize()?;
            let t = Instant::now();
            for _ in 0..b.iters {
                if bf16 {
                    blas::matmul_bf16(&gpu, &mut o16, &a16, &w16, s)?;
                } else {
                    blas::matmul_f32(&gpu, &mut o, &a, &w, s)?;
                }
            }
            gpu.synchronize()?;
            let secs = t.elapsed().as_secs_f64() / b.iters as f64;
            let tf = flops / secs / 1e12;
            println!(
                "| {name:<22} | {:<28} | {:>10.1} | {tf:>9.1} | {:>5.1}% |",
                format!("{m} x {k} x {n}"),
                secs * 1e6,
                100.0 * tf / 800.0
            );
        }
    }
    // The simple attention kernels (f32, warp per row; bf16 runs the flash
    // kernels instead) and the token log-probs.
    {
        use aha_cuda_kernels::launch::AttnGeometry;
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            for _ in 0..2 {
                f()?;
            }
            gpu.synchronize()?;
            let t = Instant::now();
            for _ in 0..b.iters {
                f()?;
            }
            gpu.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / b.iters as f64)
        };
        for t in [1024usize, 4096] {
            let g = AttnGeometry {
                b: 1,
                t,
                h: 16,
                hk: 4,
                dk: 128,
                dv: 128,
                scale: 0.088,
            };
            let (q, k, v) = (
                ramp(&gpu, t * 16 * 128)?,
                ramp(&gpu, t * 4 * 128)?,
                ramp(&gpu, t * 4 * 128)?,
            );
            let (mut o, mut l) = (zeros(&gpu, t * 16 * 128)?, zeros(&gpu, 16 * t)?);
            // Causal: half of the T x T scores, 2 products of D each.
            let flops = 2.0 * 2.0 * 16.0 * (t * t) as f64 / 2.0 * 128.0;
            let secs = timed(&mut || launch::attention_forward_f32(&gpu, &mut o, &mut l, &q, &k, &v, &g))?;
            let tf = flops / secs / 1e12;
            println!(
                "| {:<22} | {:<28} | {:>10.1} | {tf:>9.2} | {:>5.1}% |",
                "attention fwd (simple)",
                format!("T {t}, H 16/4, D 128"),
                secs * 1e6,
                100.0 * tf / 800.0
            );
            let (mut dq, mut dk, mut dv) = (
                zeros(&gpu, t * 16 * 128)?,
                zeros(&gpu, t * 4 * 128)?,
                zeros(&gpu, t * 4 * 128)?,
            );
            let secs = timed(&mut || {
                launch::attention_backward_f32(&gpu, &mut dq, &mut dk, &mut dv, &o, &q, &k, &v, &o, &l, &g)
            })?;
            let tf = 2.5 * flops / secs / 1e12;
            println!(
                "| {:<22} | {:<28} | {:>10.1} | {tf:>9.2} | {:>5.1}% |",
                "attention bwd (simple)",
                format!("T {t}, H 16/4, D 128"),
                secs * 1e6,
                100.0 * tf / 800.0
            );
        }
        let (n, v) = (4096usize, 151_936usize);
        let logits = ramp(&gpu, n * v)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 37 % v as u32).collect();
        let (mut lp, mut ls) = (zeros(&gpu, n)?, zeros(&gpu, n)?);
        let secs = timed(&mut || launch::token_logprob_forward_f32(&gpu, &mut lp, &mut ls, &logits, &targets, v))?;
        println!(
            "(token_logprob_forward_f32, {n} x {v}: {:.1} us, {:.0} GB/s of logits read)",
            secs * 1e6,
            4.0 * (n * v) as f64 / secs / 1e9
        );
    }
    bench_lmhead_grpo(&gpu, iters)?;
    bench_flash(&gpu, iters)?;
    bench_moe(&gpu, iters)?;
    Ok(())
}

/// The fused lm-head log-probs (vocabulary chunks from hidden states, f32
/// and bf16 operands; forward, and forward + backward as a GRPO step runs
/// it) at the target shape N = 16,384, V = 151,936, C = 2,048, with the chunk
/// buffer the plan allocates; then the GRPO math on a 1024 x 1024 batch.
/// scripts/bench_logprob_torch.py times PyTorch's naive path (product,
/// log_softmax, gather) and TRL's selective_log_softmax at the same shapes.
fn bench_lmhead_grpo(gpu: &Gpu, iters: usize) -> Result<()> {
    use aha_cuda_kernels::grpo::{self, GrpoLossInputs, GrpoParams};
    use aha_cuda_kernels::lmhead::{self, LmHeadOperands};
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    };
    println!();
    println!("| lm head (fused)        | N x C x V                    |   time (ms) |   TFLOP/s | workspace |");
    println!("|---|---|---:|---:|---:|");
    let (n, c, v) = (16_384usize, 2_048usize, 151_936usize);
    let plan = lmhead::plan_lm_head(n, c, v, 1.0, lmhead::DEFAULT_BUDGET_BYTES)?;
    let (h, w) = (ramp(gpu, n * c)?, ramp(gpu, v * c)?);
    let (mut h16, mut w16) = (gpu.zeros::<u16>(n * c)?, gpu.zeros::<u16>(v * c)?);
    launch::cast_f32_to_bf16(gpu, &mut h16, &h, n * c)?;
    launch::cast_f32_to_bf16(gpu, &mut w16, &w, v * c)?;
    let targets: Vec<u32> = (0..n as u32).map(|i| i * 7919 % v as u32).collect();
    let (mut lp, mut ent, mut lse) = (zeros(gpu, n)?, zeros(gpu, n)?, zeros(gpu, n)?);
    let (dl, de) = (ramp(gpu, n)?, zeros(gpu, n)?);
    let (mut dh, mut dw) = (zeros(gpu, n * c)?, zeros(gpu, v * c)?);
    let flops = 2.0 * (n * c * v) as f64;
    for (name, x) in [
        (
            "f32",
            LmHeadOperands::F32 {
                hidden: h.as_view(),
                weight: w.as_view(),
            },
        ),
        (
            "bf16",
            LmHeadOperands::Bf16 {
                hidden: h16.as_view(),
                weight: w16.as_view(),
            },
        ),
    ] {
        let secs =
            timed(&mut || lmhead::lm_head_logprob_forward_f32(gpu, &mut lp, &mut ent, &mut lse, &x, &targets, &plan))?;
        println!(
            "| {:<22} | {:<28} | {:>11.2} | {:>9.1} | {:>6.0} MB |",
            format!("fwd {name}"),
            format!("{n} x {c} x {v}"),
            secs * 1e3,
            flops / secs / 1e12,
            plan.workspace_bytes() as f64 / 1e6
        );
        let secs = timed(&mut || {
            lmhead::lm_head_logprob_forward_f32(gpu, &mut lp, &mut ent, &mut lse, &x, &targets, &plan)?;
            lmhead::lm_head_logprob_backward_f32(gpu, &mut dh, &mut dw, &x, &targets, &lse, &ent, &dl, &de, &plan)
        })?;
        // forward, recompute, two gradient products: 4 products of 2 N C V.
        println!(
            "| {:<22} | {:<28} | {:>11.2} | {:>9.1} | {:>6.0} MB |",
            format!("fwd + bwd {name}"),
            format!("{n} x {c} x {v}"),
            secs * 1e3,
            4.0 * flops / secs / 1e12,
            plan.workspace_bytes() as f64 / 1e6
        );
    }
    println!(
        "(naive [N, V] f32 logits and their gradient: {:.1} GB)",
        lmhead::naive_workspace_bytes(n, v) as f64 / 1e9
    );

    // GRPO loss and advantages: B = 1024 completions of T = 1024 tokens.
    let (bb, t) = (1024usize, 1024usize);
    let logp = ramp(gpu, bb * t)?;
    let mask: Vec<u8> = (0..bb * t).map(|i| u8::from(i % t < 700)).collect();
    let mask = gpu.upload(&mask)?;
    let rewards: Vec<f64> = (0..bb).map(|i| (i % 3) as f64).collect();
    let adv = grpo::grpo_advantages_f64(gpu, &rewards, 16, 0)?;
    let (mut dlogp, mut dent) = (zeros(gpu, bb * t)?, zeros(gpu, bb * t)?);
    let p = GrpoParams {
        kl: 3,
        beta: 0.001,
        eps_low: 0.2,
        eps_high: 0.28,
        max_len: t as f64,
        ..GrpoParams::default()
    };
    let inp = GrpoLossInputs {
        batch: bb,
        seq: t,
        logp: &logp,
        old_logp: Some(&logp),
        ref_logp: Some(&logp),
        mask: &mask,
        advantages: &adv.values,
        entropy: None,
    };
    let secs = timed(&mut || grpo::grpo_loss_f32(gpu, &mut dlogp, &mut dent, &inp, &p).map(|_| ()))?;
    // reads logp, old, ref (f32), mask (u8); writes dlogp, dentropy (f32)
    let bytes = (bb * t) as f64 * (3.0 * 4.0 + 1.0 + 2.0 * 4.0);
    println!(
        "(grpo_loss_f32 grpo+k3 B {bb} T {t}: {:.1} us incl. the 72-byte copy back, {:.0} GB/s, {:.0} M tokens/s)",
        secs * 1e6,
        bytes / secs / 1e9,
        (bb * t) as f64 / secs / 1e6
    );
    let secs = timed(&mut || grpo::grpo_advantages_f64(gpu, &rewards, 16, 0).map(|_| ()))?;
    println!(
        "(grpo_advantages_f64 {bb} rewards: {:.1} us incl. upload and copy back)",
        secs * 1e6
    );
    Ok(())
}

/// Flash attention (kernels/flash_attention.cu: CUDA cores, bf16 inputs, f32
/// accumulation and output) at D = 128, causal, 16 heads, 16,384 tokens a
/// call as 16384 / T sequences of T (varlen batch of equal lengths), T 1k to
/// 16k: forward, and backward alone (deterministic: dQ by its own pass),
/// each on CUDA cores and on tensor cores, in TFLOP/s of
/// causal work (forward 2 * 2 * B * H * T^2 * D / 2, backward 2.5 times
/// that, as FlashAttention counts); then paged decode, one new token for 32
/// sequences of 4096 cached positions, in GB/s of cache read.
/// scripts/bench_sdpa.py prints the same table for PyTorch's SDPA (flash
/// backend).
fn bench_flash(gpu: &Gpu, iters: usize) -> Result<()> {
    use aha_cuda_kernels::flash::{self, FlashGeometry, PagedGeometry};
    let iters = iters.clamp(1, 10);
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    };
    let bf16 = |n: usize| -> Result<CudaSlice<u16>> {
        let x = ramp(gpu, n)?;
        let mut y = gpu.zeros::<u16>(n)?;
        launch::cast_f32_to_bf16(gpu, &mut y, &x, n)?;
        Ok(y)
    };
    println!();
    println!("| flash attention (ours) | B x T, H 16, D 128, causal   |   time (ms) |   TFLOP/s |");
    println!("|---|---|---:|---:|");
    let (h, d, tokens) = (16usize, 128usize, 16_384usize);
    for t in [1024usize, 2048, 4096, 8192, 16_384] {
        let b = tokens / t;
        let g = FlashGeometry {
            total: tokens,
            nseq: b,
            max_seqlen: t,
            h,
            hk: h,
            dk: d,
            dv: d,
            scale: 1.0 / (d as f32).sqrt(),
            tensor_cores: false,
        };
        let tc = FlashGeometry {
            tensor_cores: true,
            ..g
        };
        let n = tokens * h * d;
        let (q, k, v) = (bf16(n)?, bf16(n)?, bf16(n)?);
        let cu: Vec<i32> = (0..=b).map(|i| (i * t) as i32).collect();
        let cu = gpu.upload(&cu)?;
        let (mut o, mut l, dout) = (zeros(gpu, n)?, zeros(gpu, h * tokens)?, ramp(gpu, n)?);
        let (mut dq, mut dk, mut dv) = (zeros(gpu, n)?, zeros(gpu, n)?, zeros(gpu, n)?);
        let flops = 2.0 * 2.0 * (b * h) as f64 * (t * t) as f64 * d as f64 / 2.0;
        let shape = format!("{b} x {t}");
        let secs = timed(&mut || flash::flash_forward_bf16(gpu, &mut o, &mut l, &q, &k, &v, &cu, &g))?;
        println!(
            "| {:<22} | {shape:<28} | {:>11.2} | {:>9.1} |",
            "fwd (CUDA cores)",
            secs * 1e3,
            flops / secs / 1e12
        );
        let secs = timed(&mut || flash::flash_forward_bf16(gpu, &mut o, &mut l, &q, &k, &v, &cu, &tc))?;
        println!(
            "| {:<22} | {shape:<28} | {:>11.2} | {:>9.1} |",
            "fwd (tensor cores)",
            secs * 1e3,
            flops / secs / 1e12
        );
        let secs = timed(&mut || {
            flash::flash_backward_bf16(gpu, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &o, &l, &cu, &g)
        })?;
        println!(
            "| {:<22} | {shape:<28} | {:>11.2} | {:>9.1} |",
            "bwd (CUDA cores)",
            secs * 1e3,
            2.5 * flops / secs / 1e12
        );
        let secs = timed(&mut || {
            flash::flash_backward_bf16(gpu, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &o, &l, &cu, &tc)
        })?;
        println!(
            "| {:<22} | {shape:<28} | {:>11.2} | {:>9.1} |",
            "bwd (tensor cores)",
            secs * 1e3,
            2.5 * flops / secs / 1e12
        );
    }
    let (nseq, ctx, hq, hk, bs) = (32usize, 4096usize, 32usize, 8usize, 16usize);
    let max_blocks = ctx / bs;
    let num_blocks = nseq * max_blocks;
    let g = PagedGeometry {
        total_q: nseq,
        nseq,
        max_ctx: ctx,
        block_size: bs,
        num_blocks,
        max_blocks,
        h: hq,
        hk,
        dk: d,
        dv: d,
        scale: 1.0 / (d as f32).sqrt(),
        splits: 0,
        shared_kv: false,
    };
    let (q, kc, vc) = (
        bf16(nseq * hq * d)?,
        bf16(num_blocks * bs * hk * d)?,
        bf16(num_blocks * bs * hk * d)?,
    );
    let tables: Vec<i32> = (0..num_blocks as i32).collect();
    let (tables, ctxs) = (gpu.upload(&tables)?, gpu.upload(&vec![ctx as i32; nseq])?);
    let qcu = gpu.upload(&(0..=nseq as i32).collect::<Vec<i32>>())?;
    let (mut o, mut l) = (zeros(gpu, nseq * hq * d)?, zeros(gpu, hq * nseq)?);
    let secs = timed(&mut || flash::flash_decode_bf16(gpu, &mut o, &mut l, &q, &kc, &vc, &tables, &ctxs, &qcu, &g))?;
    let bytes = (nseq * ctx * hk * 2 * d * 2) as f64;
    println!(
        "(flash_decode_bf16, {nseq} seqs x {ctx} cached, H {hq}/{hk}, D {d}: {:.1} us, {:.0} GB/s of cache read)",
        secs * 1e6,
        bytes / secs / 1e9
    );
    // DeepSeek-V3's latent cache: 128 query heads over one 576-wide entry a
    // position (keys = values), the weight-absorbed decode.
    let (lh, lw, lctx) = (128usize, 576usize, 2048usize);
    let lmax = lctx / bs;
    let lg = PagedGeometry {
        total_q: nseq,
        nseq,
        max_ctx: lctx,
        block_size: bs,
        num_blocks: nseq * lmax,
        max_blocks: lmax,
        h: lh,
        hk: 1,
        dk: lw,
        dv: lw,
        scale: 1.0 / 192f32.sqrt(),
        splits: 0,
        shared_kv: true,
    };
    let (lq, lc) = (bf16(nseq * lh * lw)?, bf16(nseq * lmax * bs * lw)?);
    let ltables = gpu.upload(&(0..(nseq * lmax) as i32).collect::<Vec<i32>>())?;
    let lctxs = gpu.upload(&vec![lctx as i32; nseq])?;
    let (mut lo, mut ll) = (zeros(gpu, nseq * lh * lw)?, zeros(gpu, lh * nseq)?);
    let secs =
        timed(&mut || flash::flash_decode_bf16(gpu, &mut lo, &mut ll, &lq, &lc, &lc, &ltables, &lctxs, &qcu, &lg))?;
    let bytes = (nseq * lctx * lw * 2) as f64;
    println!(
        "(flash_decode_latent576_bf16, {nseq} seqs x {lctx} cached, H {lh}/1, entry {lw}: {:.1} us, {:.0} GB/s of cache read, {:.1} TFLOP/s)",
        secs * 1e6,
        bytes / secs / 1e9,
        (nseq * lh * lctx * lw * 4) as f64 / secs / 1e12
    );
    Ok(())
}

/// Pseudo-random values in [-s, s) (a fixed LCG), so that the routing of the
/// MoE benchmark spreads tokens over the experts as trained routers roughly
/// do, instead of the ramp's few repeating patterns.
fn noise(gpu: &Gpu, n: usize, seed: u64, s: f32) -> Result<CudaSlice<f32>> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s
        })
        .collect();
    gpu.upload(&v)
}

/// The MoE layer at a Qwen3-30B-A3B-like shape (C 2048, 128
/// experts, top-8, expert width 768, softmax top-k renormalised) and a
/// scaled-down DeepSeek-V3-like one (C 2048, 64 experts in 8 groups, 4 kept,
/// top-6, width 512, one shared expert of 1024, routed scaling 2.5), N =
/// 4096 tokens: the grouped expert products in TFLOP/s (useful flops only:
/// 2 M C F per product, M = N K) against ~800 (H100 dense bf16), the
/// routing + permutation, and the whole layer's forward and backward, each
/// with the SIMT and the tensor-core grouped kernels.
/// scripts/bench_moe_torch.py times transformers' Qwen3-MoE sparse block at
/// the first shape.
fn bench_moe(gpu: &Gpu, iters: usize) -> Result<()> {
    use aha_cuda_kernels::launch_moe::{self as lm, MoeGating, MoeMath, MoeStorage};
    use aha_cuda_kernels::moe_layer::{self as ml, MoeBuffers, MoeDims, MoeGrads, MoeWeightsBf16, Stored};
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        for _ in 0..2 {
            f()?;
        }
        gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        gpu.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    };
    let bf16 = |v: &CudaSlice<f32>, n: usize| -> Result<CudaSlice<u16>> {
        let mut o = gpu.zeros::<u16>(n)?;
        launch::cast_f32_to_bf16(gpu, &mut o, v, n)?;
        Ok(o)
    };
    println!();
    println!("| MoE                    | shape                        |  time (us) |   TFLOP/s | of 800 |");
    println!("|---|---|---:|---:|---:|");
    let shapes = [
        (
            "qwen3-30b-a3b",
            MoeDims {
                n: 4096,
                c: 2048,
                e: 128,
                k: 8,
                f: 768,
                f_shared: 0,
                gating: MoeGating::Softmax { renorm: true },
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
        ),
        (
            "dsv3-small",
            MoeDims {
                n: 4096,
                c: 2048,
                e: 64,
                k: 6,
                f: 512,
                f_shared: 1024,
                gating: MoeGating::SigmoidGroup {
                    n_group: 8,
                    topk_group: 4,
                    renorm: true,
                    scaling: 2.5,
                },
                math: MoeMath::TensorCores,
                storage: MoeStorage::Bf16,
            },
        ),
    ];
    for (name, d) in shapes {
        let (n, c, e, k, f, fs, m) = (d.n, d.c, d.e, d.k, d.f, d.f_shared, d.m());
        let ws = 1.0 / (c as f32).sqrt();
        let w = MoeWeightsBf16 {
            router: noise(gpu, e * c, 1, ws)?,
            bias: matches!(d.gating, MoeGating::SigmoidGroup { .. })
                .then(|| noise(gpu, e, 2, 0.01))
                .transpose()?,
            w_gate: bf16(&noise(gpu, e * f * c, 3, ws)?, e * f * c)?,
            w_up: bf16(&noise(gpu, e * f * c, 4, ws)?, e * f * c)?,
            w_down: bf16(&noise(gpu, e * c * f, 5, 1.0 / (f as f32).sqrt())?, e * c * f)?,
            shared: if fs > 0 {
                Some([
                    bf16(&noise(gpu, fs * c, 6, ws)?, fs * c)?,
                    bf16(&noise(gpu, fs * c, 7, ws)?, fs * c)?,
                    bf16(&noise(gpu, c * fs, 8, 1.0 / (fs as f32).sqrt())?, c * fs)?,
                ])
            } else {
                None
            },
        };
        let x = noise(gpu, n * c, 9, 1.0)?;
        let dy = noise(gpu, n * c, 10, 1.0)?;
        let mut y = zeros(gpu, n * c)?;
        let mut dx = zeros(gpu, n * c)?;
        let mut b = MoeBuffers::new(gpu, d)?;
        let mut gr = MoeGrads::zeros(gpu, &d)?;
        let wv = w.view();
        ml::moe_layer_forward(gpu, &mut y, &x, &wv, &mut b)?;
        let counts = gpu.download(&b.perm.counts)?;
        let max = counts.iter().copied().max().unwrap_or(0) as f64;
        let mean = m as f64 / e as f64;
        let shape = format!("{name} N {n} E {e} K {k}");
        let row = |what: &str, secs: f64, flops: f64| {
            let tf = flops / secs / 1e12;
            println!(
                "| {what:<22} | {shape:<28} | {:>10.1} | {tf:>9.1} | {:>5.1}% |",
                secs * 1e6,
                100.0 * tf / 800.0
            );
        };
        let secs = timed(&mut || {
            lm::moe_route_f32(
                gpu,
                &mut b.probs,
                &mut b.ids,
                &mut b.w,
                &mut b.denom,
                &b.logits,
                w.bias.as_ref(),
                n,
                e,
                k,
                d.gating,
            )?;
            lm::moe_permute(gpu, &mut b.perm, &b.ids, n, k, e)
        })?;
        row("moe route + permute", secs, 0.0);
        // Layer flops: routed 3 products forward (6 backward), shared likewise, router.
        let fwd = 2.0 * (3 * m * c * f + 3 * n * c * fs + n * c * e) as f64;
        for (tag, math) in [("simt", MoeMath::Simt), ("mma", MoeMath::TensorCores)] {
            let (o, t) = (&b.perm.offsets, &b.perm.tile_off);
            let Stored::Bf16(st) = &mut b.stored else {
                return Err(aha_cuda_kernels::Error::InvalidArgument {
                    op: "bench_moe",
                    msg: "bf16 buffers expected".into(),
                });
            };
            let secs = timed(&mut || {
                lm::moe_grouped_gate_up_bf16(
                    gpu,
                    &mut b.g,
                    &mut b.u,
                    &mut st.act,
                    &st.xe,
                    &w.w_gate,
                    &w.w_up,
                    o,
                    t,
                    m,
                    e,
                    c,
                    f,
                    math,
                )
            })?;
            row(&format!("gate+up+swiglu {tag}"), secs, 2.0 * 2.0 * (m * c * f) as f64);
            let secs = timed(&mut || {
                lm::moe_grouped_gemm_bf16(gpu, &mut b.ye, &st.act, &w.w_down, o, t, m, e, f, c, true, false, math)
            })?;
            row(&format!("grouped down {tag}"), secs, 2.0 * (m * c * f) as f64);
            let secs =
                timed(&mut || lm::moe_grouped_wgrad_bf16(gpu, &mut gr.w_gate, &st.dg, &st.xe, o, m, e, f, c, math))?;
            row(&format!("wgrad (gate) {tag}"), secs, 2.0 * (m * c * f) as f64);
            b.dims.math = math;
            let secs = timed(&mut || ml::moe_layer_forward(gpu, &mut y, &x, &wv, &mut b))?;
            row(&format!("layer forward {tag}"), secs, fwd);
            let secs =
                timed(&mut || ml::moe_layer_backward(gpu, &mut dx, &mut gr.view_mut(), &dy, &x, &wv, &mut b, None))?;
            row(&format!("layer backward {tag}"), secs, 2.0 * fwd);
        }
        println!(
            "(load of the busiest expert: {:.2} x the mean of {mean:.0} rows)",
            max / mean
        );
    }
    println!("(MoE rows: simt = f32 FMA tiles, mma = mma.sync bf16 tensor cores)");
    Ok(())
}
