//! aha-tensor: the [`Tensor`] type, its [`Shape`], [`DType`] and [`Device`],
//! the CPU kernels every model layer is built from ([`cpu`], each with a
//! forward and a hand-written backward), and device dispatch ([`ops`]).
//!
//! ```
//! use aha_tensor::{ops, Device, Tensor};
//!
//! let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2], Device::Cpu)?;
//! let w = Tensor::from_vec(vec![1.0f32, 1.0], [2], Device::Cpu)?;
//! let (y, _rstd) = ops::rms_norm(&x, &w, 1e-6)?;
//! let p = ops::softmax(&y)?;
//! let row: f32 = p.to_vec::<f32>()?[..2].iter().sum();
//! assert!((row - 1.0).abs() < 1e-6);
//! # Ok::<(), aha_tensor::Error>(())
//! ```
//!
//! The kernels in [`cpu`] are generic over [`Real`] (`f32` and `f64`): models
//! run in f32, and the tests run the same code in f64 to check every backward
//! against finite differences.

pub mod cpu;
mod device;
mod dtype;
mod error;
pub mod ops;
mod real;
mod shape;
mod tensor;

pub use device::Device;
pub use dtype::{CpuStorage, DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use real::Real;
pub use shape::Shape;
pub use tensor::{CudaBuf, CudaStorage, Storage, Tensor};
