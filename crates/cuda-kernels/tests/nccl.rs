//! The NCCL binding against a CPU reference: every collective aha uses, on
//! random sizes, with 2 and 3 ranks (threads of this process, each with its
//! own communicator; the emulated NCCL connects them as it connects
//! processes), and a rank that never joins, named in the error. Runs on the
//! emulated GPU and NCCL (`AHA_EMULATED_GPU=1`) or on a machine with GPUs
//! and NCCL; without either each test prints "skipped: no GPU".
//! Processes rather than threads are covered by `tests/dist.rs` at the
//! workspace root (`aha launch ... nccl-check`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use aha_cuda_kernels::nccl::{shard_range, Comm, Nccl, UniqueId};
use aha_cuda_kernels::Gpu;

fn setup(test: &str) -> Option<(Arc<Nccl>, Arc<Gpu>)> {
    if aha_cuda_kernels::device_count() == 0 {
        let reason = aha_cuda_kernels::no_gpu_reason().unwrap_or_default();
        eprintln!("{test}: skipped: no GPU ({reason})");
        return None;
    }
    let nccl = Nccl::get().unwrap();
    Some((nccl, Gpu::get(0).unwrap()))
}

/// splitmix64 values in [-1, 1), per (seed, rank, index).
fn data(seed: u64, rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut z = seed ^ ((rank as u64) << 40) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn from_bf16(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

/// Runs `body(rank, comm)` on `world` threads joined in one communicator.
fn on_ranks<T: Send + 'static>(
    nccl: &Arc<Nccl>,
    gpu: &Arc<Gpu>,
    world: usize,
    body: impl Fn(usize, &mut Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let id = nccl.unique_id().unwrap();
    let body = Arc::new(body);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (nccl, gpu, body) = (nccl.clone(), gpu.clone(), body.clone());
            std::thread::spawn(move || {
                let mut comm = Comm::init(nccl, gpu, &id, world, rank).unwrap();
                assert_eq!((comm.rank(), comm.world()), (rank, world));
                body(rank, &mut comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn collectives_match_the_cpu_on_random_sizes_cuda() {
    let Some((nccl, gpu)) = setup("collectives_match_the_cpu_on_random_sizes_cuda") else {
        return;
    };
    for (case, (world, n)) in [(2usize, 1usize), (2, 1000), (3, 4097), (3, 77), (2, 65_536)]
        .into_iter()
        .enumerate()
    {
        let seed = 0x5eed + case as u64;
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(seed, r, n * world)).collect();
        // f32 sums in rank order, the order the emulated NCCL promises (a
        // real NCCL's ring order differs in the last bits: 1e-6 relative).
        let mut sum = inputs[0].clone();
        for x in &inputs[1..] {
            for (s, v) in sum.iter_mut().zip(x) {
                *s += v;
            }
        }
        let exact = nccl.is_emulated();
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let ok = if exact {
                    g == w
                } else {
                    (g - w).abs() <= 1e-6 + 1e-6 * w.abs()
                };
                assert!(ok, "{what}: element {i}: {g} vs {w} (world {world}, n {n})");
            }
        };
        let gpu2 = gpu.clone();
        let ins = inputs.clone();
        let outs = on_ranks(&nccl, &gpu, world, move |rank, comm| {
            let g = &gpu2;
            let mine = &ins[rank];
            // All-reduce of a sub-range in place: the rest is untouched.
            let mut buf = g.upload(mine).unwrap();
            let lo = n / 3;
            comm.all_reduce_sum(&mut buf, lo..n * world).unwrap();
            let ar = g.download(&buf).unwrap();
            // Reduce-scatter: this rank's block of the sum.
            let send = g.upload(mine).unwrap();
            let mut recv = g.zeros::<f32>(n).unwrap();
            comm.reduce_scatter_sum(&send, &mut recv).unwrap();
            let rs = g.download(&recv).unwrap();
            // All-gather of each rank's first n values.
            let part = g.upload(&mine[..n]).unwrap();
            let mut all = g.zeros::<f32>(n * world).unwrap();
            comm.all_gather(&part, &mut all).unwrap();
            let ag = g.download(&all).unwrap();
            // Broadcast from the last rank.
            let mut b = g.upload(&mine[..n]).unwrap();
            comm.broadcast(&mut b, world - 1).unwrap();
            let bc = g.download(&b).unwrap();
            // bf16 all-reduce and f64 all-reduce.
            let mut h = g
                .upload(&mine[..n].iter().map(|&x| bf16(x)).collect::<Vec<u16>>())
                .unwrap();
            comm.all_reduce_sum(&mut h, 0..n).unwrap();
            let hb = g.download(&h).unwrap();
            let mut d = g
                .upload(&mine[..n].iter().map(|&x| f64::from(x)).collect::<Vec<f64>>())
                .unwrap();
            comm.all_reduce_sum(&mut d, 0..n).unwrap();
            let dd = g.download(&d).unwrap();
            (ar, rs, ag, bc, hb, dd)
        });
        for (rank, (ar, rs, ag, bc, hb, dd)) in outs.into_iter().enumerate() {
            let lo = n / 3;
            close(&ar[..lo], &inputs[rank][..lo], "all-reduce outside its range");
            close(&ar[lo..], &sum[lo..], "all-reduce");
            close(&rs, &sum[rank * n..(rank + 1) * n], "reduce-scatter");
            let gathered: Vec<f32> = inputs.iter().flat_map(|x| x[..n].to_vec()).collect();
            close(&ag, &gathered, "all-gather");
            close(&bc, &inputs[world - 1][..n], "broadcast");
            for i in 0..n {
                // bf16: the f32 sum of the bf16 inputs, rounded once (the
                // emulated NCCL's rule; a real ring rounds per hop: 2 ulps).
                let want: f32 = inputs.iter().map(|x| from_bf16(bf16(x[i]))).sum();
                let got = from_bf16(hb[i]);
                let tol = if exact { 0.0 } else { 2.0 * want.abs() / 128.0 };
                assert!((got - from_bf16(bf16(want))).abs() <= tol, "bf16 {i}: {got} vs {want}");
                let want64: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                assert!((dd[i] - want64).abs() <= 1e-12, "f64 {i}: {} vs {want64}", dd[i]);
            }
        }
    }
    a_rank_that_never_joins_is_named_after_the_timeout(&nccl, &gpu);
}

/// ZeRO-1's collectives: the in-place reduce-scatter and all-gather over
/// contiguous shards, on sizes that do not divide by the world (the last
/// rank owns the remainder) and one smaller than the world.
#[test]
fn sharded_collectives_cover_sizes_not_divisible_by_the_world_cuda() {
    let Some((nccl, gpu)) = setup("sharded_collectives_cover_sizes_not_divisible_by_the_world_cuda") else {
        return;
    };
    let exact = nccl.is_emulated();
    for (case, (world, n)) in [(2usize, 1001usize), (3, 1000), (3, 2), (2, 64)]
        .into_iter()
        .enumerate()
    {
        // The shards partition 0..n in rank order.
        let ranges: Vec<_> = (0..world).map(|r| shard_range(n, world, r)).collect();
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges[world - 1].end, n);
        for w in ranges.windows(2) {
            assert_eq!(w[0].end, w[1].start, "world {world}, n {n}");
        }
        assert!(ranges[world - 1].len() - ranges[0].len() < world);
        let seed = 0xabc + case as u64;
        // Two spare elements past n, which neither collective may touch.
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(seed, r, n + 2)).collect();
        let mut sum = inputs[0].clone();
        for x in &inputs[1..] {
            for (s, v) in sum.iter_mut().zip(x) {
                *s += v;
            }
        }
        let gpu2 = gpu.clone();
        let ins = inputs.clone();
        let outs = on_ranks(&nccl, &gpu, world, move |rank, comm| {
            let mut buf = gpu2.upload(&ins[rank]).unwrap();
            let own = comm.reduce_scatter_sum_shards(&mut buf, n).unwrap();
            let rs = gpu2.download(&buf).unwrap();
            // Each rank writes its own marker into its shard, then gathers.
            let mut mine = ins[rank].clone();
            for x in &mut mine[own.clone()] {
                *x = rank as f32 + 0.5;
            }
            let mut b = gpu2.upload(&mine).unwrap();
            comm.all_gather_shards(&mut b, n).unwrap();
            (own, rs, gpu2.download(&b).unwrap())
        });
        for (rank, (own, rs, ag)) in outs.into_iter().enumerate() {
            assert_eq!(own, ranges[rank]);
            for i in own {
                let (g, w) = (rs[i], sum[i]);
                let ok = if exact {
                    g == w
                } else {
                    (g - w).abs() <= 1e-6 + 1e-6 * w.abs()
                };
                assert!(
                    ok,
                    "reduce-scatter, rank {rank}, element {i}: {g} vs {w} (world {world}, n {n})"
                );
            }
            assert_eq!(&rs[n..], &inputs[rank][n..], "reduce-scatter past n");
            for (r, range) in ranges.iter().enumerate() {
                for i in range.clone() {
                    assert_eq!(
                        ag[i],
                        r as f32 + 0.5,
                        "all-gather on rank {rank}: element {i} is rank {r}'s"
                    );
                }
            }
            assert_eq!(&ag[n..], &inputs[rank][n..], "all-gather past n");
        }
    }
}

#[test]
fn wrong_arguments_are_errors_naming_the_call_cuda() {
    let Some((nccl, gpu)) = setup("wrong_arguments_are_errors_naming_the_call_cuda") else {
        return;
    };
    let gpu2 = gpu.clone();
    let errs = on_ranks(&nccl, &gpu, 1, move |_, comm| {
        let mut buf = gpu2.zeros::<f32>(8).unwrap();
        let a = comm.all_reduce_sum(&mut buf, 0..9).unwrap_err().to_string();
        let send = gpu2.zeros::<f32>(5).unwrap();
        let b = comm.reduce_scatter_sum(&send, &mut buf).unwrap_err().to_string();
        let c = comm.broadcast(&mut buf, 1).unwrap_err().to_string();
        vec![a, b, c]
    });
    let e = &errs[0];
    assert!(
        e[0].contains("ncclAllReduce") && e[0].contains("range ends at 9"),
        "{}",
        e[0]
    );
    assert!(e[1].contains("ncclReduceScatter"), "{}", e[1]);
    assert!(e[2].contains("ncclBroadcast") && e[2].contains("root 1"), "{}", e[2]);
}

/// Ranks 0 and 2 of 3 join, rank 1 never does: both fail within the
/// timeout, rank 0 naming rank 1. Called last by the collectives test, as
/// it sets the process's `AHA_NCCL_TIMEOUT_S`.
fn a_rank_that_never_joins_is_named_after_the_timeout(nccl: &Arc<Nccl>, gpu: &Arc<Gpu>) {
    if !nccl.is_emulated() {
        // The init timeout checked here is the emulated NCCL's.
        return;
    }
    // The emulated NCCL reads its timeout at init: 2 s here.
    std::env::set_var("AHA_NCCL_TIMEOUT_S", "2");
    let (nccl, gpu) = (nccl.clone(), gpu.clone());
    let id: UniqueId = nccl.unique_id().unwrap();
    let t = std::time::Instant::now();
    // Ranks 0 and 2 of 3 join; rank 1 never does.
    let hs: Vec<_> = [0usize, 2]
        .into_iter()
        .map(|rank| {
            let (nccl, gpu) = (nccl.clone(), gpu.clone());
            std::thread::spawn(move || Comm::init(nccl, gpu, &id, 3, rank).map(|_| ()))
        })
        .collect();
    let errs: Vec<String> = hs
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err().to_string())
        .collect();
    let secs = t.elapsed().as_secs_f64();
    assert!(errs[0].contains("rank(s) 1 did not connect"), "{}", errs[0]);
    assert!(errs[0].contains("rank 0 of 3"), "{}", errs[0]);
    assert!(errs[1].contains("rank 2 of 3"), "{}", errs[1]);
    assert!(secs < 10.0, "took {secs} s");
}

/// The block rank `from` sends to rank `to` in the all-to-all test:
/// `counts[from][to]` values that name both ends and the position
/// (`from * 1000 + to * 100 + i`), so a block landing in the wrong place or
/// order shows.
fn a2a_block(from: usize, to: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (from * 1000 + to * 100 + i) as f32).collect()
}

/// Expert parallelism's all-to-all: uneven per-rank counts, zeros among
/// them (a rank that sends nothing to anyone, a rank that receives nothing
/// from one peer), on 2 and 3 ranks, checked against the exchange written
/// out by hand; the packed form exchanges the counts first, the explicit
/// form places blocks at given offsets and leaves the gaps alone.
#[test]
fn all_to_all_moves_uneven_blocks_between_ranks_cuda() {
    let Some((nccl, gpu)) = setup("all_to_all_moves_uneven_blocks_between_ranks_cuda") else {
        return;
    };
    // counts[from][to], elements.
    let cases: Vec<Vec<Vec<usize>>> = vec![
        vec![vec![3, 5], vec![0, 2]],
        vec![vec![1, 0, 4], vec![0, 0, 0], vec![2, 7, 0]],
        vec![vec![0, 6, 1], vec![3, 2, 0], vec![5, 0, 9]],
    ];
    for counts in cases {
        let world = counts.len();
        let c2 = counts.clone();
        let gpu2 = gpu.clone();
        let outs = on_ranks(&nccl, &gpu, world, move |rank, comm| {
            let g = &gpu2;
            let send_counts = c2[rank].clone();
            let send: Vec<f32> = (0..world).flat_map(|to| a2a_block(rank, to, send_counts[to])).collect();
            let dev = g.upload(&send).unwrap();
            let (recv, recv_counts) = comm.all_to_all_packed(&dev, &send_counts).unwrap();
            let packed = g.download(&recv).unwrap();
            // Explicit offsets, in reverse rank order with a gap of 2
            // between blocks; bf16 this time.
            let mut offs = vec![0usize; world];
            let mut at = 0;
            for p in (0..world).rev() {
                offs[p] = at;
                at += recv_counts[p] + 2;
            }
            let mut sent_offs = vec![0usize; world];
            for p in 1..world {
                sent_offs[p] = sent_offs[p - 1] + send_counts[p - 1];
            }
            let send16: Vec<u16> = send.iter().map(|&x| bf16(x)).collect();
            let dev16 = g.upload(&send16).unwrap();
            let mut recv16 = g.upload(&vec![bf16(-1.0); at]).unwrap();
            comm.all_to_all_v(&dev16, &send_counts, &sent_offs, &mut recv16, &recv_counts, &offs)
                .unwrap();
            let spread = g.download(&recv16).unwrap();
            (recv_counts, packed, offs, spread)
        });
        for (rank, (recv_counts, packed, offs, spread)) in outs.into_iter().enumerate() {
            let want_counts: Vec<usize> = (0..world).map(|from| counts[from][rank]).collect();
            assert_eq!(recv_counts, want_counts, "rank {rank} counts, case {counts:?}");
            let want: Vec<f32> = (0..world)
                .flat_map(|from| a2a_block(from, rank, counts[from][rank]))
                .collect();
            if want.is_empty() {
                assert_eq!(packed, vec![0.0], "rank {rank}: nothing received");
            } else {
                assert_eq!(packed, want, "rank {rank}, case {counts:?}");
            }
            let mut filled = vec![false; spread.len()];
            for from in 0..world {
                let block = a2a_block(from, rank, counts[from][rank]);
                for (i, v) in block.iter().enumerate() {
                    assert_eq!(
                        from_bf16(spread[offs[from] + i]),
                        from_bf16(bf16(*v)),
                        "rank {rank}: element {i} from rank {from}"
                    );
                    filled[offs[from] + i] = true;
                }
            }
            for (i, f) in filled.iter().enumerate() {
                if !f {
                    assert_eq!(from_bf16(spread[i]), -1.0, "rank {rank}: gap element {i} was written");
                }
            }
        }
    }
    // Wrong shapes are refused before anything is sent.
    let gpu2 = gpu.clone();
    let errs = on_ranks(&nccl, &gpu, 1, move |_, comm| {
        let send = gpu2.zeros::<f32>(4).unwrap();
        let mut recv = gpu2.zeros::<f32>(4).unwrap();
        let a = comm
            .all_to_all_v(&send, &[5], &[0], &mut recv, &[4], &[0])
            .unwrap_err()
            .to_string();
        let b = comm.exchange_counts(&[1, 2]).unwrap_err().to_string();
        vec![a, b]
    });
    assert!(
        errs[0][0].contains("all-to-all") && errs[0][0].contains("range ends at 5"),
        "{}",
        errs[0][0]
    );
    assert!(errs[0][1].contains("2 send counts for 1 ranks"), "{}", errs[0][1]);
}
