//! Launchers of `kernels/rmsnorm.cu`: RMSNorm forward and backward.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_len, check_lens, mul, to_i32};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

/// Blocks (and scratch rows) of the RMSNorm backward's first pass.
const RMSNORM_BWD_MAX_BLOCKS: usize = 1024;
/// Widest row the RMSNorm backward takes: its per-block `dweight` partial
/// lives in dynamic shared memory, at most 48 KiB without an opt-in.
pub const RMSNORM_BWD_MAX_C: usize = 12032;

/// RMSNorm forward over `rows` rows of `c` channels (kernel
/// `rmsnorm_forward_f32`; CPU twin `aha_tensor::cpu::rmsnorm_forward`).
///
/// `out [rows, c]`, `rstd [rows]`, `inp [rows, c]`, `weight [c]`.
pub fn rmsnorm_forward_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    rstd: &mut impl DevOut<f32>,
    inp: &impl DevIn<f32>,
    weight: &impl DevIn<f32>,
    rows: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut rstd = rstd.view_mut();
    let inp = inp.view();
    let weight = weight.view();
    const OP: &str = "rmsnorm_forward_f32";
    check_len(OP, "out", out.len(), rows * c)?;
    check_len(OP, "rstd", rstd.len(), rows)?;
    check_len(OP, "inp", inp.len(), rows * c)?;
    check_len(OP, "weight", weight.len(), c)?;
    if rows == 0 || c == 0 {
        return Ok(());
    }
    let rows_i = to_i32(OP, "rows", rows)?;
    let c_i = to_i32(OP, "c", c)?;
    let grid = u32::try_from(rows).map_err(|_| Error::InvalidArgument {
        op: OP,
        msg: format!("rows = {rows} exceeds the grid"),
    })?;
    let func = gpu.function(KernelId::RmsnormForwardF32)?;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&func);
    b.arg(&mut out)
        .arg(&mut rstd)
        .arg(&inp)
        .arg(&weight)
        .arg(&rows_i)
        .arg(&c_i)
        .arg(&eps);
    // SAFETY: the argument list matches the kernel signature
    // (float*, float*, const float*, const float*, int, int, float), and the
    // lengths were checked above against what the kernel reads and writes.
    unsafe { b.launch(cfg) }.ctx("launch rmsnorm_forward_f32")?;
    Ok(())
}

/// What the RMSNorm backward launch needs: sizes as the kernel's ints and
/// the number of first-pass blocks (= scratch rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RmsnormBwdPlan {
    rows: i32,
    c: i32,
    blocks: usize,
}

fn plan_rmsnorm_backward(lens: [usize; 6], rows: usize, c: usize) -> Result<Option<RmsnormBwdPlan>> {
    const OP: &str = "rmsnorm_backward_f32";
    let rc = mul(OP, rows, c)?;
    let [dinp, dweight, dout, inp, weight, rstd] = lens;
    check_lens(
        OP,
        &[
            ("dinp", dinp, rc),
            ("dweight", dweight, c),
            ("dout", dout, rc),
            ("inp", inp, rc),
            ("weight", weight, c),
            ("rstd", rstd, rows),
        ],
    )?;
    if c > RMSNORM_BWD_MAX_C {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!(
                "c = {c} exceeds {RMSNORM_BWD_MAX_C} (the per-block dweight partial must fit 48 KiB of shared memory)"
            ),
        });
    }
    if rows == 0 || c == 0 {
        return Ok(None);
    }
    Ok(Some(RmsnormBwdPlan {
        rows: to_i32(OP, "rows", rows)?,
        c: to_i32(OP, "c", c)?,
        blocks: rows.min(RMSNORM_BWD_MAX_BLOCKS),
    }))
}

/// RMSNorm backward (kernels `rmsnorm_backward_f32` then
/// `rmsnorm_dweight_reduce_f32`; CPU twin `aha_tensor::cpu::rmsnorm_backward`):
/// `dinp =` (assigned), `dweight +=` (accumulated, in a fixed order, so the
/// result is the same bits on every run).
///
/// `dinp, dout, inp [rows, c]`, `dweight, weight [c]`, `rstd [rows]` from the
/// forward; `c <= RMSNORM_BWD_MAX_C`. Allocates a `[min(rows, 1024), c]`
/// scratch buffer for the per-block partial sums.
pub fn rmsnorm_backward_f32(
    gpu: &Gpu,
    dinp: &mut impl DevOut<f32>,
    dweight: &mut impl DevOut<f32>,
    dout: &impl DevIn<f32>,
    inp: &impl DevIn<f32>,
    weight: &impl DevIn<f32>,
    rstd: &impl DevIn<f32>,
    rows: usize,
    c: usize,
) -> Result<()> {
    let mut dinp = dinp.view_mut();
    let mut dweight = dweight.view_mut();
    let dout = dout.view();
    let inp = inp.view();
    let weight = weight.view();
    let rstd = rstd.view();
    let lens = [
        dinp.len(),
        dweight.len(),
        dout.len(),
        inp.len(),
        weight.len(),
        rstd.len(),
    ];
    let Some(p) = plan_rmsnorm_backward(lens, rows, c)? else {
        return Ok(());
    };
    let mut partial = gpu.scratch_f32(p.blocks * c)?;
    let f1 = gpu.function(KernelId::RmsnormBackwardF32)?;
    let cfg1 = LaunchConfig {
        grid_dim: (p.blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (c * std::mem::size_of::<f32>()) as u32,
    };
    let mut b = gpu.stream().launch_builder(&f1);
    b.arg(&mut dinp)
        .arg(&mut *partial)
        .arg(&dout)
        .arg(&inp)
        .arg(&weight)
        .arg(&rstd)
        .arg(&p.rows)
        .arg(&p.c);
    // SAFETY: the arguments match (float*, float*, const float* x4, int, int);
    // lengths were checked by the plan; `partial` holds blocks * c floats and
    // the dynamic shared memory c floats (c <= RMSNORM_BWD_MAX_C fits 48 KiB).
    unsafe { b.launch(cfg1) }.ctx("launch rmsnorm_backward_f32")?;
    let f2 = gpu.function(KernelId::RmsnormDweightReduceF32)?;
    let g = p.blocks as i32;
    let cfg2 = LaunchConfig {
        grid_dim: ((c as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&f2);
    b.arg(&mut dweight).arg(&*partial).arg(&g).arg(&p.c);
    // SAFETY: (float*, const float*, int, int); dweight holds c floats,
    // partial g * c, and each thread touches one channel < c.
    unsafe { b.launch(cfg2) }.ctx("launch rmsnorm_dweight_reduce_f32")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn msg(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn rmsnorm_backward_plan_checks_every_buffer_and_the_width() {
        let ok = [6, 3, 6, 6, 3, 2];
        let p = plan_rmsnorm_backward(ok, 2, 3).unwrap().unwrap();
        assert_eq!((p.rows, p.c, p.blocks), (2, 3, 2));
        let names = ["dinp", "dweight", "dout", "inp", "weight", "rstd"];
        for (i, name) in names.iter().enumerate() {
            let mut lens = ok;
            lens[i] -= 1;
            let e = msg(plan_rmsnorm_backward(lens, 2, 3).unwrap_err());
            assert!(e.contains(&format!("{name} holds")), "{e}");
        }
        let c = RMSNORM_BWD_MAX_C + 1;
        let e = msg(plan_rmsnorm_backward([c, c, c, c, c, 1], 1, c).unwrap_err());
        assert!(e.contains("shared memory"), "{e}");
        let big = plan_rmsnorm_backward([5000 * 8; 6], 5000, 8).unwrap().unwrap();
        assert_eq!(big.blocks, RMSNORM_BWD_MAX_BLOCKS);
        assert!(plan_rmsnorm_backward([usize::MAX; 6], usize::MAX, 2).is_err());
    }
}
