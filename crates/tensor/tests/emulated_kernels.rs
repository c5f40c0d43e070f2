//! The first CUDA kernels (RMSNorm, attention, KV-cache decode, RoPE, the
//! bf16 casts, the gradient norm, SiLU / SwiGLU, add / scale, bias add and
//! gradient, embedding, AdamW, the token log-prob backward) as written in
//! kernels/*.cu, compiled by g++
//! through `aha_cuda_kernels::emulate`'s CUDA shim and run on the CPU with
//! their launchers' geometry, against the CPU twins run in f64. This is how
//! their indexing, masking, shuffles and barriers are tested on machines
//! without a GPU (tests/gpu_kernels.rs runs the real thing where there is
//! one). Tolerances are those of the GPU tests: f32 arithmetic against an f64
//! reference. Skipped only where no C++ compiler exists and
//! `AHA_REQUIRE_EMULATOR` is not 1 (scripts/test.sh sets it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_cuda_kernels::emulate::{self, numbers, Emulator};
use aha_tensor::cpu::{self, AttnShape, RopeLayout, RopeShape};
use common::{assert_close, rand_vec, to_f32};

fn core_or_skip(test: &str) -> Option<Emulator> {
    emulate::emulator_for_test(test, "core").unwrap_or_else(|e| panic!("{test}: {e}"))
}

/// Seeded values that are exact f32s.
fn r32(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    to_f32(&rand_vec(seed, n, scale)).iter().map(|&x| x as f64).collect()
}

/// Splits `out` into consecutive pieces of the given lengths.
fn split(out: &[f64], lens: &[usize]) -> Vec<Vec<f64>> {
    assert_eq!(out.len(), lens.iter().sum::<usize>(), "output length");
    let mut at = 0;
    lens.iter()
        .map(|&l| {
            at += l;
            out[at - l..at].to_vec()
        })
        .collect()
}

#[test]
fn rmsnorm_forward_and_backward_emulated() {
    let Some(e) = core_or_skip("rmsnorm_forward_and_backward_emulated") else {
        return;
    };
    // Rows below and above one block of 256 threads, a channel count above
    // the block, and more rows than the backward's 1024 blocks.
    for (i, &(rows, c)) in [(1usize, 1usize), (3, 7), (5, 300), (1030, 3)].iter().enumerate() {
        let seed = 10 * i as u64;
        let (x, w, g) = (
            r32(seed, rows * c, 2.0),
            r32(seed + 1, c, 1.0),
            r32(seed + 2, rows * c, 1.0),
        );
        let eps = 1e-6;
        let (mut y, mut rstd) = (vec![0f64; rows * c], vec![0f64; rows]);
        cpu::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, c, eps).unwrap();
        let (mut dx, mut dw) = (vec![0f64; rows * c], vec![0f64; c]);
        cpu::rmsnorm_backward(&mut dx, &mut dw, &g, &x, &w, &rstd, rows, c).unwrap();
        let job = format!(
            "rmsnorm {rows} {c} {eps:?}\n{}{}{}",
            numbers(&x),
            numbers(&w),
            numbers(&g)
        );
        let o = split(&e.run(&job).unwrap(), &[rows * c, rows, rows * c, c]);
        let what = format!("rmsnorm {rows} x {c}");
        assert_close(&format!("{what} out"), &o[0], &y, 1e-5, 1e-5);
        assert_close(&format!("{what} rstd"), &o[1], &rstd, 1e-5, 1e-5);
        assert_close(&format!("{what} dinp"), &o[2], &dx, 1e-5, 1e-4);
        assert_close(&format!("{what} dweight"), &o[3], &dw, 1e-4, 1e-4);
    }
}

#[test]
fn attention_forward_backward_and_decode_emulated() {
    let Some(e) = core_or_skip("attention_forward_backward_and_decode_emulated") else {
        return;
    };
    // GQA, MHA, MLA widths (Dk != Dv), widths not multiples of 32.
    for (i, &(b, t, h, hk, dk, dv)) in [
        (1usize, 1usize, 1usize, 1usize, 8usize, 8usize),
        (2, 9, 4, 2, 16, 16),
        (1, 13, 2, 1, 40, 24),
        (1, 5, 3, 3, 72, 33),
    ]
    .iter()
    .enumerate()
    {
        let s = AttnShape {
            b,
            t,
            h,
            hk,
            dk,
            dv,
            scale: 1.0 / (dk as f64).sqrt(),
        };
        let seed = 100 + 10 * i as u64;
        let (nq, nk) = (b * t * h, b * t * hk);
        let q = r32(seed, nq * dk, 1.0);
        let k = r32(seed + 1, nk * dk, 1.0);
        let v = r32(seed + 2, nk * dv, 1.0);
        let dout = r32(seed + 3, nq * dv, 1.0);
        let (mut out, mut lse) = (vec![0f64; nq * dv], vec![0f64; nq]);
        cpu::attention_forward(&mut out, &mut lse, &q, &k, &v, s).unwrap();
        let (mut dq, mut dk_, mut dv_) = (vec![0f64; nq * dk], vec![0f64; nk * dk], vec![0f64; nk * dv]);
        cpu::attention_backward(&mut dq, &mut dk_, &mut dv_, &dout, &q, &k, &v, &out, &lse, s).unwrap();
        let job = format!(
            "attention {b} {t} {h} {hk} {dk} {dv} {:?}\n{}{}{}{}",
            s.scale as f32,
            numbers(&q),
            numbers(&k),
            numbers(&v),
            numbers(&dout)
        );
        let o = split(&e.run(&job).unwrap(), &[nq * dv, nq, nq * dk, nk * dk, nk * dv]);
        let what = format!("attention b {b} t {t} h {h}/{hk} d {dk}/{dv}");
        assert_close(&format!("{what} out"), &o[0], &out, 1e-5, 1e-4);
        // The kernel's lse is [B, H, T]; the twin's is too.
        assert_close(&format!("{what} lse"), &o[1], &lse, 1e-5, 1e-4);
        assert_close(&format!("{what} dq"), &o[2], &dq, 1e-5, 1e-3);
        assert_close(&format!("{what} dk"), &o[3], &dk_, 1e-5, 1e-3);
        assert_close(&format!("{what} dv"), &o[4], &dv_, 1e-5, 1e-3);

        // Decode: the last n tokens of batch 0 against its whole cache equal
        // the full forward's rows for them.
        if b == 1 && t > 2 {
            let n = 2;
            let start = t - n;
            let qn = &q[start * h * dk..];
            let job = format!(
                "decode {start} {n} {t} {h} {hk} {dk} {dv} {:?}\n{}{}{}",
                s.scale as f32,
                numbers(qn),
                numbers(&k),
                numbers(&v)
            );
            let got = e.run(&job).unwrap();
            assert_close(&format!("{what} decode"), &got, &out[start * h * dv..], 1e-5, 1e-4);
        }
    }
}

#[test]
fn rope_both_layouts_emulated() {
    let Some(e) = core_or_skip("rope_both_layouts_emulated") else {
        return;
    };
    for (i, &(heads, head_dim, rot_offset, rot_dim, layout)) in [
        (2usize, 8usize, 0usize, 8usize, RopeLayout::Half),
        (3, 16, 0, 8, RopeLayout::Interleaved),
        (1, 24, 8, 16, RopeLayout::Half),
    ]
    .iter()
    .enumerate()
    {
        let n = 37;
        let max_pos = 50;
        let s = RopeShape {
            heads,
            head_dim,
            rot_offset,
            rot_dim,
            layout,
        };
        let (cos, sin) = cpu::rope_table::<f64>(10_000.0, rot_dim, max_pos);
        let (cos, sin): (Vec<f64>, Vec<f64>) = (
            cos.iter().map(|&x| x as f32 as f64).collect(),
            sin.iter().map(|&x| x as f32 as f64).collect(),
        );
        let x = r32(300 + i as u64, n * heads * head_dim, 1.0);
        let pos: Vec<u32> = (0..n as u32).map(|p| (p * 7) % max_pos as u32).collect();
        let (mut y, mut dx) = (vec![0f64; x.len()], vec![0f64; x.len()]);
        cpu::rope_forward(&mut y, &x, &cos, &sin, &pos, s).unwrap();
        cpu::rope_backward(&mut dx, &x, &cos, &sin, &pos, s).unwrap();
        let job = format!(
            "rope {n} {} {head_dim} {rot_offset} {rot_dim} {} {max_pos}\n{}{}{}{}",
            heads * head_dim,
            i32::from(layout == RopeLayout::Interleaved),
            numbers(&x),
            numbers(&cos),
            numbers(&sin),
            numbers(&pos)
        );
        let o = split(&e.run(&job).unwrap(), &[x.len(), x.len()]);
        assert_close(&format!("rope {i} forward"), &o[0], &y, 1e-6, 1e-5);
        assert_close(&format!("rope {i} backward"), &o[1], &dx, 1e-6, 1e-5);
    }
}

#[test]
fn bf16_casts_and_gradient_norm_emulated() {
    let Some(e) = core_or_skip("bf16_casts_and_gradient_norm_emulated") else {
        return;
    };
    // Ties (to even), overflow to inf, subnormals, NaN, signed zero.
    let mut x: Vec<f32> = to_f32(&rand_vec(7, 1500, 1e4));
    x.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::MAX,
        -f32::MAX,
        1e-40,
        -1e-41,
        f32::NAN,
        -0.0,
        f32::INFINITY,
    ]);
    let o = e.run(&format!("cast {}\n{}", x.len(), numbers(&x))).unwrap();
    let (bits, back) = o.split_at(x.len());
    for (i, &v) in x.iter().enumerate() {
        let want = aha_tensor::bf16::from_f32(v);
        let got = bits[i] as u16;
        if v.is_nan() {
            assert!(aha_tensor::bf16::from_bits(got).is_nan(), "cast of NaN gave {got:#06x}");
            assert!(back[i].is_nan());
        } else {
            assert_eq!(
                got,
                want.to_bits(),
                "cast of {v:e}: {got:#06x} vs {:#06x}",
                want.to_bits()
            );
            assert_eq!(back[i], want.to_f64(), "round trip of {v:e}");
        }
    }
    for n in [1usize, 255, 257, 5000] {
        let g = to_f32(&rand_vec(n as u64, n, 3.0));
        let want = cpu::global_norm(&g);
        let got = e.run(&format!("gradnorm {n}\n{}", numbers(&g))).unwrap()[0].sqrt();
        assert!((got - want).abs() <= 1e-12 * want, "grad norm n {n}: {got} vs {want}");
    }
}

#[test]
fn activations_elementwise_and_bias_emulated() {
    let Some(e) = core_or_skip("activations_elementwise_and_bias_emulated") else {
        return;
    };
    // More elements than the emulation's 4 blocks of 256: the grid-stride
    // loops run several times.
    let n = 2_345;
    let (gate, up, dout) = (r32(1, n, 6.0), r32(2, n, 2.0), r32(3, n, 1.0));
    let mut want = vec![vec![0f64; n]; 5];
    cpu::silu(&mut want[0], &gate).unwrap();
    cpu::silu_backward(&mut want[1], &dout, &gate).unwrap();
    cpu::swiglu(&mut want[2], &gate, &up).unwrap();
    let (a, b) = want.split_at_mut(4);
    cpu::swiglu_backward(&mut a[3], &mut b[0], &dout, &gate, &up).unwrap();
    let o = split(
        &e.run(&format!(
            "act {n}\n{}{}{}",
            numbers(&gate),
            numbers(&up),
            numbers(&dout)
        ))
        .unwrap(),
        &[n; 5],
    );
    for (i, name) in ["silu", "silu backward", "swiglu", "swiglu dgate", "swiglu dup"]
        .iter()
        .enumerate()
    {
        assert_close(name, &o[i], &want[i], 1e-6, 1e-5);
    }

    let s = 0.37f32;
    let o = split(
        &e.run(&format!("elementwise {n} {s:?}\n{}{}", numbers(&gate), numbers(&up)))
            .unwrap(),
        &[n; 3],
    );
    let mut sum = vec![0f64; n];
    cpu::add(&mut sum, &gate, &up).unwrap();
    let mut scaled = vec![0f64; n];
    cpu::scale(&mut scaled, &sum, s as f64).unwrap();
    assert_close("add", &o[0], &sum, 1e-6, 1e-6);
    assert_close("add_inplace", &o[1], &sum, 1e-6, 1e-6);
    assert_close("scale", &o[2], &scaled, 1e-6, 1e-6);

    // Bias add and its gradient (column sums in row order).
    let (rows, c) = (37usize, 300usize);
    let (x, bias, dy) = (r32(4, rows * c, 1.0), r32(5, c, 1.0), r32(6, rows * c, 1.0));
    let o = split(
        &e.run(&format!(
            "bias {rows} {c}\n{}{}{}",
            numbers(&x),
            numbers(&bias),
            numbers(&dy)
        ))
        .unwrap(),
        &[rows * c, c],
    );
    let xb: Vec<f64> = (0..rows * c).map(|i| x[i] + bias[i % c]).collect();
    let db: Vec<f64> = (0..c).map(|j| (0..rows).map(|r| dy[r * c + j]).sum()).collect();
    assert_close("add_bias", &o[0], &xb, 1e-6, 1e-6);
    assert_close("bias_grad", &o[1], &db, 1e-5, 1e-5);
}

#[test]
fn embedding_adamw_and_logprob_backward_emulated() {
    let Some(e) = core_or_skip("embedding_adamw_and_logprob_backward_emulated") else {
        return;
    };
    // Embedding with repeated ids (the backward's atomics add them up).
    let (tokens, vocab, c) = (50usize, 7usize, 33usize);
    let table = r32(10, vocab * c, 1.0);
    let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 5 + i / 3) % vocab as u32).collect();
    let dout = r32(11, tokens * c, 1.0);
    let (mut out, mut dtable) = (vec![0f64; tokens * c], vec![0f64; vocab * c]);
    cpu::embedding_forward(&mut out, &table, &ids, vocab, c).unwrap();
    cpu::embedding_backward(&mut dtable, &dout, &ids, vocab, c).unwrap();
    let job = format!(
        "embedding {tokens} {vocab} {c}\n{}{}{}",
        numbers(&table),
        numbers(&ids),
        numbers(&dout)
    );
    let o = split(&e.run(&job).unwrap(), &[tokens * c, vocab * c]);
    assert_close("embedding forward", &o[0], &out, 0.0, 0.0);
    assert_close("embedding backward", &o[1], &dtable, 1e-5, 1e-5);

    // Three AdamW steps from the host scalars the launcher computes.
    let n = 1_100;
    let h = cpu::AdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..cpu::AdamW::default()
    };
    let mut p64 = r32(12, n, 1.0);
    let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
    let (mut p, mut m, mut v) = (p64.clone(), vec![0f64; n], vec![0f64; n]);
    for t in 1..=3u64 {
        let g = r32(13 + t, n, 1.0);
        cpu::adamw_step(&mut p64, &g, &mut m64, &mut v64, &h, t).unwrap();
        let sc = aha_cuda_kernels::launch::AdamwScalars::new(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, t).unwrap();
        let job = format!(
            "adamw {n} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}\n{}{}{}{}",
            sc.b1,
            sc.b2,
            sc.ob1,
            sc.ob2,
            sc.decay,
            sc.step,
            sc.inv_bc2_sqrt,
            sc.eps,
            numbers(&to_f32(&p)),
            numbers(&to_f32(&m)),
            numbers(&to_f32(&v)),
            numbers(&to_f32(&g))
        );
        let o = split(&e.run(&job).unwrap(), &[n; 3]);
        (p, m, v) = (o[0].clone(), o[1].clone(), o[2].clone());
    }
    assert_close("adamw params", &p, &p64, 1e-6, 1e-5);
    assert_close("adamw m", &m, &m64, 1e-7, 1e-5);
    assert_close("adamw v", &v, &v64, 1e-9, 1e-5);

    // The token log-prob backward over full rows.
    let (rows, vv) = (3usize, 700usize);
    let logits = r32(20, rows * vv, 5.0);
    let targets: Vec<u32> = vec![0, 699, 350];
    let dlogp = r32(21, rows, 1.0);
    let (mut lp, mut lse) = (vec![0f64; rows], vec![0f64; rows]);
    cpu::token_logprob_forward(&mut lp, &mut lse, &logits, &targets, vv).unwrap();
    let lse: Vec<f64> = lse.iter().map(|&x| x as f32 as f64).collect();
    let mut want = vec![0f64; rows * vv];
    cpu::token_logprob_backward(&mut want, &dlogp, &logits, &lse, &targets, vv).unwrap();
    let job = format!(
        "logprob_bwd {rows} {vv}\n{}{}{}{}",
        numbers(&logits),
        numbers(&targets),
        numbers(&dlogp),
        numbers(&lse)
    );
    assert_close("token_logprob_backward", &e.run(&job).unwrap(), &want, 1e-7, 1e-4);
}
