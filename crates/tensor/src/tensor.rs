//! [`Tensor`]: a shape, and owned contiguous storage on one device.

use std::sync::Arc;

use aha_cuda_kernels::cudarc::driver::CudaSlice;
use aha_cuda_kernels::Gpu;
use half::{bf16, f16};

use crate::dtype::{CpuStorage, DType, Element};
use crate::error::{Error, Result};
use crate::{Device, Shape};

/// A device buffer of one element type. bf16 and f16 travel as their bits.
#[derive(Debug)]
pub enum CudaBuf {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// bf16 bits.
    BF16(CudaSlice<u16>),
    /// f16 bits.
    F16(CudaSlice<u16>),
    /// i32 elements.
    I32(CudaSlice<i32>),
    /// i64 elements.
    I64(CudaSlice<i64>),
    /// u32 elements.
    U32(CudaSlice<u32>),
}

/// Storage on a GPU: the device handle and the buffer.
#[derive(Debug)]
pub struct CudaStorage {
    /// The device the buffer lives on.
    pub gpu: Arc<Gpu>,
    /// The buffer.
    pub buf: CudaBuf,
}

/// Where a tensor's elements are.
#[derive(Debug)]
pub enum Storage {
    /// On the host.
    Cpu(CpuStorage),
    /// On a GPU.
    Cuda(CudaStorage),
}

/// A contiguous row-major tensor that owns its storage.
#[derive(Debug)]
pub struct Tensor {
    shape: Shape,
    device: Device,
    storage: Storage,
}

impl Tensor {
    /// A tensor from host data, placed on `device`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_vec",
                expected: format!("{} elements for shape {shape}", shape.elem_count()),
                got: format!("{}", data.len()),
            });
        }
        Tensor::from_storage(T::into_storage(data), shape, Device::Cpu)?.to_device(device)
    }

    /// A tensor over host storage, placed on `device`.
    pub fn from_storage(storage: CpuStorage, shape: impl Into<Shape>, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        if storage.len() != shape.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_storage",
                expected: format!("{} elements for shape {shape}", shape.elem_count()),
                got: format!("{}", storage.len()),
            });
        }
        let t = Tensor {
            shape,
            device: Device::Cpu,
            storage: Storage::Cpu(storage),
        };
        t.to_device(device)
    }

    /// A tensor over an f32 device buffer of exactly `shape`'s element count.
    pub fn from_cuda_f32(gpu: Arc<Gpu>, buf: CudaSlice<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if buf.len() < shape.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_cuda_f32",
                expected: format!("{} elements for shape {shape}", shape.elem_count()),
                got: format!("{}", buf.len()),
            });
        }
        let device = Device::Cuda(gpu.ordinal());
        Ok(Tensor {
            shape,
            device,
            storage: Storage::Cuda(CudaStorage {
                gpu,
                buf: CudaBuf::F32(buf),
            }),
        })
    }

    /// The device buffer of an f32 tensor on a GPU (it may hold more
    /// elements than the shape: buffers are never empty).
    pub fn cuda_f32(&self) -> Result<&CudaSlice<f32>> {
        match &self.storage {
            Storage::Cuda(CudaStorage {
                buf: CudaBuf::F32(b), ..
            }) => Ok(b),
            Storage::Cuda(_) => Err(Error::DType {
                op: "Tensor::cuda_f32",
                expected: "f32",
                got: self.dtype(),
            }),
            Storage::Cpu(_) => Err(Error::Unsupported {
                op: "Tensor::cuda_f32 (the tensor is on the host)",
                device: self.device,
            }),
        }
    }

    /// Multiplies every element of an f32 tensor by `s`, in place, on its
    /// device (the GPU: `scale_f32`).
    pub fn scale_inplace(&mut self, s: f32) -> Result<()> {
        let n = self.elem_count();
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cuda(CudaStorage {
                gpu,
                buf: CudaBuf::F32(b),
            }) => {
                aha_cuda_kernels::launch::scale_f32(gpu, b, s, n)?;
                Ok(())
            }
            Storage::Cuda(_) => Err(Error::DType {
                op: "Tensor::scale_inplace",
                expected: "f32",
                got: dtype,
            }),
            Storage::Cpu(_) => {
                for x in self.as_mut_slice::<f32>()? {
                    *x *= s;
                }
                Ok(())
            }
        }
    }

    /// Zeros of `dtype` on `device`.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        Tensor::from_storage(CpuStorage::zeros(dtype, n), shape, device)
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => match s.buf {
                CudaBuf::F32(_) => DType::F32,
                CudaBuf::BF16(_) => DType::BF16,
                CudaBuf::F16(_) => DType::F16,
                CudaBuf::I32(_) => DType::I32,
                CudaBuf::I64(_) => DType::I64,
                CudaBuf::U32(_) => DType::U32,
            },
        }
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same elements with a new shape of equal element count.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.shape.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "Tensor::reshape",
                expected: format!("{} elements", self.shape.elem_count()),
                got: format!("shape {shape}"),
            });
        }
        Ok(Tensor { shape, ..self })
    }

    /// Borrows the host elements as `T`: errors if on a GPU or of another dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        match &self.storage {
            Storage::Cpu(s) => T::slice(s).ok_or(Error::DType {
                op: "Tensor::as_slice",
                expected: dtype_name(T::DTYPE),
                got: s.dtype(),
            }),
            Storage::Cuda(_) => Err(Error::Unsupported {
                op: "Tensor::as_slice (copy with to_device(Device::Cpu) first)",
                device: self.device,
            }),
        }
    }

    /// Mutably borrows the host elements as `T`.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let device = self.device;
        match &mut self.storage {
            Storage::Cpu(s) => {
                let got = s.dtype();
                T::slice_mut(s).ok_or(Error::DType {
                    op: "Tensor::as_mut_slice",
                    expected: dtype_name(T::DTYPE),
                    got,
                })
            }
            Storage::Cuda(_) => Err(Error::Unsupported {
                op: "Tensor::as_mut_slice (copy with to_device(Device::Cpu) first)",
                device,
            }),
        }
    }

    /// Copies the elements to a host vector of `T` (the dtype must match).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Cpu(_) => Ok(self.as_slice::<T>()?.to_vec()),
            Storage::Cuda(_) => self.to_device(Device::Cpu)?.to_vec(),
        }
    }

    /// A copy on `device` (a no-op move when already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(s), Device::Cpu) => Storage::Cpu(s.clone()),
            (Storage::Cpu(s), Device::Cuda(i)) => Storage::Cuda(upload(s, i)?),
            (Storage::Cuda(s), Device::Cpu) => Storage::Cpu(download(s)?),
            (Storage::Cuda(s), Device::Cuda(_)) => Storage::Cuda(upload(&download(s)?, device_ordinal(device))?),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            device,
            storage,
        })
    }

    /// A copy converted to `dtype`. On a GPU, f32 <-> bf16 runs there
    /// (`cast_f32_to_bf16`, round to nearest even; `cast_bf16_to_f32`); other
    /// pairs round-trip through the host.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if let Storage::Cuda(s) = &self.storage {
            let n = self.elem_count();
            let buf = match (&s.buf, dtype) {
                (CudaBuf::F32(b), DType::BF16) if n > 0 => {
                    let mut out = s.gpu.zeros::<u16>(n)?;
                    aha_cuda_kernels::launch::cast_f32_to_bf16(&s.gpu, &mut out, b, n)?;
                    Some(CudaBuf::BF16(out))
                }
                (CudaBuf::BF16(b), DType::F32) if n > 0 => {
                    let mut out = s.gpu.zeros::<f32>(n)?;
                    aha_cuda_kernels::launch::cast_bf16_to_f32(&s.gpu, &mut out, b, n)?;
                    Some(CudaBuf::F32(out))
                }
                _ => None,
            };
            if let Some(buf) = buf {
                let storage = Storage::Cuda(CudaStorage {
                    gpu: s.gpu.clone(),
                    buf,
                });
                return Ok(Tensor::from_parts(self.shape.clone(), self.device, storage));
            }
        }
        match &self.storage {
            Storage::Cpu(s) => Ok(Tensor {
                shape: self.shape.clone(),
                device: Device::Cpu,
                storage: Storage::Cpu(s.to_dtype(dtype)),
            }),
            Storage::Cuda(_) => self.to_device(Device::Cpu)?.to_dtype(dtype)?.to_device(self.device),
        }
    }

    pub(crate) fn from_parts(shape: Shape, device: Device, storage: Storage) -> Tensor {
        Tensor { shape, device, storage }
    }
}

fn device_ordinal(d: Device) -> usize {
    match d {
        Device::Cpu => 0,
        Device::Cuda(i) => i,
    }
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U32 => "u32",
    }
}

fn upload(s: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
    let gpu = Gpu::get(ordinal)?;
    let buf = match s {
        CpuStorage::F32(v) => CudaBuf::F32(gpu.upload(v)?),
        CpuStorage::BF16(v) => CudaBuf::BF16(gpu.upload(bytemuck::cast_slice::<bf16, u16>(v))?),
        CpuStorage::F16(v) => CudaBuf::F16(gpu.upload(bytemuck::cast_slice::<f16, u16>(v))?),
        CpuStorage::I32(v) => CudaBuf::I32(gpu.upload(v)?),
        CpuStorage::I64(v) => CudaBuf::I64(gpu.upload(v)?),
        CpuStorage::U32(v) => CudaBuf::U32(gpu.upload(v)?),
    };
    Ok(CudaStorage { gpu, buf })
}

fn download(s: &CudaStorage) -> Result<CpuStorage> {
    let g = &s.gpu;
    Ok(match &s.buf {
        CudaBuf::F32(b) => CpuStorage::F32(g.download(b)?),
        CudaBuf::BF16(b) => CpuStorage::BF16(g.download(b)?.into_iter().map(bf16::from_bits).collect()),
        CudaBuf::F16(b) => CpuStorage::F16(g.download(b)?.into_iter().map(f16::from_bits).collect()),
        CudaBuf::I32(b) => CpuStorage::I32(g.download(b)?),
        CudaBuf::I64(b) => CpuStorage::I64(g.download(b)?),
        CudaBuf::U32(b) => CpuStorage::U32(g.download(b)?),
    })
}
