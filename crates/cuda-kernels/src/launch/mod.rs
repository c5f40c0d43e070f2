//! Typed launchers: exactly one per kernel (a two-pass reduction's launcher
//! owns both of its kernels), owning its launch geometry and checking its
//! arguments against the kernel's contract.
//!
//! Each launcher first calls a `plan_*` function that sees only lengths and
//! sizes, so the checks are tested on machines without a GPU (see the tests at
//! the bottom). Buffers may be longer than needed (views into an arena);
//! shorter is an [`Error::InvalidArgument`] naming the buffer.
//!
//! One module per kernel file, named like it (`launch::rmsnorm` launches
//! `kernels/rmsnorm.cu`); every public item of the element-wise families is
//! re-exported here, so `launch::rmsnorm_forward_f32` and
//! `launch::rmsnorm::rmsnorm_forward_f32` name the same function. The
//! larger families ([`moe`], [`flash_attention`], [`lmhead`], [`grpo`]) keep
//! their own namespaces (also reachable as `crate::launch_moe`,
//! `crate::flash`, `crate::lmhead`, `crate::grpo`).

use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};

pub mod activation;
pub mod attention;
pub mod cast;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod grpo;
pub mod lmhead;
pub mod logprob;
pub mod moe;
pub mod optim;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;

pub use activation::*;
pub use attention::*;
pub use cast::*;
pub use elementwise::*;
pub use embedding::*;
pub use logprob::*;
pub use optim::*;
pub use rmsnorm::*;
pub use rope::*;
pub use sampling::*;

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;
/// Grid cap of the element-wise kernels, which loop with a grid stride.
const MAX_GRID: u64 = 1 << 16;

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{what} holds {got} elements, needs {want}"),
        });
    }
    Ok(())
}

/// Every `(buffer, holds, needs)` holds at least what it needs, else an
/// error naming the first that does not (shared by every launcher module).
pub(crate) fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    lens.iter()
        .try_for_each(|&(what, got, want)| check_len(op, what, got, want))
}

/// `v` as the kernel's `int`, or an error naming it.
pub(crate) fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument {
        op,
        msg: format!("{what} = {v} does not fit the kernel's int"),
    })
}

/// `a * b`, or an error when it overflows.
pub(crate) fn mul(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::InvalidArgument {
        op,
        msg: format!("{a} * {b} elements overflow"),
    })
}

/// Grid-stride geometry for `n` elements: 256 threads a block, at most 65536 blocks.
pub(crate) fn grid_1d(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_GRID) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An element-wise launch over `n` elements: the count the kernel takes and
/// its geometry, or `None` when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan1d {
    n: u64,
    cfg: (u32, u32),
}

fn plan_1d(op: &'static str, n: usize, lens: &[(&str, usize)]) -> Result<Option<Plan1d>> {
    for &(what, got) in lens {
        check_len(op, what, got, n)?;
    }
    if n == 0 {
        return Ok(None);
    }
    let n = n as u64;
    let cfg = grid_1d(n);
    Ok(Some(Plan1d {
        n,
        cfg: (cfg.grid_dim.0, cfg.block_dim.0),
    }))
}

impl Plan1d {
    fn config(self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.cfg.0, 1, 1),
            block_dim: (self.cfg.1, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shared checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn msg(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn grid_covers_sizes_that_are_not_multiples_of_the_block() {
        for n in [1u64, 255, 256, 257, 1000, 65_537 * 256] {
            let cfg = grid_1d(n);
            let threads = u64::from(cfg.grid_dim.0) * u64::from(cfg.block_dim.0);
            assert!(cfg.grid_dim.0 >= 1 && u64::from(cfg.grid_dim.0) <= MAX_GRID);
            // Either one thread per element or the capped grid, which strides.
            assert!(threads >= n || u64::from(cfg.grid_dim.0) == MAX_GRID, "n = {n}");
        }
    }

    #[test]
    fn element_wise_plans_reject_short_buffers() {
        let e = plan_1d("add_f32", 10, &[("out", 10), ("a", 9), ("b", 10)]).unwrap_err();
        assert!(msg(e).contains("add_f32: a holds 9 elements, needs 10"));
        assert_eq!(plan_1d("add_f32", 0, &[("out", 0)]).unwrap(), None);
        let p = plan_1d("add_f32", 1000, &[("out", 1024)]).unwrap().unwrap();
        assert_eq!((p.n, p.cfg), (1000, (4, 256)));
    }
}
