//! aha-cuda-kernels: the GPU side of aha at the level of raw device buffers.
//!
//! - [`device_count`] / [`no_gpu_reason`]: detection that never panics; with
//!   no driver or no device everything runs on the CPU.
//! - [`registry`]: every file of `kernels/` embedded in the binary, and a
//!   [`KernelId`] naming each kernel.
//! - [`nvrtc`]: NVRTC found at run time and used to compile a file once per
//!   device (as cubin, so ptxas checks resources too).
//! - [`cache`]: compiled kernels kept on disk, keyed by source, architecture,
//!   options and NVRTC version.
//! - [`pool`]: a caching pool of device buffers (scratch stops calling the
//!   driver's allocator after the first step).
//! - [`launch`]: one typed launcher per kernel, one module per kernel file
//!   (`launch::rmsnorm` launches `kernels/rmsnorm.cu`); among them
//!   [`launch::moe`] (also [`launch_moe`]): the mixture-of-experts kernels
//!   (routing, permutation, grouped expert products, combine, backward),
//!   which [`moe_layer`] chains into a whole layer with no copy to the host;
//!   [`launch::flash_attention`] (also [`flash`]): flash attention (varlen
//!   causal GQA forward, deterministic backward, paged split-key decode) over
//!   bf16 inputs; [`lmhead`]: token log-probs and entropies from hidden
//!   states in vocabulary chunks, and their backward, never holding `[N, V]`
//!   logits; [`grpo`]: group advantages and the GRPO loss family on the
//!   device.
//! - [`emulate`]: the kernel files compiled by a C++ compiler through a CUDA
//!   shim and run on the CPU, as written, for tests without a GPU.
//! - [`view`]: the buffers launchers take, owned slices or views into a
//!   flat allocation.
//! - [`nccl`]: NCCL loaded at run time (the real library found on the
//!   machine, or the emulated one built from `emulate/fake_nccl.cpp`), and
//!   the collectives data parallelism uses.
//! - [`graph`]: CUDA graphs (capture a stream's work once, replay it with
//!   one call) and page-locked staging for a replay's inputs.
//! - [`blas`]: row-major matrix products through cuBLAS (f32, and bf16 with
//!   f32 accumulation).
//!
//! ```
//! // Works on every machine: on one without a GPU the count is 0.
//! let n = aha_cuda_kernels::device_count();
//! if n == 0 {
//!     println!("no GPU: {}", aha_cuda_kernels::no_gpu_reason().unwrap_or_default());
//! }
//! ```

pub mod blas;
pub mod cache;
pub mod device;
pub mod emulate;
pub mod error;
pub mod graph;
pub mod launch;
pub mod moe_ep;
pub mod moe_layer;
pub mod nccl;
pub mod nvrtc;
pub mod pool;
pub mod registry;
pub mod view;

pub use cudarc;
pub use device::{device_count, no_gpu_reason, Gpu};
pub use error::{Error, Result};
/// The flash-attention launchers, by their older name ([`launch::flash_attention`]).
pub use launch::flash_attention as flash;
/// The GRPO loss launchers ([`launch::grpo`]).
pub use launch::grpo;
/// The chunked lm-head launchers ([`launch::lmhead`]).
pub use launch::lmhead;
/// The mixture-of-experts launchers, by their older name ([`launch::moe`]).
pub use launch::moe as launch_moe;
pub use registry::{KernelId, KernelSource, SOURCES};
pub use view::{DevIn, DevOut};
