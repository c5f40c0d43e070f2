//! The CPU kernels: plain functions over flat row-major buffers, f32 for work
//! and f64 for reference checks. Each forward has a backward; outputs come
//! first, then inputs, then sizes. Parameter gradients accumulate (`+=`),
//! activation gradients assign (`=`).
//!
//! Size letters: `N` rows (tokens, B*T), `C` channels, `V` vocabulary,
//! `B` batch, `T` time, `H` query heads, `Hk` key/value heads, `D` head dim,
//! `F` MLP width, `K` top-k.

mod attention;
mod bf16;
mod elementwise;
mod embedding;
mod flash;
mod lmhead;
mod logprob;
mod matmul;
mod moe;
mod moe_layer;
mod optim;
mod rmsnorm;
mod rope;
mod skinny;
mod softmax;
mod topk;

pub use attention::{attention_backward, attention_forward, AttnShape};
pub use bf16::{bf16_hardware, product_precision, round_bf16, set_product_precision, ProductPrecision};
pub use elementwise::{
    add, add_backward, add_inplace, copy_cols, mul, mul_backward, scale, scale_backward, silu, silu_backward, swiglu,
    swiglu_backward,
};
pub use embedding::{embedding_backward, embedding_forward};
pub use flash::{
    check_cu_seqlens, flash_backward, flash_decode_paged, flash_forward, flash_forward_tiled, kv_write, FlashShape,
    PagedShape,
};
pub use lmhead::{
    lm_head_logprob_backward, lm_head_logprob_backward_kept, lm_head_logprob_forward, lm_head_logprob_forward_keep,
    LmHeadShape,
};
pub use logprob::{token_logprob_backward, token_logprob_forward};
pub use matmul::{matmul, matmul_batched, Gemm};
pub use moe::{
    moe_bias_update, moe_combine, moe_combine_backward, moe_count, moe_gather, moe_grouped_gate_up, moe_grouped_matmul,
    moe_grouped_wgrad, moe_permute, moe_route, moe_route_backward, moe_route_sigmoid_group, moe_route_softmax,
    moe_swiglu_backward, MoeGating, MoeMath, MoeStorage, Store, MOE_TILE_ROWS,
};
pub use moe_layer::{moe_layer_backward, moe_layer_forward, MoeDims, MoeLayerGrads, MoeLayerSaved, MoeLayerWeights};
pub use optim::{adamw_step, adamw_step_f32, clip_grad_norm, global_norm, AdamW, AdamwConsts};
pub use rmsnorm::{rmsnorm_backward, rmsnorm_forward};
pub use rope::{rope_backward, rope_forward, rope_table, RopeLayout, RopeShape};
pub use softmax::{log_softmax_backward, log_softmax_forward, softmax_backward, softmax_forward};
pub use topk::{topk, topk_backward};

/// x86-64 vector helpers that other crates' hand-written kernels share.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    pub use super::skinny::x86::reduce4_512;
}

use rayon::prelude::*;

/// Runs `f` compiled for AVX-512 (or AVX2 + FMA) when the CPU has them,
/// chosen at run time, else for the baseline target (SSE2 on x86-64): the
/// element-wise passes between products (softmax rows, the lm head's
/// log-sum-exp, AdamW) vectorize over 16 lanes instead of 4. The
/// arithmetic is the same in every variant (no fused multiply-adds are
/// formed: Rust never contracts `a * b + c`), so results are bit-identical.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { wide_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { wide_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
fn wide_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi2")]
fn wide_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The maximum of `x` (-inf when empty; NaNs are skipped), in eight
/// independent lanes so that the compiler can use vector max instructions
/// (a plain `fold(f32::max)` is one long dependency chain).
#[inline(always)]
pub(crate) fn row_max<F: crate::Real>(x: &[F]) -> F {
    let mut lanes = [F::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (m, &v) in lanes.iter_mut().zip(ch) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m = F::neg_infinity();
    for &v in lanes.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

/// The sum of `x` in eight independent lanes (vectorizable; the order
/// differs from a left fold by rounding only).
#[inline(always)]
pub(crate) fn sum_lanes<F: crate::Real>(x: &[F]) -> F {
    let mut lanes = [F::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (s, &v) in lanes.iter_mut().zip(ch) {
            *s += v;
        }
    }
    lanes.iter().chain(rest).fold(F::zero(), |a, &b| a + b)
}

/// `sum(x * x)` in eight lanes (vectorizable; the order differs from a
/// left fold by rounding only).
#[inline(always)]
pub(crate) fn sum_sq_lanes<F: crate::Real>(x: &[F]) -> F {
    let mut lanes = [F::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (s, &v) in lanes.iter_mut().zip(ch) {
            *s += v * v;
        }
    }
    lanes
        .iter()
        .fold(rest.iter().fold(F::zero(), |a, &v| a + v * v), |a, &b| a + b)
}

/// `sum(exp(x - m))` in eight lanes, without a scratch buffer.
#[inline(always)]
pub(crate) fn sum_exp_shifted<F: crate::Real>(x: &[F], m: F) -> F {
    let mut lanes = [F::zero(); 8];
    // Exponentials of a block, then their lane sums: the same sums in the
    // same order as one fused loop, which the compiler does not vectorize.
    let mut e = [F::zero(); 64];
    let blocks = x.chunks_exact(64);
    let tail64 = blocks.remainder();
    for xb in blocks {
        for (o, &v) in e.iter_mut().zip(xb) {
            *o = (v - m).exp_fast();
        }
        for ch in e.chunks_exact(8) {
            for (s, &v) in lanes.iter_mut().zip(ch) {
                *s += v;
            }
        }
    }
    let chunks = tail64.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for (s, &v) in lanes.iter_mut().zip(ch) {
            *s += (v - m).exp_fast();
        }
    }
    let tail = rest.iter().fold(F::zero(), |a, &v| a + (v - m).exp_fast());
    lanes.iter().fold(tail, |a, &b| a + b)
}

/// Errors on the first index `>= limit` (token ids, targets).
pub(crate) fn check_indices(op: &'static str, ids: &[u32], limit: usize) -> crate::Result<()> {
    match ids.iter().position(|&i| i as usize >= limit) {
        Some(p) => Err(crate::Error::IndexOutOfRange {
            op,
            index: ids[p] as i64,
            position: p,
            limit,
        }),
        None => Ok(()),
    }
}

/// Rows per rayon task: large enough that a task does at least ~32k elements.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (32 * 1024 / cols.max(1)).max(1)
}

/// Runs `f(row_index, out_row)` over the rows of `out`, in parallel when big.
pub(crate) fn for_rows<F: Send, G>(out: &mut [F], cols: usize, f: G)
where
    G: Fn(usize, &mut [F]) + Sync + Send,
{
    if cols == 0 {
        return;
    }
    let per = rows_per_task(cols);
    if out.len() <= per * cols {
        for (r, row) in out.chunks_mut(cols).enumerate() {
            f(r, row);
        }
    } else {
        out.par_chunks_mut(per * cols).enumerate().for_each(|(i, chunk)| {
            for (j, row) in chunk.chunks_mut(cols).enumerate() {
                f(i * per + j, row);
            }
        });
    }
}
