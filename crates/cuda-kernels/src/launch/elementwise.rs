//! Launchers of `kernels/elementwise.cu`: residual adds, in-place scale and strided column copies.

use cudarc::driver::PushKernelArg;

use super::{check_lens, mul, plan_1d};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

/// Residual add (kernel `add_f32`; CPU twin `aha_tensor::cpu::add`):
/// `out = a + b`, `n` elements.
pub fn add_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    a: &impl DevIn<f32>,
    b: &impl DevIn<f32>,
    n: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let a = a.view();
    let b = b.view();
    let lens = [("out", out.len()), ("a", a.len()), ("b", b.len())];
    let Some(p) = plan_1d("add_f32", n, &lens)? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AddF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&a).arg(&b).arg(&p.n);
    // SAFETY: (float*, const float*, const float*, unsigned long long); all hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch add_f32")?;
    Ok(())
}

/// In-place add (kernel `add_inplace_f32`; CPU twin
/// `aha_tensor::cpu::add_inplace`): `acc += x`, `n` elements.
pub fn add_inplace_f32(gpu: &Gpu, acc: &mut impl DevOut<f32>, x: &impl DevIn<f32>, n: usize) -> Result<()> {
    let mut acc = acc.view_mut();
    let x = x.view();
    let Some(p) = plan_1d("add_inplace_f32", n, &[("acc", acc.len()), ("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::AddInplaceF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut acc).arg(&x).arg(&p.n);
    // SAFETY: (float*, const float*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch add_inplace_f32")?;
    Ok(())
}

/// In-place element-wise product (kernel `mul_inplace_f32`; CPU twin the
/// product of `aha_moe_model::lora::apply_dropout`): `x *= m`, `n`
/// elements.
pub fn mul_inplace_f32(gpu: &Gpu, x: &mut impl DevOut<f32>, m: &impl DevIn<f32>, n: usize) -> Result<()> {
    let mut x = x.view_mut();
    let m = m.view();
    let Some(p) = plan_1d("mul_inplace_f32", n, &[("x", x.len()), ("m", m.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::MulInplaceF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut x).arg(&m).arg(&p.n);
    // SAFETY: (float*, const float*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch mul_inplace_f32")?;
    Ok(())
}

/// In-place scale (kernel `scale_f32`; CPU twin `aha_tensor::cpu::scale` with
/// `out = a`, as gradient clipping uses it): `x *= s`, `n` elements.
pub fn scale_f32(gpu: &Gpu, x: &mut impl DevOut<f32>, s: f32, n: usize) -> Result<()> {
    let mut x = x.view_mut();
    let Some(p) = plan_1d("scale_f32", n, &[("x", x.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::ScaleF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut x).arg(&s).arg(&p.n);
    // SAFETY: (float*, float, unsigned long long); x holds >= n floats.
    unsafe { l.launch(p.config()) }.ctx("launch scale_f32")?;
    Ok(())
}

/// A block of columns copied between row-major matrices (kernel
/// `copy_cols_f32`; CPU twin `aha_tensor::cpu::copy_cols`):
/// `out[r * out_stride + out_off + j] (=, +=) sum_{q < group} inp[((r / rep)
/// * group + q) * in_stride + in_off + j]` for `r < rows`, `j < cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColsCopy {
    /// Output rows.
    pub rows: usize,
    /// Columns copied per row.
    pub cols: usize,
    /// Row length of `out`.
    pub out_stride: usize,
    /// First output column.
    pub out_off: usize,
    /// Row length of `inp`.
    pub in_stride: usize,
    /// First input column.
    pub in_off: usize,
    /// Output rows per input row group (a broadcast when > 1).
    pub rep: usize,
    /// Input rows summed into each output row (a reduction when > 1).
    pub group: usize,
    /// Add into `out` instead of assigning.
    pub accumulate: bool,
}

impl ColsCopy {
    /// A plain copy of `cols` columns: `out[r, out_off..] = inp[r, in_off..]`.
    pub fn plain(
        rows: usize,
        cols: usize,
        (out_stride, out_off): (usize, usize),
        (in_stride, in_off): (usize, usize),
    ) -> ColsCopy {
        ColsCopy {
            rows,
            cols,
            out_stride,
            out_off,
            in_stride,
            in_off,
            rep: 1,
            group: 1,
            accumulate: false,
        }
    }

    /// The elements `out` and `inp` must hold (checked, so a zero-sized copy
    /// needs nothing).
    pub fn lens(&self) -> Result<(usize, usize)> {
        const OP: &str = "copy_cols_f32";
        let bad = |msg: String| Error::InvalidArgument { op: OP, msg };
        if self.rep == 0 || self.group == 0 {
            return Err(bad("rep and group must be at least 1".into()));
        }
        if self.out_off.saturating_add(self.cols) > self.out_stride
            || self.in_off.saturating_add(self.cols) > self.in_stride
        {
            return Err(bad(format!(
                "columns {}..+{} do not fit rows of {} (out) / {}..+{} of {} (in)",
                self.out_off, self.cols, self.out_stride, self.in_off, self.cols, self.in_stride
            )));
        }
        if self.rows == 0 || self.cols == 0 {
            return Ok((0, 0));
        }
        let out = mul(OP, self.rows - 1, self.out_stride)? + self.out_off + self.cols;
        let in_rows = mul(OP, (self.rows - 1) / self.rep, self.group)? + self.group;
        let inp = mul(OP, in_rows - 1, self.in_stride)? + self.in_off + self.cols;
        Ok((out, inp))
    }
}

/// Copies the column block `s` from `inp` to `out` (kernel `copy_cols_f32`).
pub fn copy_cols_f32(gpu: &Gpu, out: &mut impl DevOut<f32>, inp: &impl DevIn<f32>, s: &ColsCopy) -> Result<()> {
    const OP: &str = "copy_cols_f32";
    let (mut out, inp) = (out.view_mut(), inp.view());
    let (need_out, need_in) = s.lens()?;
    check_lens(OP, &[("out", out.len(), need_out), ("inp", inp.len(), need_in)])?;
    let n = mul(OP, s.rows, s.cols)?;
    let Some(p) = plan_1d(OP, n, &[])? else {
        return Ok(());
    };
    let a = [
        s.rows,
        s.cols,
        s.out_stride,
        s.out_off,
        s.in_stride,
        s.in_off,
        s.rep,
        s.group,
    ]
    .map(|x| x as u64);
    let acc = i32::from(s.accumulate);
    let f = gpu.function(KernelId::CopyColsF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp);
    for x in &a {
        l.arg(x);
    }
    l.arg(&acc);
    // SAFETY: (float*, const float*, unsigned long long x8, int); the plan
    // checked that out and inp hold every element the copy touches.
    unsafe { l.launch(p.config()) }.ctx("launch copy_cols_f32")?;
    Ok(())
}
