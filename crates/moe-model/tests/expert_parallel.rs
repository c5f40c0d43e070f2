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
use aha_moe_model::Model;

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
