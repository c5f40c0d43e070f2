//! Tensor-level ops: shape checks, then dispatch on the device to the CPU
//! kernels of [`crate::cpu`] or the CUDA launchers of `aha-cuda-kernels`.
//!
//! The model crate works on flat buffers with the kernels directly (forward
//! and backward); these wrappers serve library users and the tests. An op
//! with no CUDA kernel yet returns [`Error::Unsupported`] on a GPU tensor.

use std::sync::Arc;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::{launch, Gpu};

use crate::cpu::{self, Gemm};
use crate::error::{Error, Result};
use crate::tensor::{CudaBuf, Storage};
use crate::{DType, Device, Shape, Tensor};

fn f32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    match t.storage() {
        Storage::Cpu(_) => t.as_slice::<f32>().map_err(|_| Error::DType {
            op,
            expected: "f32",
            got: t.dtype(),
        }),
        Storage::Cuda(_) => Err(Error::Unsupported { op, device: t.device() }),
    }
}

fn u32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [u32]> {
    match t.storage() {
        Storage::Cpu(_) => t.as_slice::<u32>().map_err(|_| Error::DType {
            op,
            expected: "u32",
            got: t.dtype(),
        }),
        Storage::Cuda(_) => Err(Error::Unsupported { op, device: t.device() }),
    }
}

fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch {
            op,
            a: a.device(),
            b: b.device(),
        });
    }
    Ok(())
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("{}", a.shape()),
            got: format!("{}", b.shape()),
        });
    }
    same_device(op, a, b)
}

fn f32_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, Device::Cpu)
}

/// A GPU and `K` of its f32 buffers.
type CudaF32s<'a, const K: usize> = (Arc<Gpu>, [&'a CudaSlice<f32>; K]);

/// The GPU and f32 buffers of `ts` when all are f32 tensors on one GPU;
/// `None` when any is on the host (the CPU path then reports dtype errors).
fn cuda_f32s<'a, const K: usize>(op: &'static str, ts: [&'a Tensor; K]) -> Result<Option<CudaF32s<'a, K>>> {
    let mut gpu = None;
    let mut bufs = Vec::with_capacity(K);
    for t in ts {
        let Storage::Cuda(s) = t.storage() else {
            return Ok(None);
        };
        let CudaBuf::F32(b) = &s.buf else {
            return Err(Error::DType {
                op,
                expected: "f32",
                got: t.dtype(),
            });
        };
        gpu.get_or_insert_with(|| s.gpu.clone());
        bufs.push(b);
    }
    match (gpu, bufs.try_into()) {
        (Some(g), Ok(b)) => Ok(Some((g, b))),
        _ => Ok(None),
    }
}

/// A new f32 tensor on `like`'s GPU holding `buf`.
fn cuda_tensor(gpu: Arc<Gpu>, buf: CudaSlice<f32>, like: &Tensor) -> Tensor {
    Tensor::from_parts(
        like.shape().clone(),
        like.device(),
        Storage::Cuda(crate::tensor::CudaStorage {
            gpu,
            buf: CudaBuf::F32(buf),
        }),
    )
}

/// Matrix product of the last two dims: `a [.., M, K] @ b [.., K, N]`, with
/// either operand stored transposed. `b` may be 2-D and shared by every
/// matrix of a batched `a` (a linear layer).
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    const OP: &str = "matmul";
    same_device(OP, a, b)?;
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || bd.len() < 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "operands of rank >= 2".into(),
            got: format!("{:?} and {:?}", ad, bd),
        });
    }
    let (ar, ac) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (br, bc) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    let batch: usize = ad[..ad.len() - 2].iter().product();
    let b_batch: usize = bd[..bd.len() - 2].iter().product();
    if k != k2 || !(b_batch == 1 && bd.len() == 2 || ad[..ad.len() - 2] == bd[..bd.len() - 2]) {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("inner dims to agree and batch dims to match ({k} vs {k2})"),
            got: format!("{:?} x {:?}", ad, bd),
        });
    }
    let (x, y) = (f32s(OP, a)?, f32s(OP, b)?);
    let mut out = vec![0f32; batch * m * n];
    let mut g = Gemm::new(m, k, n);
    g.trans_a = trans_a;
    g.trans_b = trans_b;
    if b_batch == batch {
        cpu::matmul_batched(&mut out, x, y, batch, g)?;
    } else {
        for i in 0..batch {
            cpu::matmul(
                &mut out[i * m * n..(i + 1) * m * n],
                &x[i * m * k..(i + 1) * m * k],
                y,
                g,
            )?;
        }
    }
    let mut dims = ad[..ad.len() - 2].to_vec();
    dims.extend([m, n]);
    f32_tensor(out, dims)
}

/// `a + b`, same shapes. Runs on the GPU for f32 tensors there (`add_f32`).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("add", a, b)?;
    if let Some((gpu, [x, y])) = cuda_f32s("add", [a, b])? {
        let mut out = gpu.zeros::<f32>(a.elem_count())?;
        launch::add_f32(&gpu, &mut out, x, y, a.elem_count())?;
        return Ok(cuda_tensor(gpu, out, a));
    }
    let mut out = vec![0f32; a.elem_count()];
    cpu::add(&mut out, f32s("add", a)?, f32s("add", b)?)?;
    f32_tensor(out, a.shape().clone())
}

/// `a * b`, same shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("mul", a, b)?;
    let mut out = vec![0f32; a.elem_count()];
    cpu::mul(&mut out, f32s("mul", a)?, f32s("mul", b)?)?;
    f32_tensor(out, a.shape().clone())
}

/// `s * a`.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    let mut out = vec![0f32; a.elem_count()];
    cpu::scale(&mut out, f32s("scale", a)?, s)?;
    f32_tensor(out, a.shape().clone())
}

/// RMSNorm over the last dim; returns `(out, rstd)`. Runs on the GPU for f32
/// tensors there (kernel `rmsnorm_forward_f32`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm";
    same_device(OP, x, weight)?;
    let c = x.shape().last();
    let rows = x.shape().rows();
    if weight.elem_count() != c {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("weight of [{c}]"),
            got: format!("{}", weight.shape()),
        });
    }
    let rstd_shape: Vec<usize> = x.dims()[..x.dims().len().saturating_sub(1)].to_vec();
    match (x.storage(), weight.storage()) {
        (Storage::Cuda(xs), Storage::Cuda(ws)) => {
            let (CudaBuf::F32(xb), CudaBuf::F32(wb)) = (&xs.buf, &ws.buf) else {
                return Err(Error::DType {
                    op: OP,
                    expected: "f32",
                    got: x.dtype(),
                });
            };
            let gpu = xs.gpu.clone();
            let mut out = gpu.zeros::<f32>(rows * c)?;
            let mut rstd = gpu.zeros::<f32>(rows)?;
            aha_cuda_kernels::launch::rmsnorm_forward_f32(&gpu, &mut out, &mut rstd, xb, wb, rows, c, eps)?;
            let dev = x.device();
            let mk = |buf, shape: Shape| {
                Tensor::from_parts(
                    shape,
                    dev,
                    Storage::Cuda(crate::tensor::CudaStorage {
                        gpu: gpu.clone(),
                        buf: CudaBuf::F32(buf),
                    }),
                )
            };
            Ok((mk(out, x.shape().clone()), mk(rstd, rstd_shape.into())))
        }
        _ => {
            let mut out = vec![0f32; rows * c];
            let mut rstd = vec![0f32; rows];
            cpu::rmsnorm_forward(&mut out, &mut rstd, f32s(OP, x)?, f32s(OP, weight)?, rows, c, eps)?;
            Ok((f32_tensor(out, x.shape().clone())?, f32_tensor(rstd, rstd_shape)?))
        }
    }
}

fn rowwise(op: &'static str, x: &Tensor, f: fn(&mut [f32], &[f32], usize, usize) -> Result<()>) -> Result<Tensor> {
    let (rows, c) = (x.shape().rows(), x.shape().last());
    let mut out = vec![0f32; rows * c];
    f(&mut out, f32s(op, x)?, rows, c)?;
    f32_tensor(out, x.shape().clone())
}

/// Softmax over the last dim.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    rowwise("softmax", x, cpu::softmax_forward)
}

/// Log-softmax over the last dim.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    rowwise("log_softmax", x, cpu::log_softmax_forward)
}

/// `x * sigmoid(x)`. Runs on the GPU for f32 tensors there (`silu_forward_f32`).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if let Some((gpu, [xb])) = cuda_f32s("silu", [x])? {
        let mut out = gpu.zeros::<f32>(x.elem_count())?;
        launch::silu_forward_f32(&gpu, &mut out, xb, x.elem_count())?;
        return Ok(cuda_tensor(gpu, out, x));
    }
    let mut out = vec![0f32; x.elem_count()];
    cpu::silu(&mut out, f32s("silu", x)?)?;
    f32_tensor(out, x.shape().clone())
}

/// `silu(gate) * up`, same shapes. Runs on the GPU for f32 tensors there
/// (`swiglu_forward_f32`).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    same_shape("swiglu", gate, up)?;
    if let Some((gpu, [g, u])) = cuda_f32s("swiglu", [gate, up])? {
        let mut out = gpu.zeros::<f32>(gate.elem_count())?;
        launch::swiglu_forward_f32(&gpu, &mut out, g, u, gate.elem_count())?;
        return Ok(cuda_tensor(gpu, out, gate));
    }
    let mut out = vec![0f32; gate.elem_count()];
    cpu::swiglu(&mut out, f32s("swiglu", gate)?, f32s("swiglu", up)?)?;
    f32_tensor(out, gate.shape().clone())
}

/// Rows of `table [V, C]` picked by u32 `ids [..]`: shape `[.., C]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    same_device(OP, table, ids)?;
    if table.dims().len() != 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "table of rank 2".into(),
            got: format!("{}", table.shape()),
        });
    }
    let (v, c) = (table.dims()[0], table.dims()[1]);
    let ids_s = u32s(OP, ids)?;
    let mut out = vec![0f32; ids_s.len() * c];
    cpu::embedding_forward(&mut out, f32s(OP, table)?, ids_s, v, c)?;
    let mut dims = ids.dims().to_vec();
    dims.push(c);
    f32_tensor(out, dims)
}

/// Log-probability of `targets [..]` (u32) under `softmax(logits [.., V])`;
/// returns `(logp, lse)`, both shaped like `targets`.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "token_logprobs";
    same_device(OP, logits, targets)?;
    let v = logits.shape().last();
    if logits.shape().rows() != targets.elem_count() {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("{} targets", logits.shape().rows()),
            got: format!("{}", targets.shape()),
        });
    }
    let t = u32s(OP, targets)?;
    let (mut logp, mut lse) = (vec![0f32; t.len()], vec![0f32; t.len()]);
    cpu::token_logprob_forward(&mut logp, &mut lse, f32s(OP, logits)?, t, v)?;
    Ok((
        f32_tensor(logp, targets.shape().clone())?,
        f32_tensor(lse, targets.shape().clone())?,
    ))
}

/// The `k` largest values of each row of the last dim, descending, with
/// their u32 indices.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (rows, c) = (x.shape().rows(), x.shape().last());
    let (mut vals, mut idx) = (vec![0f32; rows * k], vec![0u32; rows * k]);
    cpu::topk(&mut vals, &mut idx, f32s("topk", x)?, rows, c, k)?;
    let mut dims = x.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = k;
    }
    Ok((
        f32_tensor(vals, dims.clone())?,
        Tensor::from_vec(idx, dims, Device::Cpu)?,
    ))
}

/// Converts to f32 if needed (a convenience for loaded bf16 weights).
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        x.to_device(x.device())
    } else {
        x.to_dtype(DType::F32)
    }
}
