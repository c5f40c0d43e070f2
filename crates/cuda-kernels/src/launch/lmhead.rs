//! The lm head's token log-probabilities and entropies straight from hidden
//! states on the device, one vocabulary chunk at a time, and their backward
//! (kernels in `kernels/lmhead.cu`, products through cuBLAS). CPU twin:
//! `aha_tensor::cpu::lm_head_logprob_forward` / `_backward`, with the same
//! chunks and the same merge rule.
//!
//! Logits for the whole vocabulary never exist for the batch: the largest
//! buffer is one chunk's `[rows, chunk]` f32 logits (reused for its
//! gradient), sized by [`plan_lm_head`] from a byte budget. For GRPO at
//! N = 16,384 completion tokens, V = 151,936, C = 2,048 with the default
//! 256 MiB budget that is 4,096 vocabulary rows a chunk: 256 MiB plus 256 KiB
//! of row state, against 9.3 GiB for the full logits alone and 18.6 GiB with
//! their gradient on the naive path (see [`LmHeadPlan::workspace_bytes`] and
//! [`naive_workspace_bytes`]).
//!
//! | name | shape |
//! |---|---|
//! | hidden, dhidden | [N, C] f32 |
//! | weight, dweight | [V, C] f32 |
//! | targets | [N] (host), each < V |
//! | logp, entropy, lse, dlogp, dentropy | [N] f32 |

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::blas::{matmul_bf16_f32out, matmul_f32, MatmulShape};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::launch::{cast_f32_to_bf16, check_lens};
use crate::registry::KernelId;
use crate::view::DevOut;

/// Default byte budget of the chunk buffer: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: usize = 256 << 20;
/// The narrowest vocabulary chunk the planner picks (narrower chunks make
/// the products too thin to be efficient); rows are chunked instead.
pub const MIN_CHUNK: usize = 1024;
/// Threads per block of the per-row kernel.
const ROW_BLOCK: u32 = 256;

/// How one lm-head computation is cut up: `rows` tokens by `chunk`
/// vocabulary rows at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmHeadPlan {
    /// Tokens.
    pub n: usize,
    /// Hidden size.
    pub c: usize,
    /// Vocabulary size.
    pub v: usize,
    /// Vocabulary rows per chunk.
    pub chunk: usize,
    /// Tokens per row block (all of them unless the budget forces fewer).
    pub rows: usize,
    /// Logits are divided by this first (finite, > 0).
    pub temperature: f32,
}

impl LmHeadPlan {
    /// Device bytes the computation allocates beyond its inputs and outputs:
    /// the chunk buffer and the `[N, 4]` row state.
    pub fn workspace_bytes(&self) -> usize {
        4 * (self.rows * self.chunk.min(self.v) + 4 * self.n)
    }

    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.n)
            .step_by(self.rows.max(1))
            .map(|r0| (r0, self.rows.min(self.n - r0)))
    }

    fn vocab_chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.v)
            .step_by(self.chunk.max(1))
            .map(|v0| (v0, self.chunk.min(self.v - v0)))
    }
}

/// Bytes of the naive path's logits and their gradient, `[N, V]` f32 each
/// (what `log_softmax(hidden @ W.T).gather(...)` holds in autograd).
pub fn naive_workspace_bytes(n: usize, v: usize) -> usize {
    2 * 4 * n * v
}

/// Plans the chunks for `n` tokens, hidden size `c`, vocabulary `v` within
/// `budget_bytes` of chunk buffer, checking sizes and the temperature.
pub fn plan_lm_head(n: usize, c: usize, v: usize, temperature: f32, budget_bytes: usize) -> Result<LmHeadPlan> {
    let bad = |msg: String| Error::InvalidArgument {
        op: "plan_lm_head",
        msg,
    };
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(bad(format!("temperature must be finite and > 0, got {temperature}")));
    }
    if n.checked_mul(c).is_none() || v.checked_mul(c).is_none() {
        return Err(bad(format!("{n} x {c} or {v} x {c} overflows")));
    }
    for (what, x) in [("tokens", n), ("hidden size", c), ("vocabulary", v)] {
        if i32::try_from(x).is_err() {
            return Err(bad(format!("{what} = {x} exceeds cuBLAS's int range")));
        }
    }
    let floats = (budget_bytes / 4).max(1);
    let min_chunk = MIN_CHUNK.min(v.max(1));
    // All rows at once when at least `min_chunk` vocabulary rows fit.
    let rows = if n.saturating_mul(min_chunk) <= floats {
        n.max(1)
    } else {
        (floats / min_chunk).max(1)
    };
    let chunk = (floats / rows).clamp(min_chunk, v.max(1));
    Ok(LmHeadPlan {
        n,
        c,
        v,
        chunk,
        rows,
        temperature,
    })
}

fn check_targets(op: &'static str, targets: &[u32], v: usize) -> Result<()> {
    match targets.iter().position(|&t| t as usize >= v) {
        Some(i) => Err(Error::InvalidArgument {
            op,
            msg: format!("target {} at position {i} is outside the vocabulary of {v}", targets[i]),
        }),
        None => Ok(()),
    }
}

/// The lm head's inputs: hidden states `[N, C]` and weight `[V, C]`, both
/// f32 (`cublasSgemm`) or both bf16 bits (`cublasGemmEx` with f32 logits;
/// the gradient chunk is rounded to bf16 for the two backward products,
/// which accumulate in f32).
/// The buffers may be views (the weight usually is one, into a model's flat
/// parameter buffer).
#[derive(Debug)]
pub enum LmHeadOperands<'a> {
    /// f32 hidden states and weight.
    F32 {
        /// `[N, C]`.
        hidden: CudaView<'a, f32>,
        /// `[V, C]`.
        weight: CudaView<'a, f32>,
    },
    /// bf16 hidden states and weight (`u16` bits, as the cast kernels write).
    Bf16 {
        /// `[N, C]`.
        hidden: CudaView<'a, u16>,
        /// `[V, C]`.
        weight: CudaView<'a, u16>,
    },
}

impl LmHeadOperands<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            LmHeadOperands::F32 { hidden, weight } => (hidden.len(), weight.len()),
            LmHeadOperands::Bf16 { hidden, weight } => (hidden.len(), weight.len()),
        }
    }
}

/// `logits [rows, vc] = hidden[r0 .. r0 + rows] · weight[v0 .. v0 + vc]ᵀ`.
fn chunk_logits(
    gpu: &Gpu,
    buf: &mut CudaSlice<f32>,
    x: &LmHeadOperands<'_>,
    p: &LmHeadPlan,
    (r0, rows): (usize, usize),
    (v0, vc): (usize, usize),
) -> Result<()> {
    let mut out = buf.slice_mut(..rows * vc);
    let s = MatmulShape {
        m: rows,
        k: p.c,
        n: vc,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    };
    let (hr, wr) = (r0 * p.c..(r0 + rows) * p.c, v0 * p.c..(v0 + vc) * p.c);
    match x {
        LmHeadOperands::F32 { hidden, weight } => matmul_f32(gpu, &mut out, &hidden.slice(hr), &weight.slice(wr), s),
        LmHeadOperands::Bf16 { hidden, weight } => {
            matmul_bf16_f32out(gpu, &mut out, &hidden.slice(hr), &weight.slice(wr), s)
        }
    }
}

/// Log-probs of `targets`, entropies and log-sum-exps of the tempered
/// softmax over `hidden weightᵀ` (kernels `lmhead_chunk_stats_f32` and
/// `lmhead_finish_f32`).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_forward_f32(
    gpu: &Gpu,
    logp: &mut CudaSlice<f32>,
    entropy: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    x: &LmHeadOperands<'_>,
    targets: &[u32],
    p: &LmHeadPlan,
) -> Result<()> {
    const OP: &str = "lm_head_logprob_forward_f32";
    let (n, c, v) = (p.n, p.c, p.v);
    let (hidden_len, weight_len) = x.lens();
    check_lens(
        OP,
        &[
            ("logp", logp.len(), n),
            ("entropy", entropy.len(), n),
            ("lse", lse.len(), n),
            ("hidden", hidden_len, n * c),
            ("weight", weight_len, v * c),
            ("targets", targets.len(), n),
        ],
    )?;
    check_targets(OP, &targets[..n], v)?;
    if n == 0 {
        return Ok(());
    }
    if v == 0 || c == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("empty lm head: vocabulary {v}, hidden size {c}"),
        });
    }
    let t = gpu.upload(&targets[..n])?;
    let mut state = gpu.scratch_f32(4 * n)?;
    let mut buf = gpu.scratch_f32(p.rows * p.chunk.min(v))?;
    let stats = gpu.function(KernelId::LmheadChunkStatsF32)?;
    let inv_t = 1.0f32 / p.temperature;
    for (r0, rows) in p.row_blocks() {
        for (ci, (v0, vc)) in p.vocab_chunks().enumerate() {
            chunk_logits(gpu, &mut buf, x, p, (r0, rows), (v0, vc))?;
            let mut st: CudaViewMut<'_, f32> = state.slice_mut(4 * r0..4 * (r0 + rows));
            let tv = t.slice(r0..r0 + rows);
            let (vc64, v064, first) = (vc as u64, v0 as u64, i32::from(ci == 0));
            let mut l = gpu.stream().launch_builder(&stats);
            l.arg(&mut st)
                .arg(&*buf)
                .arg(&tv)
                .arg(&vc64)
                .arg(&v064)
                .arg(&inv_t)
                .arg(&first);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (ROW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: (float*, const float*, const unsigned*, u64, u64,
            // float, int); one block per row of the chunk's [rows, vc]
            // logits; state holds 4 floats per row; targets were checked < v.
            unsafe { l.launch(cfg) }.ctx("launch lmhead_chunk_stats_f32")?;
        }
    }
    let fin = gpu.function(KernelId::LmheadFinishF32)?;
    let n64 = n as u64;
    let mut l = gpu.stream().launch_builder(&fin);
    l.arg(logp).arg(entropy).arg(lse).arg(&*state).arg(&n64);
    let cfg = LaunchConfig {
        grid_dim: ((n as u64).div_ceil(u64::from(ROW_BLOCK)) as u32, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (float*, float*, float*, const float*, u64): one thread per
    // row, every output holds n, the state 4 n.
    unsafe { l.launch(cfg) }.ctx("launch lmhead_finish_f32")?;
    Ok(())
}

/// Backward of [`lm_head_logprob_forward_f32`]: `dhidden +=` and
/// `dweight +=` from `dlogp` and `dentropy`, recomputing each chunk's logits
/// (kernel `lmhead_chunk_grad_f32` between two cuBLAS products per chunk).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_backward_f32(
    gpu: &Gpu,
    dhidden: &mut impl DevOut<f32>,
    dweight: &mut impl DevOut<f32>,
    x: &LmHeadOperands<'_>,
    targets: &[u32],
    lse: &CudaSlice<f32>,
    entropy: &CudaSlice<f32>,
    dlogp: &CudaSlice<f32>,
    dentropy: &CudaSlice<f32>,
    p: &LmHeadPlan,
) -> Result<()> {
    let mut dw = dweight.view_mut();
    lm_head_backward(
        gpu,
        dhidden,
        Some(&mut dw),
        x,
        targets,
        lse,
        entropy,
        dlogp,
        dentropy,
        p,
    )
}

/// [`lm_head_logprob_backward_f32`] without the weight's gradient (a frozen
/// head): only `dhidden +=`, one cuBLAS product per chunk fewer.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_logprob_backward_dhidden_f32(
    gpu: &Gpu,
    dhidden: &mut impl DevOut<f32>,
    x: &LmHeadOperands<'_>,
    targets: &[u32],
    lse: &CudaSlice<f32>,
    entropy: &CudaSlice<f32>,
    dlogp: &CudaSlice<f32>,
    dentropy: &CudaSlice<f32>,
    p: &LmHeadPlan,
) -> Result<()> {
    lm_head_backward(gpu, dhidden, None, x, targets, lse, entropy, dlogp, dentropy, p)
}

#[allow(clippy::too_many_arguments)]
fn lm_head_backward(
    gpu: &Gpu,
    dhidden: &mut impl DevOut<f32>,
    mut dweight: Option<&mut CudaViewMut<'_, f32>>,
    x: &LmHeadOperands<'_>,
    targets: &[u32],
    lse: &CudaSlice<f32>,
    entropy: &CudaSlice<f32>,
    dlogp: &CudaSlice<f32>,
    dentropy: &CudaSlice<f32>,
    p: &LmHeadPlan,
) -> Result<()> {
    const OP: &str = "lm_head_logprob_backward_f32";
    let mut dhidden = dhidden.view_mut();
    let (n, c, v) = (p.n, p.c, p.v);
    let (hidden_len, weight_len) = x.lens();
    check_lens(
        OP,
        &[
            ("dhidden", dhidden.len(), n * c),
            ("dweight", dweight.as_ref().map_or(v * c, |d| d.len()), v * c),
            ("hidden", hidden_len, n * c),
            ("weight", weight_len, v * c),
            ("targets", targets.len(), n),
            ("lse", lse.len(), n),
            ("entropy", entropy.len(), n),
            ("dlogp", dlogp.len(), n),
            ("dentropy", dentropy.len(), n),
        ],
    )?;
    check_targets(OP, &targets[..n], v)?;
    if n == 0 || v == 0 || c == 0 {
        return Ok(());
    }
    let t = gpu.upload(&targets[..n])?;
    let mut buf = gpu.scratch_f32(p.rows * p.chunk.min(v))?;
    // The bf16 path rounds each gradient chunk into this buffer.
    let mut buf16 = match x {
        LmHeadOperands::Bf16 { .. } => Some(gpu.zeros::<u16>(p.rows * p.chunk.min(v))?),
        LmHeadOperands::F32 { .. } => None,
    };
    let grad = gpu.function(KernelId::LmheadChunkGradF32)?;
    let inv_t = 1.0f32 / p.temperature;
    for (r0, rows) in p.row_blocks() {
        for (v0, vc) in p.vocab_chunks() {
            chunk_logits(gpu, &mut buf, x, p, (r0, rows), (v0, vc))?;
            {
                let (ls, en) = (lse.slice(r0..r0 + rows), entropy.slice(r0..r0 + rows));
                let (dl, de) = (dlogp.slice(r0..r0 + rows), dentropy.slice(r0..r0 + rows));
                let tv = t.slice(r0..r0 + rows);
                let (rows64, vc64, v064) = (rows as u64, vc as u64, v0 as u64);
                let mut l = gpu.stream().launch_builder(&grad);
                l.arg(&mut *buf)
                    .arg(&ls)
                    .arg(&en)
                    .arg(&dl)
                    .arg(&de)
                    .arg(&tv)
                    .arg(&rows64)
                    .arg(&vc64)
                    .arg(&v064)
                    .arg(&inv_t);
                let total = (rows * vc) as u64;
                let cfg = LaunchConfig {
                    grid_dim: (total.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: (float*, 5 x const float* / unsigned*, u64 x 3,
                // float); grid-stride over rows * vc elements of the chunk
                // buffer; the per-row views hold `rows` entries.
                unsafe { l.launch(cfg) }.ctx("launch lmhead_chunk_grad_f32")?;
            }
            chunk_grad_products(
                gpu,
                &mut dhidden,
                dweight.as_deref_mut(),
                &buf,
                buf16.as_mut(),
                x,
                p,
                (r0, rows),
                (v0, vc),
            )?;
        }
    }
    Ok(())
}

/// `dhidden[r0..] += g · W_chunk` and (with `dweight`) `dW_chunk += gᵀ ·
/// hidden[r0..]` for one chunk's gradient `g [rows, vc]` (rounded to bf16 first on the bf16
/// path).
#[allow(clippy::too_many_arguments)]
fn chunk_grad_products(
    gpu: &Gpu,
    dhidden: &mut CudaViewMut<'_, f32>,
    dweight: Option<&mut CudaViewMut<'_, f32>>,
    buf: &CudaSlice<f32>,
    buf16: Option<&mut CudaSlice<u16>>,
    x: &LmHeadOperands<'_>,
    p: &LmHeadPlan,
    (r0, rows): (usize, usize),
    (v0, vc): (usize, usize),
) -> Result<()> {
    let c = p.c;
    let sh = MatmulShape {
        m: rows,
        k: vc,
        n: c,
        trans_a: false,
        trans_b: false,
        accumulate: true,
    };
    let sw = MatmulShape {
        m: vc,
        k: rows,
        n: c,
        trans_a: true,
        trans_b: false,
        accumulate: true,
    };
    let (hr, wr) = (r0 * c..(r0 + rows) * c, v0 * c..(v0 + vc) * c);
    let mut dh = dhidden.slice_mut(hr.clone());
    match (x, buf16) {
        (LmHeadOperands::F32 { hidden, weight }, _) => {
            let g = buf.slice(..rows * vc);
            matmul_f32(gpu, &mut dh, &g, &weight.slice(wr.clone()), sh)?;
            match dweight {
                Some(dw) => matmul_f32(gpu, &mut dw.slice_mut(wr), &g, &hidden.slice(hr), sw),
                None => Ok(()),
            }
        }
        (LmHeadOperands::Bf16 { hidden, weight }, Some(g16)) => {
            cast_f32_to_bf16(gpu, g16, buf, rows * vc)?;
            let g = g16.slice(..rows * vc);
            matmul_bf16_f32out(gpu, &mut dh, &g, &weight.slice(wr.clone()), sh)?;
            match dweight {
                Some(dw) => matmul_bf16_f32out(gpu, &mut dw.slice_mut(wr), &g, &hidden.slice(hr), sw),
                None => Ok(()),
            }
        }
        (LmHeadOperands::Bf16 { .. }, None) => Err(Error::InvalidArgument {
            op: "lm_head_logprob_backward_f32",
            msg: "bf16 operands need a bf16 gradient buffer".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpo_scale_fits_one_eighth_of_the_naive_path() {
        // The target shape: N = 16,384, V = 151,936, C = 2,048.
        let p = plan_lm_head(16_384, 2_048, 151_936, 1.0, DEFAULT_BUDGET_BYTES).unwrap();
        assert_eq!((p.rows, p.chunk), (16_384, 4_096));
        let ours = p.workspace_bytes();
        let naive = naive_workspace_bytes(16_384, 151_936);
        assert!(ours * 8 < naive, "{ours} vs {naive}");
        assert!(ours <= DEFAULT_BUDGET_BYTES + 4 * 4 * 16_384);
        // Counting what both paths hold anyway (f32 weight, its gradient,
        // hidden and its gradient: 2.76 GB) the ratio is 3.03 GB to 22.7 GB,
        // 1/7.5.
        let shared = 4 * (2 * 151_936 * 2_048 + 2 * 16_384 * 2_048);
        assert!((ours + shared) * 7 < naive + shared, "{ours} + {shared} vs {naive}");
    }

    #[test]
    fn plans_chunk_rows_when_the_budget_is_small_and_cover_everything() {
        let p = plan_lm_head(10_000, 64, 50_000, 0.7, 4 * 1024 * 100).unwrap();
        assert_eq!(p.chunk, MIN_CHUNK);
        assert_eq!(p.rows, 100);
        assert_eq!(p.row_blocks().map(|(_, r)| r).sum::<usize>(), 10_000);
        assert_eq!(p.vocab_chunks().map(|(_, c)| c).sum::<usize>(), 50_000);
        let small = plan_lm_head(3, 8, 10, 1.0, DEFAULT_BUDGET_BYTES).unwrap();
        assert_eq!((small.rows, small.chunk), (3, 10));
        assert_eq!(small.vocab_chunks().collect::<Vec<_>>(), vec![(0, 10)]);
    }

    #[test]
    fn bad_sizes_and_temperatures_are_errors() {
        for t in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
            let e = plan_lm_head(4, 4, 4, t, DEFAULT_BUDGET_BYTES).unwrap_err();
            assert!(e.to_string().contains("temperature"), "{e}");
        }
        assert!(plan_lm_head(1 << 32, 4, 4, 1.0, DEFAULT_BUDGET_BYTES).is_err());
        assert!(plan_lm_head(usize::MAX, 4, 4, 1.0, DEFAULT_BUDGET_BYTES).is_err());
        let e = check_targets("op", &[1, 2, 9], 5).unwrap_err();
        assert!(e.to_string().contains("target 9 at position 2"), "{e}");
    }
}
