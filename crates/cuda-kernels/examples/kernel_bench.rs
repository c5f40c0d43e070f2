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
    // The simple attention kernels (f32, warp per row; the flash kernels of
    // the attention issue will replace them) and the token log-probs.
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
    Ok(())
}
