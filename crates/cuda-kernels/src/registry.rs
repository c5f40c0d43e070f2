//! The kernel registry: every source file under `kernels/`, embedded in the
//! binary, and the name of every kernel in it.

/// One CUDA source file of `kernels/`, embedded with `include_str!`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The CUDA C++ text.
    pub source: &'static str,
}

macro_rules! kernel_sources {
    ($($file:literal),* $(,)?) => {
        /// Every file in `kernels/`; a test checks this list against the folder.
        pub const SOURCES: &[KernelSource] = &[
            $(KernelSource { file: $file, source: include_str!(concat!("../../../kernels/", $file)) },)*
        ];
    };
}

kernel_sources![
    "activation.cu",
    "attention.cu",
    "cast.cu",
    "elementwise.cu",
    "embedding.cu",
    "logprob.cu",
    "optim.cu",
    "rmsnorm.cu",
    "rope.cu",
    "sampling.cu",
];

macro_rules! kernel_ids {
    ($($(#[doc = $doc:literal])* $id:ident => ($file:literal, $symbol:literal),)*) => {
        /// Names every kernel the launchers use: its source file and symbol.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum KernelId {
            $($(#[doc = $doc])* $id,)*
        }

        impl KernelId {
            /// Every kernel, for tests that check each one is present in its module.
            pub const ALL: &'static [KernelId] = &[$(KernelId::$id,)*];

            /// The source file under `kernels/` that defines this kernel.
            pub fn file(self) -> &'static str {
                match self {
                    $(KernelId::$id => $file,)*
                }
            }

            /// The `extern "C"` symbol of the kernel.
            pub fn symbol(self) -> &'static str {
                match self {
                    $(KernelId::$id => $symbol,)*
                }
            }
        }
    };
}

kernel_ids! {
    /// `rmsnorm_forward_f32`; CPU twin `aha_tensor::cpu::rmsnorm_forward`.
    RmsnormForwardF32 => ("rmsnorm.cu", "rmsnorm_forward_f32"),
    /// `rmsnorm_backward_f32` (dinp, per-block dweight partials); CPU twin
    /// `aha_tensor::cpu::rmsnorm_backward`.
    RmsnormBackwardF32 => ("rmsnorm.cu", "rmsnorm_backward_f32"),
    /// `rmsnorm_dweight_reduce_f32`: `dweight +=` the partials, in block order.
    RmsnormDweightReduceF32 => ("rmsnorm.cu", "rmsnorm_dweight_reduce_f32"),
    /// `rope_forward_f32`; CPU twin `aha_tensor::cpu::rope_forward`.
    RopeForwardF32 => ("rope.cu", "rope_forward_f32"),
    /// `rope_backward_f32`; CPU twin `aha_tensor::cpu::rope_backward`.
    RopeBackwardF32 => ("rope.cu", "rope_backward_f32"),
    /// `silu_forward_f32`; CPU twin `aha_tensor::cpu::silu`.
    SiluForwardF32 => ("activation.cu", "silu_forward_f32"),
    /// `silu_backward_f32`; CPU twin `aha_tensor::cpu::silu_backward`.
    SiluBackwardF32 => ("activation.cu", "silu_backward_f32"),
    /// `swiglu_forward_f32`; CPU twin `aha_tensor::cpu::swiglu`.
    SwigluForwardF32 => ("activation.cu", "swiglu_forward_f32"),
    /// `swiglu_backward_f32`; CPU twin `aha_tensor::cpu::swiglu_backward`.
    SwigluBackwardF32 => ("activation.cu", "swiglu_backward_f32"),
    /// `embedding_forward_f32`; CPU twin `aha_tensor::cpu::embedding_forward`.
    EmbeddingForwardF32 => ("embedding.cu", "embedding_forward_f32"),
    /// `embedding_backward_f32` (atomicAdd scatter); CPU twin
    /// `aha_tensor::cpu::embedding_backward`.
    EmbeddingBackwardF32 => ("embedding.cu", "embedding_backward_f32"),
    /// `add_f32`; CPU twin `aha_tensor::cpu::add`.
    AddF32 => ("elementwise.cu", "add_f32"),
    /// `add_inplace_f32`; CPU twin `aha_tensor::cpu::add_inplace`.
    AddInplaceF32 => ("elementwise.cu", "add_inplace_f32"),
    /// `scale_f32` (in place); CPU twin `aha_tensor::cpu::scale`.
    ScaleF32 => ("elementwise.cu", "scale_f32"),
    /// `cast_f32_to_bf16` (round to nearest even); CPU twin `half::bf16::from_f32`.
    CastF32ToBf16 => ("cast.cu", "cast_f32_to_bf16"),
    /// `cast_bf16_to_f32`; CPU twin `half::bf16::to_f32`.
    CastBf16ToF32 => ("cast.cu", "cast_bf16_to_f32"),
    /// `adamw_f32`; CPU twin `aha_tensor::cpu::adamw_step`.
    AdamwF32 => ("optim.cu", "adamw_f32"),
    /// `grad_norm_sq_f32`: per-block f64 sums of squares; CPU twin
    /// `aha_tensor::cpu::global_norm`.
    GradNormSqF32 => ("optim.cu", "grad_norm_sq_f32"),
    /// `grad_norm_sq_reduce_f64`: the block sums into one f64.
    GradNormSqReduceF64 => ("optim.cu", "grad_norm_sq_reduce_f64"),
    /// `attention_forward_f32` (out, lse); CPU twin `aha_tensor::cpu::attention_forward`.
    AttentionForwardF32 => ("attention.cu", "attention_forward_f32"),
    /// `attention_decode_f32`: new tokens of one sequence against its KV cache.
    AttentionDecodeF32 => ("attention.cu", "attention_decode_f32"),
    /// `attention_dsum_f32`: `dout . out` per row, for the backward.
    AttentionDsumF32 => ("attention.cu", "attention_dsum_f32"),
    /// `attention_backward_dq_f32`; CPU twin `aha_tensor::cpu::attention_backward`.
    AttentionBackwardDqF32 => ("attention.cu", "attention_backward_dq_f32"),
    /// `attention_backward_dkv_f32`; CPU twin `aha_tensor::cpu::attention_backward`.
    AttentionBackwardDkvF32 => ("attention.cu", "attention_backward_dkv_f32"),
    /// `token_logprob_forward_f32` (logp, lse); CPU twin
    /// `aha_tensor::cpu::token_logprob_forward`.
    TokenLogprobForwardF32 => ("logprob.cu", "token_logprob_forward_f32"),
    /// `token_logprob_backward_f32` (dlogits); CPU twin
    /// `aha_tensor::cpu::token_logprob_backward`.
    TokenLogprobBackwardF32 => ("logprob.cu", "token_logprob_backward_f32"),
    /// `add_bias_f32`: `x [rows, c] += bias [c]`.
    AddBiasF32 => ("logprob.cu", "add_bias_f32"),
    /// `bias_grad_f32`: `dbias [c] +=` column sums of `dy [rows, c]`, in row order.
    BiasGradF32 => ("logprob.cu", "bias_grad_f32"),
    /// `sample_f32`: one token per row (temperature, top-k, top-p, min-p,
    /// a given uniform); CPU twin `aha_sampler::sample_with_uniform`.
    SampleF32 => ("sampling.cu", "sample_f32"),
}

impl KernelId {
    /// The embedded source of this kernel's file.
    pub fn source(self) -> Option<&'static KernelSource> {
        SOURCES.iter().find(|s| s.file == self.file())
    }
}
