//! Every backward, run in f64, against central finite differences of its own
//! forward, on random shapes. The loss is `sum(out * r)` for a random `r`, so
//! `dout = r`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_tensor::cpu::{self, AttnShape, Gemm, RopeLayout, RopeShape};
use common::{dot, fd_check, rand_ids, rand_vec};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn matmul_backward(m in 1usize..9, k in 1usize..9, n in 1usize..9, ta: bool, tb: bool, seed: u64) {
        let a = rand_vec(seed, m * k, 1.0);
        let b = rand_vec(seed + 1, k * n, 1.0);
        let r = rand_vec(seed + 2, m * n, 1.0);
        let g = |ta_, tb_| { let mut g = Gemm::new(m, k, n); g.trans_a = ta_; g.trans_b = tb_; g };
        let fwd = |a: &[f64], b: &[f64]| { let mut o = vec![0.0; m * n]; cpu::matmul(&mut o, a, b, g(ta, tb)).unwrap(); dot(&o, &r) };
        // dA = dOut B^T (stored as A is), dB = A^T dOut.
        let mut da = vec![0.0; m * k];
        if ta {
            // A stored [k, m]: dA_stored = B dOut^T, i.e. [k,n] x [n,m]
            let mut gg = Gemm::new(k, n, m); gg.trans_a = tb; gg.trans_b = true;
            cpu::matmul(&mut da, &b, &r, gg).unwrap();
        } else {
            let mut gg = Gemm::new(m, n, k); gg.trans_b = !tb;
            cpu::matmul(&mut da, &r, &b, gg).unwrap();
        }
        let mut db = vec![0.0; k * n];
        if tb {
            // B stored [n, k]: dB_stored = dOut^T A, [n,m] x [m,k]
            let mut gg = Gemm::new(n, m, k); gg.trans_a = true; gg.trans_b = ta;
            cpu::matmul(&mut db, &r, &a, gg).unwrap();
        } else {
            let mut gg = Gemm::new(k, m, n); gg.trans_a = !ta;
            cpu::matmul(&mut db, &a, &r, gg).unwrap();
        }
        fd_check("matmul dA", &a, &da, |x| fwd(x, &b));
        fd_check("matmul dB", &b, &db, |x| fwd(&a, x));
    }

    #[test]
    fn rmsnorm_backward(rows in 1usize..6, c in 1usize..40, seed: u64) {
        let x = rand_vec(seed, rows * c, 2.0);
        let w = rand_vec(seed + 1, c, 1.5);
        let r = rand_vec(seed + 2, rows * c, 1.0);
        let eps = 1e-5;
        let fwd = |x: &[f64], w: &[f64]| {
            let (mut o, mut s) = (vec![0.0; rows * c], vec![0.0; rows]);
            cpu::rmsnorm_forward(&mut o, &mut s, x, w, rows, c, eps).unwrap();
            (dot(&o, &r), s)
        };
        let (_, rstd) = fwd(&x, &w);
        let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.5; c]);
        cpu::rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rstd, rows, c).unwrap();
        // dweight accumulates onto what was there (0.5).
        let dw: Vec<f64> = dw.iter().map(|v| v - 0.5).collect();
        fd_check("rmsnorm dinp", &x, &dx, |x| fwd(x, &w).0);
        fd_check("rmsnorm dweight", &w, &dw, |w| fwd(&x, w).0);
    }

    #[test]
    fn rope_backward(n in 1usize..6, heads in 1usize..3, half_rot in 1usize..5, extra in 0usize..3, interleaved: bool, seed: u64) {
        let rot = 2 * half_rot;
        let d = rot + extra;
        let s = RopeShape { heads, head_dim: d, rot_offset: extra, rot_dim: rot,
                            layout: if interleaved { RopeLayout::Interleaved } else { RopeLayout::Half } };
        let (cos, sin) = cpu::rope_table::<f64>(10000.0, rot, 64);
        let pos = rand_ids(seed, n, 64);
        let x = rand_vec(seed, n * heads * d, 1.0);
        let r = rand_vec(seed + 1, x.len(), 1.0);
        let mut dx = vec![0.0; x.len()];
        cpu::rope_backward(&mut dx, &r, &cos, &sin, &pos, s).unwrap();
        fd_check("rope dinp", &x, &dx, |x| {
            let mut o = vec![0.0; x.len()];
            cpu::rope_forward(&mut o, x, &cos, &sin, &pos, s).unwrap();
            dot(&o, &r)
        });
    }

    #[test]
    fn softmax_log_softmax_backward(rows in 1usize..5, c in 1usize..30, seed: u64) {
        let x = rand_vec(seed, rows * c, 3.0);
        let r = rand_vec(seed + 1, rows * c, 1.0);
        type Fwd = fn(&mut [f64], &[f64], usize, usize) -> aha_tensor::Result<()>;
        type Bwd = fn(&mut [f64], &[f64], &[f64], usize, usize) -> aha_tensor::Result<()>;
        let pairs: [(&str, Fwd, Bwd); 2] = [
            ("softmax", cpu::softmax_forward, cpu::softmax_backward),
            ("log_softmax", cpu::log_softmax_forward, cpu::log_softmax_backward),
        ];
        for (name, f, b) in pairs {
            let mut out = vec![0.0; x.len()];
            f(&mut out, &x, rows, c).unwrap();
            let mut dx = vec![0.0; x.len()];
            b(&mut dx, &r, &out, rows, c).unwrap();
            fd_check(name, &x, &dx, |x| { let mut o = vec![0.0; x.len()]; f(&mut o, x, rows, c).unwrap(); dot(&o, &r) });
        }
    }

    #[test]
    fn silu_swiglu_mul_scale_add_backward(n in 1usize..50, seed: u64) {
        let a = rand_vec(seed, n, 4.0);
        let b = rand_vec(seed + 1, n, 2.0);
        let r = rand_vec(seed + 2, n, 1.0);
        let mut dx = vec![0.0; n];
        cpu::silu_backward(&mut dx, &r, &a).unwrap();
        fd_check("silu", &a, &dx, |x| { let mut o = vec![0.0; n]; cpu::silu(&mut o, x).unwrap(); dot(&o, &r) });

        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        cpu::swiglu_backward(&mut dg, &mut du, &r, &a, &b).unwrap();
        let sw = |g: &[f64], u: &[f64]| { let mut o = vec![0.0; n]; cpu::swiglu(&mut o, g, u).unwrap(); dot(&o, &r) };
        fd_check("swiglu dgate", &a, &dg, |x| sw(x, &b));
        fd_check("swiglu dup", &b, &du, |x| sw(&a, x));

        let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
        cpu::mul_backward(&mut da, &mut db, &r, &a, &b).unwrap();
        let ml = |x: &[f64], y: &[f64]| { let mut o = vec![0.0; n]; cpu::mul(&mut o, x, y).unwrap(); dot(&o, &r) };
        fd_check("mul da", &a, &da, |x| ml(x, &b));
        fd_check("mul db", &b, &db, |x| ml(&a, x));

        let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
        cpu::add_backward(&mut da, &mut db, &r).unwrap();
        let ad = |x: &[f64], y: &[f64]| { let mut o = vec![0.0; n]; cpu::add(&mut o, x, y).unwrap(); dot(&o, &r) };
        fd_check("add da", &a, &da, |x| ad(x, &b));
        fd_check("add db", &b, &db, |x| ad(&a, x));

        let mut da = vec![0.0; n];
        cpu::scale_backward(&mut da, &r, -1.7).unwrap();
        fd_check("scale", &a, &da, |x| { let mut o = vec![0.0; n]; cpu::scale(&mut o, x, -1.7).unwrap(); dot(&o, &r) });
    }

    #[test]
    fn embedding_backward(v in 1usize..12, c in 1usize..8, n in 1usize..12, seed: u64) {
        let table = rand_vec(seed, v * c, 1.0);
        let ids = rand_ids(seed, n, v);
        let r = rand_vec(seed + 1, n * c, 1.0);
        let mut dt = vec![0.0; v * c];
        cpu::embedding_backward(&mut dt, &r, &ids, v, c).unwrap();
        fd_check("embedding dtable", &table, &dt, |t| {
            let mut o = vec![0.0; n * c];
            cpu::embedding_forward(&mut o, t, &ids, v, c).unwrap();
            dot(&o, &r)
        });
    }

    #[test]
    fn attention_backward(b in 1usize..3, t in 1usize..9, hk in 1usize..3, group in 1usize..3,
                          dk in 1usize..6, dv in 1usize..6, seed: u64) {
        let h = hk * group;
        let s = AttnShape { b, t, h, hk, dk, dv, scale: 0.7 };
        let q = rand_vec(seed, b * t * h * dk, 1.0);
        let k = rand_vec(seed + 1, b * t * hk * dk, 1.0);
        let v = rand_vec(seed + 2, b * t * hk * dv, 1.0);
        let r = rand_vec(seed + 3, b * t * h * dv, 1.0);
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let (mut o, mut l) = (vec![0.0; b * t * h * dv], vec![0.0; b * h * t]);
            cpu::attention_forward(&mut o, &mut l, q, k, v, s).unwrap();
            (o, l)
        };
        let (out, lse) = fwd(&q, &k, &v);
        let (mut dq, mut dkk, mut dvv) = (vec![9.0; q.len()], vec![9.0; k.len()], vec![9.0; v.len()]);
        cpu::attention_backward(&mut dq, &mut dkk, &mut dvv, &r, &q, &k, &v, &out, &lse, s).unwrap();
        fd_check("attention dq", &q, &dq, |x| dot(&fwd(x, &k, &v).0, &r));
        fd_check("attention dk", &k, &dkk, |x| dot(&fwd(&q, x, &v).0, &r));
        fd_check("attention dv", &v, &dvv, |x| dot(&fwd(&q, &k, x).0, &r));
    }

    #[test]
    fn token_logprob_backward(n in 1usize..6, v in 1usize..40, seed: u64) {
        let logits = rand_vec(seed, n * v, 4.0);
        let targets = rand_ids(seed, n, v);
        let r = rand_vec(seed + 1, n, 1.0);
        let fwd = |x: &[f64]| {
            let (mut lp, mut lse) = (vec![0.0; n], vec![0.0; n]);
            cpu::token_logprob_forward(&mut lp, &mut lse, x, &targets, v).unwrap();
            (lp, lse)
        };
        let (_, lse) = fwd(&logits);
        let mut dl = vec![0.0; n * v];
        cpu::token_logprob_backward(&mut dl, &r, &logits, &lse, &targets, v).unwrap();
        fd_check("token_logprob dlogits", &logits, &dl, |x| dot(&fwd(x).0, &r));
    }

    #[test]
    fn topk_backward(rows in 1usize..5, c in 1usize..20, seed: u64) {
        let k = 1 + (seed as usize % c);
        // Distinct values, so the selection is stable under small perturbations.
        let x: Vec<f64> = rand_vec(seed, rows * c, 1.0).iter().enumerate().map(|(i, v)| v + i as f64 * 1e-3).collect();
        let r = rand_vec(seed + 1, rows * k, 1.0);
        let fwd = |x: &[f64]| {
            let (mut vals, mut idx) = (vec![0.0; rows * k], vec![0u32; rows * k]);
            cpu::topk(&mut vals, &mut idx, x, rows, c, k).unwrap();
            (vals, idx)
        };
        let (_, idx) = fwd(&x);
        let mut dx = vec![0.0; rows * c];
        cpu::topk_backward(&mut dx, &r, &idx, rows, c, k).unwrap();
        fd_check("topk dinp", &x, &dx, |x| dot(&fwd(x).0, &r));
    }
}
