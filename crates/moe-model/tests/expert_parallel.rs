//! Expert parallelism of the GPU model (`GpuModel::set_expert_parallel`):
//! a global batch split over 2 ranks (threads, one NCCL communicator each,
//! the routed experts sharded between them) gives, for each rank's rows,
//! the log-probs of the whole batch on one rank, and after the
//! data-parallel all-reduce of the flat gradient (sum) every parameter's
//! gradient of the whole batch and every weight after one AdamW step,
//! within 1e-5 of each tensor's largest value (f32 products, and bf16 on
//! qwen3-moe-tiny).
//! Fixtures: qwen3-moe-tiny (softmax routing, the Switch aux loss, whose
//! expert loads and token count are the global batch's) and
//! deepseek-v3-tiny (sigmoid group-limited routing with the correction
//! bias, a shared expert, dense first layers). The ranks get uneven row
//! counts. Runs on the emulated GPU and NCCL in CI; without a GPU each test
//! prints "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_cuda_kernels::launch::AdamwScalars;
use aha_cuda_kernels::nccl::{Comm, Nccl};
use aha_cuda_kernels::Gpu;
use aha_moe_model::gpu::{GpuModel, GpuPrecision};
use aha_moe_model::memory::{memory_plan, MemoryPlan, Workload};
use aha_moe_model::{Model, Precision};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
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

/// splitmix64 of (seed, i).
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a run gives: log-probs of every position, the flat gradient (after
/// the all-reduce, for the ranks) and the weights after one AdamW step.
type RunOut = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One rank's (or the whole batch's) run.
#[allow(clippy::too_many_arguments)]
fn run(
    precision: GpuPrecision,
    model: &Model,
    comm: Option<Comm>,
    ids: &[u32],
    t: usize,
    targets: &[u32],
    dlogp: &[f32],
    aux: f32,
) -> RunOut {
    let mut g = GpuModel::upload_with(model, 0, precision).unwrap();
    let ep = comm.is_some();
    g.set_expert_parallel(comm).unwrap();
    let b = ids.len() / t;
    let fwd = g.forward(ids, b, t).unwrap();
    let rows: Vec<u32> = (0..ids.len() as u32).collect();
    let scores = g.score(&fwd, &rows, targets, 1.0).unwrap();
    let gpu = g.gpu().clone();
    let logp = gpu.download(&scores.logp).unwrap();
    let dl = gpu.upload(dlogp).unwrap();
    g.backward(fwd, &scores, &dl, None, aux).unwrap();
    if ep {
        let mut comm = g.set_expert_parallel(None).unwrap().unwrap();
        let (_, grads) = g.grads_mut().unwrap();
        let n = grads.len();
        comm.all_reduce_sum(grads, 0..n).unwrap();
    }
    let grads = g.grads_to_host().unwrap();
    let (mut m, mut v) = g.new_moments().unwrap();
    let h = AdamwScalars::new(1e-4, 0.9, 0.999, 1e-6, 0.01, 1).unwrap();
    g.adamw(&mut m, &mut v, &h).unwrap();
    (logp, grads, g.params_to_host().unwrap())
}

fn check_fixture(name: &str, precision: GpuPrecision, aux: f32) {
    let path = fixture(name);
    let model = Model::load(&path).unwrap();
    let vocab = model.config.vocab_size as u64;
    let (b, t) = (4usize, 6usize);
    let n = b * t;
    let seed = 0xe9 + name.len() as u64;
    let ids: Vec<u32> = (0..n as u64).map(|i| (mix(seed, i) % vocab) as u32).collect();
    let targets: Vec<u32> = (0..n as u64).map(|i| (mix(seed + 1, i) % vocab) as u32).collect();
    let dlogp: Vec<f32> = (0..n as u64)
        .map(|i| (mix(seed + 2, i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let (want_logp, want_grad, want_w) = run(precision, &model, None, &ids, t, &targets, &dlogp, aux);
    // Rank 0 gets 1 row of the batch, rank 1 the other 3.
    let split = [0..t, t..n];
    let nccl = Nccl::get().unwrap();
    let gpu = Gpu::get(0).unwrap();
    let id = nccl.unique_id().unwrap();
    let hs: Vec<_> = (0..2)
        .map(|rank| {
            let (nccl, gpu, path) = (nccl.clone(), gpu.clone(), path.clone());
            let r = split[rank].clone();
            let (ids, targets, dlogp) = (ids[r.clone()].to_vec(), targets[r.clone()].to_vec(), dlogp[r].to_vec());
            std::thread::spawn(move || {
                let model = Model::load(&path).unwrap();
                let comm = Comm::init(nccl, gpu, &id, 2, rank).unwrap();
                run(precision, &model, Some(comm), &ids, t, &targets, &dlogp, aux)
            })
        })
        .collect();
    let outs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    // Worst differences over the ranks (log-prob absolute, gradient and
    // weight relative to each tensor's largest value), printed.
    let mut worst = [0f32; 3];
    for (rank, (logp, grad, weights)) in outs.iter().enumerate() {
        for (i, (g, w)) in logp.iter().zip(&want_logp[split[rank].clone()]).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name}: rank {rank} log-prob {i}: {g} vs {w}"
            );
        }
        assert_eq!(grad.len(), want_grad.len());
        for e in &model.layout.entries {
            let (g, w) = (e.slot.of(grad), e.slot.of(&want_grad));
            let scale = w.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
            let diff = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{name}: rank {rank}: gradient of {} off by {diff} (largest {scale})",
                e.name
            );
            worst[1] = worst[1].max(diff / scale);
            let (g, w) = (e.slot.of(weights), e.slot.of(&want_w));
            let scale = w.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
            let diff = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{name}: rank {rank}: {} after the step off by {diff} (largest {scale})",
                e.name
            );
            worst[2] = worst[2].max(diff / scale);
        }
    }
    eprintln!(
        "{name} ({precision:?}): 2 ranks vs 1: log-prob {:.2e}, gradient {:.2e}, weights {:.2e}",
        worst[0], worst[1], worst[2]
    );
    // Both ranks' experts were trained (the check is not vacuous): some
    // expert of each half has a gradient.
    let e = model.config.moe.as_ref().unwrap().n_experts;
    for half in [0..e / 2, e / 2..e] {
        let trained = model.layout.entries.iter().any(|en| {
            half.clone().any(|x| en.name.contains(&format!(".experts.{x}.")))
                && en.slot.of(&want_grad).iter().any(|&v| v != 0.0)
        });
        assert!(trained, "{name}: no gradient for experts {half:?}");
    }
}

#[test]
fn expert_parallel_model_matches_one_rank_on_the_gpu() {
    if skip("expert_parallel_model_matches_one_rank_on_the_gpu") {
        return;
    }
    check_fixture("qwen3-moe-tiny", GpuPrecision::F32, 0.01);
    check_fixture("deepseek-v3-tiny", GpuPrecision::F32, 0.0);
    // bf16 products: the experts' tensor-core kernels on the local segments.
    check_fixture("qwen3-moe-tiny", GpuPrecision::Bf16, 0.0);
}

#[test]
fn expert_parallel_degree_must_divide_the_experts_on_the_gpu() {
    if skip("expert_parallel_degree_must_divide_the_experts_on_the_gpu") {
        return;
    }
    let model = Model::load(&fixture("qwen3-moe-tiny")).unwrap();
    let e = model.config.moe.as_ref().unwrap().n_experts;
    let mut g = GpuModel::upload(&model, 0).unwrap();
    let nccl = Nccl::get().unwrap();
    let gpu = Gpu::get(0).unwrap();
    // A degree that does not divide E (3, or 5 if E is a multiple of 3);
    // this thread is rank 0, the other ranks threads that only join.
    let world = if e.is_multiple_of(3) { 5 } else { 3 };
    let id = nccl.unique_id().unwrap();
    let hs: Vec<_> = (1..world)
        .map(|rank| {
            let (nccl, gpu) = (nccl.clone(), gpu.clone());
            std::thread::spawn(move || Comm::init(nccl, gpu, &id, world, rank).unwrap())
        })
        .collect();
    let comm = Comm::init(nccl, gpu, &id, world, 0).unwrap();
    let _peers: Vec<Comm> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let err = g.set_expert_parallel(Some(comm)).unwrap_err().to_string();
    assert!(
        err.contains("expert_parallel") && err.contains(&format!("({e})")),
        "{err}"
    );
    assert_eq!(g.expert_parallel(), None);
}

/// What one rank's run with the experts sharded gives.
struct Sharded {
    /// Log-probs of the rank's rows.
    logp: Vec<f32>,
    /// The sharded layout.
    layout: aha_moe_model::Layout,
    /// The gradient (sharded layout) after the all-reduce of the
    /// replicated ranges.
    grads: Vec<f32>,
    /// The local weights after one AdamW step (sharded layout).
    weights: Vec<f32>,
    /// The whole model gathered before any step and after the step.
    gathered: [Vec<f32>; 2],
    /// Device bytes (weights, gradients, moments) with every expert and
    /// with the experts sharded.
    bytes: [[u64; 3]; 2],
    /// The whole model's gradient norm after the all-reduce.
    norm: f64,
}

/// One rank's run with the experts sharded: expert parallelism over `ep`,
/// the gradient all-reduce over `dp` (skipping the rank-local experts).
#[allow(clippy::too_many_arguments)]
fn run_sharded(
    precision: GpuPrecision,
    model: &Model,
    ep: Comm,
    mut dp: Comm,
    ids: &[u32],
    t: usize,
    targets: &[u32],
    dlogp: &[f32],
    aux: f32,
) -> Sharded {
    let mut g = GpuModel::upload_with(model, 0, precision).unwrap();
    let bytes = |g: &mut GpuModel| {
        g.zero_grad().unwrap();
        let (m, v) = g.new_moments().unwrap();
        let p = g.param_bytes();
        [p.weights + p.weights_bf16, p.grads, 4 * (m.len() + v.len()) as u64]
    };
    let whole = bytes(&mut g);
    // Sharding needs expert parallelism on.
    assert!(g.shard_experts().is_err());
    g.set_expert_parallel(Some(ep)).unwrap();
    g.shard_experts().unwrap();
    g.shard_experts().unwrap();
    let sharded = bytes(&mut g);
    // The offloaded and the ZeRO-1 updates would clip by this rank's norm.
    let err = g.set_offload(true).unwrap_err().to_string();
    assert!(err.contains("experts are sharded"), "{err}");
    assert!(g.shard_master(0..1).is_err());
    let before = g.gather_params_to_host().unwrap();
    let b = ids.len() / t;
    // With expert parallelism off the sharded model refuses to run (and
    // to gather); back on with the same communicator it runs.
    let ep = g.set_expert_parallel(None).unwrap().unwrap();
    let err = g.forward(ids, b, t).err().unwrap().to_string();
    assert!(err.contains("expert parallelism is off"), "{err}");
    assert!(g.gather_params_to_host().is_err());
    g.set_expert_parallel(Some(ep)).unwrap();
    let fwd = g.forward(ids, b, t).unwrap();
    let rows: Vec<u32> = (0..ids.len() as u32).collect();
    let scores = g.score(&fwd, &rows, targets, 1.0).unwrap();
    let gpu = g.gpu().clone();
    let logp = gpu.download(&scores.logp).unwrap();
    let dl = gpu.upload(dlogp).unwrap();
    g.backward(fwd, &scores, &dl, None, aux).unwrap();
    let layout = g.layout().clone();
    {
        let (_, grads) = g.grads_mut().unwrap();
        for r in layout.replicated_ranges() {
            dp.all_reduce_sum(grads, r).unwrap();
        }
    }
    let grads = g.grads_to_host().unwrap();
    let norm = g.grad_norm().unwrap();
    let (mut m, mut v) = g.new_moments().unwrap();
    let h = AdamwScalars::new(1e-4, 0.9, 0.999, 1e-6, 0.01, 1).unwrap();
    g.adamw(&mut m, &mut v, &h).unwrap();
    let weights = g.params_to_host().unwrap();
    let after = g.gather_model().unwrap();
    assert_eq!(after.layout, model.layout);
    Sharded {
        logp,
        layout,
        grads,
        weights,
        gathered: [before, after.params],
        bytes: [whole, sharded],
        norm,
    }
}

/// The largest difference of `got` from `want`, relative to `want`'s
/// largest value.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |a, &x| a.max(x.abs())).max(1e-6);
    got.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale
}

fn check_sharded(name: &str, precision: GpuPrecision, aux: f32) {
    let path = fixture(name);
    let model = Model::load(&path).unwrap();
    let vocab = model.config.vocab_size as u64;
    let (b, t) = (4usize, 6usize);
    let n = b * t;
    let seed = 0x5e + name.len() as u64;
    let ids: Vec<u32> = (0..n as u64).map(|i| (mix(seed, i) % vocab) as u32).collect();
    let targets: Vec<u32> = (0..n as u64).map(|i| (mix(seed + 1, i) % vocab) as u32).collect();
    let dlogp: Vec<f32> = (0..n as u64)
        .map(|i| (mix(seed + 2, i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let (one_logp, one_grad, one_w) = run(precision, &model, None, &ids, t, &targets, &dlogp, aux);
    // Rank 0 gets 3 rows, rank 1 the last one.
    let split = [0..3 * t, 3 * t..n];
    let nccl = Nccl::get().unwrap();
    let gpu = Gpu::get(0).unwrap();
    let ids3 = [
        nccl.unique_id().unwrap(),
        nccl.unique_id().unwrap(),
        nccl.unique_id().unwrap(),
    ];
    let hs: Vec<_> = (0..2)
        .map(|rank| {
            let (nccl, gpu, path) = (nccl.clone(), gpu.clone(), path.clone());
            let r = split[rank].clone();
            let (ids, targets, dlogp) = (ids[r.clone()].to_vec(), targets[r.clone()].to_vec(), dlogp[r].to_vec());
            std::thread::spawn(move || {
                let model = Model::load(&path).unwrap();
                let whole_comm = Comm::init(nccl.clone(), gpu.clone(), &ids3[0], 2, rank).unwrap();
                let whole = run(precision, &model, Some(whole_comm), &ids, t, &targets, &dlogp, aux);
                let ep = Comm::init(nccl.clone(), gpu.clone(), &ids3[1], 2, rank).unwrap();
                let dp = Comm::init(nccl, gpu, &ids3[2], 2, rank).unwrap();
                let sharded = run_sharded(precision, &model, ep, dp, &ids, t, &targets, &dlogp, aux);
                (whole, sharded)
            })
        })
        .collect();
    let outs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let e = model.config.moe.as_ref().unwrap().n_experts;
    let expert_elems: usize = model
        .layout
        .entries
        .iter()
        .filter(|en| en.name.contains(".mlp.experts."))
        .map(|en| en.slot.len)
        .sum();
    // Worst differences from the one-rank run (log-prob, gradient, weight).
    let mut worst = [0f32; 3];
    for (rank, ((w_logp, w_grad, w_weights), s)) in outs.iter().enumerate() {
        // The forward: the same log-probs as the whole-expert ranks (bit
        // for bit) and the one-rank run.
        assert_eq!(
            &s.logp, w_logp,
            "{name}: rank {rank}: log-probs differ from the whole-expert run"
        );
        for (i, (g, w)) in s.logp.iter().zip(&one_logp[split[rank].clone()]).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name}: rank {rank} log-prob {i}: {g} vs {w}"
            );
            worst[0] = worst[0].max((g - w).abs());
        }
        // The layout holds exactly this rank's experts, under their names.
        let shard = s.layout.expert_shard.clone().unwrap();
        assert_eq!(shard, rank * e / 2..(rank + 1) * e / 2);
        let local: usize = s.layout.local_expert_ranges().iter().map(|r| r.len()).sum();
        assert_eq!(local * 2, expert_elems);
        assert_eq!(s.layout.size + local, model.layout.size);
        let replicated: usize = s.layout.replicated_ranges().iter().map(|r| r.len()).sum();
        assert_eq!(replicated + local, s.layout.trainable);
        for en in &s.layout.entries {
            if let Some(x) = en
                .name
                .split(".mlp.experts.")
                .nth(1)
                .and_then(|r| r.split('.').next())
                .and_then(|x| x.parse::<usize>().ok())
            {
                assert!(shard.contains(&x), "{name}: rank {rank} holds {}", en.name);
            }
            let whole = model.layout.get(&en.name).unwrap().slot;
            // Gradients and weights after the step: the whole-expert run's
            // bit for bit, the one-rank run's within 1e-5.
            assert_eq!(
                en.slot.of(&s.grads),
                whole.of(w_grad),
                "{name}: rank {rank}: gradient of {}",
                en.name
            );
            assert_eq!(
                en.slot.of(&s.weights),
                whole.of(w_weights),
                "{name}: rank {rank}: {} after the step",
                en.name
            );
            let dg = rel_diff(en.slot.of(&s.grads), whole.of(&one_grad));
            let dw = rel_diff(en.slot.of(&s.weights), whole.of(&one_w));
            assert!(
                dg <= 1e-5 && dw <= 1e-5,
                "{name}: rank {rank}: {}: {dg:e} {dw:e}",
                en.name
            );
            worst[1] = worst[1].max(dg);
            worst[2] = worst[2].max(dw);
        }
        // The gradient norm is the whole model's (clipping scales every
        // rank alike).
        let want: f64 = one_grad[..model.layout.trainable]
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        assert!(
            (s.norm - want).abs() <= 1e-5 * want,
            "{name}: rank {rank}: gradient norm {} vs {want}",
            s.norm
        );
        if rank == 0 {
            eprintln!("{name} ({precision:?}): gradient norm {} (one rank {want})", s.norm);
        }
        // Gathered for a save: the loaded model bit for bit before the
        // step, the whole-expert run's weights after it.
        assert!(
            s.gathered[0] == model.params,
            "{name}: rank {rank}: gathered weights differ"
        );
        assert!(
            &s.gathered[1] == w_weights,
            "{name}: rank {rank}: gathered weights after the step differ"
        );
        // The experts' device bytes fall by the degree (2): the whole
        // minus the sharded bytes are half the experts' bytes in each
        // buffer (weights: 4 bytes f32, plus 2 for the bf16 copy).
        let [whole, sharded] = s.bytes;
        let per = if precision == GpuPrecision::Bf16 { 6 } else { 4 };
        assert_eq!(whole[0] - sharded[0], (per * expert_elems / 2) as u64);
        assert_eq!(whole[1] - sharded[1], (4 * expert_elems / 2) as u64);
        assert_eq!(whole[2] - sharded[2], (8 * expert_elems / 2) as u64);
        // ... and are what the memory plan of the sharded layout says.
        let w = Workload {
            tokens: n,
            scored: n,
            kv_tokens: 0,
            training: true,
            recompute: false,
        };
        let p = match precision {
            GpuPrecision::F32 => Precision::F32,
            GpuPrecision::Bf16 => Precision::Bf16,
        };
        let whole_plan = memory_plan(&model.config, p, &w);
        let plan = whole_plan.with_expert_shard(&s.layout, p);
        let parts = |x: &MemoryPlan| [x.weights + x.weights_bf16, x.grads, x.moments];
        assert_eq!(parts(&whole_plan), whole, "{name}: the whole model's plan");
        assert_eq!(parts(&plan), sharded, "{name}: the sharded plan");
        assert_eq!(whole_plan.with_expert_shard(&model.layout, p), whole_plan);
        if rank == 0 {
            eprintln!(
                "{name} ({precision:?}): experts {} of {} parameters; device bytes per rank, whole -> sharded: weights {} -> {}, grads {} -> {}, moments {} -> {}",
                expert_elems, model.layout.size, whole[0], sharded[0], whole[1], sharded[1], whole[2], sharded[2]
            );
        }
    }
    eprintln!(
        "{name} ({precision:?}): sharded experts vs 1 rank: log-prob {:.2e}, gradient {:.2e}, weights {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn sharded_experts_match_whole_experts_on_the_gpu() {
    if skip("sharded_experts_match_whole_experts_on_the_gpu") {
        return;
    }
    check_sharded("qwen3-moe-tiny", GpuPrecision::F32, 0.01);
    check_sharded("deepseek-v3-tiny", GpuPrecision::F32, 0.0);
    check_sharded("qwen3-moe-tiny", GpuPrecision::Bf16, 0.0);
}
