//! Every CUDA kernel of `aha-cuda-kernels::launch` against its CPU twin in
//! `aha_tensor::cpu`, one test body per op run on each device: the `_cpu`
//! test runs the twin in f32, the `_cuda` test runs the launcher, and both are
//! compared with the same twin run in f64 (the reference). Shapes are fixed
//! edge cases plus seeded random ones, with sizes that are not multiples of
//! the kernels' 256-thread blocks. Without a GPU the `_cuda` tests print
//! "skipped: no GPU" and pass; with one they print their wall time
//! (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch::{self, AdamwScalars, RopeGeometry, TokenIds};
use aha_cuda_kernels::Gpu;
use aha_tensor::cpu::{self, AdamW, RopeLayout, RopeShape};
use aha_tensor::{bf16, Device, Result};
use common::{assert_close, on, rand_ids, rand_vec, to_f32, twin_tests, On};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn up(g: &Gpu, v: &[f32]) -> Result<CudaSlice<f32>> {
    Ok(g.upload(v)?)
}

fn down(g: &Gpu, v: &CudaSlice<f32>) -> Result<Vec<f32>> {
    Ok(g.download(v)?)
}

/// Seeded random values that are exact f32s, so that the f64 reference and
/// the f32 computation start from the same inputs.
fn rand32(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    f64s(&to_f32(&rand_vec(seed, n, scale)))
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `count` seeded random sizes in `1..max`, after the fixed `edges`.
fn sizes(seed: u64, edges: &[usize], count: usize, max: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = edges.to_vec();
    v.extend((0..count).map(|_| rng.random_range(1..max)));
    v
}

fn check_rmsnorm_backward(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut shapes = vec![
        (1, 1),
        (3, 7),
        (17, 255),
        (5, 256),
        (1100, 33),
        (9, 1000),
        (64, 2048),
        (2, 5003),
        (3, 12032),
    ];
    shapes.extend((0..4).map(|_| (rng.random_range(1..300), rng.random_range(1..3000))));
    for (i, &(rows, c)) in shapes.iter().enumerate() {
        let s = 300 + 10 * i as u64;
        let x = rand32(s, rows * c, 2.0);
        let w = rand32(s + 1, c, 1.0);
        let g = rand32(s + 2, rows * c, 1.0);
        let dw0 = rand32(s + 3, c, 1.0);
        let (mut y, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
        cpu::rmsnorm_forward(&mut y, &mut rstd, &x, &w, rows, c, 1e-6)?;
        let (mut want_dx, mut want_dw) = (vec![0.0; rows * c], dw0.clone());
        cpu::rmsnorm_backward(&mut want_dx, &mut want_dw, &g, &x, &w, &rstd, rows, c)?;
        let (xf, wf, gf, rf) = (to_f32(&x), to_f32(&w), to_f32(&g), to_f32(&rstd));
        let (dx, dw) = match &on {
            On::Cpu => {
                let (mut dx, mut dw) = (vec![0f32; rows * c], to_f32(&dw0));
                cpu::rmsnorm_backward(&mut dx, &mut dw, &gf, &xf, &wf, &rf, rows, c)?;
                (dx, dw)
            }
            On::Gpu(gpu) => {
                let (mut dx, mut dw) = (gpu.zeros::<f32>(rows * c)?, up(gpu, &to_f32(&dw0))?);
                let (gd, xd, wd, rd) = (up(gpu, &gf)?, up(gpu, &xf)?, up(gpu, &wf)?, up(gpu, &rf)?);
                launch::rmsnorm_backward_f32(gpu, &mut dx, &mut dw, &gd, &xd, &wd, &rd, rows, c)?;
                (down(gpu, &dx)?, down(gpu, &dw)?)
            }
        };
        // dinp: a dot product of c f32 terms (|term| <= 2), summed in another
        // order, then scaled by 1/c: per-element error a few f32 ulps of O(1).
        assert_close(&format!("rmsnorm dinp {rows}x{c} on {dev}"), &dx, &want_dx, 1e-5, 1e-5);
        // dweight: a sum over `rows` f32 terms |g * xhat| <= ~2 in a different
        // order (per-block then across blocks): error <= rows * 2^-24 * 2.
        let atol = 1.2e-7 * rows.max(16) as f64;
        assert_close(
            &format!("rmsnorm dweight {rows}x{c} on {dev}"),
            &dw,
            &want_dw,
            atol,
            1e-6,
        );
    }
    Ok(())
}
twin_tests!(check_rmsnorm_backward, rmsnorm_backward_cpu, rmsnorm_backward_cuda);

fn check_rope(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let h = |heads, head_dim| RopeShape::full(heads, head_dim, RopeLayout::Half);
    let shapes = [
        (1, h(1, 2)),
        (37, h(2, 8)),
        (7, h(5, 128)),
        (300, RopeShape::full(3, 6, RopeLayout::Interleaved)),
        // DeepSeek-V3 style: a 64-wide interleaved rotary part after 128 dims.
        (
            19,
            RopeShape {
                heads: 3,
                head_dim: 192,
                rot_offset: 128,
                rot_dim: 64,
                layout: RopeLayout::Interleaved,
            },
        ),
        (
            33,
            RopeShape {
                heads: 2,
                head_dim: 24,
                rot_offset: 4,
                rot_dim: 10,
                layout: RopeLayout::Half,
            },
        ),
        (
            5,
            RopeShape {
                heads: 4,
                head_dim: 10,
                rot_offset: 3,
                rot_dim: 0,
                layout: RopeLayout::Half,
            },
        ),
    ];
    for (i, &(tokens, s)) in shapes.iter().enumerate() {
        let max_pos = 50;
        let n = tokens * s.heads * s.head_dim;
        let x = rand32(500 + i as u64, n, 2.0);
        let pos = rand_ids(600 + i as u64, tokens, max_pos);
        let (cos64, sin64) = cpu::rope_table::<f64>(10_000.0, s.rot_dim, max_pos);
        let (cos32, sin32) = cpu::rope_table::<f32>(10_000.0, s.rot_dim, max_pos);
        let (mut want_f, mut want_b) = (vec![0.0; n], vec![0.0; n]);
        cpu::rope_forward(&mut want_f, &x, &cos64, &sin64, &pos, s)?;
        cpu::rope_backward(&mut want_b, &x, &cos64, &sin64, &pos, s)?;
        let xf = to_f32(&x);
        let (fwd, bwd) = match &on {
            On::Cpu => {
                let (mut f, mut b) = (vec![0f32; n], vec![0f32; n]);
                cpu::rope_forward(&mut f, &xf, &cos32, &sin32, &pos, s)?;
                cpu::rope_backward(&mut b, &xf, &cos32, &sin32, &pos, s)?;
                (f, b)
            }
            On::Gpu(gpu) => {
                let geo = RopeGeometry {
                    heads: s.heads,
                    head_dim: s.head_dim,
                    rot_offset: s.rot_offset,
                    rot_dim: s.rot_dim,
                    interleaved: s.layout == RopeLayout::Interleaved,
                };
                let (xd, pd) = (up(gpu, &xf)?, gpu.upload(&pos)?);
                // An empty table cannot be uploaded; rot_dim 0 reads none.
                let table = |t: &[f32]| if t.is_empty() { up(gpu, &[0.0]) } else { up(gpu, t) };
                let (cd, sd) = (table(&cos32)?, table(&sin32)?);
                let (mut f, mut b) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
                launch::rope_forward_f32(gpu, &mut f, &xd, &cd, &sd, &pd, tokens, &geo)?;
                launch::rope_backward_f32(gpu, &mut b, &xd, &cd, &sd, &pd, tokens, &geo)?;
                if s.rot_dim > 0 {
                    // A position past the table turns the rotated dims to NaN.
                    let bad = gpu.upload(&vec![max_pos as u32; tokens])?;
                    let mut o = gpu.zeros::<f32>(n)?;
                    launch::rope_forward_f32(gpu, &mut o, &xd, &cd, &sd, &bad, tokens, &geo)?;
                    let o = down(gpu, &o)?;
                    assert!(o[s.rot_offset].is_nan(), "rope: out-of-table position not marked");
                }
                (down(gpu, &f)?, down(gpu, &b)?)
            }
        };
        // Each output is x_a cos -+ x_b sin with |x| <= 2 and an f32 table
        // (rounded from f64): error <= ~4 f32 ulps of 2.
        let what = format!("{tokens} tokens {s:?} on {dev}");
        assert_close(&format!("rope_forward {what}"), &fwd, &want_f, 1e-6, 1e-6);
        assert_close(&format!("rope_backward {what}"), &bwd, &want_b, 1e-6, 1e-6);
    }
    Ok(())
}
twin_tests!(check_rope, rope_cpu, rope_cuda);

fn check_silu_swiglu(dev: Device) -> Result<()> {
    let on = on(dev)?;
    for (i, n) in sizes(11, &[1, 255, 256, 257, 1000, 100_003], 3, 50_000)
        .into_iter()
        .enumerate()
    {
        let s = 700 + 10 * i as u64;
        // Scale 12 reaches both sigmoid tails.
        let (x, u, d) = (rand32(s, n, 12.0), rand32(s + 1, n, 2.0), rand32(s + 2, n, 1.0));
        let mut want = [vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]];
        {
            let [sf, sb, wf, dg, du] = &mut want;
            cpu::silu(sf, &x)?;
            cpu::silu_backward(sb, &d, &x)?;
            cpu::swiglu(wf, &x, &u)?;
            cpu::swiglu_backward(dg, du, &d, &x, &u)?;
        }
        let (xf, uf, df) = (to_f32(&x), to_f32(&u), to_f32(&d));
        let got: [Vec<f32>; 5] = match &on {
            On::Cpu => {
                let mut o = [
                    vec![0f32; n],
                    vec![0f32; n],
                    vec![0f32; n],
                    vec![0f32; n],
                    vec![0f32; n],
                ];
                let [sf, sb, wf, dg, du] = &mut o;
                cpu::silu(sf, &xf)?;
                cpu::silu_backward(sb, &df, &xf)?;
                cpu::swiglu(wf, &xf, &uf)?;
                cpu::swiglu_backward(dg, du, &df, &xf, &uf)?;
                o
            }
            On::Gpu(g) => {
                let (xd, ud, dd) = (up(g, &xf)?, up(g, &uf)?, up(g, &df)?);
                let mut o = [g.zeros(n)?, g.zeros(n)?, g.zeros(n)?, g.zeros(n)?, g.zeros(n)?];
                let [sf, sb, wf, dg, du] = &mut o;
                launch::silu_forward_f32(g, sf, &xd, n)?;
                launch::silu_backward_f32(g, sb, &dd, &xd, n)?;
                launch::swiglu_forward_f32(g, wf, &xd, &ud, n)?;
                launch::swiglu_backward_f32(g, dg, du, &dd, &xd, &ud, n)?;
                let mut v = Vec::new();
                for b in &o {
                    v.push(down(g, b)?);
                }
                v.try_into().unwrap()
            }
        };
        // exp is __expf on the GPU (fast math: ~2 ulp plus ~2^-21 relative) and
        // the division approximate: a few 1e-7 relative on O(1) values; atol
        // covers the cancellation in silu' near x = -2.4.
        for (name, (g, w)) in ["silu", "silu_backward", "swiglu", "swiglu dgate", "swiglu dup"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_close(&format!("{name} n={n} on {dev}"), g, w, 2e-6, 2e-6);
        }
    }
    Ok(())
}
twin_tests!(check_silu_swiglu, silu_swiglu_cpu, silu_swiglu_cuda);

fn check_embedding(dev: Device) -> Result<()> {
    let on = on(dev)?;
    for (i, &(tokens, vocab, c)) in [(1, 1, 1), (7, 5, 3), (300, 50, 257), (1000, 17, 64), (129, 1000, 300)]
        .iter()
        .enumerate()
    {
        let s = 800 + 10 * i as u64;
        let table = rand32(s, vocab * c, 1.0);
        let dout = rand32(s + 1, tokens * c, 1.0);
        let dt0 = rand32(s + 2, vocab * c, 1.0);
        let ids = rand_ids(s + 3, tokens, vocab);
        let mut want_out = vec![0.0; tokens * c];
        cpu::embedding_forward(&mut want_out, &table, &ids, vocab, c)?;
        let mut want_dt = dt0.clone();
        cpu::embedding_backward(&mut want_dt, &dout, &ids, vocab, c)?;
        let (tf, df) = (to_f32(&table), to_f32(&dout));
        let mut bad_ids = ids.clone();
        bad_ids[tokens - 1] = vocab as u32;
        let (out, dt) = match &on {
            On::Cpu => {
                let (mut o, mut d) = (vec![0f32; tokens * c], to_f32(&dt0));
                cpu::embedding_forward(&mut o, &tf, &ids, vocab, c)?;
                cpu::embedding_backward(&mut d, &df, &ids, vocab, c)?;
                assert!(cpu::embedding_forward(&mut o.clone(), &tf, &bad_ids, vocab, c).is_err());
                (o, d)
            }
            On::Gpu(g) => {
                let (td, dd) = (up(g, &tf)?, up(g, &df)?);
                let (mut o, mut d) = (g.zeros::<f32>(tokens * c)?, up(g, &to_f32(&dt0))?);
                // Forward from host ids, backward from device ids: both paths.
                launch::embedding_forward_f32(g, &mut o, &td, TokenIds::Host(&ids), tokens, vocab, c)?;
                let ids_d = g.upload(&ids)?;
                launch::embedding_backward_f32(g, &mut d, &dd, TokenIds::Device(&ids_d), tokens, vocab, c)?;
                let e = launch::embedding_forward_f32(g, &mut o, &td, TokenIds::Host(&bad_ids), tokens, vocab, c);
                assert!(e.is_err(), "host ids out of range must be refused");
                // Device ids out of range: a zero row forward, skipped backward.
                let bad_d = g.upload(&bad_ids)?;
                let mut o2 = g.zeros::<f32>(tokens * c)?;
                launch::embedding_forward_f32(g, &mut o2, &td, TokenIds::Device(&bad_d), tokens, vocab, c)?;
                let o2 = down(g, &o2)?;
                assert!(o2[(tokens - 1) * c..].iter().all(|&v| v == 0.0));
                let mut d2 = up(g, &to_f32(&dt0))?;
                launch::embedding_backward_f32(g, &mut d2, &dd, TokenIds::Device(&bad_d), tokens, vocab, c)?;
                (down(g, &o)?, down(g, &d)?)
            }
        };
        // Forward is a copy: exact.
        assert_close(
            &format!("embedding_forward {tokens}/{vocab}/{c} on {dev}"),
            &out,
            &want_out,
            0.0,
            0.0,
        );
        // Backward adds each token's row in an unspecified (atomic) order: up
        // to `repeats` f32 roundings of values <= 1 + repeats.
        let repeats = (0..vocab as u32)
            .map(|v| ids.iter().filter(|&&i| i == v).count())
            .max()
            .unwrap_or(1);
        let atol = 1.2e-7 * (repeats as f64 + 1.0).powi(2);
        assert_close(
            &format!("embedding_backward {tokens}/{vocab}/{c} on {dev}"),
            &dt,
            &want_dt,
            atol,
            1e-7,
        );
    }
    Ok(())
}
twin_tests!(check_embedding, embedding_cpu, embedding_cuda);

fn check_add_scale(dev: Device) -> Result<()> {
    let on = on(dev)?;
    for (i, n) in sizes(13, &[1, 255, 256, 257, 100_003], 3, 200_000)
        .into_iter()
        .enumerate()
    {
        let s = 900 + 10 * i as u64;
        let (a, b) = (rand32(s, n, 3.0), rand32(s + 1, n, 3.0));
        let k = 0.37f32;
        let mut want_add = vec![0.0; n];
        cpu::add(&mut want_add, &a, &b)?;
        let mut want_acc = a.clone();
        cpu::add_inplace(&mut want_acc, &b)?;
        let mut want_scale = vec![0.0; n];
        cpu::scale(&mut want_scale, &a, k as f64)?;
        let mut want_mul = vec![0.0; n];
        cpu::mul(&mut want_mul, &a, &b)?;
        let (af, bf) = (to_f32(&a), to_f32(&b));
        let (sum, acc, scaled, prod) = match &on {
            On::Cpu => {
                let (mut o, mut acc, mut sc, mut pr) = (vec![0f32; n], af.clone(), vec![0f32; n], vec![0f32; n]);
                cpu::add(&mut o, &af, &bf)?;
                cpu::add_inplace(&mut acc, &bf)?;
                cpu::scale(&mut sc, &af, k)?;
                cpu::mul(&mut pr, &af, &bf)?;
                (o, acc, sc, pr)
            }
            On::Gpu(g) => {
                let (ad, bd) = (up(g, &af)?, up(g, &bf)?);
                let mut o = g.zeros::<f32>(n)?;
                launch::add_f32(g, &mut o, &ad, &bd, n)?;
                let mut acc = up(g, &af)?;
                launch::add_inplace_f32(g, &mut acc, &bd, n)?;
                let mut sc = up(g, &af)?;
                launch::scale_f32(g, &mut sc, k, n)?;
                let mut pr = up(g, &af)?;
                launch::mul_inplace_f32(g, &mut pr, &bd, n)?;
                (down(g, &o)?, down(g, &acc)?, down(g, &sc)?, down(g, &pr)?)
            }
        };
        // One f32 rounding of an exact f64 result: <= 2^-24 relative.
        let rtol = 6.0e-8;
        assert_close(&format!("add n={n} on {dev}"), &sum, &want_add, 0.0, rtol);
        assert_close(&format!("add_inplace n={n} on {dev}"), &acc, &want_acc, 0.0, rtol);
        assert_close(&format!("scale n={n} on {dev}"), &scaled, &want_scale, 0.0, rtol);
        assert_close(&format!("mul_inplace n={n} on {dev}"), &prod, &want_mul, 0.0, rtol);
    }
    Ok(())
}
twin_tests!(check_add_scale, add_scale_cpu, add_scale_cuda);

fn check_cast(dev: Device) -> Result<()> {
    let on = on(dev)?;
    // Random bit patterns (NaNs, infinities, subnormals included) and the
    // edge cases of rounding: ties to even both ways, overflow to inf.
    let mut rng = StdRng::seed_from_u64(17);
    let mut bits: Vec<u32> = (0..100_003).map(|_| rng.random()).collect();
    bits.extend([
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xffff_ffff,
        0x0000_0001,
        0x007f_ffff,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x7f7f_ffff,
        0xff7f_8000,
    ]);
    let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let want16: Vec<u16> = xs.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    let all16: Vec<u16> = (0..=u16::MAX).collect();
    let want32: Vec<u32> = all16.iter().map(|&b| bf16::from_bits(b).to_f32().to_bits()).collect();
    let (got16, got32): (Vec<u16>, Vec<u32>) = match &on {
        // The CPU twin is the half crate (Tensor::to_dtype uses it).
        On::Cpu => (
            xs.iter().map(|&x| bf16::from_f32(x).to_bits()).collect(),
            all16.iter().map(|&b| bf16::from_bits(b).to_f32().to_bits()).collect(),
        ),
        On::Gpu(g) => {
            let xd = up(g, &xs)?;
            let mut o16 = g.zeros::<u16>(xs.len())?;
            launch::cast_f32_to_bf16(g, &mut o16, &xd, xs.len())?;
            let bd = g.upload(&all16)?;
            let mut o32 = g.zeros::<f32>(all16.len())?;
            launch::cast_bf16_to_f32(g, &mut o32, &bd, all16.len())?;
            (g.download(&o16)?, down(g, &o32)?.iter().map(|x| x.to_bits()).collect())
        }
    };
    // Bit-exact: rounding is specified (nearest, ties to even; NaN quieted).
    for (i, (g, w)) in got16.iter().zip(&want16).enumerate() {
        assert_eq!(g, w, "cast_f32_to_bf16 of {:#010x} on {dev}", bits[i]);
    }
    for (i, (g, w)) in got32.iter().zip(&want32).enumerate() {
        assert_eq!(g, w, "cast_bf16_to_f32 of {i:#06x} on {dev}");
    }
    Ok(())
}
twin_tests!(check_cast, cast_cpu, cast_cuda);

fn check_adamw(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let h = AdamW {
        lr: 1e-2,
        ..AdamW::default()
    };
    for (i, n) in sizes(19, &[1, 257, 10_007], 2, 100_000).into_iter().enumerate() {
        let s = 1000 + 10 * i as u64;
        let p0 = rand32(s, n, 1.0);
        let m0 = rand32(s + 1, n, 0.1);
        let v0 = f64s(&rand32(s + 2, n, 0.1).iter().map(|x| (x * x) as f32).collect::<Vec<_>>());
        let grads: Vec<Vec<f64>> = (0..3).map(|t| rand32(s + 3 + t, n, 1.0)).collect();
        let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
        for (t, g) in grads.iter().enumerate() {
            cpu::adamw_step(&mut wp, g, &mut wm, &mut wv, &h, t as u64 + 1)?;
        }
        let (p, m, v) = match &on {
            On::Cpu => {
                let (mut p, mut m, mut v) = (to_f32(&p0), to_f32(&m0), to_f32(&v0));
                for (t, g) in grads.iter().enumerate() {
                    cpu::adamw_step(&mut p, &to_f32(g), &mut m, &mut v, &h, t as u64 + 1)?;
                }
                (p, m, v)
            }
            On::Gpu(gpu) => {
                let (mut p, mut m, mut v) = (up(gpu, &to_f32(&p0))?, up(gpu, &to_f32(&m0))?, up(gpu, &to_f32(&v0))?);
                for (t, g) in grads.iter().enumerate() {
                    let sc = AdamwScalars::new(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, t as u64 + 1)?;
                    let gd = up(gpu, &to_f32(g))?;
                    launch::adamw_f32(gpu, &mut p, &mut m, &mut v, &gd, n, &sc)?;
                }
                (down(gpu, &p)?, down(gpu, &m)?, down(gpu, &v)?)
            }
        };
        // Three steps of f32 arithmetic (fast-math sqrt and division on the
        // GPU) against f64. m = b1 m + (1 - b1) g can cancel: its error is a
        // few ulps of the terms (<= 0.1, ulp 7.5e-9), not of m; likewise v
        // with terms <= 0.01. Parameters O(1) move by ~lr per step, and the
        // update inherits ~1e-5 relative error where v ~ 0.
        assert_close(&format!("adamw m n={n} on {dev}"), &m, &wm, 5e-8, 1e-6);
        assert_close(&format!("adamw v n={n} on {dev}"), &v, &wv, 5e-9, 1e-5);
        assert_close(&format!("adamw params n={n} on {dev}"), &p, &wp, 1e-6, 1e-6);
    }
    Ok(())
}
twin_tests!(check_adamw, adamw_cpu, adamw_cuda);

fn check_grad_norm_clip(dev: Device) -> Result<()> {
    let on = on(dev)?;
    for (i, n) in sizes(23, &[1, 255, 257, 1_000_003], 3, 300_000).into_iter().enumerate() {
        let g = rand32(1100 + i as u64, n, 1.0);
        let gf = to_f32(&g);
        // The reference: the f32 values, squared and summed in f64.
        let want_norm = cpu::global_norm(&f64s(&gf));
        let max_norm = want_norm / 3.0;
        let mut want = f64s(&gf);
        cpu::clip_grad_norm(&mut want, max_norm);
        let (norm, clipped) = match &on {
            On::Cpu => {
                let mut c = gf.clone();
                (cpu::clip_grad_norm(&mut c, max_norm), c)
            }
            On::Gpu(gpu) => {
                let mut d = up(gpu, &gf)?;
                let norm = launch::grad_norm_f32(gpu, &d, n)?;
                let coef = max_norm / (norm + 1e-6);
                if coef < 1.0 {
                    launch::scale_f32(gpu, &mut d, coef as f32, n)?;
                }
                (norm, down(gpu, &d)?)
            }
        };
        // Exact f32 squares summed in f64 in another order: ~n * 2^-53 relative.
        assert!(
            (norm - want_norm).abs() <= 1e-12 * want_norm,
            "grad norm n={n} on {dev}: {norm} vs {want_norm}"
        );
        // One f32 rounding of the coefficient and one of the product.
        assert_close(&format!("clip n={n} on {dev}"), &clipped, &want, 0.0, 1.2e-7);
    }
    Ok(())
}
twin_tests!(check_grad_norm_clip, grad_norm_clip_cpu, grad_norm_clip_cuda);

/// The scratch of the two-pass reductions comes from the device's caching
/// pool: after the first call, repeats of the same shape allocate nothing.
#[test]
fn scratch_is_reused_from_the_pool_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("scratch_is_reused_from_the_pool_cuda: skipped: no GPU ({reason})");
        return;
    }
    let gpu = Gpu::get(0).unwrap();
    let x = gpu.upload(&vec![1f32; 123_457]).unwrap();
    let (_, before) = gpu.pool_stats();
    for _ in 0..5 {
        let norm = launch::grad_norm_f32(&gpu, &x, 123_457).unwrap();
        assert!((norm - (123_457f64).sqrt()).abs() < 1e-6 * norm);
    }
    let (_, after) = gpu.pool_stats();
    // Two scratch buffers per call; at most the first call's two allocate
    // (other tests may have cached these lengths already).
    assert!(after.misses - before.misses <= 2, "{before:?} -> {after:?}");
    assert!(after.hits - before.hits >= 8, "{before:?} -> {after:?}");
    assert_eq!(after.live_bytes, before.live_bytes, "every loan came back");
}

/// Matrix products: `cpu::matmul` (f32) on the CPU, cuBLAS (`blas::matmul_f32`)
/// on the GPU, both against the f64 twin; every transpose combination,
/// accumulate on and off, sizes around cuBLAS's tiles.
fn check_matmul(dev: Device) -> Result<()> {
    use aha_cuda_kernels::blas::{self, MatmulShape};
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(21);
    let mut shapes = vec![(1, 1, 1), (1, 256, 4096), (16, 256, 768), (129, 65, 257), (7, 1000, 3)];
    shapes.extend((0..6).map(|_| {
        (
            rng.random_range(1..300),
            rng.random_range(1..300),
            rng.random_range(1..300),
        )
    }));
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        for (ta, tb, acc) in [
            (false, false, false),
            (false, true, true),
            (true, false, false),
            (true, true, true),
        ] {
            let seed = 1000 + i as u64 * 8;
            let a = rand32(seed, m * k, 1.0);
            let b = rand32(seed + 1, k * n, 1.0);
            let init = rand32(seed + 2, m * n, 1.0);
            let mut g = cpu::Gemm::new(m, k, n);
            (g.trans_a, g.trans_b, g.accumulate) = (ta, tb, acc);
            let mut want = init.clone();
            cpu::matmul(&mut want, &a, &b, g)?;
            let got = match &on {
                On::Cpu => {
                    let mut o = to_f32(&init);
                    cpu::matmul(&mut o, &to_f32(&a), &to_f32(&b), g)?;
                    o
                }
                On::Gpu(gpu) => {
                    let mut o = up(gpu, &to_f32(&init))?;
                    let (da, db) = (up(gpu, &to_f32(&a))?, up(gpu, &to_f32(&b))?);
                    let s = MatmulShape {
                        m,
                        k,
                        n,
                        trans_a: ta,
                        trans_b: tb,
                        accumulate: acc,
                    };
                    blas::matmul_f32(gpu, &mut o, &da, &db, s)?;
                    down(gpu, &o)?
                }
            };
            // f32 accumulation over k products of size <= 1 (TF32 is not
            // enabled: cuBLAS's default math mode for Sgemm is full f32).
            assert_close(
                &format!("matmul {m}x{k}x{n} ta {ta} tb {tb}"),
                &got,
                &want,
                2e-6 * k as f64,
                1e-5,
            );
        }
    }
    Ok(())
}

twin_tests!(check_matmul, matmul_cpu, matmul_cuda);

/// bf16 products with f32 accumulation against the f64 product of the same
/// (bf16-rounded) inputs: only the output's rounding to bf16 (relative
/// 2^-8) and the f32 sum differ.
#[test]
fn matmul_bf16_cuda() {
    use aha_cuda_kernels::blas::{self, MatmulShape};
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("matmul_bf16_cuda: skipped: no GPU ({reason})");
        return;
    }
    let gpu = Gpu::get(0).unwrap();
    for (m, k, n) in [(1, 64, 1), (16, 256, 768), (129, 65, 257), (512, 2048, 1024)] {
        let q = |v: Vec<f64>| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f64(x)).collect() };
        let a = q(rand_vec(5, m * k, 1.0));
        let b = q(rand_vec(6, n * k, 1.0));
        let f = |v: &[bf16]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
        let mut want = vec![0f64; m * n];
        let mut g = cpu::Gemm::new(m, k, n);
        g.trans_b = true;
        cpu::matmul(&mut want, &f(&a), &f(&b), g).unwrap();
        let bits = |v: &[bf16]| -> Vec<u16> { v.iter().map(|x| x.to_bits()).collect() };
        let (da, db) = (gpu.upload(&bits(&a)).unwrap(), gpu.upload(&bits(&b)).unwrap());
        let mut o = gpu.zeros::<u16>(m * n).unwrap();
        let s = MatmulShape {
            m,
            k,
            n,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        blas::matmul_bf16(&gpu, &mut o, &da, &db, s).unwrap();
        let got: Vec<f64> = gpu
            .download(&o)
            .unwrap()
            .into_iter()
            .map(|x| bf16::from_bits(x).to_f64())
            .collect();
        assert_close(
            &format!("matmul_bf16 {m}x{k}x{n}"),
            &got,
            &want,
            1e-5 * k as f64,
            1.0 / 256.0,
        );
    }
}

/// Causal GQA attention forward and backward: the CPU kernels in f32 on the
/// CPU, the simple warp-per-row CUDA kernels on the GPU, both against the
/// CPU twin in f64; MLA widths (Dk != Dv) and lengths that are not multiples
/// of the four-warp blocks included.
fn check_attention(dev: Device) -> Result<()> {
    use aha_cuda_kernels::launch::AttnGeometry;
    let on = on(dev)?;
    let shapes = [
        (1, 1, 1, 1, 1, 1),
        (2, 7, 4, 2, 8, 6),
        (1, 33, 8, 8, 32, 32),
        (3, 65, 6, 2, 24, 16),
        (1, 130, 4, 1, 64, 64),
        (1, 9, 2, 2, 192, 128),
    ];
    for (i, &(b, t, h, hk, dk, dv)) in shapes.iter().enumerate() {
        let seed = 3000 + 10 * i as u64;
        let q = rand32(seed, b * t * h * dk, 1.0);
        let k = rand32(seed + 1, b * t * hk * dk, 1.0);
        let v = rand32(seed + 2, b * t * hk * dv, 1.0);
        let dout = rand32(seed + 3, b * t * h * dv, 1.0);
        let s = cpu::AttnShape {
            b,
            t,
            h,
            hk,
            dk,
            dv,
            scale: 1.0 / (dk as f64).sqrt(),
        };
        let (mut out, mut lse) = (vec![0f64; b * t * h * dv], vec![0f64; b * h * t]);
        cpu::attention_forward(&mut out, &mut lse, &q, &k, &v, s)?;
        let (mut dq, mut dkk, mut dvv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
        cpu::attention_backward(&mut dq, &mut dkk, &mut dvv, &dout, &q, &k, &v, &out, &lse, s)?;
        let got: [Vec<f32>; 5] = match &on {
            On::Cpu => {
                let f = |x: &[f64]| to_f32(x);
                let (mut o, mut l) = (vec![0f32; out.len()], vec![0f32; lse.len()]);
                cpu::attention_forward(&mut o, &mut l, &f(&q), &f(&k), &f(&v), s)?;
                let (mut a, mut bb, mut c) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
                cpu::attention_backward(&mut a, &mut bb, &mut c, &f(&dout), &f(&q), &f(&k), &f(&v), &o, &l, s)?;
                [o, l, a, bb, c]
            }
            On::Gpu(gpu) => {
                let g = AttnGeometry {
                    b,
                    t,
                    h,
                    hk,
                    dk,
                    dv,
                    scale: s.scale as f32,
                };
                let (dqd, dkd, dvd) = (up(gpu, &to_f32(&q))?, up(gpu, &to_f32(&k))?, up(gpu, &to_f32(&v))?);
                let (mut o, mut l) = (gpu.zeros::<f32>(out.len())?, gpu.zeros::<f32>(lse.len())?);
                launch::attention_forward_f32(gpu, &mut o, &mut l, &dqd, &dkd, &dvd, &g)?;
                let dod = up(gpu, &to_f32(&dout))?;
                let (mut a, mut bb, mut c) = (
                    gpu.zeros::<f32>(q.len())?,
                    gpu.zeros::<f32>(k.len())?,
                    gpu.zeros::<f32>(v.len())?,
                );
                launch::attention_backward_f32(gpu, &mut a, &mut bb, &mut c, &dod, &dqd, &dkd, &dvd, &o, &l, &g)?;
                [
                    down(gpu, &o)?,
                    down(gpu, &l)?,
                    down(gpu, &a)?,
                    down(gpu, &bb)?,
                    down(gpu, &c)?,
                ]
            }
        };
        // f32 sums over t keys of terms of size ~1: absolute error grows with
        // t and the head width; gradients sum one more product.
        let tol = 1e-5 * (t * dk.max(dv)) as f64;
        let what = format!("attention b {b} t {t} h {h} hk {hk} dk {dk} dv {dv}");
        assert_close(&format!("{what} out"), &got[0], &out, tol, 1e-4);
        assert_close(&format!("{what} lse"), &got[1], &lse, tol, 1e-5);
        for (name, g, w) in [("dq", &got[2], &dq), ("dk", &got[3], &dkk), ("dv", &got[4], &dvv)] {
            assert_close(&format!("{what} {name}"), g, w, 4.0 * tol, 1e-4);
        }
    }
    Ok(())
}

twin_tests!(check_attention, attention_cpu, attention_cuda);

/// Token log-probs over full rows and their backward, against the CPU twin
/// in f64; vocabularies around the 256-thread block and a Qwen-sized one.
fn check_token_logprob(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(41);
    for (i, &(n, v)) in [(1usize, 1usize), (3, 255), (5, 257), (17, 4096), (2, 151_936)]
        .iter()
        .enumerate()
    {
        let logits = rand32(4000 + i as u64, n * v, 8.0);
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let dlogp = rand32(4100 + i as u64, n, 1.0);
        let (mut logp, mut lse) = (vec![0f64; n], vec![0f64; n]);
        cpu::token_logprob_forward(&mut logp, &mut lse, &logits, &targets, v)?;
        let mut dl = vec![0f64; n * v];
        cpu::token_logprob_backward(&mut dl, &dlogp, &logits, &lse, &targets, v)?;
        let (glp, glse, gdl) = match &on {
            On::Cpu => {
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                cpu::token_logprob_forward(&mut a, &mut b, &to_f32(&logits), &targets, v)?;
                let mut d = vec![0f32; n * v];
                cpu::token_logprob_backward(&mut d, &to_f32(&dlogp), &to_f32(&logits), &b, &targets, v)?;
                (a, b, d)
            }
            On::Gpu(gpu) => {
                let x = up(gpu, &to_f32(&logits))?;
                let (mut a, mut b) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
                launch::token_logprob_forward_f32(gpu, &mut a, &mut b, &x, &targets, v)?;
                let mut d = gpu.zeros::<f32>(n * v)?;
                launch::token_logprob_backward_f32(gpu, &mut d, &up(gpu, &to_f32(&dlogp))?, &x, &b, &targets, v)?;
                (down(gpu, &a)?, down(gpu, &b)?, down(gpu, &d)?)
            }
        };
        // f32 sums of up to 151,936 exponentials: relative error ~1e-6 of lse.
        let what = format!("token_logprob n {n} v {v}");
        assert_close(&format!("{what} lse"), &glse, &lse, 1e-4, 1e-5);
        assert_close(&format!("{what} logp"), &glp, &logp, 1e-4, 1e-5);
        assert_close(&format!("{what} dlogits"), &gdl, &dl, 1e-6, 1e-4);
    }
    Ok(())
}

twin_tests!(check_token_logprob, token_logprob_cpu, token_logprob_cuda);

/// kernels/logprob.cu's one-pass forward as written, run on the CPU through
/// `aha_cuda_kernels::emulate`, against the f64 twin; rows with -inf logits
/// (masked vocabulary), rows shorter than the block, and a NaN row.
#[test]
fn token_logprob_emulated() {
    use aha_cuda_kernels::emulate::{self, numbers};
    let Some(e) = emulate::emulator_for_test("token_logprob_emulated", "lmhead_grpo").unwrap() else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(43);
    for (i, &(n, v)) in [(1usize, 1usize), (3, 255), (5, 257), (4, 5000)].iter().enumerate() {
        let mut logits = rand32(4200 + i as u64, n * v, 8.0);
        // Masked entries: every seventh logit is -inf (never a target).
        let targets: Vec<u32> = (0..n)
            .map(|_| loop {
                let t = rng.random_range(0..v as u32);
                if v == 1 || t % 7 != 3 {
                    break t;
                }
            })
            .collect();
        if v > 1 {
            for (j, x) in logits.iter_mut().enumerate() {
                if j % v % 7 == 3 {
                    *x = f64::NEG_INFINITY;
                }
            }
        }
        let (mut logp, mut lse) = (vec![0f64; n], vec![0f64; n]);
        cpu::token_logprob_forward(&mut logp, &mut lse, &logits, &targets, v).unwrap();
        let out = e
            .run(&format!("logprob {n} {v}\n{}{}", numbers(&logits), numbers(&targets)))
            .unwrap();
        let what = format!("emulated token_logprob n {n} v {v}");
        assert_close(&format!("{what} logp"), &out[..n], &logp, 1e-4, 1e-5);
        assert_close(&format!("{what} lse"), &out[n..], &lse, 1e-4, 1e-5);
    }
    // A NaN logit makes its row's log-prob NaN, not a number.
    let out = e.run("logprob 2 3\n1.0 nan 0.5 0.1 0.2 0.3\n0 2\n").unwrap();
    assert!(out[0].is_nan() && out[1].is_finite() && out[1] < 0.0, "{out:?}");
}

/// Bias add and bias gradient on the GPU against plain loops in f64.
#[test]
fn bias_add_and_grad_cuda() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("bias_add_and_grad_cuda: skipped: no GPU ({reason})");
        return;
    }
    let gpu = Gpu::get(0).unwrap();
    for &(rows, c) in &[(1usize, 1usize), (7, 255), (300, 1000), (4096, 3)] {
        let x = rand32(50, rows * c, 1.0);
        let bias = rand32(51, c, 1.0);
        let init = rand32(52, c, 1.0);
        let mut dx = up(&gpu, &to_f32(&x)).unwrap();
        launch::add_bias_f32(&gpu, &mut dx, &up(&gpu, &to_f32(&bias)).unwrap(), rows, c).unwrap();
        let want: Vec<f64> = (0..rows * c).map(|i| x[i] + bias[i % c]).collect();
        assert_close("add_bias", &down(&gpu, &dx).unwrap(), &want, 1e-6, 1e-6);
        let mut db = up(&gpu, &to_f32(&init)).unwrap();
        launch::bias_grad_f32(&gpu, &mut db, &up(&gpu, &to_f32(&x)).unwrap(), rows, c).unwrap();
        let want: Vec<f64> = (0..c)
            .map(|j| init[j] + (0..rows).map(|r| x[r * c + j]).sum::<f64>())
            .collect();
        assert_close("bias_grad", &down(&gpu, &db).unwrap(), &want, 1e-5 * rows as f64, 1e-5);
    }
}
