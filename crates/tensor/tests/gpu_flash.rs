//! The flash-attention kernels (`aha_cuda_kernels::flash`) against their CPU
//! twins (`aha_tensor::cpu::flash_*`), one test body per device: the `_cpu`
//! test runs the twin in f32, the `_cuda` test the kernels, and both are
//! compared with the twin in f64 (the reference). Inputs q, k, v are rounded
//! to bf16 once and the same values go to both sides (bf16 bits to the GPU,
//! their exact f32 / f64 values to the CPU), so the only differences are
//! f32 arithmetic: summation order and the GPU's fast `exp`. Without a GPU
//! the `_cuda` tests print "skipped: no GPU" and pass.
//!
//! Tolerances: scores are dot products of <= 256 terms |q k| <= 1 scaled by
//! 1/sqrt(d), so |score| stays below ~16 and `__expf`'s relative error
//! (a few ulp plus 2^-24 |x log2 e| from the argument) stays below ~2e-6;
//! outputs are convex combinations of |v| <= 1 and the f32 sums over up to
//! a few hundred keys add a few 1e-6: `atol 5e-5, rtol 1e-4` for out and
//! lse leaves a 10x margin. Gradients sum one more product (dS of size
//! <= ~|dO||V| d scale, times |q| or |k| <= 1) over up to T x group rows:
//! `atol 2e-4 + 2e-6 * T * group, rtol 1e-3`. A wrong mask, head or tile
//! boundary moves values by 1e-2 or more.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::flash::{self, FlashGeometry, PagedGeometry};
use aha_tensor::cpu::{self, FlashShape, PagedShape};
use aha_tensor::{bf16, Device, Result};
use common::{assert_close, on, rand_vec, to_f32, twin_tests, On};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The long-sequence length: 8192, or 1024 on the emulated GPU (the kernels
/// run as written on CPU fibers there; 8k tokens take minutes).
fn long_len(on: &On) -> usize {
    match on {
        On::Gpu(g) if g.is_emulated() => 1024,
        _ => 8192,
    }
}

/// Seeded values in [-scale, scale) rounded to bf16: (bits, exact values).
fn rand_bf16(seed: u64, n: usize, scale: f64) -> (Vec<u16>, Vec<f64>) {
    rand_vec(seed, n, scale)
        .iter()
        .map(|&x| {
            let b = bf16::from_f64(x);
            (b.to_bits(), b.to_f64())
        })
        .unzip()
}

/// Seeded exact-f32 values (the f32 inputs: dout).
fn rand32(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    to_f32(&rand_vec(seed, n, scale)).iter().map(|&x| x as f64).collect()
}

fn i32s(v: &[usize]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

fn cu_of(lens: &[usize]) -> Vec<usize> {
    let mut cu = vec![0];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l);
    }
    cu
}

/// One varlen problem: inputs as bf16 bits and exact values.
struct Problem {
    lens: Vec<usize>,
    s: FlashShape,
    q: (Vec<u16>, Vec<f64>),
    k: (Vec<u16>, Vec<f64>),
    v: (Vec<u16>, Vec<f64>),
    dout: Vec<f64>,
}

impl Problem {
    fn new(seed: u64, lens: &[usize], h: usize, hk: usize, dk: usize, dv: usize) -> Problem {
        let total: usize = lens.iter().sum();
        Problem {
            lens: lens.to_vec(),
            s: FlashShape {
                h,
                hk,
                dk,
                dv,
                scale: 1.0 / (dk as f64).sqrt(),
            },
            q: rand_bf16(seed, total * h * dk, 1.0),
            k: rand_bf16(seed + 1, total * hk * dk, 1.0),
            v: rand_bf16(seed + 2, total * hk * dv, 1.0),
            dout: rand32(seed + 3, total * h * dv, 1.0),
        }
    }

    fn total(&self) -> usize {
        self.lens.iter().sum()
    }

    fn geometry(&self) -> FlashGeometry {
        FlashGeometry {
            total: self.total(),
            nseq: self.lens.len(),
            max_seqlen: self.lens.iter().copied().max().unwrap_or(0),
            h: self.s.h,
            hk: self.s.hk,
            dk: self.s.dk,
            dv: self.s.dv,
            scale: self.s.scale as f32,
            tensor_cores: false,
        }
    }

    fn what(&self) -> String {
        let s = self.s;
        format!("flash lens {:?} h {}/{} d {}/{}", self.lens, s.h, s.hk, s.dk, s.dv)
    }
}

/// [out, lse] on the device under test; `tensor_cores` picks the GPU's
/// mma.sync forward (the CPU has one twin for both).
fn forward(on: &On, p: &Problem, tensor_cores: bool) -> Result<[Vec<f32>; 2]> {
    let cu = cu_of(&p.lens);
    let (total, s) = (p.total(), p.s);
    Ok(match on {
        On::Cpu => {
            let (mut o, mut l) = (vec![0f32; total * s.h * s.dv], vec![0f32; s.h * total]);
            cpu::flash_forward(
                &mut o,
                &mut l,
                &to_f32(&p.q.1),
                &to_f32(&p.k.1),
                &to_f32(&p.v.1),
                &cu,
                s,
            )?;
            [o, l]
        }
        On::Gpu(gpu) => {
            let (q, k, v) = (gpu.upload(&p.q.0)?, gpu.upload(&p.k.0)?, gpu.upload(&p.v.0)?);
            let cud = gpu.upload(&i32s(&cu))?;
            let (mut o, mut l) = (gpu.zeros::<f32>(total * s.h * s.dv)?, gpu.zeros::<f32>(s.h * total)?);
            let g = FlashGeometry {
                tensor_cores,
                ..p.geometry()
            };
            flash::flash_forward_bf16(gpu, &mut o, &mut l, &q, &k, &v, &cud, &g)?;
            [gpu.download(&o)?, gpu.download(&l)?]
        }
    })
}

/// [dq, dk, dv] on the device under test, from the given out and lse;
/// `tensor_cores` as in [`forward`].
fn backward(on: &On, p: &Problem, out: &[f32], lse: &[f32], tensor_cores: bool) -> Result<[Vec<f32>; 3]> {
    let cu = cu_of(&p.lens);
    let (total, s) = (p.total(), p.s);
    let (nq, nk, nv) = (total * s.h * s.dk, total * s.hk * s.dk, total * s.hk * s.dv);
    Ok(match on {
        On::Cpu => {
            let (mut a, mut b, mut c) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nv]);
            let f = to_f32;
            cpu::flash_backward(
                &mut a,
                &mut b,
                &mut c,
                &f(&p.dout),
                &f(&p.q.1),
                &f(&p.k.1),
                &f(&p.v.1),
                out,
                lse,
                &cu,
                s,
            )?;
            [a, b, c]
        }
        On::Gpu(gpu) => {
            let (q, k, v) = (gpu.upload(&p.q.0)?, gpu.upload(&p.k.0)?, gpu.upload(&p.v.0)?);
            let cud = gpu.upload(&i32s(&cu))?;
            let (o, l, d) = (gpu.upload(out)?, gpu.upload(lse)?, gpu.upload(&to_f32(&p.dout))?);
            let (mut a, mut b, mut c): (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>) =
                (gpu.zeros(nq)?, gpu.zeros(nk)?, gpu.zeros(nv)?);
            let g = FlashGeometry {
                tensor_cores,
                ..p.geometry()
            };
            flash::flash_backward_bf16(gpu, &mut a, &mut b, &mut c, &d, &q, &k, &v, &o, &l, &cud, &g)?;
            [gpu.download(&a)?, gpu.download(&b)?, gpu.download(&c)?]
        }
    })
}

/// The f64 references: [out, lse] and [dq, dk, dv].
type Reference = ([Vec<f64>; 2], [Vec<f64>; 3]);

fn reference(p: &Problem) -> Result<Reference> {
    let cu = cu_of(&p.lens);
    let (total, s) = (p.total(), p.s);
    let (mut o, mut l) = (vec![0.0; total * s.h * s.dv], vec![0.0; s.h * total]);
    cpu::flash_forward(&mut o, &mut l, &p.q.1, &p.k.1, &p.v.1, &cu, s)?;
    let (mut a, mut b, mut c) = (vec![0.0; p.q.1.len()], vec![0.0; p.k.1.len()], vec![0.0; p.v.1.len()]);
    cpu::flash_backward(&mut a, &mut b, &mut c, &p.dout, &p.q.1, &p.k.1, &p.v.1, &o, &l, &cu, s)?;
    Ok(([o, l], [a, b, c]))
}

/// Varlen forward and backward on fixed and seeded random shapes: empty and
/// one-token sequences, lengths around the 16/32-row tiles, GQA, each
/// head-width specialisation (64, 128, MLA 192/128) and the generic one
/// (odd widths, 256), one with a sharp softmax (scale 1); the backward is
/// also run twice and must repeat bit for bit (deterministic mode). On the
/// CPU the tiled twin is checked too; on the GPU the tensor-core kernels too.
/// (sequence lengths, H, Hk, Dk, Dv).
type VarlenCase = (Vec<usize>, usize, usize, usize, usize);

fn check_flash_varlen(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut shapes: Vec<VarlenCase> = vec![
        (vec![1], 1, 1, 1, 1),
        (vec![5, 0, 33, 1, 64], 4, 2, 64, 64),
        (vec![70, 3], 2, 1, 128, 128),
        (vec![40, 17], 4, 4, 192, 128),
        (vec![9, 50, 31], 6, 2, 24, 16),
        (vec![33], 2, 2, 256, 256),
        (vec![65, 2], 8, 1, 40, 72),
    ];
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..4 {
        let nseq = rng.random_range(1..4);
        let lens = (0..nseq).map(|_| rng.random_range(1..100)).collect();
        let hk = [1, 2, 3][rng.random_range(0..3)];
        let h = hk * [1, 2, 4][rng.random_range(0..3)];
        let (dk, dv) = [(64, 64), (128, 128), (192, 128), (16, 16), (48, 32)][rng.random_range(0..5)];
        shapes.push((lens, h, hk, dk, dv));
    }
    for (i, (lens, h, hk, dk, dv)) in shapes.into_iter().enumerate() {
        let mut p = Problem::new(9000 + 10 * i as u64, &lens, h, hk, dk, dv);
        if i == 2 {
            // Sharp softmax: scale 1 instead of 1/sqrt(d) (scores up to ~15),
            // so the running max changes by large steps between key tiles.
            p.s.scale = 1.0;
        }
        let what = format!("{} scale {:.3}", p.what(), p.s.scale);
        let (fwd, bwd) = reference(&p)?;
        let [o, l] = forward(&on, &p, false)?;
        assert_close(&format!("{what} out"), &o, &fwd[0], 5e-5, 1e-4);
        assert_close(&format!("{what} lse"), &l, &fwd[1], 5e-5, 1e-4);
        if let On::Gpu(_) = on {
            // Tensor cores round P to bf16 before P V: out moves by up to
            // 2^-8 of |v| <= 1 (4e-3); lse keeps f32 sums. The backward also
            // rounds dS and dO (2^-9 relative each) before its products, so
            // gradient errors scale with the gradient: 1e-2 of the tensor's
            // largest value (the CPU emulation, crates/cuda-kernels/emulate/flash.cpp,
            // saw up to 5.3e-3 of it with a sharp softmax) and 2e-2 relative.
            let [o, l] = forward(&on, &p, true)?;
            assert_close(&format!("{what} out (tensor cores)"), &o, &fwd[0], 4e-3, 0.0);
            assert_close(&format!("{what} lse (tensor cores)"), &l, &fwd[1], 5e-5, 1e-4);
            let tc = backward(&on, &p, &o, &l, true)?;
            for (name, g, w) in [
                ("dq", &tc[0], &bwd[0]),
                ("dk", &tc[1], &bwd[1]),
                ("dv", &tc[2], &bwd[2]),
            ] {
                let big = w.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                assert_close(&format!("{what} {name} (tensor cores)"), g, w, 1e-2 * big, 2e-2);
            }
            let again = backward(&on, &p, &o, &l, true)?;
            for (a, b) in tc.iter().zip(&again) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}: the tensor-core backward is not deterministic"
                );
            }
        }
        if let On::Cpu = on {
            let cu = cu_of(&p.lens);
            let (mut o2, mut l2) = (vec![0f32; o.len()], vec![0f32; l.len()]);
            let f = to_f32;
            cpu::flash_forward_tiled(&mut o2, &mut l2, &f(&p.q.1), &f(&p.k.1), &f(&p.v.1), &cu, p.s, 32)?;
            assert_close(&format!("{what} tiled out"), &o2, &fwd[0], 5e-5, 1e-4);
            assert_close(&format!("{what} tiled lse"), &l2, &fwd[1], 5e-5, 1e-4);
        }
        let grads = backward(&on, &p, &o, &l, false)?;
        let t = lens.iter().copied().max().unwrap_or(1) as f64;
        let atol = 2e-4 + 2e-6 * t * (h / hk) as f64;
        for (name, g, w) in [
            ("dq", &grads[0], &bwd[0]),
            ("dk", &grads[1], &bwd[1]),
            ("dv", &grads[2], &bwd[2]),
        ] {
            assert_close(&format!("{what} {name}"), g, w, atol, 1e-3);
        }
        let again = backward(&on, &p, &o, &l, false)?;
        for (a, b) in grads.iter().zip(&again) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: the backward is not deterministic"
            );
        }
    }
    Ok(())
}

twin_tests!(check_flash_varlen, flash_varlen_cpu, flash_varlen_cuda);

/// 8192 tokens in one sequence (plus a short one after it), one head of
/// width 16: the forward against the blockwise f64 reference
/// (`flash_forward_tiled`, 256-key tiles), and the backward against the f64
/// twin. Errors grow with the number of keys summed: for 8k keys the f32
/// sums of |p v| <= 1 terms stay near sqrt(8192) 2^-24 ~ 5e-6 (and below
/// 8192 2^-24 ~ 5e-4 at worst), so `atol 2e-4` for out and lse; the
/// gradients' sums are over 8k rows of terms ~1/i: `atol 1e-3, rtol 1e-3`.
fn check_flash_long(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let p = Problem::new(77, &[long_len(&on), 100], 1, 1, 16, 16);
    let cu = cu_of(&p.lens);
    let total = p.total();
    let (mut o, mut l) = (vec![0.0; total * 16], vec![0.0; total]);
    cpu::flash_forward_tiled(&mut o, &mut l, &p.q.1, &p.k.1, &p.v.1, &cu, p.s, 256)?;
    let [go, gl] = forward(&on, &p, false)?;
    assert_close("flash 8k out", &go, &o, 2e-4, 1e-3);
    assert_close("flash 8k lse", &gl, &l, 2e-4, 1e-4);
    let (mut a, mut b, mut c) = (vec![0.0; total * 16], vec![0.0; total * 16], vec![0.0; total * 16]);
    cpu::flash_backward(
        &mut a, &mut b, &mut c, &p.dout, &p.q.1, &p.k.1, &p.v.1, &o, &l, &cu, p.s,
    )?;
    let grads = backward(&on, &p, &go, &gl, false)?;
    for (name, g, w) in [("dq", &grads[0], &a), ("dk", &grads[1], &b), ("dv", &grads[2], &c)] {
        assert_close(&format!("flash 8k {name}"), g, w, 1e-3, 1e-3);
    }
    Ok(())
}

twin_tests!(check_flash_long, flash_long_cpu, flash_long_cuda);

/// The tensor-core forward at 8k tokens (a sequence of 8192 and one of 100,
/// 2 query heads on one key/value head, d 128) against the f64 twin;
/// the CPU's variant checks the f32 twin at the same shape. Tolerances as in
/// `check_flash_varlen`, lse over 8k keys as in `check_flash_long`.
fn check_flash_long_tensor_cores(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let p = Problem::new(99, &[long_len(&on), 100], 2, 1, 128, 128);
    let cu = cu_of(&p.lens);
    let total = p.total();
    let (mut o, mut l) = (vec![0.0; total * 2 * 128], vec![0.0; 2 * total]);
    cpu::flash_forward(&mut o, &mut l, &p.q.1, &p.k.1, &p.v.1, &cu, p.s)?;
    let [go, gl] = forward(&on, &p, true)?;
    let atol = if let On::Gpu(_) = on { 4e-3 } else { 2e-4 };
    assert_close("flash 8k d128 out (tensor cores)", &go, &o, atol, 0.0);
    assert_close("flash 8k d128 lse (tensor cores)", &gl, &l, 2e-4, 1e-4);
    Ok(())
}

twin_tests!(
    check_flash_long_tensor_cores,
    flash_long_tensor_cores_cpu,
    flash_long_tensor_cores_cuda
);

/// Paged decode: sequences of various context lengths with 1 to 3 new
/// tokens each, their keys and values scattered over a shuffled block pool;
/// the result must equal the last rows of the full causal attention (f64
/// twin), for one split, the automatic split count and explicit ones.
/// (context lengths, new tokens, H, Hk, Dk, Dv, block size).
type DecodeCase = (&'static [usize], &'static [usize], usize, usize, usize, usize, usize);

fn check_flash_decode(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let cases: [DecodeCase; 4] = [
        (&[1, 37, 300, 1000], &[1, 2, 1, 3], 8, 2, 64, 64, 16),
        (&[200, 64], &[1, 1], 4, 4, 128, 128, 32),
        (&[130, 513], &[2, 1], 4, 1, 192, 128, 16),
        (&[5, 90], &[3, 1], 6, 3, 24, 8, 8),
    ];
    let mut rng = StdRng::seed_from_u64(5);
    for (ci, &(ctxs, news, h, hk, dk, dv, bs)) in cases.iter().enumerate() {
        let seed = 12_000 + 100 * ci as u64;
        let nseq = ctxs.len();
        let max_blocks = ctxs.iter().map(|c| c.div_ceil(bs)).max().unwrap_or(1) + 1;
        let num_blocks = nseq * max_blocks + 3;
        let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
        pool.shuffle(&mut rng);
        let tables: Vec<u32> = pool[..nseq * max_blocks].to_vec();
        let (mut kc16, mut kc) = (
            vec![0u16; num_blocks * bs * hk * dk],
            vec![0.0; num_blocks * bs * hk * dk],
        );
        let (mut vc16, mut vc) = (
            vec![0u16; num_blocks * bs * hk * dv],
            vec![0.0; num_blocks * bs * hk * dv],
        );
        let q_cu = cu_of(news);
        let total_q = q_cu[nseq];
        let (mut q16, mut q) = (vec![0u16; total_q * h * dk], vec![0.0; total_q * h * dk]);
        let (mut want_o, mut want_l) = (vec![0.0; total_q * h * dv], vec![0.0; h * total_q]);
        for si in 0..nseq {
            // The whole sequence, contiguous, and its f64 causal attention.
            let p = Problem::new(seed + 10 * si as u64, &[ctxs[si]], h, hk, dk, dv);
            let (ctx, n) = (ctxs[si], news[si]);
            let (mut o, mut l) = (vec![0.0; ctx * h * dv], vec![0.0; h * ctx]);
            cpu::flash_forward(&mut o, &mut l, &p.q.1, &p.k.1, &p.v.1, &[0, ctx], p.s)?;
            for pos in 0..ctx {
                let b = tables[si * max_blocks + pos / bs] as usize;
                let slot = b * bs + pos % bs;
                let (kr, vr) = (
                    slot * hk * dk..(slot + 1) * hk * dk,
                    slot * hk * dv..(slot + 1) * hk * dv,
                );
                kc16[kr.clone()].copy_from_slice(&p.k.0[pos * hk * dk..(pos + 1) * hk * dk]);
                kc[kr].copy_from_slice(&p.k.1[pos * hk * dk..(pos + 1) * hk * dk]);
                vc16[vr.clone()].copy_from_slice(&p.v.0[pos * hk * dv..(pos + 1) * hk * dv]);
                vc[vr].copy_from_slice(&p.v.1[pos * hk * dv..(pos + 1) * hk * dv]);
            }
            for t in 0..n {
                let (row, pos) = (q_cu[si] + t, ctx - n + t);
                let (qr, qs) = (row * h * dk..(row + 1) * h * dk, pos * h * dk..(pos + 1) * h * dk);
                q16[qr.clone()].copy_from_slice(&p.q.0[qs.clone()]);
                q[qr].copy_from_slice(&p.q.1[qs]);
                want_o[row * h * dv..(row + 1) * h * dv].copy_from_slice(&o[pos * h * dv..(pos + 1) * h * dv]);
                for hh in 0..h {
                    want_l[hh * total_q + row] = l[hh * ctx + pos];
                }
            }
        }
        let max_ctx = ctxs.iter().copied().max().unwrap_or(0);
        let s = FlashShape {
            h,
            hk,
            dk,
            dv,
            scale: 1.0 / (dk as f64).sqrt(),
        };
        for splits in [1usize, 0, 3, 7] {
            let g = PagedGeometry {
                total_q,
                nseq,
                max_ctx,
                block_size: bs,
                num_blocks,
                max_blocks,
                h,
                hk,
                dk,
                dv,
                scale: s.scale as f32,
                splits,
                shared_kv: false,
            };
            let [o, l] = match &on {
                On::Cpu => {
                    // The split the GPU would use.
                    let lens = [
                        q.len(),
                        kc.len(),
                        vc.len(),
                        tables.len(),
                        nseq,
                        nseq + 1,
                        want_o.len(),
                        want_l.len(),
                    ];
                    let plan = flash::plan_flash_decode(&g, lens)?.expect("work to do");
                    let shape = PagedShape {
                        block_size: bs,
                        max_blocks,
                        split_len: plan.split_len,
                    };
                    let (mut o, mut l) = (vec![0f32; want_o.len()], vec![0f32; want_l.len()]);
                    let f = to_f32;
                    cpu::flash_decode_paged(&mut o, &mut l, &f(&q), &f(&kc), &f(&vc), &tables, ctxs, &q_cu, shape, s)?;
                    [o, l]
                }
                On::Gpu(gpu) => {
                    let (qd, kd, vd) = (gpu.upload(&q16)?, gpu.upload(&kc16)?, gpu.upload(&vc16)?);
                    let td = gpu.upload(&tables.iter().map(|&b| b as i32).collect::<Vec<i32>>())?;
                    let (cd, qcd) = (gpu.upload(&i32s(ctxs))?, gpu.upload(&i32s(&q_cu))?);
                    let (mut o, mut l) = (gpu.zeros::<f32>(want_o.len())?, gpu.zeros::<f32>(want_l.len())?);
                    flash::flash_decode_bf16(gpu, &mut o, &mut l, &qd, &kd, &vd, &td, &cd, &qcd, &g)?;
                    [gpu.download(&o)?, gpu.download(&l)?]
                }
            };
            let what = format!("flash decode ctx {ctxs:?} new {news:?} h {h}/{hk} d {dk}/{dv} splits {splits}");
            assert_close(&format!("{what} out"), &o, &want_o, 5e-5, 1e-4);
            assert_close(&format!("{what} lse"), &l, &want_l, 5e-5, 1e-4);
        }
    }
    Ok(())
}

twin_tests!(check_flash_decode, flash_decode_cpu, flash_decode_cuda);

/// The paged-cache row scatter (`kv_write_bf16` / `kv_write_f32` against
/// `cpu::kv_write`): random rows into shuffled distinct slots of a pool
/// that starts filled with a sentinel, so a row written to the wrong slot,
/// a column off by one or a slot left untouched shows. Exact on both sides:
/// the same rounding (nearest even) of the same f32 values.
fn check_kv_write(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(77);
    // (pool slots, rows, width): one row, a decode batch, a prefill chunk
    // with a width that is no multiple of anything.
    for (ci, &(pool_rows, rows, w)) in [(8usize, 1usize, 64usize), (96, 40, 128), (300, 257, 37)]
        .iter()
        .enumerate()
    {
        let src = to_f32(&rand_vec(9_000 + ci as u64, rows * w, 4.0));
        let mut all: Vec<u32> = (0..pool_rows as u32).collect();
        all.shuffle(&mut rng);
        let slots = &all[..rows];
        let sentinel = -7.5f32;
        // The expected pool, built the other way round: per slot, the row
        // that targets it.
        let mut want = vec![sentinel; pool_rows * w];
        for s in 0..pool_rows {
            if let Some(r) = slots.iter().position(|&x| x as usize == s) {
                want[s * w..(s + 1) * w].copy_from_slice(&src[r * w..(r + 1) * w]);
            }
        }
        let want16: Vec<u16> = want.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let (got, got16) = match &on {
            On::Cpu => {
                let (mut p, mut p16) = (
                    vec![sentinel; pool_rows * w],
                    want16
                        .iter()
                        .map(|_| bf16::from_f32(sentinel).to_bits())
                        .collect::<Vec<u16>>(),
                );
                cpu::kv_write(&mut p, &src, slots, w, |x| x)?;
                cpu::kv_write(&mut p16, &src, slots, w, |x| bf16::from_f32(x).to_bits())?;
                (p, p16)
            }
            On::Gpu(gpu) => {
                let mut p = gpu.upload(&vec![sentinel; pool_rows * w])?;
                let mut p16 = gpu.upload(&vec![bf16::from_f32(sentinel).to_bits(); pool_rows * w])?;
                let s = gpu.upload(&src)?;
                let ks = aha_cuda_kernels::launch::KvSlots::new(gpu, slots)?;
                aha_cuda_kernels::launch::kv_write_f32(gpu, &mut p, &s, &ks, w)?;
                aha_cuda_kernels::launch::kv_write_bf16(gpu, &mut p16, &s, &ks, w)?;
                (gpu.download(&p)?, gpu.download(&p16)?)
            }
        };
        assert_eq!(got, want, "kv_write f32 pool {pool_rows} rows {rows} w {w}");
        assert_eq!(got16, want16, "kv_write bf16 pool {pool_rows} rows {rows} w {w}");
    }
    // Refused: a slot outside the pool, a slot written twice.
    let src = vec![1.0f32; 2 * 4];
    let bad = |slots: &[u32]| -> bool {
        match &on {
            On::Cpu => cpu::kv_write(&mut [0f32; 12], &src, slots, 4, |x| x).is_err(),
            On::Gpu(gpu) => {
                let (Ok(mut p), Ok(s)) = (gpu.upload(&[0f32; 12]), gpu.upload(&src)) else {
                    return false;
                };
                aha_cuda_kernels::launch::KvSlots::new(gpu, slots)
                    .and_then(|ks| aha_cuda_kernels::launch::kv_write_f32(gpu, &mut p, &s, &ks, 4))
                    .is_err()
            }
        }
    };
    assert!(bad(&[0, 3]) && bad(&[1, 1]) && !bad(&[2, 0]));
    Ok(())
}

twin_tests!(check_kv_write, kv_write_cpu, kv_write_cuda);

/// Paged decode over one shared key/value buffer (MLA's latent cache: each
/// cached entry serves as key and value), at DeepSeek-V3's entry width 576
/// (the `latent576` kernel) and at 320 (the same kernel, a width it pads),
/// against the twin in f64 with the same buffer passed twice. Scores are
/// dot products of up to 576 bf16 terms |q k| <= 1 over sqrt(576), so one
/// f32 score carries up to ~576 ulp of summation error (~4e-5 at |score|
/// ~1): `atol 1e-4, rtol 2e-4`; a wrong column stride or tile moves values
/// by 1e-2.
fn check_flash_decode_latent(dev: Device) -> Result<()> {
    let on = on(dev)?;
    let mut rng = StdRng::seed_from_u64(11);
    for (ci, &(ctxs, news, h, d, bs)) in [
        (&[70usize, 5][..], &[1usize, 3][..], 8usize, 576usize, 16usize),
        (&[33, 1, 40][..], &[2, 1, 1][..], 4, 320, 8),
    ]
    .iter()
    .enumerate()
    {
        let nseq = ctxs.len();
        let max_blocks = ctxs.iter().map(|c| c.div_ceil(bs)).max().unwrap_or(1);
        let num_blocks = nseq * max_blocks + 2;
        let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
        pool.shuffle(&mut rng);
        let tables: Vec<u32> = pool[..nseq * max_blocks].to_vec();
        let (c16, c) = rand_bf16(30_000 + ci as u64, num_blocks * bs * d, 1.0);
        let q_cu = cu_of(news);
        let total_q = q_cu[nseq];
        let (q16, q) = rand_bf16(31_000 + ci as u64, total_q * h * d, 1.0);
        let s = FlashShape {
            h,
            hk: 1,
            dk: d,
            dv: d,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let g = PagedGeometry {
            total_q,
            nseq,
            max_ctx: ctxs.iter().copied().max().unwrap_or(0),
            block_size: bs,
            num_blocks,
            max_blocks,
            h,
            hk: 1,
            dk: d,
            dv: d,
            scale: s.scale as f32,
            splits: 0,
            shared_kv: true,
        };
        let lens = [
            q.len(),
            c.len(),
            c.len(),
            tables.len(),
            nseq,
            nseq + 1,
            total_q * h * d,
            h * total_q,
        ];
        let plan = flash::plan_flash_decode(&g, lens)?.expect("work to do");
        let shape = PagedShape {
            block_size: bs,
            max_blocks,
            split_len: plan.split_len,
        };
        let (mut want_o, mut want_l) = (vec![0.0f64; total_q * h * d], vec![0.0f64; h * total_q]);
        cpu::flash_decode_paged(&mut want_o, &mut want_l, &q, &c, &c, &tables, ctxs, &q_cu, shape, s)?;
        let [o, l] = match &on {
            On::Cpu => {
                let (mut o, mut l) = (vec![0f32; want_o.len()], vec![0f32; want_l.len()]);
                let (qf, cf) = (to_f32(&q), to_f32(&c));
                cpu::flash_decode_paged(&mut o, &mut l, &qf, &cf, &cf, &tables, ctxs, &q_cu, shape, s)?;
                [o, l]
            }
            On::Gpu(gpu) => {
                let (qd, cd) = (gpu.upload(&q16)?, gpu.upload(&c16)?);
                let td = gpu.upload(&tables.iter().map(|&b| b as i32).collect::<Vec<i32>>())?;
                let (xd, qcd) = (gpu.upload(&i32s(ctxs))?, gpu.upload(&i32s(&q_cu))?);
                let (mut o, mut l) = (gpu.zeros::<f32>(want_o.len())?, gpu.zeros::<f32>(want_l.len())?);
                flash::flash_decode_bf16(gpu, &mut o, &mut l, &qd, &cd, &cd, &td, &xd, &qcd, &g)?;
                // Two buffers with the same contents are refused: the
                // kernel reads the values from the key tile.
                let other = gpu.upload(&c16)?;
                assert!(flash::flash_decode_bf16(gpu, &mut o, &mut l, &qd, &cd, &other, &td, &xd, &qcd, &g).is_err());
                [gpu.download(&o)?, gpu.download(&l)?]
            }
        };
        let what = format!("latent decode ctx {ctxs:?} new {news:?} h {h} d {d}");
        assert_close(&format!("{what} out"), &o, &want_o, 1e-4, 2e-4);
        assert_close(&format!("{what} lse"), &l, &want_l, 1e-4, 2e-4);
    }
    Ok(())
}

twin_tests!(
    check_flash_decode_latent,
    flash_decode_latent_cpu,
    flash_decode_latent_cuda
);
