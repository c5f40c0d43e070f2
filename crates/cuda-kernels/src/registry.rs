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

/// The headers the kernel files include (`#include "common.cuh"`), embedded
/// like them: NVRTC receives them as in-memory headers and the CPU emulation
/// writes them beside the kernel files. A test checks this list against the
/// folder's `*.cuh`.
pub const HEADERS: &[KernelSource] = &[KernelSource {
    file: "common.cuh",
    source: include_str!("../../../kernels/common.cuh"),
}];

kernel_sources![
    "activation.cu",
    "attention.cu",
    "cast.cu",
    "elementwise.cu",
    "embedding.cu",
    "flash_attention.cu",
    "grpo.cu",
    "lmhead.cu",
    "logprob.cu",
    "moe.cu",
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
    /// `mul_inplace_f32` (element-wise, in place); CPU twin the product
    /// of `aha_moe_model::lora::apply_dropout`.
    MulInplaceF32 => ("elementwise.cu", "mul_inplace_f32"),
    /// `scale_f32` (in place); CPU twin `aha_tensor::cpu::scale`.
    ScaleF32 => ("elementwise.cu", "scale_f32"),
    /// `copy_cols_f32`: strided column blocks with broadcast or group sums;
    /// CPU twin `aha_tensor::cpu::copy_cols`.
    CopyColsF32 => ("elementwise.cu", "copy_cols_f32"),
    /// `cast_f32_to_bf16` (round to nearest even); CPU twin `half::bf16::from_f32`.
    CastF32ToBf16 => ("cast.cu", "cast_f32_to_bf16"),
    /// `cast_bf16_to_f32`; CPU twin `half::bf16::to_f32`.
    CastBf16ToF32 => ("cast.cu", "cast_bf16_to_f32"),
    /// `kv_write_bf16`: packed f32 rows rounded into their paged-cache
    /// slots; CPU twin `aha_tensor::cpu::kv_write`.
    KvWriteBf16 => ("cast.cu", "kv_write_bf16"),
    /// `kv_write_f32`: as `kv_write_bf16`, stored as f32.
    KvWriteF32 => ("cast.cu", "kv_write_f32"),
    /// `adamw_f32`; CPU twin `aha_tensor::cpu::adamw_step`.
    AdamwF32 => ("optim.cu", "adamw_f32"),
    /// `adamw_copy_bf16_f32`: `adamw_f32` writing the bf16 copy of each
    /// updated parameter; CPU twin `aha_tensor::cpu::adamw_step` then
    /// `half::bf16::from_f32`.
    AdamwCopyBf16F32 => ("optim.cu", "adamw_copy_bf16_f32"),
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
    /// `flash_fwd_d64_bf16`: varlen causal GQA flash attention forward, head
    /// widths 64/64; CPU twin `aha_tensor::cpu::flash_forward`.
    FlashFwdD64Bf16 => ("flash_attention.cu", "flash_fwd_d64_bf16"),
    /// `flash_fwd_d128_bf16`: as `flash_fwd_d64_bf16` for widths 128/128.
    FlashFwdD128Bf16 => ("flash_attention.cu", "flash_fwd_d128_bf16"),
    /// `flash_fwd_d192v128_bf16`: as `flash_fwd_d64_bf16` for MLA widths 192/128.
    FlashFwdD192v128Bf16 => ("flash_attention.cu", "flash_fwd_d192v128_bf16"),
    /// `flash_fwd_any_bf16`: as `flash_fwd_d64_bf16` for any widths up to 256.
    FlashFwdAnyBf16 => ("flash_attention.cu", "flash_fwd_any_bf16"),
    /// `flash_fwd_mma_d64_bf16`: the forward on tensor cores (mma.sync
    /// m16n8k16, P rounded to bf16), widths 64/64; CPU twin
    /// `aha_tensor::cpu::flash_forward`.
    FlashFwdMmaD64Bf16 => ("flash_attention.cu", "flash_fwd_mma_d64_bf16"),
    /// `flash_fwd_mma_d128_bf16`: as `flash_fwd_mma_d64_bf16` for 128/128.
    FlashFwdMmaD128Bf16 => ("flash_attention.cu", "flash_fwd_mma_d128_bf16"),
    /// `flash_fwd_mma_d192v128_bf16`: as `flash_fwd_mma_d64_bf16` for 192/128.
    FlashFwdMmaD192v128Bf16 => ("flash_attention.cu", "flash_fwd_mma_d192v128_bf16"),
    /// `flash_bwd_dsum_f32`: `dout . out` per (row, head), for the backward.
    FlashBwdDsumF32 => ("flash_attention.cu", "flash_bwd_dsum_f32"),
    /// `flash_bwd_dq_d64_bf16`: dQ by a pass over key tiles (no atomics);
    /// CPU twin `aha_tensor::cpu::flash_backward`.
    FlashBwdDqD64Bf16 => ("flash_attention.cu", "flash_bwd_dq_d64_bf16"),
    /// `flash_bwd_dq_d128_bf16`: as `flash_bwd_dq_d64_bf16` for widths 128/128.
    FlashBwdDqD128Bf16 => ("flash_attention.cu", "flash_bwd_dq_d128_bf16"),
    /// `flash_bwd_dq_d192v128_bf16`: as `flash_bwd_dq_d64_bf16` for 192/128.
    FlashBwdDqD192v128Bf16 => ("flash_attention.cu", "flash_bwd_dq_d192v128_bf16"),
    /// `flash_bwd_dq_any_bf16`: as `flash_bwd_dq_d64_bf16` for widths up to 256.
    FlashBwdDqAnyBf16 => ("flash_attention.cu", "flash_bwd_dq_any_bf16"),
    /// `flash_bwd_dq_mma_d64_bf16`: dQ on tensor cores (P, dS, dO rounded
    /// to bf16), widths 64/64; CPU twin `aha_tensor::cpu::flash_backward`.
    FlashBwdDqMmaD64Bf16 => ("flash_attention.cu", "flash_bwd_dq_mma_d64_bf16"),
    /// `flash_bwd_dq_mma_d128_bf16`: as `flash_bwd_dq_mma_d64_bf16` for 128/128.
    FlashBwdDqMmaD128Bf16 => ("flash_attention.cu", "flash_bwd_dq_mma_d128_bf16"),
    /// `flash_bwd_dq_mma_d192v128_bf16`: as `flash_bwd_dq_mma_d64_bf16` for 192/128.
    FlashBwdDqMmaD192v128Bf16 => ("flash_attention.cu", "flash_bwd_dq_mma_d192v128_bf16"),
    /// `flash_bwd_dkv_d64_bf16`: dK and dV by a pass over query tiles; CPU
    /// twin `aha_tensor::cpu::flash_backward`.
    FlashBwdDkvD64Bf16 => ("flash_attention.cu", "flash_bwd_dkv_d64_bf16"),
    /// `flash_bwd_dkv_d128_bf16`: as `flash_bwd_dkv_d64_bf16` for 128/128.
    FlashBwdDkvD128Bf16 => ("flash_attention.cu", "flash_bwd_dkv_d128_bf16"),
    /// `flash_bwd_dkv_d192v128_bf16`: as `flash_bwd_dkv_d64_bf16` for 192/128.
    FlashBwdDkvD192v128Bf16 => ("flash_attention.cu", "flash_bwd_dkv_d192v128_bf16"),
    /// `flash_bwd_dkv_any_bf16`: as `flash_bwd_dkv_d64_bf16` for widths up to 256.
    FlashBwdDkvAnyBf16 => ("flash_attention.cu", "flash_bwd_dkv_any_bf16"),
    /// `flash_bwd_dkv_mma_d64_bf16`: dK and dV on tensor cores, widths
    /// 64/64; CPU twin `aha_tensor::cpu::flash_backward`.
    FlashBwdDkvMmaD64Bf16 => ("flash_attention.cu", "flash_bwd_dkv_mma_d64_bf16"),
    /// `flash_bwd_dkv_mma_d128_bf16`: as `flash_bwd_dkv_mma_d64_bf16` for 128/128.
    FlashBwdDkvMmaD128Bf16 => ("flash_attention.cu", "flash_bwd_dkv_mma_d128_bf16"),
    /// `flash_bwd_dkv_mma_d192v128_bf16`: as `flash_bwd_dkv_mma_d64_bf16` for 192/128.
    FlashBwdDkvMmaD192v128Bf16 => ("flash_attention.cu", "flash_bwd_dkv_mma_d192v128_bf16"),
    /// `flash_decode_d64_bf16`: new tokens against the paged KV cache, one
    /// key split per block (partial output and lse); CPU twin
    /// `aha_tensor::cpu::flash_decode_paged`.
    FlashDecodeD64Bf16 => ("flash_attention.cu", "flash_decode_d64_bf16"),
    /// `flash_decode_d128_bf16`: as `flash_decode_d64_bf16` for 128/128.
    FlashDecodeD128Bf16 => ("flash_attention.cu", "flash_decode_d128_bf16"),
    /// `flash_decode_d192v128_bf16`: as `flash_decode_d64_bf16` for 192/128.
    FlashDecodeD192v128Bf16 => ("flash_attention.cu", "flash_decode_d192v128_bf16"),
    /// `flash_decode_any_bf16`: as `flash_decode_d64_bf16` for widths up to 256.
    FlashDecodeAnyBf16 => ("flash_attention.cu", "flash_decode_any_bf16"),
    /// `flash_decode_latent576_bf16`: MLA's latent cache (keys = values,
    /// one buffer), widths up to 576 (DeepSeek-V3's 512 + 64).
    FlashDecodeLatent576Bf16 => ("flash_attention.cu", "flash_decode_latent576_bf16"),
    /// `flash_decode_combine_f32`: merges the decode splits by their lse.
    FlashDecodeCombineF32 => ("flash_attention.cu", "flash_decode_combine_f32"),
    /// `lmhead_chunk_stats_f32`: one vocabulary chunk's max, sums and target
    /// logit merged into each row's running state; CPU twin
    /// `aha_tensor::cpu::lm_head_logprob_forward`.
    LmheadChunkStatsF32 => ("lmhead.cu", "lmhead_chunk_stats_f32"),
    /// `lmhead_finish_f32`: log-prob, entropy and lse from the running state.
    LmheadFinishF32 => ("lmhead.cu", "lmhead_finish_f32"),
    /// `lmhead_chunk_grad_f32`: a chunk's logits replaced by their gradient;
    /// CPU twin `aha_tensor::cpu::lm_head_logprob_backward`.
    LmheadChunkGradF32 => ("lmhead.cu", "lmhead_chunk_grad_f32"),
    /// `grpo_seq_stats_f32`: tokens and mean log-ratio per completion.
    GrpoSeqStatsF32 => ("grpo.cu", "grpo_seq_stats_f32"),
    /// `grpo_batch_stats_f32`: token total and the top-entropy threshold.
    GrpoBatchStatsF32 => ("grpo.cu", "grpo_batch_stats_f32"),
    /// `grpo_token_loss_f32`: per-token loss terms and d loss / d logp; CPU
    /// twin `aha_grpo::grpo_loss`.
    GrpoTokenLossF32 => ("grpo.cu", "grpo_token_loss_f32"),
    /// `grpo_finalize_f64`: the loss and TRL's metrics from per-row sums.
    GrpoFinalizeF64 => ("grpo.cu", "grpo_finalize_f64"),
    /// `grpo_advantages_f64`; CPU twin `aha_grpo::compute_advantages`.
    GrpoAdvantagesF64 => ("grpo.cu", "grpo_advantages_f64"),
    /// `moe_route_softmax_f32`: softmax top-k routing; CPU twin
    /// `aha_tensor::cpu::moe_route_softmax`.
    MoeRouteSoftmaxF32 => ("moe.cu", "moe_route_softmax_f32"),
    /// `moe_route_sigmoid_group_f32`: DeepSeek-V3 group-limited routing; CPU
    /// twin `aha_tensor::cpu::moe_route_sigmoid_group`.
    MoeRouteSigmoidGroupF32 => ("moe.cu", "moe_route_sigmoid_group_f32"),
    /// `moe_route_backward_f32`: routing weights back to the router logits;
    /// CPU twin `aha_tensor::cpu::moe_route_backward`.
    MoeRouteBackwardF32 => ("moe.cu", "moe_route_backward_f32"),
    /// `moe_count_u32`: per-expert counts, offsets, tile list, load fractions;
    /// CPU twin `aha_tensor::cpu::moe_count`.
    MoeCountU32 => ("moe.cu", "moe_count_u32"),
    /// `moe_scatter_u32`: stable permutation and its inverse; CPU twin
    /// `aha_tensor::cpu::moe_permute`.
    MoeScatterU32 => ("moe.cu", "moe_scatter_u32"),
    /// `moe_gather_bf16`: token rows into expert order, as bf16; CPU twin
    /// `aha_tensor::cpu::moe_gather`.
    MoeGatherBf16 => ("moe.cu", "moe_gather_bf16"),
    /// `moe_gather_f32`: token rows into expert order, as f32; CPU twin
    /// `aha_tensor::cpu::moe_gather` with `Store::F32`.
    MoeGatherF32 => ("moe.cu", "moe_gather_f32"),
    /// `moe_combine_f32`: weighted gather back to token order; CPU twin
    /// `aha_tensor::cpu::moe_combine`.
    MoeCombineF32 => ("moe.cu", "moe_combine_f32"),
    /// `moe_combine_backward_bf16`: d routing weights and d expert outputs;
    /// CPU twin `aha_tensor::cpu::moe_combine_backward`.
    MoeCombineBackwardBf16 => ("moe.cu", "moe_combine_backward_bf16"),
    /// `moe_combine_backward_f32`: as the bf16 kernel with f32 d expert
    /// outputs; CPU twin `aha_tensor::cpu::moe_combine_backward` with `Store::F32`.
    MoeCombineBackwardF32 => ("moe.cu", "moe_combine_backward_f32"),
    /// `moe_swiglu_backward_bf16`; CPU twin `aha_tensor::cpu::moe_swiglu_backward`.
    MoeSwigluBackwardBf16 => ("moe.cu", "moe_swiglu_backward_bf16"),
    /// `moe_swiglu_backward_f32`: f32 outputs; CPU twin
    /// `aha_tensor::cpu::moe_swiglu_backward` with `Store::F32`.
    MoeSwigluBackwardF32 => ("moe.cu", "moe_swiglu_backward_f32"),
    /// `moe_bias_update_f32`: aux-loss-free balancing; CPU twin
    /// `aha_tensor::cpu::moe_bias_update`.
    MoeBiasUpdateF32 => ("moe.cu", "moe_bias_update_f32"),
    /// `moe_grouped_gemm_bf16`: products over expert segments; CPU twin
    /// `aha_tensor::cpu::moe_grouped_matmul`.
    MoeGroupedGemmBf16 => ("moe.cu", "moe_grouped_gemm_bf16"),
    /// `moe_grouped_gemm_f32`: `moe_grouped_gemm_bf16` with f32 operands;
    /// CPU twin `aha_tensor::cpu::moe_grouped_matmul`.
    MoeGroupedGemmF32 => ("moe.cu", "moe_grouped_gemm_f32"),
    /// `moe_grouped_gate_up_bf16`: fused gate/up products and SwiGLU; CPU
    /// twin `aha_tensor::cpu::moe_grouped_gate_up`.
    MoeGroupedGateUpBf16 => ("moe.cu", "moe_grouped_gate_up_bf16"),
    /// `moe_grouped_gate_up_f32`: f32 operands and activations; CPU twin
    /// `aha_tensor::cpu::moe_grouped_gate_up` with `Store::F32`.
    MoeGroupedGateUpF32 => ("moe.cu", "moe_grouped_gate_up_f32"),
    /// `moe_grouped_wgrad_bf16`: per-expert weight gradients; CPU twin
    /// `aha_tensor::cpu::moe_grouped_wgrad`.
    MoeGroupedWgradBf16 => ("moe.cu", "moe_grouped_wgrad_bf16"),
    /// `moe_grouped_wgrad_f32`: f32 operands; CPU twin
    /// `aha_tensor::cpu::moe_grouped_wgrad`.
    MoeGroupedWgradF32 => ("moe.cu", "moe_grouped_wgrad_f32"),
    /// `moe_grouped_gemm_mma_bf16`: tensor-core twin of `moe_grouped_gemm_bf16`.
    MoeGroupedGemmMmaBf16 => ("moe.cu", "moe_grouped_gemm_mma_bf16"),
    /// `moe_grouped_gate_up_mma_bf16`: tensor-core twin of `moe_grouped_gate_up_bf16`.
    MoeGroupedGateUpMmaBf16 => ("moe.cu", "moe_grouped_gate_up_mma_bf16"),
    /// `moe_grouped_wgrad_mma_bf16`: tensor-core twin of `moe_grouped_wgrad_bf16`.
    MoeGroupedWgradMmaBf16 => ("moe.cu", "moe_grouped_wgrad_mma_bf16"),
}

impl KernelId {
    /// The embedded source of this kernel's file.
    pub fn source(self) -> Option<&'static KernelSource> {
        SOURCES.iter().find(|s| s.file == self.file())
    }
}
