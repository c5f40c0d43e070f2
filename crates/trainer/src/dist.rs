//! Launch environment and rendezvous for several processes, torchrun's way:
//! each process reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
//! `MASTER_PORT` (set by `aha launch`, torchrun, Slurm's `srun` through a
//! wrapper, mpirun or a Kubernetes job). Rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` (TCP); every other rank connects to it, with
//! retries, and says which rank it is. When every rank has joined, rank 0
//! answers each one; a rank that has not joined within the timeout
//! (`AHA_RENDEZVOUS_TIMEOUT_S`, default 300 s) fails every rank with an
//! error naming the missing ranks.
//!
//! The joined [`Group`] then carries small host-side messages through rank
//! 0 (the NCCL unique id, batch statistics, metrics); gradients go through
//! NCCL ([`crate::dp`]). A peer that exits closes its socket, which every
//! waiting rank sees at once; one that hangs is given up on after the same
//! timeout.
//!
//! ```
//! // With no WORLD_SIZE (or WORLD_SIZE=1) there is nothing to join.
//! let env = aha_trainer::dist::DistEnv::from_vars(|_| None).unwrap();
//! assert!(env.is_none());
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Dist(msg.into())
}

/// Where this process sits among the ranks, from the launch variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process, 0..world.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world: usize,
    /// `LOCAL_RANK`: this process among those of its node (picks the GPU;
    /// default `RANK`).
    pub local_rank: usize,
    /// `MASTER_ADDR`: rank 0's host (default `127.0.0.1`).
    pub master_addr: String,
    /// `MASTER_PORT`: rank 0's rendezvous port (default 29500, torchrun's).
    pub master_port: u16,
}

impl DistEnv {
    /// Reads the launch variables of this process; `None` when
    /// `WORLD_SIZE` is unset or 1 (a single process).
    pub fn from_env() -> Result<Option<DistEnv>> {
        DistEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|e| err(format!("{k}={v:?}: {e}"))),
            }
        };
        let world = num("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(None);
        }
        let rank = num("RANK")?.ok_or_else(|| err(format!("WORLD_SIZE={world} but RANK is not set")))?;
        if rank >= world {
            return Err(err(format!("RANK={rank} but WORLD_SIZE={world}")));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let master_port = match get("MASTER_PORT") {
            None => 29500,
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|e| err(format!("MASTER_PORT={p:?}: {e}")))?,
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        }))
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// How long the rendezvous and every host-side exchange wait for a peer:
/// `AHA_RENDEZVOUS_TIMEOUT_S` seconds (default 300).
pub fn rendezvous_timeout() -> Duration {
    let s = std::env::var("AHA_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

const MAGIC: u32 = 0x6168_6131; // "aha1"
const OK: u8 = 0;
const FAIL: u8 = 1;

fn send_msg(s: &mut TcpStream, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind;
    head[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(body)?;
    s.flush()
}

fn recv_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(n);
    if len > 1 << 34 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn io_why(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!(
                "no answer within {:.0} s (AHA_RENDEZVOUS_TIMEOUT_S)",
                timeout.as_secs_f64()
            )
        }
        std::io::ErrorKind::UnexpectedEof => "closed the connection (did it exit?)".into(),
        _ => format!("{e} (did it exit?)"),
    }
}

/// The joined ranks: rank 0 holds a connection to every other rank, each
/// other rank one to rank 0.
#[derive(Debug)]
pub struct Group {
    rank: usize,
    world: usize,
    /// Rank 0: `peers[r]` for r >= 1 (`peers[0]` unused); others: `peers[0]`
    /// is rank 0.
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
    master: String,
}

impl Group {
    /// Joins the rendezvous described by `env`, waiting at most `timeout`
    /// for every rank.
    pub fn join(env: &DistEnv, timeout: Duration) -> Result<Group> {
        if env.world <= 1 {
            return Ok(Group {
                rank: 0,
                world: 1,
                peers: vec![None],
                timeout,
                master: env.master(),
            });
        }
        if env.rank == 0 {
            Group::join_root(env, timeout)
        } else {
            Group::join_peer(env, timeout)
        }
    }

    fn join_root(env: &DistEnv, timeout: Duration) -> Result<Group> {
        let master = env.master();
        // Listen on every interface at MASTER_PORT, as torchrun's store does.
        let listener = TcpListener::bind(("0.0.0.0", env.master_port))
            .map_err(|e| err(format!("rank 0: listening on port {} ({master}): {e}", env.master_port)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("rank 0: {master}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
        let mut joined = 1;
        while joined < env.world && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(timeout));
                    let _ = s.set_nodelay(true);
                    let hello = recv_msg(&mut s);
                    let Ok((OK, body)) = hello else { continue };
                    if body.len() != 16 {
                        continue;
                    }
                    let word = |i: usize| {
                        let mut b = [0u8; 4];
                        b.copy_from_slice(&body[i * 4..i * 4 + 4]);
                        u32::from_le_bytes(b) as usize
                    };
                    let (magic, rank, world) = (word(0) as u32, word(1), word(2));
                    if magic != MAGIC {
                        continue;
                    }
                    if world != env.world || rank == 0 || rank >= env.world || peers[rank].is_some() {
                        let msg = format!(
                            "rendezvous at {master}: a process said it is rank {rank} of {world}; rank 0 expects \
                             ranks 1..{} of {} (each once)",
                            env.world, env.world
                        );
                        let _ = send_msg(&mut s, FAIL, msg.as_bytes());
                        Group::fail_all(&mut peers, &msg);
                        return Err(err(msg));
                    }
                    peers[rank] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(err(format!("rank 0: accepting at {master}: {e}"))),
            }
        }
        if joined < env.world {
            let missing: Vec<String> = (1..env.world)
                .filter(|&r| peers[r].is_none())
                .map(|r| r.to_string())
                .collect();
            let msg = format!(
                "rendezvous at {master}: rank(s) {} of {} did not join within {:.0} s (AHA_RENDEZVOUS_TIMEOUT_S)",
                missing.join(", "),
                env.world,
                timeout.as_secs_f64()
            );
            Group::fail_all(&mut peers, &msg);
            return Err(err(msg));
        }
        for (r, p) in peers.iter_mut().enumerate() {
            if let Some(s) = p {
                send_msg(s, OK, &[]).map_err(|e| err(format!("rendezvous at {master}: rank {r}: {e}")))?;
            }
        }
        Ok(Group {
            rank: 0,
            world: env.world,
            peers,
            timeout,
            master,
        })
    }

    fn fail_all(peers: &mut [Option<TcpStream>], msg: &str) {
        for s in peers.iter_mut().flatten() {
            let _ = send_msg(s, FAIL, msg.as_bytes());
        }
    }

    fn join_peer(env: &DistEnv, timeout: Duration) -> Result<Group> {
        let master = env.master();
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut stream = loop {
            let addrs: Vec<_> = match master.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    last = e.to_string();
                    Vec::new()
                }
            };
            let mut got = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(s) = got {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "rank {}: rank 0 at {master} could not be reached within {:.0} s (AHA_RENDEZVOUS_TIMEOUT_S): {last}",
                    env.rank,
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(timeout + Duration::from_secs(5)))
            .map_err(|e| err(format!("rank {}: {e}", env.rank)))?;
        let mut hello = Vec::with_capacity(16);
        for w in [MAGIC, env.rank as u32, env.world as u32, 0] {
            hello.extend_from_slice(&w.to_le_bytes());
        }
        send_msg(&mut stream, OK, &hello).map_err(|e| err(format!("rank {}: sending to {master}: {e}", env.rank)))?;
        match recv_msg(&mut stream) {
            Ok((OK, _)) => {}
            Ok((_, msg)) => return Err(err(String::from_utf8_lossy(&msg).into_owned())),
            Err(e) => {
                return Err(err(format!(
                    "rank {}: waiting for the other ranks through rank 0 at {master}: {}",
                    env.rank,
                    io_why(&e, timeout)
                )))
            }
        }
        let _ = stream.set_read_timeout(Some(timeout));
        Ok(Group {
            rank: env.rank,
            world: env.world,
            peers: vec![Some(stream)],
            timeout,
            master,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Every rank's `mine`, in rank order (through rank 0).
    pub fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (rank, timeout) = (self.rank, self.timeout);
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for r in 1..self.world {
                let s = self.peers[r]
                    .as_mut()
                    .ok_or_else(|| err(format!("rank 0: no connection to rank {r}")))?;
                match recv_msg(s) {
                    Ok((OK, b)) => all.push(b),
                    Ok((_, msg)) => return Err(err(String::from_utf8_lossy(&msg).into_owned())),
                    Err(e) => {
                        let msg = format!("rank 0: waiting for rank {r}: rank {r} {}", io_why(&e, timeout));
                        self.fail_others(&msg);
                        return Err(err(msg));
                    }
                }
            }
            let mut packed = Vec::new();
            for a in &all {
                packed.extend_from_slice(&(a.len() as u64).to_le_bytes());
                packed.extend_from_slice(a);
            }
            for r in 1..self.world {
                if let Some(s) = self.peers[r].as_mut() {
                    send_msg(s, OK, &packed)
                        .map_err(|e| err(format!("rank 0: sending to rank {r}: rank {r} {}", io_why(&e, timeout))))?;
                }
            }
            Ok(all)
        } else {
            let master = self.master.clone();
            let s = self.peers[0]
                .as_mut()
                .ok_or_else(|| err(format!("rank {rank}: no connection to rank 0")))?;
            let lost = |e: std::io::Error| err(format!("rank {rank}: rank 0 ({master}) {}", io_why(&e, timeout)));
            send_msg(s, OK, mine).map_err(lost)?;
            let packed = match recv_msg(s) {
                Ok((OK, b)) => b,
                Ok((_, msg)) => return Err(err(String::from_utf8_lossy(&msg).into_owned())),
                Err(e) => return Err(lost(e)),
            };
            let mut all = Vec::with_capacity(self.world);
            let mut at = 0usize;
            while at + 8 <= packed.len() {
                let mut n = [0u8; 8];
                n.copy_from_slice(&packed[at..at + 8]);
                let n = u64::from_le_bytes(n) as usize;
                at += 8;
                let end = at
                    .checked_add(n)
                    .filter(|&e| e <= packed.len())
                    .ok_or_else(|| err(format!("rank {rank}: a malformed message from rank 0")))?;
                all.push(packed[at..end].to_vec());
                at = end;
            }
            if all.len() != self.world {
                return Err(err(format!(
                    "rank {rank}: rank 0 sent {} parts for {} ranks",
                    all.len(),
                    self.world
                )));
            }
            Ok(all)
        }
    }

    /// Tells every other rank why rank 0 is giving up (best effort).
    fn fail_others(&mut self, msg: &str) {
        if self.rank == 0 {
            Group::fail_all(&mut self.peers, msg);
        }
    }

    /// Rank 0's `bytes` on every rank (`bytes` is ignored elsewhere).
    pub fn broadcast_bytes(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mine = if self.rank == 0 { bytes } else { &[] };
        let mut all = self.all_gather_bytes(mine)?;
        Ok(std::mem::take(&mut all[0]))
    }

    /// Every rank's values concatenated in rank order.
    pub fn all_gather_f64(&mut self, xs: &[f64]) -> Result<Vec<Vec<f64>>> {
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.all_gather_bytes(&bytes)?;
        Ok(all
            .into_iter()
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(c);
                        f64::from_le_bytes(a)
                    })
                    .collect()
            })
            .collect())
    }

    /// Sums `xs` over the ranks, element by element, in rank order (the
    /// same result on every rank).
    pub fn sum_f64(&mut self, xs: &mut [f64]) -> Result<()> {
        let all = self.all_gather_f64(xs)?;
        for (r, v) in all.iter().enumerate() {
            if v.len() != xs.len() {
                return Err(err(format!(
                    "sum over ranks: rank {r} sent {} values, this rank {}",
                    v.len(),
                    xs.len()
                )));
            }
        }
        for (i, x) in xs.iter_mut().enumerate() {
            *x = all.iter().map(|v| v[i]).fold(0.0, |a, b| a + b);
        }
        Ok(())
    }

    /// Sums f32 values over the ranks in rank order (the CPU's gradient
    /// all-reduce; GPUs use NCCL).
    pub fn sum_f32(&mut self, xs: &mut [f32]) -> Result<()> {
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.all_gather_bytes(&bytes)?;
        for (r, b) in all.iter().enumerate() {
            if b.len() != bytes.len() {
                return Err(err(format!(
                    "sum over ranks: rank {r} sent {} bytes, this rank {}",
                    b.len(),
                    bytes.len()
                )));
            }
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (r, b) in all.iter().enumerate() {
                let mut a = [0u8; 4];
                a.copy_from_slice(&b[i * 4..i * 4 + 4]);
                let v = f32::from_le_bytes(a);
                acc = if r == 0 { v } else { acc + v };
            }
            *x = acc;
        }
        Ok(())
    }

    /// Waits until every rank gets here.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn launch_variables_are_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(), None);
        let e = DistEnv::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("MASTER_PORT", "1234")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.rank, e.world, e.local_rank, e.master()),
            (2, 4, 2, "127.0.0.1:1234".to_string())
        );
        let bad = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("RANK is not set"), "{bad}");
        let bad = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")]))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("RANK=2"), "{bad}");
        let bad = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")]))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("MASTER_PORT"), "{bad}");
    }

    #[test]
    fn ranks_join_and_exchange_in_rank_order() {
        let port = free_port();
        let hs: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut g = Group::join(&env(r, 3, port), Duration::from_secs(20)).unwrap();
                    let all = g.all_gather_bytes(&[r as u8; 3][..r + 1]).unwrap();
                    let mut s = [r as f64, 1.0];
                    g.sum_f64(&mut s).unwrap();
                    let mut f = [0.1f32 * r as f32];
                    g.sum_f32(&mut f).unwrap();
                    let b = g.broadcast_bytes(if r == 0 { b"id" } else { b"no" }).unwrap();
                    g.barrier().unwrap();
                    (all, s, f, b)
                })
            })
            .collect();
        for h in hs {
            let (all, s, f, b) = h.join().unwrap();
            assert_eq!(all, vec![vec![0u8], vec![1, 1], vec![2, 2, 2]]);
            assert_eq!(s, [3.0, 3.0]);
            assert_eq!(f, [0.0f32 + 0.1 + 0.2]);
            assert_eq!(b, b"id");
        }
    }

    #[test]
    fn a_missing_rank_is_named_on_every_rank() {
        let port = free_port();
        let t = Instant::now();
        // Ranks 0 and 1 of 4 come; 2 and 3 never do.
        let hs: Vec<_> = (0..2)
            .map(|r| std::thread::spawn(move || Group::join(&env(r, 4, port), Duration::from_secs(2)).unwrap_err()))
            .collect();
        for h in hs {
            let e = h.join().unwrap().to_string();
            assert!(e.contains("rank(s) 2, 3 of 4 did not join within 2 s"), "{e}");
        }
        assert!(t.elapsed() < Duration::from_secs(15));
    }

    #[test]
    fn a_rank_that_exits_is_named_by_the_others() {
        let port = free_port();
        let hs: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut g = Group::join(&env(r, 3, port), Duration::from_secs(20)).unwrap();
                    g.barrier().unwrap();
                    if r == 2 {
                        drop(g); // rank 2 goes away
                        return None;
                    }
                    Some(g.barrier().unwrap_err().to_string())
                })
            })
            .collect();
        let errs: Vec<Option<String>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let e0 = errs[0].as_ref().unwrap();
        assert!(e0.contains("rank 2 closed the connection"), "{e0}");
        // Rank 1 hears rank 0's reason.
        let e1 = errs[1].as_ref().unwrap();
        assert!(e1.contains("rank 2"), "{e1}");
    }
}
