//! The expert-parallel MoE layer (`moe_ep`) against the whole layer on one
//! rank: the global batch split over 2 and 3 ranks (threads of this
//! process, one communicator each), each holding its shard of the routed
//! experts, gives the same outputs and input gradients for its tokens, the
//! same gradients for its experts (the sum over every rank's tokens), router
//! and shared-expert gradients that sum to the single rank's, and the
//! global expert loads on every rank. Uneven token counts, a rank with no
//! tokens, softmax and DeepSeek-V3 sigmoid gating (with the correction bias
//! and an aux gradient), f32 and bf16 storage. Runs on the emulated GPU and
//! NCCL (`AHA_EMULATED_GPU=1`) or a GPU with NCCL; without either each test
//! prints "skipped: no GPU".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::launch_moe::{MoeGating, MoeMath, MoeStorage};
use aha_cuda_kernels::moe_ep::{expert_shard, moe_layer_backward_ep, moe_layer_forward_ep, MoeEpBuffers};
use aha_cuda_kernels::moe_layer::{
    moe_layer_backward, moe_layer_forward, MoeBuffers, MoeDims, MoeExpertViews, MoeExperts, MoeGrads, MoeWeights,
};
use aha_cuda_kernels::nccl::{Comm, Nccl};
use aha_cuda_kernels::Gpu;

fn setup(test: &str) -> Option<(Arc<Nccl>, Arc<Gpu>)> {
    if aha_cuda_kernels::device_count() == 0 {
        let reason = aha_cuda_kernels::no_gpu_reason().unwrap_or_default();
        eprintln!("{test}: skipped: no GPU ({reason})");
        return None;
    }
    Some((Nccl::get().unwrap(), Gpu::get(0).unwrap()))
}

/// splitmix64 values in [-s, s), rounded to bf16 (exact in both storages).
fn data(seed: u64, n: usize, s: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut z = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32((2.0 * u - 1.0) * s).to_f32()
        })
        .collect()
}

/// One layer's parameters on the host, f32 (bf16-exact values).
#[derive(Clone)]
struct Params {
    router: Vec<f32>,
    bias: Option<Vec<f32>>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    shared: Option<[Vec<f32>; 3]>,
}

/// The parameters on the device: routed experts `experts` only.
enum DevExperts {
    F32([CudaSlice<f32>; 3], Option<[CudaSlice<f32>; 3]>),
    Bf16([CudaSlice<u16>; 3], Option<[CudaSlice<u16>; 3]>),
}

struct DevParams {
    router: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    experts: DevExperts,
}

impl DevParams {
    fn upload(g: &Gpu, p: &Params, d: &MoeDims, experts: std::ops::Range<usize>) -> DevParams {
        let (c, f) = (d.c, d.f);
        let fc = f * c;
        let gate = &p.gate[experts.start * fc..experts.end * fc];
        let up = &p.up[experts.start * fc..experts.end * fc];
        let down = &p.down[experts.start * fc..experts.end * fc];
        let experts = match d.storage {
            MoeStorage::F32 => DevExperts::F32(
                [g.upload(gate).unwrap(), g.upload(up).unwrap(), g.upload(down).unwrap()],
                p.shared.as_ref().map(|s| s.clone().map(|v| g.upload(&v).unwrap())),
            ),
            MoeStorage::Bf16 => {
                let b = |v: &[f32]| {
                    g.upload(
                        &v.iter()
                            .map(|&x| half::bf16::from_f32(x).to_bits())
                            .collect::<Vec<u16>>(),
                    )
                    .unwrap()
                };
                DevExperts::Bf16(
                    [b(gate), b(up), b(down)],
                    p.shared.as_ref().map(|s| [b(&s[0]), b(&s[1]), b(&s[2])]),
                )
            }
        };
        DevParams {
            router: g.upload(&p.router).unwrap(),
            bias: p.bias.as_ref().map(|b| g.upload(b).unwrap()),
            experts,
        }
    }

    fn weights(&self) -> MoeWeights<'_> {
        let experts = match &self.experts {
            DevExperts::F32([a, b, c], s) => MoeExperts::F32(MoeExpertViews {
                w_gate: a.as_view(),
                w_up: b.as_view(),
                w_down: c.as_view(),
                shared: s.as_ref().map(|[x, y, z]| [x.as_view(), y.as_view(), z.as_view()]),
            }),
            DevExperts::Bf16([a, b, c], s) => MoeExperts::Bf16(MoeExpertViews {
                w_gate: a.as_view(),
                w_up: b.as_view(),
                w_down: c.as_view(),
                shared: s.as_ref().map(|[x, y, z]| [x.as_view(), y.as_view(), z.as_view()]),
            }),
        };
        MoeWeights {
            router: self.router.as_view(),
            bias: self.bias.as_ref().map(|b| b.as_view()),
            experts,
        }
    }
}

/// What one run gives: y, dx [N, C]; gradients router, gate, up, down,
/// shared (flattened); the expert loads.
struct Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    router: Vec<f32>,
    experts: [Vec<f32>; 3],
    shared: Vec<f32>,
    counts: Vec<u32>,
}

fn grads_out(g: &Gpu, gr: &MoeGrads) -> (Vec<f32>, [Vec<f32>; 3], Vec<f32>) {
    let shared = gr
        .shared
        .as_ref()
        .map(|s| s.iter().flat_map(|v| g.download(v).unwrap()).collect())
        .unwrap_or_default();
    (
        g.download(&gr.router).unwrap(),
        [
            g.download(&gr.w_gate).unwrap(),
            g.download(&gr.w_up).unwrap(),
            g.download(&gr.w_down).unwrap(),
        ],
        shared,
    )
}

fn assert_near(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn run_case(nccl: &Arc<Nccl>, gpu: &Arc<Gpu>, ns: &[usize], base: MoeDims, with_bias: bool, aux: bool, seed: u64) {
    let world = ns.len();
    let total: usize = ns.iter().sum();
    let (c, e, f, fs) = (base.c, base.e, base.f, base.f_shared);
    let p = Params {
        router: data(seed, e * c, 1.0),
        bias: with_bias.then(|| data(seed + 1, e, 0.3)),
        gate: data(seed + 2, e * f * c, 0.5),
        up: data(seed + 3, e * f * c, 0.5),
        down: data(seed + 4, e * c * f, 0.5),
        shared: (fs > 0).then(|| {
            [
                data(seed + 5, fs * c, 0.5),
                data(seed + 6, fs * c, 0.5),
                data(seed + 7, c * fs, 0.5),
            ]
        }),
    };
    let x = data(seed + 8, total * c, 1.0);
    let dy = data(seed + 9, total * c, 1.0);
    let auxv = aux.then(|| data(seed + 10, e, 0.1));
    // The whole layer on one rank, on the global batch.
    let reference = {
        let g = gpu.as_ref();
        let d = MoeDims { n: total, ..base };
        let dp = DevParams::upload(g, &p, &d, 0..e);
        let w = dp.weights();
        let mut b = MoeBuffers::new(g, d).unwrap();
        let (xd, dyd) = (g.upload(&x).unwrap(), g.upload(&dy).unwrap());
        let auxd = auxv.as_ref().map(|a| g.upload(a).unwrap());
        let mut y = g.zeros::<f32>(total * c).unwrap();
        let mut dx = g.zeros::<f32>(total * c).unwrap();
        let mut gr = MoeGrads::zeros(g, &d).unwrap();
        moe_layer_forward(g, &mut y, &xd, &w, &mut b).unwrap();
        let counts = g.download(&b.perm.counts).unwrap();
        moe_layer_backward(g, &mut dx, &mut gr.view_mut(), &dyd, &xd, &w, &mut b, auxd.as_ref()).unwrap();
        let (router, experts, shared) = grads_out(g, &gr);
        Out {
            y: g.download(&y).unwrap(),
            dx: g.download(&dx).unwrap(),
            router,
            experts,
            shared,
            counts,
        }
    };
    // The same batch split over the ranks, experts sharded.
    let id = nccl.unique_id().unwrap();
    let starts: Vec<usize> = ns
        .iter()
        .scan(0, |a, &n| {
            let s = *a;
            *a += n;
            Some(s)
        })
        .collect();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (nccl, gpu, p) = (nccl.clone(), gpu.clone(), p.clone());
            let n = ns[rank];
            let rows = starts[rank] * c..(starts[rank] + n) * c;
            let (x, dy, auxv) = (x[rows.clone()].to_vec(), dy[rows].to_vec(), auxv.clone());
            std::thread::spawn(move || {
                let g = gpu.as_ref();
                let mut comm = Comm::init(nccl, gpu.clone(), &id, world, rank).unwrap();
                let d = MoeDims { n, ..base };
                let shard = expert_shard(e, world, rank);
                let dp = DevParams::upload(g, &p, &d, shard.clone());
                let w = dp.weights();
                let mut b = MoeBuffers::new(g, d).unwrap();
                let mut ep = MoeEpBuffers::new(g, &b, world, rank).unwrap();
                let up = |v: &[f32]| g.upload(if v.is_empty() { &[0.0f32][..] } else { v }).unwrap();
                let (xd, dyd) = (up(&x), up(&dy));
                let auxd = auxv.as_ref().map(|a| g.upload(a).unwrap());
                let mut y = g.zeros::<f32>((n * c).max(1)).unwrap();
                let mut dx = g.zeros::<f32>((n * c).max(1)).unwrap();
                let ld = MoeDims { e: shard.len(), ..d };
                let mut gr = MoeGrads::zeros(g, &ld).unwrap();
                // The router gradient is [E, C] (replicated), not [E_loc, C].
                gr.router = g.zeros::<f32>(e * c).unwrap();
                moe_layer_forward_ep(g, &mut comm, &mut y, &xd, &w, &mut b, &mut ep).unwrap();
                let counts = g.download(&b.perm.counts).unwrap();
                moe_layer_backward_ep(
                    g,
                    &mut comm,
                    &mut dx,
                    &mut gr.view_mut(),
                    &dyd,
                    &xd,
                    &w,
                    &mut b,
                    &mut ep,
                    auxd.as_ref(),
                )
                .unwrap();
                let (router, experts, shared) = grads_out(g, &gr);
                let mut yv = g.download(&y).unwrap();
                let mut dxv = g.download(&dx).unwrap();
                yv.truncate(n * c);
                dxv.truncate(n * c);
                Out {
                    y: yv,
                    dx: dxv,
                    router,
                    experts,
                    shared,
                    counts,
                }
            })
        })
        .collect();
    let outs: Vec<Out> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let case = format!("ranks {ns:?}, {:?}, {:?}", base.storage, base.gating);
    let mut router_sum = vec![0.0f32; e * c];
    let mut shared_sum = vec![0.0f32; reference.shared.len()];
    for (rank, o) in outs.iter().enumerate() {
        let rows = starts[rank] * c..(starts[rank] + ns[rank]) * c;
        assert_near(&format!("{case}: y on rank {rank}"), &o.y, &reference.y[rows.clone()]);
        assert_near(&format!("{case}: dx on rank {rank}"), &o.dx, &reference.dx[rows]);
        let shard = expert_shard(e, world, rank);
        let fc = f * c;
        for (i, name) in ["gate", "up", "down"].iter().enumerate() {
            assert_near(
                &format!("{case}: d {name} of experts {shard:?} on rank {rank}"),
                &o.experts[i][..shard.len() * fc],
                &reference.experts[i][shard.start * fc..shard.end * fc],
            );
        }
        if ns[rank] > 0 {
            assert_eq!(
                o.counts[..e],
                reference.counts[..e],
                "{case}: global loads on rank {rank}"
            );
        }
        for (s, v) in router_sum.iter_mut().zip(&o.router) {
            *s += v;
        }
        for (s, v) in shared_sum.iter_mut().zip(&o.shared) {
            *s += v;
        }
    }
    assert_near(
        &format!("{case}: d router summed over ranks"),
        &router_sum,
        &reference.router,
    );
    assert_near(
        &format!("{case}: d shared summed over ranks"),
        &shared_sum,
        &reference.shared,
    );
    // Every token's K rows were routed (and, for the record, some cases
    // leave an expert with no rows at all: seed 13's expert 1).
    let routed: u32 = reference.counts[..e].iter().sum();
    assert_eq!(routed as usize, total * base.k, "{case}: {:?}", reference.counts);
}

#[test]
fn expert_parallel_layer_matches_the_whole_layer_on_the_gpu() {
    let Some((nccl, gpu)) = setup("expert_parallel_layer_matches_the_whole_layer_on_the_gpu") else {
        return;
    };
    let base = MoeDims {
        n: 0,
        c: 16,
        e: 6,
        k: 2,
        f: 8,
        f_shared: 8,
        gating: MoeGating::Softmax { renorm: true },
        math: MoeMath::Simt,
        storage: MoeStorage::F32,
    };
    let sigmoid = MoeGating::SigmoidGroup {
        n_group: 2,
        topk_group: 1,
        renorm: true,
        scaling: 2.5,
    };
    run_case(&nccl, &gpu, &[5, 9], base, false, false, 11);
    run_case(
        &nccl,
        &gpu,
        &[7, 0, 6],
        MoeDims { f_shared: 0, ..base },
        false,
        true,
        12,
    );
    run_case(
        &nccl,
        &gpu,
        &[6, 8],
        MoeDims {
            gating: sigmoid,
            ..base
        },
        true,
        false,
        13,
    );
    run_case(
        &nccl,
        &gpu,
        &[4, 5, 7],
        MoeDims {
            storage: MoeStorage::Bf16,
            ..base
        },
        false,
        false,
        14,
    );
}
