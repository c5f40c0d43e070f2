//! AdamW offloaded to the host (`Policy::set_offload_optimizer`,
//! `aha_moe_model::offload`) against AdamW on the device: the same weights
//! and moments after three clipped steps of real backward passes, in small
//! ragged buckets so that the double-buffered pipeline runs over many of
//! them; in bf16, the device keeping only the bf16 weights and the tensors
//! read in f32, and the bf16 copy the products read written from the host's
//! update as the device kernel writes it; and
//! a resume from host copies of the moments (a checkpoint) continuing as an
//! uninterrupted run; and ZeRO-1's sharded f32 master (the other way of
//! not keeping the whole master on the device); and LoRA, whose host
//! master copy spans the adapters alone. Without a GPU each test prints "skipped: no GPU"; CI
//! runs them on the emulated GPU.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::{Model, Moments, OffloadConfig, Policy, PolicyModel, Precision};
use aha_tensor::cpu::AdamW;
use aha_tensor::{Device, Tensor};

fn fixture(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name),
    )
    .unwrap()
}

fn skip(test: &str) -> bool {
    match aha_cuda_kernels::no_gpu_reason() {
        Some(reason) => {
            eprintln!("{test}: skipped: no GPU ({reason})");
            true
        }
        None => false,
    }
}

/// A small bucket that does not divide the parameter count, so the last
/// bucket is ragged and the two staging buffers alternate many times.
const BUCKET: usize = 1_777;

const H: AdamW = AdamW {
    lr: 3e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.05,
};

/// Clipping threshold far below the fixtures' gradient norms, so every
/// step clips.
const MAX_NORM: f64 = 0.05;

/// One forward, score and backward of a fixed batch (the gradients depend
/// on the weights, so three steps compound any difference).
fn backward(p: &mut Policy, step: usize) {
    let v = p.config().vocab_size as u32;
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i + 3 * step) as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..b {
        for i in 0..t - 1 {
            rows.push((r * t + i) as u32);
            targets.push(ids[r * t + i + 1]);
        }
    }
    let n = rows.len();
    let fwd = p.forward(&ids, b, t).unwrap();
    let sc = p.score(&fwd, &rows, &targets, 1.0).unwrap();
    let dl = Tensor::from_vec(vec![-1.0 / n as f32; n], n, p.device()).unwrap();
    p.zero_grad().unwrap();
    p.backward(fwd, &sc, &dl, None, 0.0).unwrap();
}

/// Largest |got - want| over the largest |want|.
fn relative(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-30);
    got.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale
}

/// Runs `steps` steps from `step0 + 1` and returns the gradient norms.
fn run(p: &mut Policy, m: &mut Moments, step0: u64, steps: u64) -> Vec<f64> {
    (step0..step0 + steps)
        .map(|s| {
            backward(p, s as usize);
            p.optimizer_step(m, &H, s + 1, MAX_NORM).unwrap()
        })
        .collect()
}

fn offloaded(model: Model, precision: Precision) -> Policy {
    let mut p = Policy::new(model, Device::Cuda(0), precision).unwrap();
    p.set_offload_optimizer(Some(OffloadConfig { bucket_elems: BUCKET }))
        .unwrap();
    p
}

#[test]
fn offloaded_adamw_matches_device_adamw_over_three_clipped_steps_cuda() {
    if skip("offloaded_adamw_matches_device_adamw_over_three_clipped_steps_cuda") {
        return;
    }
    for name in ["qwen2-tiny", "deepseek-v3-tiny"] {
        let model = fixture(name);
        assert!(
            model.layout.trainable > 4 * BUCKET,
            "{name}: too few parameters for several buckets"
        );
        let mut dev = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let mut off = offloaded(model.clone(), Precision::F32);
        let (mut md, mut mo) = (dev.new_moments().unwrap(), off.new_moments().unwrap());
        assert!(matches!(mo, Moments::Offload(_)), "{name}: {mo:?}");
        let nd = run(&mut dev, &mut md, 0, 3);
        let no = run(&mut off, &mut mo, 0, 3);
        for (a, b) in nd.iter().zip(&no) {
            assert!(*a > 4.0 * MAX_NORM, "{name}: norm {a} does not clip");
            assert!((a - b).abs() <= 1e-6 * a, "{name}: gradient norms {nd:?} vs {no:?}");
        }
        let (pd, po) = (dev.params_to_host().unwrap(), off.params_to_host().unwrap());
        let moved = relative(&pd, &model.params);
        assert!(moved > 1e-4, "{name}: the weights hardly moved ({moved})");
        for e in &model.layout.entries {
            let r = relative(e.slot.of(&po), e.slot.of(&pd));
            assert!(r <= 1e-6, "{name}: {} differs by {r:e} of its scale", e.name);
            if !e.trainable {
                assert_eq!(
                    e.slot.of(&po),
                    e.slot.of(&model.params),
                    "{name}: frozen {} moved",
                    e.name
                );
            }
        }
        let ((m1, v1), (m2, v2)) = (md.to_host(&dev).unwrap(), mo.to_host(&off).unwrap());
        let (rm, rv) = (relative(&m2, &m1), relative(&v2, &v1));
        eprintln!("{name}: offloaded vs device after 3 steps: moments {rm:.1e} / {rv:.1e} of their scale");
        assert!(rm <= 1e-6 && rv <= 1e-6, "{name}: moments differ ({rm:e}, {rv:e})");
        let t = mo.take_offload_timing().unwrap();
        assert_eq!(t.steps, 3);
        assert!(t.adamw_s > 0.0 && t.total_s >= t.adamw_s + t.norm_s, "{t:?}");
        assert!(md.take_offload_timing().is_none());
    }
}

#[test]
fn offloaded_adamw_refreshes_the_bf16_weights_cuda() {
    if skip("offloaded_adamw_refreshes_the_bf16_weights_cuda") {
        return;
    }
    for name in ["qwen2-tiny", "qwen3-moe-tiny"] {
        let model = fixture(name);
        let mut dev = Policy::new(model.clone(), Device::Cuda(0), Precision::Bf16).unwrap();
        let mut off = offloaded(model.clone(), Precision::Bf16);
        // The device keeps the bf16 weights and only the tensors read in
        // f32 (norms, biases, routers, the embedding).
        let PolicyModel::Gpu(g) = off.model() else {
            panic!("{name}: not on the GPU")
        };
        assert!(g.is_offloaded());
        let kept: usize = g.f32_resident().iter().map(|r| r.1).sum();
        assert_eq!(g.params().len(), kept, "{name}: packed f32 tensors");
        assert!(
            kept < model.layout.size / 2,
            "{name}: {kept} of {} kept in f32",
            model.layout.size
        );
        let (mut md, mut mo) = (dev.new_moments().unwrap(), off.new_moments().unwrap());
        run(&mut dev, &mut md, 0, 2);
        run(&mut off, &mut mo, 0, 2);
        let r = relative(&off.params_to_host().unwrap(), &dev.params_to_host().unwrap());
        assert!(r <= 1e-6, "{name}: bf16 master weights differ by {r:e}");
        // The products read the bf16 copy: equal log-probs mean it was
        // written from the host's update exactly as the device kernel does.
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % v).collect();
        let rows: Vec<u32> = (0..11).collect();
        let lp = |p: &Policy| p.logprobs(&ids, 1, 12, &rows, &ids[1..], 1.0).unwrap();
        assert_eq!(lp(&dev), lp(&off), "{name}: log-probs after the host update");
        // Back on the device: the same weights.
        off.set_offload_optimizer(None).unwrap();
        assert_eq!(off.params_to_host().unwrap().len(), model.layout.size);
        assert_eq!(lp(&dev), lp(&off), "{name}: log-probs after leaving offload");
    }
}

/// Every adapter tensor set to small deterministic values (B non-zero, so
/// both adapter factors get gradients from the first step).
fn with_lora(model: Model, targets: &[&str]) -> Model {
    let cfg = aha_moe_model::LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut m = model.with_lora(&cfg, 7).unwrap();
    let entries: Vec<_> = m.layout.entries.iter().filter(|e| e.trainable).cloned().collect();
    for (i, e) in entries.iter().enumerate() {
        for (j, v) in e.slot.of_mut(&mut m.params).iter_mut().enumerate() {
            *v = (((i * 29 + j * 13) % 19) as f32 - 9.0) * 0.01;
        }
    }
    m
}

/// LoRA with the optimizer offloaded: the page-locked host memory holds
/// the adapters' f32 master copy, moments and staging buffers only (what
/// `MemoryPlan::with_offload` plans for the LoRA layout, 12 bytes an
/// adapter parameter plus staging, nothing of the frozen base), and three
/// clipped steps in f32 give device AdamW's weights and moments within
/// 1e-6 of their scale with the base bit-identical. In bf16 the device
/// keeps the base in bf16 and only the tensors read in f32, and two host
/// updates give the device updates' weights and log-probs.
#[test]
fn offloaded_adamw_under_lora_keeps_only_the_adapters_on_the_host_cuda() {
    if skip("offloaded_adamw_under_lora_keeps_only_the_adapters_on_the_host_cuda") {
        return;
    }
    use aha_moe_model::memory::{memory_plan, Workload};
    let bucket = 777;
    let models = [
        (
            "qwen2-tiny + LoRA",
            with_lora(fixture("qwen2-tiny"), &["q_proj", "v_proj", "o_proj", "down_proj"]),
        ),
        (
            "deepseek-v3-tiny + LoRA",
            with_lora(
                fixture("deepseek-v3-tiny"),
                &["o_proj", "kv_b_proj", "shared_experts.up_proj"],
            ),
        ),
    ];
    let w = Workload {
        tokens: 18,
        scored: 16,
        kv_tokens: 0,
        training: true,
        recompute: false,
    };
    for (name, model) in models {
        let (a, size) = (model.layout.trainable, model.layout.size);
        assert!(
            a > 2 * bucket && a % bucket != 0 && a < size / 10,
            "{name}: {a} of {size}"
        );
        let cfg = OffloadConfig { bucket_elems: bucket };
        let mut dev = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let mut off = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        off.set_offload_optimizer(Some(cfg)).unwrap();
        let (mut md, mut mo) = (dev.new_moments().unwrap(), off.new_moments().unwrap());
        // The host: master (4) and moments (8) of the adapters, two
        // bucket-sized f32 staging buffers and one of the ragged last bucket.
        let staging = 2 * bucket + a % bucket;
        let host = off.param_bytes(&mo).host_pinned;
        assert_eq!(host, (12 * a + 4 * staging) as u64, "{name}: page-locked bytes");
        let plan = memory_plan(&model.config, Precision::F32, &w)
            .with_lora(&model.layout, Precision::F32)
            .with_offload(&model.layout, Precision::F32, bucket);
        assert_eq!(host, plan.host_pinned, "{name}: host bytes vs the plan");
        assert!(host < 4 * size as u64, "{name}: {host} bytes on the host");
        let nd = run(&mut dev, &mut md, 0, 3);
        let no = run(&mut off, &mut mo, 0, 3);
        for (x, y) in nd.iter().zip(&no) {
            assert!(*x > 4.0 * MAX_NORM, "{name}: norm {x} does not clip");
            assert!((x - y).abs() <= 1e-6 * x, "{name}: gradient norms {nd:?} vs {no:?}");
        }
        let (pd, po) = (dev.params_to_host().unwrap(), off.params_to_host().unwrap());
        assert!(
            relative(&pd[..a], &model.params[..a]) > 1e-4,
            "{name}: the adapters hardly moved"
        );
        for e in &model.layout.entries {
            if e.trainable {
                let r = relative(e.slot.of(&po), e.slot.of(&pd));
                assert!(r <= 1e-6, "{name}: {} differs by {r:e} of its scale", e.name);
            } else {
                assert_eq!(
                    e.slot.of(&po),
                    e.slot.of(&model.params),
                    "{name}: frozen {} moved",
                    e.name
                );
            }
        }
        let ((m1, v1), (m2, v2)) = (md.to_host(&dev).unwrap(), mo.to_host(&off).unwrap());
        let (rm, rv) = (relative(&m2, &m1), relative(&v2, &v1));
        let rw = relative(&po[..a], &pd[..a]);
        eprintln!(
            "{name}: {a} adapter parameters, {host} page-locked bytes; offloaded vs device after 3 steps: \
             adapters {rw:.1e}, moments {rm:.1e} / {rv:.1e} of their scale"
        );
        assert!(rm <= 1e-6 && rv <= 1e-6, "{name}: moments differ ({rm:e}, {rv:e})");

        // bf16: the base in bf16 only, the host master the adapters'.
        let mut dev = Policy::new(model.clone(), Device::Cuda(0), Precision::Bf16).unwrap();
        let mut off = Policy::new(model.clone(), Device::Cuda(0), Precision::Bf16).unwrap();
        off.set_offload_optimizer(Some(cfg)).unwrap();
        let (mut md, mut mo) = (dev.new_moments().unwrap(), off.new_moments().unwrap());
        run(&mut dev, &mut md, 0, 2);
        run(&mut off, &mut mo, 0, 2);
        let b = off.param_bytes(&mo);
        let plan = memory_plan(&model.config, Precision::Bf16, &w)
            .with_lora(&model.layout, Precision::Bf16)
            .with_offload(&model.layout, Precision::Bf16, bucket);
        assert_eq!(
            (b.weights, b.weights_bf16, b.grads, b.host_pinned),
            (plan.weights, plan.weights_bf16, 4 * a as u64, plan.host_pinned),
            "{name}: bf16 bytes vs the plan"
        );
        assert_eq!(
            b.host_pinned,
            (12 * a + 6 * staging) as u64,
            "{name}: bf16 page-locked bytes"
        );
        let (pd, po) = (dev.params_to_host().unwrap(), off.params_to_host().unwrap());
        let r = relative(&po[..a], &pd[..a]);
        assert!(r <= 1e-6, "{name}: bf16 adapters differ by {r:e}");
        assert_eq!(po[a..], pd[a..], "{name}: bf16 frozen base");
        let v = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % v).collect();
        let rows: Vec<u32> = (0..11).collect();
        let lp = |p: &Policy| p.logprobs(&ids, 1, 12, &rows, &ids[1..], 1.0).unwrap();
        assert_eq!(lp(&dev), lp(&off), "{name}: bf16 log-probs after the host update");
        // Back on the device: the same weights.
        off.set_offload_optimizer(None).unwrap();
        assert_eq!(off.params_to_host().unwrap(), po, "{name}: leaving offload");
    }
}

#[test]
fn offloaded_adamw_resumes_from_host_moments_cuda() {
    if skip("offloaded_adamw_resumes_from_host_moments_cuda") {
        return;
    }
    let model = fixture("deepseek-v3-tiny");
    // Uninterrupted: three steps.
    let mut whole = offloaded(model.clone(), Precision::F32);
    let mut mw = whole.new_moments().unwrap();
    run(&mut whole, &mut mw, 0, 3);
    // Two steps, a checkpoint (weights and host copies of the moments),
    // then a fresh policy resumed from it for the third.
    let mut first = offloaded(model.clone(), Precision::F32);
    let mut mf = first.new_moments().unwrap();
    run(&mut first, &mut mf, 0, 2);
    let (params, (m, v)) = (first.params_to_host().unwrap(), mf.to_host(&first).unwrap());
    // The trainable prefix only (deepseek-v3-tiny's correction biases are
    // frozen).
    assert_eq!(m.len(), model.layout.trainable);
    assert!(model.layout.trainable < model.layout.size);
    assert!(
        v[..model.layout.trainable].iter().any(|&x| x > 0.0),
        "empty second moment"
    );
    let mut resumed = offloaded(model.clone(), Precision::F32);
    resumed.set_params(&params).unwrap();
    let mut mr = resumed.moments_from_host(m, v).unwrap();
    assert!(matches!(mr, Moments::Offload(_)));
    run(&mut resumed, &mut mr, 2, 1);
    assert_eq!(
        resumed.params_to_host().unwrap(),
        whole.params_to_host().unwrap(),
        "the resumed run's weights"
    );
    assert_eq!(
        mr.to_host(&resumed).unwrap(),
        mw.to_host(&whole).unwrap(),
        "the resumed run's moments"
    );
    // Weights replaced after the moments exist (a reference reset, a
    // restore) are what the next host update starts from.
    let mut late = offloaded(model.clone(), Precision::F32);
    let mut ml = late
        .moments_from_host(mr.to_host(&resumed).unwrap().0, mr.to_host(&resumed).unwrap().1)
        .unwrap();
    late.set_params(&params).unwrap();
    let mut again = offloaded(model.clone(), Precision::F32);
    again.set_params(&params).unwrap();
    // Moments over the whole buffer (zeros for the frozen tensors, as
    // older checkpoints hold them) load the same.
    let whole_len = |mut x: Vec<f32>| {
        x.resize(model.layout.size, 0.0);
        x
    };
    let mut ma = again
        .moments_from_host(
            whole_len(mr.to_host(&resumed).unwrap().0),
            whole_len(mr.to_host(&resumed).unwrap().1),
        )
        .unwrap();
    run(&mut late, &mut ml, 2, 1);
    run(&mut again, &mut ma, 2, 1);
    assert_eq!(late.params_to_host().unwrap(), again.params_to_host().unwrap());
}

/// ZeRO-1's sharded f32 master (`Policy::shard_master`) on a bf16 policy:
/// the f32 master of one range only (bit for bit the weights it started
/// from), of the f32 weights only the tensors the kernels read in f32, every
/// weight in bf16; the bytes `param_bytes` counts are those; the weights
/// read back are the bf16 ones with the f32-resident tensors exact;
/// `set_params` and `set_master_shard` write the shard; offload and the
/// whole-buffer AdamW are refused; an f32 policy (whose weights are the
/// master) is left as it is.
#[test]
fn a_sharded_master_keeps_one_shard_in_f32_and_every_weight_in_bf16_cuda() {
    if skip("a_sharded_master_keeps_one_shard_in_f32_and_every_weight_in_bf16_cuda") {
        return;
    }
    let model = fixture("deepseek-v3-tiny");
    let host = model.params.clone();
    let mut p = Policy::new(model, Device::Cuda(0), Precision::Bf16).unwrap();
    let (n, size) = (p.layout().trainable, p.num_params());
    let none = || Moments::Cpu {
        m: Vec::new(),
        v: Vec::new(),
    };
    let before = p.param_bytes(&none());
    assert_eq!((before.weights, before.master), (4 * size as u64, 0));
    let range = n / 3..2 * n / 3;
    assert!(p.shard_master(range.clone()).unwrap());
    assert!(
        p.shard_master(range.clone()).unwrap(),
        "the same range again changes nothing"
    );
    assert!(p.shard_master(0..n / 2).is_err());
    let (r, m) = p.master_shard_to_host().unwrap().unwrap();
    assert_eq!(r, range);
    assert!(m
        .iter()
        .zip(&host[range.clone()])
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let resident = aha_moe_model::gpu::f32_resident(p.layout());
    let kept: usize = resident.iter().map(|r| r.1).sum();
    assert!(kept > 0 && kept < size / 2, "{kept} of {size}");
    let after = p.param_bytes(&none());
    assert_eq!(after.weights, 4 * kept as u64);
    assert_eq!(after.master, 4 * range.len() as u64);
    assert_eq!(after.weights_bf16, 2 * size as u64);
    let in_f32 = |i: usize| resident.iter().any(|&(off, len, _)| (off..off + len).contains(&i));
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let back = p.params_to_host().unwrap();
    for (i, (&got, &x)) in back.iter().zip(&host).enumerate() {
        let want = if in_f32(i) { x } else { bf16(x) };
        assert_eq!(got.to_bits(), want.to_bits(), "parameter {i}");
    }
    // Offload and the whole-buffer AdamW are refused.
    assert!(p
        .set_offload_optimizer(Some(OffloadConfig { bucket_elems: BUCKET }))
        .is_err());
    let mut mom = p.new_moments().unwrap();
    backward(&mut p, 0);
    assert!(p.optimizer_step(&mut mom, &H, 1, MAX_NORM).is_err());
    // set_params writes the master shard too.
    let shifted: Vec<f32> = host.iter().map(|x| x + 0.25).collect();
    p.set_params(&shifted).unwrap();
    let (_, m) = p.master_shard_to_host().unwrap().unwrap();
    assert_eq!(m, shifted[range.clone()]);
    // set_master_shard writes the shard's bf16 weights.
    let new: Vec<f32> = (0..range.len()).map(|i| (i % 97) as f32 * 1.37e-3).collect();
    p.set_master_shard(&new).unwrap();
    assert!(p.set_master_shard(&new[1..]).is_err());
    let back = p.params_to_host().unwrap();
    for (k, i) in range.clone().enumerate().filter(|&(_, i)| !in_f32(i)) {
        assert_eq!(back[i], bf16(new[k]), "parameter {i}");
    }
    // f32: the weights the kernels read are the master.
    let mut f = Policy::new(fixture("deepseek-v3-tiny"), Device::Cuda(0), Precision::F32).unwrap();
    assert!(!f.shard_master(0..1).unwrap());
    assert_eq!(f.param_bytes(&none()).master, 0);
}

/// `backward` with the gradients streamed to the host part by part during
/// the backward (`Policy::backward_offload_streamed`); `again` adds a
/// second, plain backward of the same batch afterwards (accumulating), which
/// leaves the streamed copy stale.
fn backward_streamed(p: &mut Policy, m: &mut Moments, step: usize, again: bool) -> bool {
    let v = p.config().vocab_size as u32;
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i + 3 * step) as u32).wrapping_mul(2_654_435_761) % v)
        .collect();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..b {
        for i in 0..t - 1 {
            rows.push((r * t + i) as u32);
            targets.push(ids[r * t + i + 1]);
        }
    }
    let n = rows.len();
    let dl = Tensor::from_vec(vec![-1.0 / n as f32; n], n, p.device()).unwrap();
    p.zero_grad().unwrap();
    let fwd = p.forward(&ids, b, t).unwrap();
    let sc = p.score(&fwd, &rows, &targets, 1.0).unwrap();
    let streamed = p.backward_offload_streamed(fwd, &sc, &dl, None, 0.0, m).unwrap();
    if again {
        let fwd = p.forward(&ids, b, t).unwrap();
        let sc = p.score(&fwd, &rows, &targets, 1.0).unwrap();
        p.backward(fwd, &sc, &dl, None, 0.0).unwrap();
    }
    streamed
}

/// Gradients streamed to the host during the backward: after three clipped
/// steps the weights and moments are exactly those of the offload that
/// copies the gradients after the backward, and those of AdamW on the
/// device within 1e-6 (f32); the timings count the streamed steps and the
/// copies queued during the backward. A gradient changed after the
/// streaming backward (a second backward accumulating into it) is copied
/// again by the step: the result is again exactly the plain offload's.
#[test]
fn streamed_gradients_give_the_offloaded_and_the_device_adamw_cuda() {
    if skip("streamed_gradients_give_the_offloaded_and_the_device_adamw_cuda") {
        return;
    }
    for name in ["qwen2-tiny", "deepseek-v3-tiny"] {
        let model = fixture(name);
        let mut dev = Policy::new(model.clone(), Device::Cuda(0), Precision::F32).unwrap();
        let mut off = offloaded(model.clone(), Precision::F32);
        let mut st = offloaded(model.clone(), Precision::F32);
        let (mut md, mut mo, mut ms) = (
            dev.new_moments().unwrap(),
            off.new_moments().unwrap(),
            st.new_moments().unwrap(),
        );
        run(&mut dev, &mut md, 0, 3);
        run(&mut off, &mut mo, 0, 3);
        for s in 0..3u64 {
            assert!(backward_streamed(&mut st, &mut ms, s as usize, false), "{name}");
            st.optimizer_step(&mut ms, &H, s + 1, MAX_NORM).unwrap();
        }
        let (pd, po, ps) = (
            dev.params_to_host().unwrap(),
            off.params_to_host().unwrap(),
            st.params_to_host().unwrap(),
        );
        assert!(relative(&pd, &model.params) > 1e-4, "{name}: the weights hardly moved");
        assert!(ps == po, "{name}: streamed and copied-after offload differ");
        assert_eq!(ms.to_host(&st).unwrap(), mo.to_host(&off).unwrap(), "{name}: moments");
        let r = relative(&ps, &pd);
        assert!(r <= 1e-6, "{name}: streamed offload vs device AdamW: {r:e}");
        let t = ms.take_offload_timing().unwrap();
        assert_eq!((t.steps, t.streamed_steps), (3, 3), "{name}: {t:?}");
        assert!(t.copy_overlapped_s > 0.0 && t.adamw_s > 0.0, "{name}: {t:?}");
        assert_eq!(mo.take_offload_timing().unwrap().streamed_steps, 0);
        eprintln!("{name}: streamed offload equals the copied-after offload; {r:.1e} from device AdamW; {t:?}");

        // A stale copy is not used.
        let mut off2 = offloaded(model.clone(), Precision::F32);
        let mut st2 = offloaded(model.clone(), Precision::F32);
        let (mut mo2, mut ms2) = (off2.new_moments().unwrap(), st2.new_moments().unwrap());
        backward(&mut off2, 0);
        {
            // The plain offload's second backward of the same batch.
            let v = off2.config().vocab_size as u32;
            let ids: Vec<u32> = (0..18).map(|i| (i as u32).wrapping_mul(2_654_435_761) % v).collect();
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for r in 0..2 {
                for i in 0..8 {
                    rows.push((r * 9 + i) as u32);
                    targets.push(ids[r * 9 + i + 1]);
                }
            }
            let dl = Tensor::from_vec(vec![-1.0 / 16.0; 16], 16, off2.device()).unwrap();
            let fwd = off2.forward(&ids, 2, 9).unwrap();
            let sc = off2.score(&fwd, &rows, &targets, 1.0).unwrap();
            off2.backward(fwd, &sc, &dl, None, 0.0).unwrap();
        }
        off2.optimizer_step(&mut mo2, &H, 1, MAX_NORM).unwrap();
        assert!(backward_streamed(&mut st2, &mut ms2, 0, true));
        st2.optimizer_step(&mut ms2, &H, 1, MAX_NORM).unwrap();
        assert!(
            st2.params_to_host().unwrap() == off2.params_to_host().unwrap(),
            "{name}: stale copy used"
        );
        assert_eq!(ms2.take_offload_timing().unwrap().streamed_steps, 0, "{name}");
    }
}
