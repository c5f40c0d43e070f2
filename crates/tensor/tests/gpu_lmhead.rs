//! The fused lm-head log-prob / entropy path (`aha_cuda_kernels::lmhead`)
//! against its CPU twin `aha_tensor::cpu::lm_head_logprob_*`, both compared
//! with the twin run in f64 (the reference, itself tested against full
//! logits in its unit tests). Shapes cover one chunk, many chunks with a
//! short last one, row blocks (a tiny budget), temperatures != 1 and a
//! Qwen-sized vocabulary. The `_cuda` test prints "skipped: no GPU" where
//! there is none.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_cuda_kernels::lmhead::{self, plan_lm_head, LmHeadOperands};
use aha_cuda_kernels::Gpu;
use aha_tensor::cpu::{self, LmHeadShape};
use aha_tensor::{Device, Result};
use common::{assert_close, rand_ids, rand_vec, to_f32};

/// (n, c, v, budget in bytes, temperature)
const CASES: &[(usize, usize, usize, usize, f32)] = &[
    (1, 8, 1, 1 << 20, 1.0),
    (7, 16, 300, 1 << 20, 1.0),
    (33, 24, 5_000, 33 * 4 * 1024, 0.7),
    (300, 32, 3_000, 4 * 1024 * 64, 1.3),
    (9, 64, 151_936, 256 << 20, 0.6),
];

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn check(dev: Device) -> Result<()> {
    for (i, &(n, c, v, budget, temp)) in CASES.iter().enumerate() {
        let plan = plan_lm_head(n, c, v, temp, budget)?;
        let s = LmHeadShape {
            n,
            c,
            v,
            chunk: plan.chunk,
            temperature: temp,
        };
        let seed = 700 + 10 * i as u64;
        let h = f64s(&to_f32(&rand_vec(seed, n * c, 1.0)));
        let w = f64s(&to_f32(&rand_vec(seed + 1, v * c, 0.5)));
        let t = rand_ids(seed + 2, n, v);
        let dl = f64s(&to_f32(&rand_vec(seed + 3, n, 1.0)));
        let de = f64s(&to_f32(&rand_vec(seed + 4, n, 1.0)));
        let (mut lp, mut ent, mut lse) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s)?;
        let (mut dh, mut dw) = (vec![0f64; n * c], vec![0f64; v * c]);
        cpu::lm_head_logprob_backward(&mut dh, &mut dw, &h, &w, &t, &lse, &ent, &dl, &de, s)?;

        let (glp, gent, glse, gdh, gdw) = match dev {
            Device::Cpu => {
                let (h, w, dl, de) = (to_f32(&h), to_f32(&w), to_f32(&dl), to_f32(&de));
                let (mut a, mut b, mut l) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                cpu::lm_head_logprob_forward(&mut a, &mut b, &mut l, &h, &w, &t, s)?;
                let (mut x, mut y) = (vec![0f32; n * c], vec![0f32; v * c]);
                cpu::lm_head_logprob_backward(&mut x, &mut y, &h, &w, &t, &l, &b, &dl, &de, s)?;
                (a, b, l, x, y)
            }
            Device::Cuda(o) => {
                let g = Gpu::get(o)?;
                let (hh, ww) = (g.upload(&to_f32(&h))?, g.upload(&to_f32(&w))?);
                let (mut a, mut b, mut l) = (g.zeros::<f32>(n)?, g.zeros::<f32>(n)?, g.zeros::<f32>(n)?);
                let x = LmHeadOperands::F32 {
                    hidden: hh.as_view(),
                    weight: ww.as_view(),
                };
                lmhead::lm_head_logprob_forward_f32(&g, &mut a, &mut b, &mut l, &x, &t, &plan)?;
                let (dd, ee) = (g.upload(&to_f32(&dl))?, g.upload(&to_f32(&de))?);
                let hx = LmHeadOperands::F32 {
                    hidden: hh.as_view(),
                    weight: ww.as_view(),
                };
                let (mut x, mut y) = (g.zeros::<f32>(n * c)?, g.zeros::<f32>(v * c)?);
                lmhead::lm_head_logprob_backward_f32(&g, &mut x, &mut y, &hx, &t, &l, &b, &dd, &ee, &plan)?;
                (
                    g.download(&a)?,
                    g.download(&b)?,
                    g.download(&l)?,
                    g.download(&x)?,
                    g.download(&y)?,
                )
            }
        };
        // f32 products of length c and f32 sums over up to 151,936
        // exponentials: ~1e-6 relative on lse; entropy is lse - mean(x), so
        // its absolute error follows lse's scale.
        let what = format!(
            "lm head n {n} c {c} v {v} chunk {} rows {} T {temp}",
            plan.chunk, plan.rows
        );
        assert_close(&format!("{what} lse"), &glse, &lse, 1e-4, 1e-5);
        assert_close(&format!("{what} logp"), &glp, &lp, 1e-4, 1e-5);
        assert_close(&format!("{what} entropy"), &gent, &ent, 2e-4, 1e-4);
        assert_close(&format!("{what} dhidden"), &gdh, &dh, 1e-5, 1e-3);
        assert_close(&format!("{what} dweight"), &gdw, &dw, 1e-5, 1e-3);
    }
    Ok(())
}

#[test]
fn lm_head_logprob_cpu() {
    check(Device::Cpu).unwrap();
}

#[test]
fn lm_head_logprob_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("lm_head_logprob_cuda: skipped: no GPU ({reason})");
        return;
    }
    let t = std::time::Instant::now();
    check(Device::Cuda(0)).unwrap();
    eprintln!(
        "lm_head_logprob_cuda: passed in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// The targeted memory bound, from the plan the launchers allocate by: at
/// N = 16,384, V = 151,936, C = 2,048 the chunk buffer and row state are
/// under 1/8 of the naive path's [N, V] logits and their gradient.
#[test]
fn memory_at_grpo_scale_is_under_an_eighth_of_the_naive_path() {
    let p = plan_lm_head(16_384, 2_048, 151_936, 1.0, lmhead::DEFAULT_BUDGET_BYTES).unwrap();
    let (ours, naive) = (p.workspace_bytes(), lmhead::naive_workspace_bytes(16_384, 151_936));
    eprintln!(
        "lm head workspace at N 16384, V 151936, C 2048: {:.3} GB (chunk {}), naive logits + grad {:.2} GB: 1/{:.0}",
        ours as f64 / 1e9,
        p.chunk,
        naive as f64 / 1e9,
        naive as f64 / ours as f64
    );
    assert!(ours * 8 < naive);
}

/// The bf16 operand path against the f64 twin on the same bf16-rounded
/// hidden states and weight: logits are exact bf16 products summed in f32
/// (forward as tight as f32); the backward rounds each gradient chunk to
/// bf16 (8 bits of mantissa, relative 2^-9), so its products carry ~4e-3 of
/// the largest entry.
#[test]
fn lm_head_logprob_bf16_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("lm_head_logprob_bf16_cuda: skipped: no GPU ({reason})");
        return;
    }
    let g = Gpu::get(0).unwrap();
    let bits = |v: &[f64]| {
        v.iter()
            .map(|&x| aha_tensor::bf16::from_f64(x).to_bits())
            .collect::<Vec<u16>>()
    };
    let round = |v: &[f64]| {
        v.iter()
            .map(|&x| aha_tensor::bf16::from_f64(x).to_f64())
            .collect::<Vec<f64>>()
    };
    for (i, &(n, c, v, budget, temp)) in CASES.iter().enumerate() {
        let plan = plan_lm_head(n, c, v, temp, budget).unwrap();
        let s = LmHeadShape {
            n,
            c,
            v,
            chunk: plan.chunk,
            temperature: temp,
        };
        let seed = 900 + 10 * i as u64;
        let (h0, w0) = (rand_vec(seed, n * c, 1.0), rand_vec(seed + 1, v * c, 0.5));
        let (h, w) = (round(&h0), round(&w0));
        let t = rand_ids(seed + 2, n, v);
        let dl = f64s(&to_f32(&rand_vec(seed + 3, n, 1.0)));
        let de = f64s(&to_f32(&rand_vec(seed + 4, n, 1.0)));
        let (mut lp, mut ent, mut lse) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s).unwrap();
        let (mut dh, mut dw) = (vec![0f64; n * c], vec![0f64; v * c]);
        cpu::lm_head_logprob_backward(&mut dh, &mut dw, &h, &w, &t, &lse, &ent, &dl, &de, s).unwrap();

        let (hh, ww) = (g.upload(&bits(&h0)).unwrap(), g.upload(&bits(&w0)).unwrap());
        let x = LmHeadOperands::Bf16 {
            hidden: hh.as_view(),
            weight: ww.as_view(),
        };
        let (mut a, mut b, mut l) = (
            g.zeros::<f32>(n).unwrap(),
            g.zeros::<f32>(n).unwrap(),
            g.zeros::<f32>(n).unwrap(),
        );
        lmhead::lm_head_logprob_forward_f32(&g, &mut a, &mut b, &mut l, &x, &t, &plan).unwrap();
        let (dd, ee) = (g.upload(&to_f32(&dl)).unwrap(), g.upload(&to_f32(&de)).unwrap());
        let (mut gx, mut gy) = (g.zeros::<f32>(n * c).unwrap(), g.zeros::<f32>(v * c).unwrap());
        lmhead::lm_head_logprob_backward_f32(&g, &mut gx, &mut gy, &x, &t, &l, &b, &dd, &ee, &plan).unwrap();
        let what = format!("bf16 lm head n {n} c {c} v {v}");
        assert_close(&format!("{what} lse"), &g.download(&l).unwrap(), &lse, 1e-4, 1e-5);
        assert_close(&format!("{what} logp"), &g.download(&a).unwrap(), &lp, 1e-4, 1e-5);
        assert_close(&format!("{what} entropy"), &g.download(&b).unwrap(), &ent, 2e-4, 1e-4);
        let scale = |x: &[f64]| x.iter().fold(0f64, |m, &y| m.max(y.abs()));
        assert_close(
            &format!("{what} dhidden"),
            &g.download(&gx).unwrap(),
            &dh,
            8e-3 * scale(&dh),
            8e-3,
        );
        assert_close(
            &format!("{what} dweight"),
            &g.download(&gy).unwrap(),
            &dw,
            8e-3 * scale(&dw),
            8e-3,
        );
    }
    eprintln!("lm_head_logprob_bf16_cuda: {} shapes agree", CASES.len());
}

/// The memory bound measured on the device at the target shape (N = 16,384,
/// V = 151,936, C = 2,048, f32): the driver's free memory before the inputs
/// exist and at the lowest point of a forward + backward (the scratch pool
/// keeps the chunk buffer and row state allocated, and the driver reports
/// them as used), against the naive path's f32 logits and their gradient.
#[test]
fn memory_at_grpo_scale_measured_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("memory_at_grpo_scale_measured_cuda: skipped: no GPU ({reason})");
        return;
    }
    use aha_cuda_kernels::cudarc::driver::result::mem_get_info;
    let g = Gpu::get(0).unwrap();
    if g.is_emulated() {
        // 10 TFLOP of products: a hardware measurement, hours on the CPU.
        eprintln!("memory_at_grpo_scale_measured_cuda: skipped: the emulated GPU (this measures real device memory)");
        return;
    }
    let (n, c, v) = (16_384usize, 2_048usize, 151_936usize);
    let plan = plan_lm_head(n, c, v, 1.0, lmhead::DEFAULT_BUDGET_BYTES).unwrap();
    let h = g.zeros::<f32>(n * c).unwrap();
    let w = g.upload(&to_f32(&rand_vec(3, v * c, 0.02))).unwrap();
    let t = rand_ids(4, n, v);
    let (mut lp, mut ent, mut lse) = (
        g.zeros::<f32>(n).unwrap(),
        g.zeros::<f32>(n).unwrap(),
        g.zeros::<f32>(n).unwrap(),
    );
    let (dl, de) = (g.zeros::<f32>(n).unwrap(), g.zeros::<f32>(n).unwrap());
    let (mut dh, mut dw) = (g.zeros::<f32>(n * c).unwrap(), g.zeros::<f32>(v * c).unwrap());
    g.synchronize().unwrap();
    let (free_before, _) = mem_get_info().unwrap();
    let x = LmHeadOperands::F32 {
        hidden: h.as_view(),
        weight: w.as_view(),
    };
    let t0 = std::time::Instant::now();
    lmhead::lm_head_logprob_forward_f32(&g, &mut lp, &mut ent, &mut lse, &x, &t, &plan).unwrap();
    lmhead::lm_head_logprob_backward_f32(&g, &mut dh, &mut dw, &x, &t, &lse, &ent, &dl, &de, &plan).unwrap();
    g.synchronize().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let (free_after, _) = mem_get_info().unwrap();
    let used = free_before.saturating_sub(free_after);
    let naive = lmhead::naive_workspace_bytes(n, v);
    eprintln!(
        "memory_at_grpo_scale_measured_cuda: workspace {:.3} GB (plan {:.3} GB), naive {:.1} GB: 1/{:.0}; fwd + bwd {:.1} ms (first call, compile included)",
        used as f64 / 1e9,
        plan.workspace_bytes() as f64 / 1e9,
        naive as f64 / 1e9,
        naive as f64 / used.max(1) as f64,
        secs * 1e3
    );
    assert!(used * 8 < naive, "workspace {used} bytes vs naive {naive}");
}

/// kernels/lmhead.cu as written, compiled by g++ through the CUDA shim and
/// run on the CPU (`aha_cuda_kernels::emulate`), launched as the Rust
/// launchers launch it (a triple loop stands in for cuBLAS), against the f64
/// twin: the same tolerances as the GPU test. Runs everywhere; skipped only
/// where no C++ compiler exists and `AHA_REQUIRE_EMULATOR` is not 1.
#[test]
fn lm_head_logprob_emulated() {
    use aha_cuda_kernels::emulate::{self, numbers};
    let Some(e) = emulate::emulator_for_test("lm_head_logprob_emulated", "lmhead_grpo").unwrap() else {
        return;
    };
    for (i, &(n, c, v, budget, temp)) in CASES.iter().enumerate() {
        let plan = plan_lm_head(n, c, v, temp, budget).unwrap();
        let s = LmHeadShape {
            n,
            c,
            v,
            chunk: plan.chunk,
            temperature: temp,
        };
        let seed = 1100 + 10 * i as u64;
        let h = f64s(&to_f32(&rand_vec(seed, n * c, 1.0)));
        let w = f64s(&to_f32(&rand_vec(seed + 1, v * c, 0.5)));
        let t = rand_ids(seed + 2, n, v);
        let dl = f64s(&to_f32(&rand_vec(seed + 3, n, 1.0)));
        let de = f64s(&to_f32(&rand_vec(seed + 4, n, 1.0)));
        let (mut lp, mut ent, mut lse) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        cpu::lm_head_logprob_forward(&mut lp, &mut ent, &mut lse, &h, &w, &t, s).unwrap();
        let (mut dh, mut dw) = (vec![0f64; n * c], vec![0f64; v * c]);
        cpu::lm_head_logprob_backward(&mut dh, &mut dw, &h, &w, &t, &lse, &ent, &dl, &de, s).unwrap();
        let job = format!(
            "lmhead {n} {c} {v} {} {} {temp:?}\n{}{}{}{}{}",
            plan.chunk,
            plan.rows,
            numbers(&h),
            numbers(&w),
            numbers(&t),
            numbers(&dl),
            numbers(&de)
        );
        let out = e.run(&job).unwrap();
        assert_eq!(out.len(), 3 * n + n * c + v * c);
        let what = format!(
            "emulated lm head n {n} c {c} v {v} chunk {} rows {} T {temp}",
            plan.chunk, plan.rows
        );
        assert_close(&format!("{what} logp"), &out[..n], &lp, 1e-4, 1e-5);
        assert_close(&format!("{what} entropy"), &out[n..2 * n], &ent, 2e-4, 1e-4);
        assert_close(&format!("{what} lse"), &out[2 * n..3 * n], &lse, 1e-4, 1e-5);
        assert_close(&format!("{what} dhidden"), &out[3 * n..3 * n + n * c], &dh, 1e-5, 1e-3);
        assert_close(&format!("{what} dweight"), &out[3 * n + n * c..], &dw, 1e-5, 1e-3);
    }
}
