//! Launchers of `kernels/cast.cu`: f32 <-> bf16 casts, and the row scatter
//! of new keys and values into a paged KV cache (cast fused).

use cudarc::driver::PushKernelArg;

use super::plan_1d;
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

/// f32 to bf16 bits, round to nearest even, NaN kept (kernel
/// `cast_f32_to_bf16`; CPU twin `half::bf16::from_f32`), `n` elements.
pub fn cast_f32_to_bf16(gpu: &Gpu, out: &mut impl DevOut<u16>, inp: &impl DevIn<f32>, n: usize) -> Result<()> {
    let mut out = out.view_mut();
    let inp = inp.view();
    let Some(p) = plan_1d("cast_f32_to_bf16", n, &[("out", out.len()), ("inp", inp.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::CastF32ToBf16)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp).arg(&p.n);
    // SAFETY: (unsigned short*, const float*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch cast_f32_to_bf16")?;
    Ok(())
}

/// bf16 bits to f32, exact (kernel `cast_bf16_to_f32`; CPU twin
/// `half::bf16::to_f32`), `n` elements.
pub fn cast_bf16_to_f32(gpu: &Gpu, out: &mut impl DevOut<f32>, inp: &impl DevIn<u16>, n: usize) -> Result<()> {
    let mut out = out.view_mut();
    let inp = inp.view();
    let Some(p) = plan_1d("cast_bf16_to_f32", n, &[("out", out.len()), ("inp", inp.len())])? else {
        return Ok(());
    };
    let f = gpu.function(KernelId::CastBf16ToF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut out).arg(&inp).arg(&p.n);
    // SAFETY: (float*, const unsigned short*, unsigned long long); both hold >= n.
    unsafe { l.launch(p.config()) }.ctx("launch cast_bf16_to_f32")?;
    Ok(())
}

/// Checks a paged-cache row scatter on the host: `rows * w` source
/// elements, every slot inside a pool of `pool_len / w` rows, and no slot
/// written twice (the kernel's writes would race). Returns the element
/// count.
fn plan_kv_write(op: &'static str, pool_len: usize, src_len: usize, slots: &[u32], w: usize) -> Result<usize> {
    let n = super::mul(op, slots.len(), w)?;
    super::check_lens(op, &[("src", src_len, n)])?;
    if w == 0 {
        return Ok(0);
    }
    let pool_rows = pool_len / w;
    let mut seen = std::collections::HashSet::with_capacity(slots.len());
    for (r, &s) in slots.iter().enumerate() {
        if s as usize >= pool_rows {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("slot {s} of row {r} is outside the pool's {pool_rows} slots"),
            });
        }
        if !seen.insert(s) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("slot {s} is written by two rows (row {r} and an earlier one)"),
            });
        }
    }
    Ok(n)
}

/// Stores `slots.len()` packed rows of `w` f32 values into a paged bf16
/// cache, rounded to nearest even (kernel `kv_write_bf16`; CPU twin
/// `aha_tensor::cpu::kv_write`): `pool[slots[r] * w ..][..w] = src[r * w ..][..w]`.
/// The slots are checked on the host (inside the pool, distinct) and then
/// copied to the device: one launch for a whole decode step's rows.
pub fn kv_write_bf16(
    gpu: &Gpu,
    pool: &mut impl DevOut<u16>,
    src: &impl DevIn<f32>,
    slots: &[u32],
    w: usize,
) -> Result<()> {
    let mut pool = pool.view_mut();
    let src = src.view();
    const OP: &str = "kv_write_bf16";
    let n = plan_kv_write(OP, pool.len(), src.len(), slots, w)?;
    let Some(p) = plan_1d(OP, n, &[])? else {
        return Ok(());
    };
    let dev_slots = gpu.upload(slots)?;
    let w = w as u64;
    let f = gpu.function(KernelId::KvWriteBf16)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut pool).arg(&src).arg(&dev_slots).arg(&p.n).arg(&w);
    // SAFETY: (unsigned short*, const float*, const unsigned*, unsigned long
    // long, unsigned long long); src holds rows * w floats, every slot is
    // below pool.len() / w (checked above).
    unsafe { l.launch(p.config()) }.ctx("launch kv_write_bf16")?;
    Ok(())
}

/// As [`kv_write_bf16`] into an f32 cache (kernel `kv_write_f32`).
pub fn kv_write_f32(
    gpu: &Gpu,
    pool: &mut impl DevOut<f32>,
    src: &impl DevIn<f32>,
    slots: &[u32],
    w: usize,
) -> Result<()> {
    let mut pool = pool.view_mut();
    let src = src.view();
    const OP: &str = "kv_write_f32";
    let n = plan_kv_write(OP, pool.len(), src.len(), slots, w)?;
    let Some(p) = plan_1d(OP, n, &[])? else {
        return Ok(());
    };
    let dev_slots = gpu.upload(slots)?;
    let w = w as u64;
    let f = gpu.function(KernelId::KvWriteF32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut pool).arg(&src).arg(&dev_slots).arg(&p.n).arg(&w);
    // SAFETY: as kv_write_bf16 with a float pool.
    unsafe { l.launch(p.config()) }.ctx("launch kv_write_f32")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The host checks of the cache scatter: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn kv_write_plan_refuses_slots_outside_the_pool_and_repeated_slots() {
        assert_eq!(plan_kv_write("kv", 12, 6, &[0, 3], 3).unwrap(), 6);
        let e = plan_kv_write("kv", 12, 6, &[0, 4], 3).unwrap_err().to_string();
        assert!(e.contains("slot 4 of row 1 is outside the pool's 4 slots"), "{e}");
        let e = plan_kv_write("kv", 12, 6, &[2, 2], 3).unwrap_err().to_string();
        assert!(e.contains("slot 2 is written by two rows"), "{e}");
        let e = plan_kv_write("kv", 12, 5, &[0, 1], 3).unwrap_err().to_string();
        assert!(e.contains("src"), "{e}");
        assert_eq!(plan_kv_write("kv", 12, 0, &[], 3).unwrap(), 0);
    }
}
