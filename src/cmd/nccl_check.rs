//! `aha nccl-check`: every collective of `aha_cuda_kernels::nccl` on every
//! rank, checked against a CPU reference, with timings (run it under
//! `aha launch`, torchrun or srun to check a machine's NCCL and GPUs).

use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The arguments of `aha nccl-check`.
#[derive(clap::Args, Debug)]
pub struct NcclCheckArgs {
    /// Element counts to check, comma-separated.
    #[arg(long, default_value = "1,1000,65537,1048576")]
    sizes: String,
    /// Timed repetitions of each all-reduce.
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

/// splitmix64 values in [-1, 1) for (rank, size, index): every rank can
/// make every other rank's inputs for the reference.
fn value(rank: usize, size: usize, i: usize) -> f32 {
    let mut z = ((rank as u64) << 48) ^ ((size as u64) << 20) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn compare(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f32) -> Result<()> {
    if got.len() != want.len() {
        bail!("{what}: {} values, want {}", got.len(), want.len());
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > tol(i) || !g.is_finite() {
            bail!("{what}: element {i} is {g}, the CPU reference {w}");
        }
    }
    Ok(())
}

/// Runs `aha nccl-check` on this rank.
pub fn run(a: NcclCheckArgs) -> Result<()> {
    use aha_cuda_kernels::nccl::{Comm, Nccl, UniqueId};
    let env = aha_trainer::dist::DistEnv::from_env()?.unwrap_or(aha_trainer::dist::DistEnv {
        rank: 0,
        world: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
    });
    let sizes: Vec<usize> = a
        .sizes
        .split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--sizes: {s:?}")))
        .collect::<Result<_>>()?;
    let (rank, world) = (env.rank, env.world);
    let mut group = aha_trainer::dist::Group::join(&env, aha_trainer::dist::rendezvous_timeout())?;
    if aha_cuda_kernels::device_count() == 0 {
        bail!(
            "rank {rank}: no GPU: {}",
            aha_cuda_kernels::no_gpu_reason().unwrap_or_default()
        );
    }
    let ordinal = if aha_cuda_kernels::emulate::emulated_gpu_requested() {
        0
    } else {
        env.local_rank
    };
    let gpu = aha_cuda_kernels::Gpu::get(ordinal)?;
    let nccl = Nccl::get()?;
    let mine = if rank == 0 {
        nccl.unique_id()?.0.to_vec()
    } else {
        Vec::new()
    };
    let got = group.broadcast_bytes(&mine)?;
    let mut id = UniqueId([0; 128]);
    if got.len() != 128 {
        bail!("rank {rank}: rank 0 sent {} bytes for the NCCL id", got.len());
    }
    id.0.copy_from_slice(&got);
    let mut comm = Comm::init(nccl.clone(), gpu.clone(), &id, world, rank)?;
    if rank == 0 {
        println!(
            "{}",
            serde_json::json!({"nccl": nccl.version_string(), "library": nccl.path().display().to_string(),
                "world": world, "device": gpu.name()})
        );
    }
    for &n in &sizes {
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|r| (0..n * world).map(|i| value(r, n, i)).collect())
            .collect();
        let mut sum = inputs[0].clone();
        for x in &inputs[1..] {
            for (s, v) in sum.iter_mut().zip(x) {
                *s += v;
            }
        }
        let abs: Vec<f32> = (0..n * world)
            .map(|i| inputs.iter().map(|x| x[i].abs()).sum())
            .collect();
        // Rank order on the emulated NCCL (exact); a ring's order elsewhere.
        let exact = nccl.is_emulated();
        let tol32 = |i: usize| {
            if exact {
                0.0
            } else {
                1e-6 * world as f32 * (1.0 + abs[i])
            }
        };
        let mine = &inputs[rank];
        // all-reduce f32, timed.
        let mut buf = gpu.upload(mine)?;
        comm.all_reduce_sum(&mut buf, 0..n * world)?;
        compare(
            &format!("rank {rank}: all-reduce f32 of {}", n * world),
            &gpu.download(&buf)?,
            &sum,
            tol32,
        )?;
        let t = Instant::now();
        for _ in 0..a.iters {
            comm.all_reduce_sum(&mut buf, 0..n * world)?;
        }
        let secs = t.elapsed().as_secs_f64() / a.iters.max(1) as f64;
        // reduce-scatter, all-gather, broadcast.
        let send = gpu.upload(mine)?;
        let mut part = gpu.zeros::<f32>(n)?;
        comm.reduce_scatter_sum(&send, &mut part)?;
        let lo = rank * n;
        compare(
            &format!("rank {rank}: reduce-scatter of {n}"),
            &gpu.download(&part)?,
            &sum[lo..lo + n],
            |i| tol32(lo + i),
        )?;
        let first = gpu.upload(&mine[..n])?;
        let mut all = gpu.zeros::<f32>(n * world)?;
        comm.all_gather(&first, &mut all)?;
        let want: Vec<f32> = inputs.iter().flat_map(|x| x[..n].to_vec()).collect();
        compare(
            &format!("rank {rank}: all-gather of {n}"),
            &gpu.download(&all)?,
            &want,
            |_| 0.0,
        )?;
        let mut b = gpu.upload(&mine[..n])?;
        comm.broadcast(&mut b, world - 1)?;
        compare(
            &format!("rank {rank}: broadcast of {n}"),
            &gpu.download(&b)?,
            &inputs[world - 1][..n],
            |_| 0.0,
        )?;
        // all-reduce bf16: within a bf16 rounding per rank of the f32 sum.
        let bits: Vec<u16> = mine[..n].iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let mut h = gpu.upload(&bits)?;
        comm.all_reduce_sum(&mut h, 0..n)?;
        let got: Vec<f32> = gpu
            .download(&h)?
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect();
        let want: Vec<f32> = (0..n)
            .map(|i| inputs.iter().map(|x| half::bf16::from_f32(x[i]).to_f32()).sum())
            .collect();
        compare(&format!("rank {rank}: all-reduce bf16 of {n}"), &got, &want, |i| {
            world as f32 * abs[i] / 128.0
        })?;
        let bytes = (n * world * 4) as f64;
        let busbw = if secs > 0.0 {
            bytes * 2.0 * (world as f64 - 1.0) / world as f64 / secs / 1e9
        } else {
            0.0
        };
        if rank == 0 {
            println!(
                "{}",
                serde_json::json!({"elements": n * world, "all_reduce_f32_ms": secs * 1e3, "busbw_gb_s": busbw,
                    "checked": ["all_reduce_f32", "reduce_scatter_f32", "all_gather_f32", "broadcast_f32", "all_reduce_bf16"]})
            );
        }
    }
    group.barrier()?;
    eprintln!("rank {rank}: nccl-check ok ({} sizes)", sizes.len());
    Ok(())
}
