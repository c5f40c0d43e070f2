//! Every CPU kernel (f32) against a naive f64 reference on random shapes,
//! plus the invariants: softmax rows sum to 1, log-softmax <= 0, top-k gives
//! k distinct indices in descending order of value.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

mod common;

use aha_tensor::cpu::{self, AttnShape, Gemm, RopeLayout, RopeShape};
use common::{assert_close, rand_ids, rand_vec, to_f32};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    }
}

fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn naive_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn matmul_matches_naive(m in 1usize..70, k in 1usize..70, n in 1usize..70, batch in 1usize..4,
                            ta: bool, tb: bool, acc: bool, seed: u64) {
        let a = rand_vec(seed, batch * m * k, 1.0);
        let b = rand_vec(seed + 1, batch * k * n, 1.0);
        let init = rand_vec(seed + 2, batch * m * n, 1.0);
        let mut out = to_f32(&init);
        let mut g = Gemm::new(m, k, n);
        g.trans_a = ta;
        g.trans_b = tb;
        g.accumulate = acc;
        cpu::matmul_batched(&mut out, &to_f32(&a), &to_f32(&b), batch, g).unwrap();
        let mut want = Vec::new();
        for i in 0..batch {
            let w = naive_matmul(&a[i*m*k..(i+1)*m*k], &b[i*k*n..(i+1)*k*n], m, k, n, ta, tb);
            for (j, v) in w.into_iter().enumerate() {
                want.push(if acc { v + init[i*m*n + j] } else { v });
            }
        }
        // f32 inputs rounded from f64 plus f32 accumulation over k terms of size <= 1.
        assert_close("matmul", &out, &want, 1e-5 * k as f64, 1e-5);
    }

    #[test]
    fn rmsnorm_matches_naive(rows in 1usize..20, c in 1usize..300, seed: u64) {
        let x = rand_vec(seed, rows * c, 2.0);
        let w = rand_vec(seed + 1, c, 1.5);
        let eps = 1e-6;
        let (mut out, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows]);
        cpu::rmsnorm_forward(&mut out, &mut rstd, &to_f32(&x), &to_f32(&w), rows, c, eps as f32).unwrap();
        let mut want = Vec::new();
        let mut want_r = Vec::new();
        for r in 0..rows {
            let row = &x[r*c..(r+1)*c];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
            let s = 1.0 / (ms + eps).sqrt();
            want_r.push(s);
            want.extend(row.iter().zip(&w).map(|(v, wi)| v * s * wi));
        }
        assert_close("rmsnorm out", &out, &want, 1e-5, 1e-5);
        assert_close("rmsnorm rstd", &rstd, &want_r, 1e-5, 1e-5);
    }

    #[test]
    fn rope_matches_naive(n in 1usize..12, heads in 1usize..4, half_rot in 1usize..9, extra in 0usize..5,
                          interleaved: bool, seed: u64) {
        let rot = 2 * half_rot;
        let d = rot + extra;
        let off = extra / 2;
        let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::Half };
        let s = RopeShape { heads, head_dim: d, rot_offset: off, rot_dim: rot, layout };
        let theta = 10000.0;
        let max_pos = 40;
        let (cos, sin) = cpu::rope_table::<f32>(theta, rot, max_pos);
        let pos = rand_ids(seed, n, max_pos);
        let x = rand_vec(seed, n * heads * d, 1.0);
        let mut out = vec![0f32; x.len()];
        cpu::rope_forward(&mut out, &to_f32(&x), &cos, &sin, &pos, s).unwrap();
        let mut want = x.clone();
        for t in 0..n {
            for h in 0..heads {
                let base = (t * heads + h) * d + off;
                for i in 0..half_rot {
                    let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half_rot) };
                    let ang = pos[t] as f64 / theta.powf(2.0 * i as f64 / rot as f64);
                    let (xa, xb) = (x[base + a], x[base + b]);
                    want[base + a] = xa * ang.cos() - xb * ang.sin();
                    want[base + b] = xb * ang.cos() + xa * ang.sin();
                }
            }
        }
        assert_close("rope", &out, &want, 2e-6, 1e-5);
    }

    #[test]
    fn softmax_and_log_softmax_match_naive(rows in 1usize..10, c in 1usize..500, seed: u64) {
        let x = rand_vec(seed, rows * c, 8.0);
        let (mut p, mut lp) = (vec![0f32; rows * c], vec![0f32; rows * c]);
        cpu::softmax_forward(&mut p, &to_f32(&x), rows, c).unwrap();
        cpu::log_softmax_forward(&mut lp, &to_f32(&x), rows, c).unwrap();
        let mut want = Vec::new();
        for r in 0..rows {
            want.extend(naive_softmax(&x[r*c..(r+1)*c]));
        }
        let want_log: Vec<f64> = want.iter().map(|v| v.ln()).collect();
        assert_close("softmax", &p, &want, 1e-6, 1e-5);
        assert_close("log_softmax", &lp, &want_log, 1e-5, 1e-5);
        for r in 0..rows {
            let s: f64 = p[r*c..(r+1)*c].iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() < 1e-5, "softmax row {} sums to {}", r, s);
        }
        prop_assert!(lp.iter().all(|&v| v <= 0.0), "log_softmax has a positive value");
    }

    #[test]
    fn silu_swiglu_match_naive(n in 1usize..2000, seed: u64) {
        let g = rand_vec(seed, n, 6.0);
        let u = rand_vec(seed + 1, n, 2.0);
        let (mut s, mut y) = (vec![0f32; n], vec![0f32; n]);
        cpu::silu(&mut s, &to_f32(&g)).unwrap();
        cpu::swiglu(&mut y, &to_f32(&g), &to_f32(&u)).unwrap();
        let silu: Vec<f64> = g.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
        let sw: Vec<f64> = silu.iter().zip(&u).map(|(a, b)| a * b).collect();
        assert_close("silu", &s, &silu, 1e-6, 1e-5);
        assert_close("swiglu", &y, &sw, 1e-6, 1e-5);
    }

    #[test]
    fn elementwise_match_naive(n in 1usize..3000, seed: u64) {
        let a = rand_vec(seed, n, 3.0);
        let b = rand_vec(seed + 1, n, 3.0);
        let (af, bf) = (to_f32(&a), to_f32(&b));
        let (mut s, mut p, mut k) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        cpu::add(&mut s, &af, &bf).unwrap();
        cpu::mul(&mut p, &af, &bf).unwrap();
        cpu::scale(&mut k, &af, 0.37).unwrap();
        let want_s: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let want_p: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
        let want_k: Vec<f64> = a.iter().map(|x| 0.37 * x).collect();
        assert_close("add", &s, &want_s, 1e-6, 1e-6);
        assert_close("mul", &p, &want_p, 1e-6, 1e-6);
        assert_close("scale", &k, &want_k, 1e-6, 1e-6);
        let mut acc = af.clone();
        cpu::add_inplace(&mut acc, &bf).unwrap();
        assert_close("add_inplace", &acc, &want_s, 1e-6, 1e-6);
    }

    #[test]
    fn embedding_matches_naive(v in 1usize..50, c in 1usize..40, n in 0usize..30, seed: u64) {
        let table = rand_vec(seed, v * c, 1.0);
        let ids = rand_ids(seed, n, v);
        let mut out = vec![0f32; n * c];
        cpu::embedding_forward(&mut out, &to_f32(&table), &ids, v, c).unwrap();
        let want: Vec<f64> = ids.iter().flat_map(|&i| table[i as usize * c..(i as usize + 1) * c].to_vec()).collect();
        assert_close("embedding", &out, &want, 0.0, 1e-7);
        // Backward: a scatter-add, including repeated ids.
        let dout = rand_vec(seed + 3, n * c, 1.0);
        let mut dt = vec![0f32; v * c];
        cpu::embedding_backward(&mut dt, &to_f32(&dout), &ids, v, c).unwrap();
        let mut want_dt = vec![0.0; v * c];
        for (r, &i) in ids.iter().enumerate() {
            for j in 0..c {
                want_dt[i as usize * c + j] += dout[r * c + j];
            }
        }
        assert_close("embedding_backward", &dt, &want_dt, 1e-6, 1e-6);
    }

    #[test]
    fn attention_matches_naive(b in 1usize..3, t in 1usize..80, hk in 1usize..3, group in 1usize..3,
                               dk in 1usize..20, dv in 1usize..20, seed: u64) {
        let h = hk * group;
        let s = AttnShape { b, t, h, hk, dk, dv, scale: 1.0 / (dk as f64).sqrt() };
        let q = rand_vec(seed, b * t * h * dk, 1.5);
        let k = rand_vec(seed + 1, b * t * hk * dk, 1.5);
        let v = rand_vec(seed + 2, b * t * hk * dv, 1.0);
        let mut out = vec![0f32; b * t * h * dv];
        let mut lse = vec![0f32; b * h * t];
        cpu::attention_forward(&mut out, &mut lse, &to_f32(&q), &to_f32(&k), &to_f32(&v), s).unwrap();
        let mut want = vec![0.0; out.len()];
        let mut want_lse = vec![0.0; lse.len()];
        for bi in 0..b {
            for hi in 0..h {
                let kh = hi / group;
                for i in 0..t {
                    let qi = &q[((bi * t + i) * h + hi) * dk..][..dk];
                    let scores: Vec<f64> = (0..=i).map(|j| {
                        let kj = &k[((bi * t + j) * hk + kh) * dk..][..dk];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * s.scale
                    }).collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    want_lse[(bi * h + hi) * t + i] = m + z.ln();
                    for (j, sc) in scores.iter().enumerate() {
                        let p = (sc - m).exp() / z;
                        let vj = &v[((bi * t + j) * hk + kh) * dv..][..dv];
                        for d in 0..dv {
                            want[((bi * t + i) * h + hi) * dv + d] += p * vj[d];
                        }
                    }
                }
            }
        }
        assert_close("attention out", &out, &want, 1e-5, 1e-4);
        assert_close("attention lse", &lse, &want_lse, 1e-5, 1e-5);
    }

    #[test]
    fn token_logprob_matches_naive(n in 1usize..20, v in 1usize..600, seed: u64) {
        let logits = rand_vec(seed, n * v, 10.0);
        let targets = rand_ids(seed, n, v);
        let (mut lp, mut lse) = (vec![0f32; n], vec![0f32; n]);
        cpu::token_logprob_forward(&mut lp, &mut lse, &to_f32(&logits), &targets, v).unwrap();
        let mut want = Vec::new();
        for r in 0..n {
            let p = naive_softmax(&logits[r*v..(r+1)*v]);
            want.push(p[targets[r] as usize].ln());
        }
        assert_close("token_logprob", &lp, &want, 1e-5, 1e-5);
        prop_assert!(lp.iter().all(|&x| x <= 0.0));
    }

    #[test]
    fn topk_matches_sort(rows in 1usize..8, c in 1usize..100, kfrac in 0.0f64..1.0, ties: bool, seed: u64) {
        let k = ((c as f64 * kfrac) as usize).clamp(1, c);
        let mut x = rand_vec(seed, rows * c, 1.0);
        if ties {
            for v in x.iter_mut() { *v = (*v * 4.0).round(); }
        }
        let xf = to_f32(&x);
        let (mut vals, mut idx) = (vec![0f32; rows * k], vec![0u32; rows * k]);
        cpu::topk(&mut vals, &mut idx, &xf, rows, c, k).unwrap();
        for r in 0..rows {
            let row = &xf[r*c..(r+1)*c];
            let mut order: Vec<usize> = (0..c).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let got: Vec<usize> = idx[r*k..(r+1)*k].iter().map(|&i| i as usize).collect();
            prop_assert_eq!(&got[..], &order[..k]);
            let mut seen = got.clone();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), k, "indices not distinct");
            for j in 1..k {
                prop_assert!(vals[r*k + j - 1] >= vals[r*k + j], "values not descending");
            }
        }
    }

    #[test]
    fn adamw_matches_pytorch_formula(n in 1usize..5000, steps in 1u64..5, seed: u64) {
        let h = cpu::AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut p = rand_vec(seed, n, 1.0);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut pf = to_f32(&p);
        let (mut mf, mut vf) = (vec![0f32; n], vec![0f32; n]);
        for t in 1..=steps {
            let g = rand_vec(seed + t, n, 1.0);
            cpu::adamw_step(&mut pf, &to_f32(&g), &mut mf, &mut vf, &h, t).unwrap();
            for i in 0..n {
                // torch.optim.AdamW, written out step by step.
                p[i] *= 1.0 - h.lr * h.weight_decay;
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
                let mh = m[i] / (1.0 - h.beta1.powi(t as i32));
                let vh = v[i] / (1.0 - h.beta2.powi(t as i32));
                p[i] -= h.lr * mh / (vh.sqrt() + h.eps);
            }
        }
        assert_close("adamw params", &pf, &p, 1e-5, 1e-5);
    }

    #[test]
    fn clip_grad_norm_matches_naive(n in 1usize..5000, max_norm in 0.1f64..50.0, seed: u64) {
        let g = rand_vec(seed, n, 1.0);
        let norm: f64 = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut gf = to_f32(&g);
        let got = cpu::clip_grad_norm(&mut gf, max_norm);
        prop_assert!((got - norm).abs() <= 1e-5 * norm);
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        let want: Vec<f64> = g.iter().map(|x| x * coef).collect();
        assert_close("clipped grads", &gf, &want, 1e-6, 1e-5);
        prop_assert!(cpu::global_norm(&gf) <= max_norm * (1.0 + 1e-5) || coef == 1.0);
    }
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let mut out = vec![0f32; 4];
    assert!(cpu::matmul(&mut out, &[1.0; 4], &[1.0; 3], Gemm::new(2, 2, 2)).is_err());
    let mut o = vec![0f32; 2];
    let err = cpu::embedding_forward(&mut o, &[0.0; 4], &[7], 2, 2).unwrap_err();
    assert!(err.to_string().contains("index 7"), "{err}");
    let (mut v, mut i) = (vec![0f32; 3], vec![0u32; 3]);
    assert!(cpu::topk(&mut v, &mut i, &[1.0, 2.0], 1, 2, 3).is_err());
    let (mut lp, mut lse) = (vec![0f32; 1], vec![0f32; 1]);
    assert!(cpu::token_logprob_forward(&mut lp, &mut lse, &[0.0; 4], &[4], 4).is_err());
    let s = AttnShape {
        b: 1,
        t: 2,
        h: 3,
        hk: 2,
        dk: 1,
        dv: 1,
        scale: 1.0,
    };
    let mut out = vec![0f32; 6];
    let mut lse = vec![0f32; 6];
    assert!(cpu::attention_forward(&mut out, &mut lse, &[0.0; 6], &[0.0; 4], &[0.0; 4], s).is_err());
}
