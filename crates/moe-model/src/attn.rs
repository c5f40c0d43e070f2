//! Attention layers: grouped-query attention (Qwen2/Qwen3) and multi-head
//! latent attention (DeepSeek-V3), forward and backward, plus the cached
//! forward used for incremental decoding.
//!
//! | name | shape |
//! |---|---|
//! | x (normed input), dx | [N, C], N = B*T |
//! | q | [N, H, Dk] after RoPE |
//! | k | [N, Hk, Dk] after RoPE |
//! | v | [N, Hk, Dv] |
//! | out | [N, H * Dv], before o_proj |

use aha_tensor::cpu::{self, AttnShape, RopeLayout, RopeShape};
use aha_tensor::profile::{self, Phase};
use aha_tensor::Real;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::linear::{linear_bwd, linear_fwd, norm_bwd, norm_fwd};
use crate::paged::{PagedLayer, SeqSpan};
use crate::params::AttnSlots;
use rayon::prelude::*;

/// Positions of the N tokens and the RoPE table covering them.
pub(crate) struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub pos: &'a [u32],
}

/// How the attention finds its keys and values.
pub(crate) enum AttnMode<'a, 'b> {
    /// A right-padded training batch [B, T]: causal within each row.
    Train,
    /// A ragged batch of new tokens for several sequences, whose keys and
    /// values go into (and are read from) the paged cache.
    /// The cache is only read here; the new rows come back in `new_kv`
    /// (keys, values) for the caller to write into their slots, so that
    /// disjoint groups of sequences can run at once over one cache.
    Paged {
        layer: &'a PagedLayer,
        spans: &'a [SeqSpan<'b>],
        block_size: usize,
        new_kv: &'a mut Vec<(Vec<f32>, Vec<f32>)>,
    },
}

/// What the backward needs from the forward.
pub(crate) enum AttnActs {
    Gqa {
        q_lin: Vec<f32>,
        q_rstd: Vec<f32>,
        k_lin: Vec<f32>,
        k_rstd: Vec<f32>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        out: Vec<f32>,
        lse: Vec<f32>,
    },
    Mla {
        qa: Vec<f32>,
        qa_rstd: Vec<f32>,
        qan: Vec<f32>,
        c: Vec<f32>,
        c_rstd: Vec<f32>,
        cn: Vec<f32>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        out: Vec<f32>,
        lse: Vec<f32>,
    },
}

fn rope_shape(cfg: &ModelConfig, heads: usize) -> RopeShape {
    match &cfg.mla {
        Some(m) => RopeShape {
            heads,
            head_dim: m.qk_nope_head_dim + m.qk_rope_head_dim,
            rot_offset: m.qk_nope_head_dim,
            rot_dim: m.qk_rope_head_dim,
            layout: RopeLayout::Interleaved,
        },
        None => RopeShape::full(heads, cfg.head_dim, RopeLayout::Half),
    }
}

fn rope(x: &[f32], r: &Rope<'_>, s: RopeShape) -> Result<Vec<f32>> {
    let _prof = profile::scope(Phase::Rope);
    let mut y = vec![0f32; x.len()];
    cpu::rope_forward(&mut y, x, r.cos, r.sin, r.pos, s)?;
    Ok(y)
}

fn rope_back(dy: &[f32], r: &Rope<'_>, s: RopeShape) -> Result<Vec<f32>> {
    let _prof = profile::scope(Phase::Rope);
    let mut dx = vec![0f32; dy.len()];
    cpu::rope_backward(&mut dx, dy, r.cos, r.sin, r.pos, s)?;
    Ok(dx)
}

/// Dot product in eight lanes (vectorizable).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Causal attention of each new token against its sequence's positions
/// `0..=p`: earlier positions read from the cache through the block table,
/// the span's own new positions from `k_new`/`v_new`. `out [N, H * Dv]`.
fn attention_paged(
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    layer: &PagedLayer,
    spans: &[SeqSpan<'_>],
    bs: usize,
    s: AttnShape,
) -> Result<Vec<f32>> {
    let AttnShape { h, hk, dk, dv, .. } = s;
    let (kw, vw) = (hk * dk, hk * dv);
    // Per token: its span, its position, and the span's first token index.
    let mut meta = Vec::with_capacity(k_new.len() / kw.max(1));
    for (si, sp) in spans.iter().enumerate() {
        let first = meta.len();
        for i in 0..sp.len {
            meta.push((si, sp.start + i, first));
        }
    }
    let (kc, vc) = (&layer.k, &layer.v);
    let mut out = vec![0f32; meta.len() * h * dv];
    // A span that starts a sequence (a prompt's prefill, nothing cached)
    // and is long enough runs as one causal attention of its own queries,
    // keys and values: blocked matrix products instead of one pass over
    // the keys per query token.
    let whole: Vec<bool> = spans
        .iter()
        .map(|sp| sp.start == 0 && sp.len >= WHOLE_SPAN_MIN)
        .collect();
    // One query token: its key and value rows gathered through the block
    // table, then every head over them (see `attend_rows`).
    let row = |(ti, o): (usize, &mut [f32])| {
        let (si, p, first) = meta[ti];
        if whole[si] {
            return;
        }
        let sp = &spans[si];
        let ctx = p + 1;
        // Full-width key and value rows of positions 0..ctx: cached ones
        // block by block (no division per position), then the span's new ones.
        let mut rows: Vec<(&[f32], &[f32])> = Vec::with_capacity(ctx);
        'blocks: for &blk in sp.table {
            for jj in 0..bs {
                if rows.len() >= sp.start.min(ctx) {
                    break 'blocks;
                }
                let slot = blk as usize * bs + jj;
                rows.push((&kc[slot * kw..(slot + 1) * kw], &vc[slot * vw..(slot + 1) * vw]));
            }
        }
        for j in rows.len()..ctx {
            let t = first + j - sp.start;
            rows.push((&k_new[t * kw..(t + 1) * kw], &v_new[t * vw..(t + 1) * vw]));
        }
        attend_rows(o, &q[ti * h * dk..(ti + 1) * h * dk], &rows, s);
    };
    if meta.len() * h >= 8 {
        out.par_chunks_mut(h * dv).enumerate().for_each(row);
    } else {
        out.chunks_mut(h * dv).enumerate().for_each(row);
    }
    let mut first = 0;
    for (sp, &w) in spans.iter().zip(&whole) {
        let (t0, t1) = (first, first + sp.len);
        first = t1;
        if !w {
            continue;
        }
        let mut lse = vec![0f32; h * sp.len];
        cpu::attention_forward(
            &mut out[t0 * h * dv..t1 * h * dv],
            &mut lse,
            &q[t0 * h * dk..t1 * h * dk],
            &k_new[t0 * kw..t1 * kw],
            &v_new[t0 * vw..t1 * vw],
            AttnShape { b: 1, t: sp.len, ..s },
        )?;
    }
    Ok(out)
}

/// Tokens from which a span that starts its sequence runs as one causal
/// attention (see [`attention_paged`]).
const WHOLE_SPAN_MIN: usize = 16;

/// One query token's attention over its key/value `rows` (full-width rows,
/// positions in order) into `o [H * Dv]`, every key row and then every
/// value row read once, front to back, for all heads (sequential reads of
/// the cache instead of one strided pass per key/value head). Compiled for
/// AVX-512 or AVX2 + FMA when the CPU has them (chosen at run time); the
/// arithmetic and its order are the same in every variant.
fn attend_rows(o: &mut [f32], q: &[f32], rows: &[(&[f32], &[f32])], s: AttnShape) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { attend_rows_avx512(o, q, rows, s) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { attend_rows_avx2(o, q, rows, s) };
        }
    }
    attend_rows_body(o, q, rows, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn attend_rows_avx512(o: &mut [f32], q: &[f32], rows: &[(&[f32], &[f32])], s: AttnShape) {
    attend_rows_body(o, q, rows, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_rows_avx2(o: &mut [f32], q: &[f32], rows: &[(&[f32], &[f32])], s: AttnShape) {
    attend_rows_body(o, q, rows, s)
}

/// [`attend_rows`]' arithmetic: scores `[H, ctx]` in one pass over the key
/// rows, a softmax per head, the weighted values in one pass over the value rows.
#[inline(always)]
fn attend_rows_body(o: &mut [f32], q: &[f32], rows: &[(&[f32], &[f32])], s: AttnShape) {
    let AttnShape { h, hk, dk, dv, .. } = s;
    let group = h / hk;
    let ctx = rows.len();
    let scale = s.scale as f32;
    let mut scores = vec![0f32; h * ctx];
    #[cfg(target_arch = "x86_64")]
    let wide = dk.is_multiple_of(16) && h.is_multiple_of(4) && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    if wide {
        #[cfg(target_arch = "x86_64")]
        for (j, (kr, _)) in rows.iter().enumerate() {
            // SAFETY: AVX-512F is present (checked); dk is a multiple of 16
            // and h of 4 (checked); q holds h * dk and kr hk * dk elements.
            unsafe { x86::key_scores(&mut scores, j, ctx, q, kr, h, group, dk, scale) };
        }
    } else {
        for (j, (kr, _)) in rows.iter().enumerate() {
            for hh in 0..h {
                let kh = hh / group;
                scores[hh * ctx + j] = dot(&q[hh * dk..(hh + 1) * dk], &kr[kh * dk..(kh + 1) * dk]) * scale;
            }
        }
    }
    let mut inv_z = vec![0f32; h];
    for (hh, iz) in inv_z.iter_mut().enumerate() {
        let sc = &mut scores[hh * ctx..(hh + 1) * ctx];
        let mut lanes = [f32::NEG_INFINITY; 16];
        for ch in sc.chunks(16) {
            for (l, &x) in lanes.iter_mut().zip(ch) {
                *l = l.max(x);
            }
        }
        let m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        // The exponentials first (a map that vectorizes), then their sum.
        for x in sc.iter_mut() {
            *x = (*x - m).exp_fast();
        }
        let mut zl = [0f32; 16];
        for ch in sc.chunks(16) {
            for (l, &x) in zl.iter_mut().zip(ch) {
                *l += x;
            }
        }
        *iz = 1.0 / zl.iter().sum::<f32>();
    }
    #[cfg(target_arch = "x86_64")]
    if dv.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        for hh in 0..h {
            let kh = hh / group;
            let w = &scores[hh * ctx..(hh + 1) * ctx];
            // SAFETY: AVX-512F is present (checked), dv a multiple of 16;
            // every value row holds hk * dv elements and o h * dv.
            unsafe { x86::weighted_values(&mut o[hh * dv..(hh + 1) * dv], w, inv_z[hh], rows, kh * dv) };
        }
        return;
    }
    for (j, (_, vr)) in rows.iter().enumerate() {
        for hh in 0..h {
            let kh = hh / group;
            let w = scores[hh * ctx + j] * inv_z[hh];
            for (ov, &vv) in o[hh * dv..(hh + 1) * dv].iter_mut().zip(&vr[kh * dv..(kh + 1) * dv]) {
                *ov += w * vv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use aha_tensor::cpu::x86::reduce4_512 as reduce4;

    /// `o += z Σ_j w[j] v_j[off .. off + o.len()]` over the value rows, with
    /// the sums in registers (up to 128 columns at a time) instead of a
    /// read-modify-write of `o` per row.
    ///
    /// # Safety
    /// AVX-512F; `o.len()` a multiple of 16; every value row holds at least
    /// `off + o.len()` elements; `w.len() == rows.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_values(o: &mut [f32], w: &[f32], z: f32, rows: &[(&[f32], &[f32])], off: usize) {
        debug_assert!(o.len().is_multiple_of(16) && w.len() == rows.len());
        debug_assert!(rows.iter().all(|(_, v)| v.len() >= off + o.len()));
        let mut c0 = 0;
        while c0 < o.len() {
            let width = (o.len() - c0).min(128);
            // SAFETY: columns off + c0 .. off + c0 + width of each row and
            // c0 .. c0 + width of o are in bounds (the caller's contract).
            unsafe {
                match width / 16 {
                    1 => cols::<1>(o, w, z, rows, off, c0),
                    2 => cols::<2>(o, w, z, rows, off, c0),
                    3 => cols::<3>(o, w, z, rows, off, c0),
                    4 => cols::<4>(o, w, z, rows, off, c0),
                    5 => cols::<5>(o, w, z, rows, off, c0),
                    6 => cols::<6>(o, w, z, rows, off, c0),
                    7 => cols::<7>(o, w, z, rows, off, c0),
                    _ => cols::<8>(o, w, z, rows, off, c0),
                }
            }
            c0 += width;
        }
    }

    /// `U` vectors of columns from `c0` of [`weighted_values`].
    ///
    /// # Safety
    /// As [`weighted_values`], with `c0 + 16 U <= o.len()`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn cols<const U: usize>(o: &mut [f32], w: &[f32], z: f32, rows: &[(&[f32], &[f32])], off: usize, c0: usize) {
        let mut acc = [_mm512_setzero_ps(); U];
        for (&wj, (_, vr)) in w.iter().zip(rows) {
            let b = _mm512_set1_ps(wj * z);
            // SAFETY: 16 U elements from off + c0 lie inside the row.
            let vp = unsafe { vr.as_ptr().add(off + c0) };
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *a = _mm512_fmadd_ps(b, unsafe { _mm512_loadu_ps(vp.add(16 * u)) }, *a);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            // SAFETY: 16 U elements from c0 lie inside o.
            unsafe {
                let op = o.as_mut_ptr().add(c0 + 16 * u);
                _mm512_storeu_ps(op, _mm512_add_ps(_mm512_loadu_ps(op), *a));
            }
        }
    }

    /// The scaled scores of every query head against key row `j` (`kr`,
    /// `hk * dk` elements), written to `scores[hh * ctx + j]`: four heads'
    /// dot products reduce together.
    ///
    /// # Safety
    /// AVX-512F; `dk` a multiple of 16, `h` of 4; `q` holds `h * dk` and
    /// `kr` `(h / group) * dk` elements; `scores` `h * ctx` with `j < ctx`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn key_scores(
        scores: &mut [f32],
        j: usize,
        ctx: usize,
        q: &[f32],
        kr: &[f32],
        h: usize,
        group: usize,
        dk: usize,
        scale: f32,
    ) {
        debug_assert!(q.len() >= h * dk && kr.len() >= (h / group) * dk && scores.len() >= h * ctx && j < ctx);
        let (qp, kp) = (q.as_ptr(), kr.as_ptr());
        let sc = _mm_set1_ps(scale);
        for hb in (0..h).step_by(4) {
            let mut a = [_mm512_setzero_ps(); 4];
            for (i, acc) in a.iter_mut().enumerate() {
                let hh = hb + i;
                // SAFETY: head hh's dk query elements and its key head's dk
                // elements lie inside q and kr (the caller's contract).
                unsafe {
                    let (qh, kh) = (qp.add(hh * dk), kp.add((hh / group) * dk));
                    for c in (0..dk).step_by(16) {
                        *acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(c)), _mm512_loadu_ps(kh.add(c)), *acc);
                    }
                }
            }
            let mut out = [0f32; 4];
            // SAFETY: `out` holds four f32.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_mul_ps(reduce4(a), sc)) };
            for (i, &v) in out.iter().enumerate() {
                scores[(hb + i) * ctx + j] = v;
            }
        }
    }
}

/// Flops of `products` causal products of the attention (the forward runs
/// two: scores and weighted values; the backward five: the scores again,
/// dV, dP, dQ and dK), counting the unmasked half: `2 B H T (T + 1) / 2 D`
/// each, with D the mean of Dk and Dv.
fn attn_flops(b: usize, t: usize, s: AttnShape, products: u64) -> u64 {
    let pairs = (b * s.h * t * (t + 1) / 2) as u64;
    products * pairs * (s.dk + s.dv) as u64
}

/// Runs the attention proper: batched causal (training) or through the paged cache.
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    t: usize,
    s: AttnShape,
    mode: &mut AttnMode<'_, '_>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    match mode {
        AttnMode::Paged {
            layer,
            spans,
            block_size,
            new_kv,
        } => {
            let out = attention_paged(q, k, v, layer, spans, *block_size, s)?;
            new_kv.push((k.to_vec(), v.to_vec()));
            Ok((out, vec![]))
        }
        AttnMode::Train => {
            let _prof = profile::scope(Phase::AttnCore);
            profile::add_flops(attn_flops(b, t, s, 2));
            let mut out = vec![0f32; b * t * s.h * s.dv];
            let mut lse = vec![0f32; b * s.h * t];
            cpu::attention_forward(&mut out, &mut lse, q, k, v, AttnShape { b, t, ..s })?;
            Ok((out, lse))
        }
    }
}

/// Attention forward over normed input `x [N, C]`; returns `o_proj` output [N, C].
pub(crate) fn attn_fwd(
    cfg: &ModelConfig,
    slots: &AttnSlots,
    p: &[f32],
    x: &[f32],
    b: usize,
    t: usize,
    rope_t: &Rope<'_>,
    mode: &mut AttnMode<'_, '_>,
) -> Result<(Vec<f32>, AttnActs)> {
    let _prof = profile::scope(Phase::AttnProj);
    let n = b * t;
    let h = cfg.num_heads;
    let (dk, dv, _, scale) = cfg.attn_dims();
    let eps = cfg.rms_norm_eps;
    match slots {
        AttnSlots::Gqa { q, k, v, o, qk_norm } => {
            let hk = cfg.num_kv_heads;
            let mut q_lin = vec![0f32; n * q.out];
            let mut k_lin = vec![0f32; n * k.out];
            let mut vv = vec![0f32; n * v.out];
            linear_fwd(&mut q_lin, x, p, q, n)?;
            linear_fwd(&mut k_lin, x, p, k, n)?;
            linear_fwd(&mut vv, x, p, v, n)?;
            let (qn, q_rstd, kn, k_rstd) = match qk_norm {
                Some((qw, kw)) => {
                    let (qn, qr) = norm_fwd(&q_lin, p, *qw, dk, eps)?;
                    let (kn, kr) = norm_fwd(&k_lin, p, *kw, dk, eps)?;
                    (qn, qr, kn, kr)
                }
                None => (q_lin.clone(), vec![], k_lin.clone(), vec![]),
            };
            let qr = rope(&qn, rope_t, rope_shape(cfg, h))?;
            let kr = rope(&kn, rope_t, rope_shape(cfg, hk))?;
            let s = AttnShape {
                b,
                t,
                h,
                hk,
                dk,
                dv,
                scale,
            };
            let (out, lse) = attend(&qr, &kr, &vv, b, t, s, mode)?;
            let mut y = vec![0f32; n * o.out];
            linear_fwd(&mut y, &out, p, o, n)?;
            let acts = AttnActs::Gqa {
                q_lin,
                q_rstd,
                k_lin,
                k_rstd,
                q: qr,
                k: kr,
                v: vv,
                out,
                lse,
            };
            Ok((y, acts))
        }
        AttnSlots::Mla {
            q_lora,
            q,
            kv_a,
            kv_norm,
            kv_b,
            o,
        } => {
            let m = cfg
                .mla
                .as_ref()
                .ok_or_else(|| crate::error::input_err("attn_fwd", "MLA slots without MLA config"))?;
            let (dn, dr, kvl) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
            // Queries.
            let (qa, qa_rstd, qan, q_lin) = match (q_lora, q) {
                (Some((qa_l, qa_w, qb_l)), _) => {
                    let mut qa = vec![0f32; n * qa_l.out];
                    linear_fwd(&mut qa, x, p, qa_l, n)?;
                    let (qan, qr) = norm_fwd(&qa, p, *qa_w, qa_l.out, eps)?;
                    let mut ql = vec![0f32; n * qb_l.out];
                    linear_fwd(&mut ql, &qan, p, qb_l, n)?;
                    (qa, qr, qan, ql)
                }
                (None, Some(q_l)) => {
                    let mut ql = vec![0f32; n * q_l.out];
                    linear_fwd(&mut ql, x, p, q_l, n)?;
                    (vec![], vec![], vec![], ql)
                }
                (None, None) => return Err(crate::error::input_err("attn_fwd", "MLA without a query projection")),
            };
            let qr = rope(&q_lin, rope_t, rope_shape(cfg, h))?;
            // Compressed keys/values and the shared rotary key.
            let mut kva = vec![0f32; n * kv_a.out];
            linear_fwd(&mut kva, x, p, kv_a, n)?;
            let mut c = vec![0f32; n * kvl];
            let mut kpe = vec![0f32; n * dr];
            for i in 0..n {
                c[i * kvl..(i + 1) * kvl].copy_from_slice(&kva[i * kv_a.out..i * kv_a.out + kvl]);
                kpe[i * dr..(i + 1) * dr].copy_from_slice(&kva[i * kv_a.out + kvl..(i + 1) * kv_a.out]);
            }
            let (cn, c_rstd) = norm_fwd(&c, p, *kv_norm, kvl, eps)?;
            let mut kvb = vec![0f32; n * kv_b.out];
            linear_fwd(&mut kvb, &cn, p, kv_b, n)?;
            let kpe_shape = RopeShape::full(1, dr, RopeLayout::Interleaved);
            let kpe_r = rope(&kpe, rope_t, kpe_shape)?;
            let mut kk = vec![0f32; n * h * dk];
            let mut vv = vec![0f32; n * h * dv];
            for i in 0..n {
                for hh in 0..h {
                    let src = &kvb[(i * h + hh) * (dn + dv)..(i * h + hh + 1) * (dn + dv)];
                    let kd = &mut kk[(i * h + hh) * dk..(i * h + hh + 1) * dk];
                    kd[..dn].copy_from_slice(&src[..dn]);
                    kd[dn..].copy_from_slice(&kpe_r[i * dr..(i + 1) * dr]);
                    vv[(i * h + hh) * dv..(i * h + hh + 1) * dv].copy_from_slice(&src[dn..]);
                }
            }
            let s = AttnShape {
                b,
                t,
                h,
                hk: h,
                dk,
                dv,
                scale,
            };
            let (out, lse) = attend(&qr, &kk, &vv, b, t, s, mode)?;
            let mut y = vec![0f32; n * o.out];
            linear_fwd(&mut y, &out, p, o, n)?;
            let acts = AttnActs::Mla {
                qa,
                qa_rstd,
                qan,
                c,
                c_rstd,
                cn,
                q: qr,
                k: kk,
                v: vv,
                out,
                lse,
            };
            Ok((y, acts))
        }
    }
}

/// Attention backward: from `dy [N, C]` (gradient of the o_proj output),
/// accumulates parameter gradients into `g` and returns `dx [N, C]`.
pub(crate) fn attn_bwd(
    cfg: &ModelConfig,
    slots: &AttnSlots,
    p: &[f32],
    g: &mut [f32],
    acts: &AttnActs,
    x: &[f32],
    dy: &[f32],
    b: usize,
    t: usize,
    rope_t: &Rope<'_>,
) -> Result<Vec<f32>> {
    let _prof = profile::scope(Phase::AttnProj);
    let n = b * t;
    let h = cfg.num_heads;
    let (dk, dv, _, scale) = cfg.attn_dims();
    let c = cfg.hidden_size;
    let mut dx = vec![0f32; n * c];
    match (slots, acts) {
        (
            AttnSlots::Gqa { q, k, v, o, qk_norm },
            AttnActs::Gqa {
                q_lin,
                q_rstd,
                k_lin,
                k_rstd,
                q: qr,
                k: kr,
                v: vv,
                out,
                lse,
            },
        ) => {
            let hk = cfg.num_kv_heads;
            let mut dout = vec![0f32; out.len()];
            linear_bwd(Some(&mut dout), g, dy, out, p, o, n)?;
            let (mut dq, mut dkk, mut dvv) = (vec![0f32; qr.len()], vec![0f32; kr.len()], vec![0f32; vv.len()]);
            let s = AttnShape {
                b,
                t,
                h,
                hk,
                dk,
                dv,
                scale,
            };
            {
                let _prof = profile::scope(Phase::AttnCore);
                profile::add_flops(attn_flops(b, t, s, 5));
                cpu::attention_backward(&mut dq, &mut dkk, &mut dvv, &dout, qr, kr, vv, out, lse, s)?;
            }
            let dqn = rope_back(&dq, rope_t, rope_shape(cfg, h))?;
            let dkn = rope_back(&dkk, rope_t, rope_shape(cfg, hk))?;
            let (dq_lin, dk_lin) = match qk_norm {
                Some((qw, kw)) => (
                    norm_bwd(&dqn, q_lin, q_rstd, p, g, *qw, dk)?,
                    norm_bwd(&dkn, k_lin, k_rstd, p, g, *kw, dk)?,
                ),
                None => (dqn, dkn),
            };
            linear_bwd(Some(&mut dx), g, &dq_lin, x, p, q, n)?;
            linear_bwd(Some(&mut dx), g, &dk_lin, x, p, k, n)?;
            linear_bwd(Some(&mut dx), g, &dvv, x, p, v, n)?;
        }
        (
            AttnSlots::Mla {
                q_lora,
                q,
                kv_a,
                kv_norm,
                kv_b,
                o,
            },
            AttnActs::Mla {
                qa,
                qa_rstd,
                qan,
                c: cc,
                c_rstd,
                cn,
                q: qr,
                k: kk,
                v: vv,
                out,
                lse,
            },
        ) => {
            let m = cfg
                .mla
                .as_ref()
                .ok_or_else(|| crate::error::input_err("attn_bwd", "MLA slots without MLA config"))?;
            let (dn, dr, kvl) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
            let mut dout = vec![0f32; out.len()];
            linear_bwd(Some(&mut dout), g, dy, out, p, o, n)?;
            let (mut dq, mut dkk, mut dvv) = (vec![0f32; qr.len()], vec![0f32; kk.len()], vec![0f32; vv.len()]);
            let s = AttnShape {
                b,
                t,
                h,
                hk: h,
                dk,
                dv,
                scale,
            };
            {
                let _prof = profile::scope(Phase::AttnCore);
                profile::add_flops(attn_flops(b, t, s, 5));
                cpu::attention_backward(&mut dq, &mut dkk, &mut dvv, &dout, qr, kk, vv, out, lse, s)?;
            }
            // Keys and values back to kv_b's output and the shared rotary key.
            let mut dkvb = vec![0f32; n * kv_b.out];
            let mut dkpe_r = vec![0f32; n * dr];
            for i in 0..n {
                for hh in 0..h {
                    let dst = &mut dkvb[(i * h + hh) * (dn + dv)..(i * h + hh + 1) * (dn + dv)];
                    let dkh = &dkk[(i * h + hh) * dk..(i * h + hh + 1) * dk];
                    dst[..dn].copy_from_slice(&dkh[..dn]);
                    dst[dn..].copy_from_slice(&dvv[(i * h + hh) * dv..(i * h + hh + 1) * dv]);
                    for (a, &bb) in dkpe_r[i * dr..(i + 1) * dr].iter_mut().zip(&dkh[dn..]) {
                        *a += bb;
                    }
                }
            }
            let dkpe = rope_back(&dkpe_r, rope_t, RopeShape::full(1, dr, RopeLayout::Interleaved))?;
            let mut dcn = vec![0f32; n * kvl];
            linear_bwd(Some(&mut dcn), g, &dkvb, cn, p, kv_b, n)?;
            let dc = norm_bwd(&dcn, cc, c_rstd, p, g, *kv_norm, kvl)?;
            let mut dkva = vec![0f32; n * kv_a.out];
            for i in 0..n {
                dkva[i * kv_a.out..i * kv_a.out + kvl].copy_from_slice(&dc[i * kvl..(i + 1) * kvl]);
                dkva[i * kv_a.out + kvl..(i + 1) * kv_a.out].copy_from_slice(&dkpe[i * dr..(i + 1) * dr]);
            }
            linear_bwd(Some(&mut dx), g, &dkva, x, p, kv_a, n)?;
            // Queries.
            let dq_lin = rope_back(&dq, rope_t, rope_shape(cfg, h))?;
            match (q_lora, q) {
                (Some((qa_l, qa_w, qb_l)), _) => {
                    let mut dqan = vec![0f32; n * qa_l.out];
                    linear_bwd(Some(&mut dqan), g, &dq_lin, qan, p, qb_l, n)?;
                    let dqa = norm_bwd(&dqan, qa, qa_rstd, p, g, *qa_w, qa_l.out)?;
                    linear_bwd(Some(&mut dx), g, &dqa, x, p, qa_l, n)?;
                }
                (None, Some(q_l)) => linear_bwd(Some(&mut dx), g, &dq_lin, x, p, q_l, n)?,
                (None, None) => return Err(crate::error::input_err("attn_bwd", "MLA without a query projection")),
            }
        }
        _ => {
            return Err(crate::error::input_err(
                "attn_bwd",
                "activations do not match the layer kind",
            ))
        }
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One query token's attention in f64, straight from the definition.
    fn reference(q: &[f32], rows: &[(&[f32], &[f32])], s: AttnShape) -> Vec<f64> {
        let group = s.h / s.hk;
        let mut out = vec![0f64; s.h * s.dv];
        for hh in 0..s.h {
            let kh = hh / group;
            let sc: Vec<f64> = rows
                .iter()
                .map(|(k, _)| {
                    (0..s.dk)
                        .map(|d| f64::from(q[hh * s.dk + d]) * f64::from(k[kh * s.dk + d]))
                        .sum::<f64>()
                        * s.scale
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for (j, (_, v)) in rows.iter().enumerate() {
                let w = (sc[j] - m).exp() / z;
                for d in 0..s.dv {
                    out[hh * s.dv + d] += w * f64::from(v[kh * s.dv + d]);
                }
            }
        }
        out
    }

    #[test]
    fn attend_rows_matches_the_definition_on_varied_shapes() {
        let mut rng = aha_tensor::rng::SplitMix64(11);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.unit() as f32 - 0.5) * 4.0).collect() };
        // (h, hk, dk, dv, ctx): the vector paths (dk, dv multiples of 16,
        // h of 4, dv past 128) and the portable ones.
        let shapes = [
            (8, 4, 32, 32, 1),
            (8, 4, 32, 32, 97),
            (4, 1, 16, 48, 33),
            (8, 8, 64, 160, 20),
            (12, 3, 16, 16, 5),
            (6, 2, 8, 24, 17),
            (4, 2, 20, 16, 9),
        ];
        for &(h, hk, dk, dv, ctx) in &shapes {
            let s = AttnShape {
                b: 1,
                t: 1,
                h,
                hk,
                dk,
                dv,
                scale: 1.0 / (dk as f64).sqrt(),
            };
            let q = rand(h * dk);
            let (ks, vs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (0..ctx).map(|_| (rand(hk * dk), rand(hk * dv))).unzip();
            let rows: Vec<(&[f32], &[f32])> = ks.iter().zip(&vs).map(|(k, v)| (&k[..], &v[..])).collect();
            let mut o = vec![0f32; h * dv];
            attend_rows(&mut o, &q, &rows, s);
            let want = reference(&q, &rows, s);
            for (i, (&got, &w)) in o.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(got) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "shape {:?} element {i}: {got} vs {w}",
                    (h, hk, dk, dv, ctx)
                );
            }
        }
    }
}
