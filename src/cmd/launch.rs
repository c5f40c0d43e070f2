//! `aha launch`: N copies of an aha command on one node, torchrun's way
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT` in each child's environment; see `aha_trainer::dist`),
//! each line of their output prefixed with `[rank N]`. When a child fails,
//! the others get a grace period to report their own view of it, are then
//! killed, and `aha launch` exits non-zero naming the rank that failed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The arguments of `aha launch`.
#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Processes on this node (one per GPU; `LOCAL_RANK` picks the GPU).
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the job (each runs `aha launch` with its `--node-rank`).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Rank 0's host, where it serves the rendezvous.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rank 0's rendezvous port.
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// Seconds the other ranks get to exit on their own after one fails,
    /// before they are killed.
    #[arg(long, default_value_t = 10.0)]
    grace_s: f64,
    /// The aha command each process runs, after `--`
    /// (`aha launch --nproc-per-node 8 -- grpo --config run.toml`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

/// Copies `from` line by line to stdout or stderr with `prefix`.
fn pump(from: impl std::io::Read + Send + 'static, prefix: String, to_err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    // Progress lines redraw with '\r': keep the last state.
                    let line = text.trim_end_matches(['\n', '\r']);
                    let line = line.rsplit('\r').next().unwrap_or(line);
                    if to_err {
                        let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
                    } else {
                        let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
                    }
                }
            }
        }
    })
}

/// Runs `aha launch`.
pub fn run(a: LaunchArgs) -> Result<()> {
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!(
            "launch: --nproc-per-node {} --nnodes {} --node-rank {}: need at least one process and node_rank < nnodes",
            a.nproc_per_node,
            a.nnodes,
            a.node_rank
        );
    }
    let exe = std::env::current_exe().context("launch: the aha executable")?;
    let world = a.nproc_per_node * a.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pumps = Vec::new();
    for local in 0..a.nproc_per_node {
        let rank = a.node_rank * a.nproc_per_node + local;
        let mut child = Command::new(&exe)
            .args(&a.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc_per_node.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", a.master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("launch: starting rank {rank} ({})", exe.display()))?;
        eprintln!("[launch] rank {rank}: pid {}", child.id());
        if let Some(o) = child.stdout.take() {
            pumps.push(pump(o, format!("[rank {rank}] "), false));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(pump(e, format!("[rank {rank}] "), true));
        }
        children.push((rank, child));
    }
    let mut failed: Option<(usize, String)> = None;
    let mut failed_at: Option<Instant> = None;
    let mut done = vec![false; children.len()];
    loop {
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[i] = true;
                if !status.success() && failed.is_none() {
                    let how = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                        (Some(c), _) => format!("exited with code {c}"),
                        (None, Some(s)) => format!("was killed by signal {s}"),
                        _ => format!("ended with {status}"),
                    };
                    failed = Some((*rank, how));
                    failed_at = Some(Instant::now());
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs_f64(a.grace_s.max(0.0))) {
            for (i, (rank, child)) in children.iter_mut().enumerate() {
                if !done[i] {
                    eprintln!("[launch] stopping rank {rank}");
                    let _ = child.kill();
                    let _ = child.wait();
                    done[i] = true;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pumps {
        let _ = p.join();
    }
    match failed {
        Some((rank, how)) => bail!("launch: rank {rank} of {world} {how}; the other ranks ended or were stopped"),
        None => Ok(()),
    }
}
