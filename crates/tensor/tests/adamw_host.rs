//! The host AdamW kernel of the offloaded optimizer
//! (`aha_tensor::cpu::adamw_step_f32`: eight-lane groups over rayon chunks,
//! the clipping coefficient folded in) against the reference
//! `aha_tensor::cpu::adamw_step` with the gradient scaled beforehand, on
//! random sizes (tails shorter than a lane group and longer than a rayon
//! chunk included), random values and random steps. Both evaluate the same
//! f32 expression in the same order, so the results must be identical bits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_tensor::cpu::{adamw_step, adamw_step_f32, AdamW, AdamwConsts};
use proptest::prelude::*;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn check(n: usize, seed: u64, t: u64, scale: f32, wd: f64) {
    let h = AdamW {
        lr: 3e-3,
        weight_decay: wd,
        ..AdamW::default()
    };
    let p0 = values(n, seed, 1.0);
    let g = values(n, seed ^ 0x9e37, 0.5);
    let m0 = values(n, seed ^ 0x51, 0.01);
    let v0: Vec<f32> = values(n, seed ^ 0x77, 0.01).iter().map(|x| x * x).collect();
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    let c = AdamwConsts::new(&h, t).unwrap();
    adamw_step_f32(&mut p, &g, &mut m, &mut v, &c, scale).unwrap();
    let gs: Vec<f32> = g.iter().map(|x| x * scale).collect();
    let (mut pr, mut mr, mut vr) = (p0, m0, v0);
    adamw_step(&mut pr, &gs, &mut mr, &mut vr, &h, t).unwrap();
    for (name, got, want) in [("params", &p, &pr), ("m", &m, &mr), ("v", &v, &vr)] {
        if let Some(i) = (0..n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "n {n}, step {t}: {name}[{i}] = {} but the reference gives {}",
                got[i], want[i]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn host_adamw_matches_the_reference(n in 0usize..3000, seed in any::<u64>(), t in 1u64..50, scale in 0.05f32..1.0, wd in 0.0f64..0.1) {
        check(n, seed, t, scale, wd);
    }
}

#[test]
fn host_adamw_matches_the_reference_past_a_rayon_chunk() {
    // Two rayon chunks (32768 elements each) and a ragged tail.
    check(2 * 32_768 + 13, 7, 3, 0.5, 0.01);
}

#[test]
fn host_adamw_refuses_step_zero_and_ragged_buffers() {
    let h = AdamW::default();
    assert!(AdamwConsts::new(&h, 0).is_err());
    let c = AdamwConsts::new(&h, 1).unwrap();
    let (mut p, mut m, mut v) = (vec![0f32; 4], vec![0f32; 4], vec![0f32; 3]);
    let err = adamw_step_f32(&mut p, &[0.0; 4], &mut m, &mut v, &c, 1.0).unwrap_err();
    assert!(err.to_string().contains("v"), "{err}");
}
