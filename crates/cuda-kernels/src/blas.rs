//! Matrix products through cuBLAS, with the CPU kernel's contract
//! (`aha_tensor::cpu::matmul`): row-major `out[m, n] (+)= op(a) op(b)`,
//! `a` stored `[m, k]` (or `[k, m]` when `trans_a`), `b` stored `[k, n]`
//! (or `[n, k]` when `trans_b`, the layout of a linear layer's weight).
//!
//! cuBLAS is column-major; a row-major product is the column-major product
//! of the transposes with the operands swapped, so no copy is made:
//! `out^T = op(b)^T op(a)^T`. f32 runs `cublasSgemm`; bf16 runs
//! `cublasGemmEx` with f32 accumulation (`CUBLAS_COMPUTE_32F`).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::device::Gpu;
use crate::error::{Error, Result};

/// The shape of one product (the fields of `aha_tensor::cpu::Gemm`, which
/// this crate cannot name: aha-tensor depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulShape {
    /// Rows of `out`.
    pub m: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Columns of `out`.
    pub n: usize,
    /// `a` is stored transposed, `[k, m]`.
    pub trans_a: bool,
    /// `b` is stored transposed, `[n, k]`.
    pub trans_b: bool,
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

/// The cuBLAS call for a checked shape: `None` when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulPlan {
    /// The column-major configuration (operands swapped).
    pub transa: bool,
    /// See `transa`.
    pub transb: bool,
    /// Column-major `m` (our `n`), `n` (our `m`) and `k`.
    pub dims: (i32, i32, i32),
    /// Leading dimensions of the swapped operands and of `out`.
    pub ld: (i32, i32, i32),
    /// 0 or 1.
    pub beta: f32,
}

/// Checks lengths (`out`, `a`, `b`) against the shape and builds the call.
pub fn plan_matmul(s: MatmulShape, lens: (usize, usize, usize)) -> Result<Option<MatmulPlan>> {
    let bad = |msg: String| Error::InvalidArgument { op: "matmul", msg };
    let MatmulShape { m, k, n, .. } = s;
    let want = (m.checked_mul(n), m.checked_mul(k), k.checked_mul(n));
    let (Some(wo), Some(wa), Some(wb)) = want else {
        return Err(bad(format!("{m} x {k} x {n} overflows")));
    };
    if lens != (wo, wa, wb) {
        return Err(bad(format!(
            "lengths out {}, a {}, b {} do not fit m {m}, k {k}, n {n} (want {wo}, {wa}, {wb})",
            lens.0, lens.1, lens.2
        )));
    }
    let fits = |x: usize| i32::try_from(x).map_err(|_| bad(format!("dimension {x} exceeds cuBLAS's int range")));
    let (m32, k32, n32) = (fits(m)?, fits(k)?, fits(n)?);
    if m == 0 || n == 0 || k == 0 {
        // k == 0 with accumulate leaves out as it is; without, it must be zeroed by the caller's launcher.
        return Ok(None);
    }
    // Row-major b [k, n] is column-major [n, k] with ld n (op N); stored
    // [n, k] it is column-major [k, n] with ld k (op T). Likewise a.
    let (transa, lda) = if s.trans_b { (true, k32) } else { (false, n32) };
    let (transb, ldb) = if s.trans_a { (true, m32) } else { (false, k32) };
    Ok(Some(MatmulPlan {
        transa,
        transb,
        dims: (n32, m32, k32),
        ld: (lda, ldb, n32),
        beta: if s.accumulate { 1.0 } else { 0.0 },
    }))
}

/// A product with nothing to multiply: `k == 0` without accumulation
/// leaves zeros, everything else leaves `out` as it is.
fn empty_product<T, O>(gpu: &Gpu, out: &mut O, s: MatmulShape) -> Result<()>
where
    T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    O: DevicePtrMut<T>,
{
    if !s.accumulate && s.k == 0 {
        gpu.stream().memset_zeros(out).map_err(|source| Error::Driver {
            op: "memset_zeros",
            source,
        })?;
    }
    Ok(())
}

fn op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

fn config<T>(p: &MatmulPlan, one: T, beta: T) -> GemmConfig<T> {
    GemmConfig {
        transa: op(p.transa),
        transb: op(p.transb),
        m: p.dims.0,
        n: p.dims.1,
        k: p.dims.2,
        alpha: one,
        lda: p.ld.0,
        ldb: p.ld.1,
        beta,
        ldc: p.ld.2,
    }
}

/// `out (+)= op(a) op(b)` in f32 (`cublasSgemm`). The operands may be
/// buffers or views into them (`CudaSlice::slice`), e.g. a chunk of rows of
/// a weight.
pub fn matmul_f32<O, A, B>(gpu: &Gpu, out: &mut O, a: &A, b: &B, s: MatmulShape) -> Result<()>
where
    O: DevicePtrMut<f32>,
    A: DevicePtr<f32>,
    B: DevicePtr<f32>,
{
    let Some(p) = plan_matmul(s, (out.len(), a.len(), b.len()))? else {
        return empty_product::<f32, _>(gpu, out, s);
    };
    let blas = gpu.blas()?;
    // SAFETY: the plan checked every length against the shape, so cuBLAS
    // reads and writes inside the three buffers; all are on the GPU's stream.
    unsafe { blas.gemm(config(&p, 1.0f32, p.beta), b, a, out) }.map_err(|e| Error::Blas {
        op: "cublasSgemm",
        msg: format!("{e:?}"),
    })
}

/// `out (+)= op(a) op(b)` with bf16 operands and output, f32 accumulation
/// (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`). bf16 buffers are `u16` bits, as
/// the cast launchers write them.
pub fn matmul_bf16(
    gpu: &Gpu,
    out: &mut CudaSlice<u16>,
    a: &CudaSlice<u16>,
    b: &CudaSlice<u16>,
    s: MatmulShape,
) -> Result<()> {
    let Some(p) = plan_matmul(s, (out.len(), a.len(), b.len()))? else {
        return empty_product(gpu, out, s);
    };
    let blas = gpu.blas()?;
    let (one, beta) = (half::bf16::ONE, half::bf16::from_f32(p.beta));
    let view_err = || Error::InvalidArgument {
        op: "matmul_bf16",
        msg: "could not view a u16 buffer as bf16".into(),
    };
    let (out_len, a_len, b_len) = (out.len(), a.len(), b.len());
    // SAFETY: bf16 and u16 have the same size and any bit pattern is a
    // valid bf16; the views cover exactly the buffers.
    let av = unsafe { a.transmute::<half::bf16>(a_len) }.ok_or_else(view_err)?;
    let bv = unsafe { b.transmute::<half::bf16>(b_len) }.ok_or_else(view_err)?;
    let mut ov = unsafe { out.transmute_mut::<half::bf16>(out_len) }.ok_or_else(view_err)?;
    // SAFETY: as in `matmul_f32`.
    unsafe { blas.gemm(config(&p, one, beta), &bv, &av, &mut ov) }.map_err(|e| Error::Blas {
        op: "cublasGemmEx(bf16)",
        msg: format!("{e:?}"),
    })
}

/// `out (+)= op(a) op(b)` with bf16 operands (`u16` bits) and an **f32**
/// output, f32 accumulation (`cublasGemmEx`: A and B `CUDA_R_16BF`, C
/// `CUDA_R_32F`, `CUBLAS_COMPUTE_32F`): tensor-core products whose result
/// keeps f32 precision, as the lm head's logits and gradients need. Operands
/// may be views.
pub fn matmul_bf16_f32out<O, A, B>(gpu: &Gpu, out: &mut O, a: &A, b: &B, s: MatmulShape) -> Result<()>
where
    O: DevicePtrMut<f32>,
    A: DevicePtr<u16>,
    B: DevicePtr<u16>,
{
    let Some(p) = plan_matmul(s, (out.len(), a.len(), b.len()))? else {
        return empty_product::<f32, _>(gpu, out, s);
    };
    let blas = gpu.blas()?;
    let stream = gpu.stream();
    let (alpha, beta) = (1.0f32, p.beta);
    let (bp, _rb) = b.device_ptr(stream);
    let (ap, _ra) = a.device_ptr(stream);
    let (op_, _ro) = out.device_ptr_mut(stream);
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
    // SAFETY: the plan checked every length against the shape, so cuBLAS
    // reads and writes inside the three buffers (operands swapped for the
    // row-major contract, as in `matmul_f32`); alpha and beta are f32 as
    // CUBLAS_COMPUTE_32F requires; the handle's stream is the GPU's.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(p.transa),
            op(p.transb),
            p.dims.0,
            p.dims.1,
            p.dims.2,
            (&alpha) as *const f32 as *const _,
            bp as *const _,
            cudaDataType_t::CUDA_R_16BF,
            p.ld.0,
            ap as *const _,
            cudaDataType_t::CUDA_R_16BF,
            p.ld.1,
            (&beta) as *const f32 as *const _,
            op_ as *mut _,
            cudaDataType_t::CUDA_R_32F,
            p.ld.2,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Blas {
        op: "cublasGemmEx(bf16 -> f32)",
        msg: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> MatmulShape {
        MatmulShape {
            m,
            k,
            n,
            trans_a: ta,
            trans_b: tb,
            accumulate: false,
        }
    }

    #[test]
    fn plans_swap_the_operands_for_row_major() {
        // out [2, 5] = a [2, 3] b [3, 5]: column-major out^T [5, 2] = b^T a^T.
        let p = plan_matmul(shape(2, 3, 5, false, false), (10, 6, 15)).unwrap().unwrap();
        assert_eq!((p.transa, p.transb, p.dims, p.ld), (false, false, (5, 2, 3), (5, 3, 5)));
        // A linear layer: x [2, 3] w^T with w stored [5, 3].
        let p = plan_matmul(shape(2, 3, 5, false, true), (10, 6, 15)).unwrap().unwrap();
        assert_eq!((p.transa, p.transb, p.ld), (true, false, (3, 3, 5)));
        // Its weight gradient: dy^T [5, 2] x [2, 3], a stored [2, 5].
        let p = plan_matmul(shape(5, 2, 3, true, false), (15, 10, 6)).unwrap().unwrap();
        assert_eq!((p.transa, p.transb, p.dims, p.ld), (false, true, (3, 5, 2), (3, 5, 3)));
    }

    #[test]
    fn bad_lengths_and_empty_shapes() {
        let e = plan_matmul(shape(2, 3, 5, false, false), (10, 7, 15)).unwrap_err();
        assert!(e.to_string().contains("a 7"), "{e}");
        assert!(plan_matmul(shape(0, 3, 5, false, false), (0, 0, 15)).unwrap().is_none());
        assert!(plan_matmul(shape(2, 0, 5, false, false), (10, 0, 0)).unwrap().is_none());
        assert!(plan_matmul(shape(1 << 31, 1, 1, false, false), (1 << 31, 1 << 31, 1)).is_err());
        assert!(plan_matmul(shape(usize::MAX, 2, 1, false, false), (0, 0, 2)).is_err());
    }
}
