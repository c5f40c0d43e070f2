//! Typed launchers: exactly one per kernel, owning its launch geometry and
//! checking its arguments against the kernel's contract.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{what} holds {got} elements, needs {want}"),
        });
    }
    Ok(())
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument {
        op,
        msg: format!("{what} = {v} does not fit the kernel's int"),
    })
}

/// RMSNorm forward over `rows` rows of `c` channels (kernel
/// `rmsnorm_forward_f32`; CPU twin `aha_tensor::cpu::rmsnorm_forward`).
///
/// `out [rows, c]`, `rstd [rows]`, `inp [rows, c]`, `weight [c]`.
pub fn rmsnorm_forward_f32(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
    inp: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rows: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
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
    b.arg(out)
        .arg(rstd)
        .arg(inp)
        .arg(weight)
        .arg(&rows_i)
        .arg(&c_i)
        .arg(&eps);
    // SAFETY: the argument list matches the kernel signature
    // (float*, float*, const float*, const float*, int, int, float), and the
    // lengths were checked above against what the kernel reads and writes.
    unsafe { b.launch(cfg) }.ctx("launch rmsnorm_forward_f32")?;
    Ok(())
}
