//! `--precision bf16` on the CPU: bf16 products with f32 sums, f32
//! weights. The switch is process-wide, so it has this test binary to
//! itself: the f32 side of each comparison runs first, then the bf16 one.
//! Against the f32 policy on the Hugging Face fixtures: the log-probs and
//! gradients move by bf16's rounding (and really move), and a few AdamW
//! steps lower the loss as in f32.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::{Model, Policy, Precision};
use aha_tensor::cpu::{self, AdamW, ProductPrecision};
use aha_tensor::{Device, Tensor};

fn fixture(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name),
    )
    .unwrap()
}

struct Batch {
    ids: Vec<u32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    dl: Vec<f32>,
    bs: usize,
    t: usize,
}

fn batch(model: &Model) -> Batch {
    let (bs, t) = (3, 13);
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..bs * t)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    let targets = ids.iter().map(|&x| (x * 7 + 1) % v).collect();
    let rows: Vec<u32> = (0..(bs * t) as u32).collect();
    let dl = (0..rows.len()).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
    Batch {
        ids,
        rows,
        targets,
        dl,
        bs,
        t,
    }
}

/// Log-probs and gradients of `sum(dl * logp)`.
fn logp_and_grads(p: &mut Policy, b: &Batch) -> (Vec<f32>, Vec<f32>) {
    let f = p.forward(&b.ids, b.bs, b.t).unwrap();
    let s = p.score(&f, &b.rows, &b.targets, 1.0).unwrap();
    let lp = s.logp.to_vec::<f32>().unwrap();
    p.zero_grad().unwrap();
    let dl = Tensor::from_vec(b.dl.clone(), b.dl.len(), Device::Cpu).unwrap();
    p.backward(f, &s, &dl, None, 0.0).unwrap();
    (lp, p.grads_to_host().unwrap())
}

/// Largest |a - b| over the largest |b| of each tensor, worst over tensors.
fn worst_relative(model: &Model, got: &[f32], want: &[f32]) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for e in &model.layout.entries {
        let (g, w) = (e.slot.of(got), e.slot.of(want));
        let scale = w.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
        let diff = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        if diff / scale > worst.0 {
            worst = (diff / scale, e.name.clone());
        }
    }
    worst
}

/// Mean loss `-mean(logp)` over `steps` AdamW steps on one batch.
fn losses(model: &Model, precision: Precision, steps: usize) -> Vec<f32> {
    let mut p = Policy::new(model.clone(), Device::Cpu, precision).unwrap();
    let b = batch(model);
    let n = b.rows.len();
    let opt = AdamW {
        lr: 3e-3,
        ..AdamW::default()
    };
    let mut moments = p.new_moments().unwrap();
    let mut out = Vec::new();
    for step in 1..=steps {
        let f = p.forward(&b.ids, b.bs, b.t).unwrap();
        let s = p.score(&f, &b.rows, &b.targets, 1.0).unwrap();
        let lp = s.logp.to_vec::<f32>().unwrap();
        out.push(-lp.iter().sum::<f32>() / n as f32);
        p.zero_grad().unwrap();
        let dl = Tensor::from_vec(vec![-1.0 / n as f32; n], n, Device::Cpu).unwrap();
        p.backward(f, &s, &dl, None, 0.0).unwrap();
        p.optimizer_step(&mut moments, &opt, step as u64, 1.0).unwrap();
    }
    out
}

#[test]
fn bf16_products_on_the_cpu_stay_near_f32_and_train() {
    let names = ["qwen2-tiny", "qwen3-moe-tiny"];
    // The f32 side first, while the process computes in f32.
    cpu::set_product_precision(ProductPrecision::F32);
    let mut f32_side = Vec::new();
    for name in names {
        let model = fixture(name);
        let mut p = Policy::new(model.clone(), Device::Cpu, Precision::F32).unwrap();
        assert_eq!(p.precision(), Precision::F32);
        let b = batch(&model);
        f32_side.push((logp_and_grads(&mut p, &b), losses(&model, Precision::F32, 4)));
    }
    for (name, ((lp32, g32), loss32)) in names.iter().zip(f32_side) {
        let model = fixture(name);
        let mut p = Policy::new(model.clone(), Device::Cpu, Precision::Bf16).unwrap();
        assert_eq!(cpu::product_precision(), ProductPrecision::Bf16);
        assert_eq!(p.precision(), Precision::Bf16);
        let b = batch(&model);
        let (lp, g) = logp_and_grads(&mut p, &b);
        let worst = lp.iter().zip(&lp32).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        let (gw, at) = worst_relative(&model, &g, &g32);
        eprintln!("{name}: bf16 on the CPU: worst |logp - f32| {worst:.2e}, worst relative gradient {gw:.2e} ({at})");
        assert!(
            worst > 1e-6,
            "{name}: the log-probs did not change: bf16 products are not on"
        );
        assert!(worst < 0.1, "{name}: bf16 log-probs moved by {worst} nats");
        assert!(gw < 0.15, "{name}: bf16 gradient of {at} differs by {gw} of its scale");
        let loss = losses(&model, Precision::Bf16, 4);
        eprintln!("{name}: loss over 4 steps: f32 {loss32:?}, bf16 {loss:?}");
        assert!(
            loss[3] < loss[0],
            "{name}: bf16 training did not lower the loss: {loss:?}"
        );
        let drop = |l: &[f32]| l[0] - l[3];
        assert!(
            (drop(&loss) - drop(&loss32)).abs() < 0.25 * drop(&loss32).abs() + 1e-3,
            "{name}: bf16 lowered the loss by {}, f32 by {}",
            drop(&loss),
            drop(&loss32)
        );
    }
}
