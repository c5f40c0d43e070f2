//! Launchers of `kernels/cast.cu`: f32 <-> bf16 casts, and the row scatter
//! of new keys and values into a paged KV cache (cast fused).

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

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

/// The cache slots of one step's packed rows (`block * block_size +
/// position % block_size`, one a row), checked on the host to be distinct
/// (the scatter's writes would race) and copied to the device once, for
/// every layer's [`kv_write_bf16`] / [`kv_write_f32`].
#[derive(Debug)]
pub struct KvSlots<'a> {
    dev: SlotBuf<'a>,
    /// The largest slot (each write checks it against its pool).
    max: Option<u32>,
}

#[derive(Debug)]
enum SlotBuf<'a> {
    Owned(CudaSlice<u32>),
    Borrowed(&'a CudaSlice<u32>),
}

impl KvSlots<'static> {
    /// Checks `slots` and copies them to `gpu`.
    pub fn new(gpu: &Gpu, slots: &[u32]) -> Result<KvSlots<'static>> {
        let max = check_kv_slots("kv_write", slots)?;
        Ok(KvSlots {
            dev: SlotBuf::Owned(gpu.upload(slots)?),
            max,
        })
    }
}

impl<'a> KvSlots<'a> {
    /// Slots already on the device (a CUDA graph's staged inputs, rewritten
    /// before each replay): `dev` holds one distinct slot a row, each at
    /// most `max`, which the caller checks on the host for every step.
    pub fn on_device(dev: &'a CudaSlice<u32>, max: u32) -> KvSlots<'a> {
        KvSlots {
            dev: SlotBuf::Borrowed(dev),
            max: Some(max),
        }
    }

    fn dev(&self) -> &CudaSlice<u32> {
        match &self.dev {
            SlotBuf::Owned(d) => d,
            SlotBuf::Borrowed(d) => d,
        }
    }

    /// Rows (slots) of the step.
    pub fn len(&self) -> usize {
        self.dev().len()
    }

    /// True when the step has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refuses a slot written by two rows; returns the largest slot.
fn check_kv_slots(op: &'static str, slots: &[u32]) -> Result<Option<u32>> {
    let mut seen = std::collections::HashSet::with_capacity(slots.len());
    for (r, &s) in slots.iter().enumerate() {
        if !seen.insert(s) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("slot {s} is written by two rows (row {r} and an earlier one)"),
            });
        }
    }
    Ok(slots.iter().copied().max())
}

/// Checks one scatter against its pool: `rows * w` source elements and the
/// largest slot inside a pool of `pool_len / w` rows. Returns the element
/// count.
fn plan_kv_write(
    op: &'static str,
    pool_len: usize,
    src_len: usize,
    rows: usize,
    max: Option<u32>,
    w: usize,
) -> Result<usize> {
    let n = super::mul(op, rows, w)?;
    super::check_lens(op, &[("src", src_len, n)])?;
    if w == 0 {
        return Ok(0);
    }
    let pool_rows = pool_len / w;
    if let Some(s) = max.filter(|&s| s as usize >= pool_rows) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("slot {s} is outside the pool's {pool_rows} slots"),
        });
    }
    Ok(n)
}

/// The one launch both scatters share: `(pool, src, slots, n, w)`.
fn launch_kv_write<T: DeviceRepr>(
    gpu: &Gpu,
    kernel: KernelId,
    op: &'static str,
    pool: &mut impl DevOut<T>,
    src: &impl DevIn<f32>,
    slots: &KvSlots,
    w: usize,
) -> Result<()> {
    let mut pool = pool.view_mut();
    let src = src.view();
    let n = plan_kv_write(op, pool.len(), src.len(), slots.len(), slots.max, w)?;
    let Some(p) = plan_1d(op, n, &[])? else {
        return Ok(());
    };
    let w = w as u64;
    let f = gpu.function(kernel)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&mut pool).arg(&src).arg(slots.dev()).arg(&p.n).arg(&w);
    // SAFETY: (T*, const float*, const unsigned*, unsigned long long,
    // unsigned long long) with T the pool's element (unsigned short for
    // bf16, float); src holds rows * w floats, every slot is below
    // pool.len() / w (checked above).
    unsafe { l.launch(p.config()) }.ctx(op)?;
    Ok(())
}

/// Stores `slots.len()` packed rows of `w` f32 values into a paged bf16
/// cache, rounded to nearest even (kernel `kv_write_bf16`; CPU twin
/// `aha_tensor::cpu::kv_write`): `pool[slots[r] * w ..][..w] = src[r * w ..][..w]`.
/// One launch for a whole step's rows; the largest slot is checked against
/// this pool.
pub fn kv_write_bf16(
    gpu: &Gpu,
    pool: &mut impl DevOut<u16>,
    src: &impl DevIn<f32>,
    slots: &KvSlots,
    w: usize,
) -> Result<()> {
    launch_kv_write(gpu, KernelId::KvWriteBf16, "kv_write_bf16", pool, src, slots, w)
}

/// As [`kv_write_bf16`] into an f32 cache (kernel `kv_write_f32`).
pub fn kv_write_f32(
    gpu: &Gpu,
    pool: &mut impl DevOut<f32>,
    src: &impl DevIn<f32>,
    slots: &KvSlots,
    w: usize,
) -> Result<()> {
    launch_kv_write(gpu, KernelId::KvWriteF32, "kv_write_f32", pool, src, slots, w)
}

#[cfg(test)]
mod tests {
    //! The host checks of the cache scatter: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn kv_write_plan_refuses_slots_outside_the_pool_and_repeated_slots() {
        assert_eq!(check_kv_slots("kv", &[0, 3]).unwrap(), Some(3));
        assert_eq!(plan_kv_write("kv", 12, 6, 2, Some(3), 3).unwrap(), 6);
        let e = plan_kv_write("kv", 12, 6, 2, Some(4), 3).unwrap_err().to_string();
        assert!(e.contains("slot 4 is outside the pool's 4 slots"), "{e}");
        let e = check_kv_slots("kv", &[2, 2]).unwrap_err().to_string();
        assert!(e.contains("slot 2 is written by two rows"), "{e}");
        let e = plan_kv_write("kv", 12, 5, 2, Some(1), 3).unwrap_err().to_string();
        assert!(e.contains("src"), "{e}");
        assert_eq!(check_kv_slots("kv", &[]).unwrap(), None);
        assert_eq!(plan_kv_write("kv", 12, 0, 0, None, 3).unwrap(), 0);
    }
}
