//! CPU twins of `kernels/moe.cu`: one function per kernel with exactly its
//! contract (same outputs, same order of choices, same rounding points), so
//! that each kernel is tested against its twin and the twins, composed, are
//! tested against `aha_moe_model`'s CPU MoE layer.
//!
//! | name | shape |
//! |---|---|
//! | logits, probs, dlogits | [N, E] |
//! | ids, w, dw | [N, K] |
//! | counts, frac | [E]; offsets, tile_off [E + 1] |
//! | tok, slot | [M = N K] (token and slot of each permuted row) |
//! | inv | [N K] (permuted row of each (token, slot)) |
//! | xe, ye, dye, dxe | [M, C]; g, u, act, dg, du [M, F] |
//! | w_gate, w_up | [E, F, C]; w_down [E, C, F] |
//!
//! Where a kernel stores bf16, its twin takes a [`Store`]: `Store::Bf16`
//! rounds at the same point (to nearest even), `Store::F32` keeps f32, which
//! is what the f32 CPU layer computes. The grouped products take f32
//! operands: bf16 inputs are f32 values that are exact bf16s.

use half::bf16;

use super::{matmul, Gemm};
use crate::error::{check_lens, Error, Result};

pub use aha_cuda_kernels::launch_moe::{MoeGating, MoeMath, MoeStorage};

/// Rows per tile of the grouped products' tile list (`MOE_TM`).
pub const MOE_TILE_ROWS: usize = aha_cuda_kernels::launch_moe::MOE_TILE_ROWS;

/// How a twin stores a value that its kernel writes as bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Keep f32 (the f32 layer's semantics).
    F32,
    /// Round to bf16, nearest even (the kernel's).
    Bf16,
}

impl Store {
    /// `v` as stored.
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Store::F32 => v,
            Store::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

fn bad(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, msg }
}

/// NaN sorts below every number (as [`super::topk`]).
fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The kernels' selection: `k` passes of "largest untaken, ties to the lower
/// index" over `v`, into `out`.
fn take_top(out: &mut [u32], v: &[f32], taken: &mut [bool]) {
    taken.iter_mut().for_each(|t| *t = false);
    for o in out.iter_mut() {
        let mut best = f32::NEG_INFINITY;
        let mut bi = usize::MAX;
        for (i, &x) in v.iter().enumerate() {
            if taken[i] {
                continue;
            }
            let x = key(x);
            if bi == usize::MAX || x > best {
                best = x;
                bi = i;
            }
        }
        taken[bi] = true;
        *o = bi as u32;
    }
}

fn check_route(op: &'static str, e: usize, k: usize) -> Result<()> {
    if e == 0 || k == 0 || k > e {
        return Err(bad(op, format!("top-k = {k} must be in 1..=E (E = {e})")));
    }
    Ok(())
}

/// Softmax top-k routing (twin of `moe_route_softmax_f32`): `probs =
/// softmax(logits)`, `ids` the k largest (descending, ties to the lower
/// index), `w = probs[ids]`, renormalised by `denom = sum w` when `renorm`
/// (else `denom = 1`).
pub fn moe_route_softmax(
    probs: &mut [f32],
    ids: &mut [u32],
    w: &mut [f32],
    denom: &mut [f32],
    logits: &[f32],
    n: usize,
    e: usize,
    k: usize,
    renorm: bool,
) -> Result<()> {
    const OP: &str = "moe_route_softmax";
    check_route(OP, e, k)?;
    check_lens(
        OP,
        &[
            ("probs", probs.len(), n * e),
            ("ids", ids.len(), n * k),
            ("w", w.len(), n * k),
            ("denom", denom.len(), n),
            ("logits", logits.len(), n * e),
        ],
    )?;
    super::softmax_forward(probs, logits, n, e)?;
    let mut taken = vec![false; e];
    for t in 0..n {
        let p = &probs[t * e..(t + 1) * e];
        let it = &mut ids[t * k..(t + 1) * k];
        take_top(it, p, &mut taken);
        let d = if renorm {
            it.iter().fold(0f32, |s, &i| s + p[i as usize])
        } else {
            1.0
        };
        for (wj, &i) in w[t * k..(t + 1) * k].iter_mut().zip(it.iter()) {
            *wj = if renorm { p[i as usize] / d } else { p[i as usize] };
        }
        denom[t] = d;
    }
    Ok(())
}

/// DeepSeek-V3 routing (twin of `moe_route_sigmoid_group_f32`): `scores =
/// sigmoid(logits)`; the choice `scores + bias` picks the `topk_group`
/// groups with the largest sum of their two best choices, every other
/// expert's choice becomes 0, then the k largest choices; `w =
/// scores[ids]`, divided by `denom = sum w + 1e-20` when `renorm` (else
/// `denom = 1`), times `scaling`.
pub fn moe_route_sigmoid_group(
    scores: &mut [f32],
    ids: &mut [u32],
    w: &mut [f32],
    denom: &mut [f32],
    logits: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    e: usize,
    k: usize,
    n_group: usize,
    topk_group: usize,
    renorm: bool,
    scaling: f32,
) -> Result<()> {
    const OP: &str = "moe_route_sigmoid_group";
    check_route(OP, e, k)?;
    if n_group == 0 || !e.is_multiple_of(n_group) || e / n_group < 2 || topk_group == 0 || topk_group > n_group {
        return Err(bad(
            OP,
            format!("n_group {n_group} must split E = {e} into groups of >= 2, topk_group {topk_group} in 1..=n_group"),
        ));
    }
    check_lens(
        OP,
        &[
            ("scores", scores.len(), n * e),
            ("ids", ids.len(), n * k),
            ("w", w.len(), n * k),
            ("denom", denom.len(), n),
            ("logits", logits.len(), n * e),
            ("bias", bias.map_or(e, |b| b.len()), e),
        ],
    )?;
    let per = e / n_group;
    let mut choice = vec![0f32; e];
    let mut gscore = vec![0f32; n_group];
    let mut gsel = vec![0u32; topk_group];
    let mut gtaken = vec![false; n_group];
    let mut taken = vec![false; e];
    let mut kept = vec![false; n_group];
    for t in 0..n {
        let s = &mut scores[t * e..(t + 1) * e];
        for (i, sv) in s.iter_mut().enumerate() {
            *sv = 1.0 / (1.0 + (-logits[t * e + i]).exp());
            choice[i] = *sv + bias.map_or(0.0, |b| b[i]);
        }
        for (g, gs) in gscore.iter_mut().enumerate() {
            let (mut b1, mut b2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in &choice[g * per..(g + 1) * per] {
                let v = key(v);
                if v > b1 {
                    b2 = b1;
                    b1 = v;
                } else if v > b2 {
                    b2 = v;
                }
            }
            *gs = b1 + b2;
        }
        take_top(&mut gsel, &gscore, &mut gtaken);
        kept.fill(false);
        for &g in &gsel {
            kept[g as usize] = true;
        }
        for (i, ch) in choice.iter_mut().enumerate() {
            if !kept[i / per] {
                *ch = 0.0;
            }
        }
        let it = &mut ids[t * k..(t + 1) * k];
        take_top(it, &choice, &mut taken);
        let d = if renorm {
            it.iter().fold(0f32, |a, &i| a + s[i as usize]) + 1e-20
        } else {
            1.0
        };
        for (wj, &i) in w[t * k..(t + 1) * k].iter_mut().zip(it.iter()) {
            let v = if renorm { s[i as usize] / d } else { s[i as usize] };
            *wj = v * scaling;
        }
        denom[t] = d;
    }
    Ok(())
}

/// Either routing rule (twin of the launcher `moe_route_f32`).
pub fn moe_route(
    probs: &mut [f32],
    ids: &mut [u32],
    w: &mut [f32],
    denom: &mut [f32],
    logits: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    e: usize,
    k: usize,
    gating: MoeGating,
) -> Result<()> {
    match gating {
        MoeGating::Softmax { renorm } => {
            if bias.is_some() {
                return Err(bad(
                    "moe_route",
                    "a correction bias needs the sigmoid-group gating".into(),
                ));
            }
            moe_route_softmax(probs, ids, w, denom, logits, n, e, k, renorm)
        }
        MoeGating::SigmoidGroup {
            n_group,
            topk_group,
            renorm,
            scaling,
        } => moe_route_sigmoid_group(
            probs, ids, w, denom, logits, bias, n, e, k, n_group, topk_group, renorm, scaling,
        ),
    }
}

/// Routing backward to the logits (twin of `moe_route_backward_f32`; the
/// choice is not differentiated): `dlogits =` (assigned) from `dw` (d loss /
/// d w) and the forward's `w, ids, probs, denom`. `aux [E]`: an extra
/// gradient on every token's softmax probabilities (ignored by the sigmoid
/// gating, as in the CPU layer).
pub fn moe_route_backward(
    dlogits: &mut [f32],
    dw: &[f32],
    w: &[f32],
    ids: &[u32],
    probs: &[f32],
    denom: &[f32],
    aux: Option<&[f32]>,
    n: usize,
    e: usize,
    k: usize,
    gating: MoeGating,
) -> Result<()> {
    const OP: &str = "moe_route_backward";
    check_lens(
        OP,
        &[
            ("dlogits", dlogits.len(), n * e),
            ("dw", dw.len(), n * k),
            ("w", w.len(), n * k),
            ("ids", ids.len(), n * k),
            ("probs", probs.len(), n * e),
            ("denom", denom.len(), n),
            ("aux", aux.map_or(e, |a| a.len()), e),
        ],
    )?;
    super::check_indices(OP, ids, e)?;
    let (sigmoid, rsf, renorm) = match gating {
        MoeGating::Softmax { renorm } => (false, 1.0f32, renorm),
        MoeGating::SigmoidGroup { scaling, renorm, .. } => (true, scaling, renorm),
    };
    let mut dp = vec![0f32; e];
    for t in 0..n {
        let (dwt, wt, it) = (
            &dw[t * k..(t + 1) * k],
            &w[t * k..(t + 1) * k],
            &ids[t * k..(t + 1) * k],
        );
        let pr = &probs[t * e..(t + 1) * e];
        let dl = &mut dlogits[t * e..(t + 1) * e];
        match aux {
            Some(a) if !sigmoid => dp.copy_from_slice(a),
            _ => dp.fill(0.0),
        }
        let mut corr = 0f32;
        if renorm {
            for (d, wv) in dwt.iter().zip(wt) {
                corr += if sigmoid { d * rsf * wv / rsf } else { d * wv };
            }
        }
        for (d, &i) in dwt.iter().zip(it) {
            let g = if sigmoid { d * rsf } else { *d };
            dp[i as usize] += (g - corr) / denom[t];
        }
        if sigmoid {
            for ((o, &d), &s) in dl.iter_mut().zip(&dp).zip(pr) {
                *o = d * (s * (1.0 - s));
            }
        } else {
            let dot: f32 = dp.iter().zip(pr).map(|(d, p)| d * p).sum();
            for ((o, &d), &p) in dl.iter_mut().zip(&dp).zip(pr) {
                *o = p * (d - dot);
            }
        }
    }
    Ok(())
}

/// Per-expert counts, offsets (exclusive scan), tile list (64-row tiles per
/// expert, scanned) and load fractions `counts / M` (twin of `moe_count_u32`).
/// Ids `>= E` are an error here (the kernel skips them).
pub fn moe_count(
    counts: &mut [u32],
    offsets: &mut [u32],
    tile_off: &mut [u32],
    frac: &mut [f32],
    ids: &[u32],
    e: usize,
) -> Result<()> {
    const OP: &str = "moe_count";
    check_lens(
        OP,
        &[
            ("counts", counts.len(), e),
            ("offsets", offsets.len(), e + 1),
            ("tile_off", tile_off.len(), e + 1),
            ("frac", frac.len(), e),
        ],
    )?;
    super::check_indices(OP, ids, e)?;
    counts.fill(0);
    for &i in ids {
        counts[i as usize] += 1;
    }
    let m = ids.len();
    offsets[0] = 0;
    tile_off[0] = 0;
    for x in 0..e {
        offsets[x + 1] = offsets[x] + counts[x];
        tile_off[x + 1] = tile_off[x] + counts[x].div_ceil(MOE_TILE_ROWS as u32);
        frac[x] = if m > 0 {
            (counts[x] as f64 / m as f64) as f32
        } else {
            0.0
        };
    }
    Ok(())
}

/// Stable permutation and its inverse (twin of `moe_scatter_u32`): the i-th
/// `r = t K + j` (in increasing r) with `ids[r] = x` gets row `p =
/// offsets[x] + i`: `tok[p] = t`, `slot[p] = j`, `inv[r] = p`.
pub fn moe_permute(
    tok: &mut [u32],
    slot: &mut [u32],
    inv: &mut [u32],
    ids: &[u32],
    offsets: &[u32],
    k: usize,
) -> Result<()> {
    const OP: &str = "moe_permute";
    let m = ids.len();
    let e = offsets.len().saturating_sub(1);
    check_lens(
        OP,
        &[("tok", tok.len(), m), ("slot", slot.len(), m), ("inv", inv.len(), m)],
    )?;
    if k == 0 || !m.is_multiple_of(k) || offsets.last().map(|&o| o as usize) != Some(m) {
        return Err(bad(OP, format!("{m} ids are not N x {k} rows covered by offsets")));
    }
    super::check_indices(OP, ids, e)?;
    let mut next: Vec<u32> = offsets[..e].to_vec();
    for (r, &x) in ids.iter().enumerate() {
        let p = next[x as usize];
        if p >= offsets[x as usize + 1] {
            return Err(bad(OP, format!("offsets do not match the counts of expert {x}")));
        }
        next[x as usize] += 1;
        tok[p as usize] = (r / k) as u32;
        slot[p as usize] = (r % k) as u32;
        inv[r] = p;
    }
    Ok(())
}

/// `xe[p] = store(x[tok[p]])` (twin of `moe_gather_bf16` with `Store::Bf16`).
pub fn moe_gather(xe: &mut [f32], x: &[f32], tok: &[u32], c: usize, store: Store) -> Result<()> {
    const OP: &str = "moe_gather";
    check_lens(OP, &[("xe", xe.len(), tok.len() * c)])?;
    let n = x.len().checked_div(c).unwrap_or(0);
    super::check_indices(OP, tok, n)?;
    for (row, &t) in xe.chunks_mut(c.max(1)).zip(tok) {
        let t = t as usize;
        for (o, &v) in row.iter_mut().zip(&x[t * c..(t + 1) * c]) {
            *o = store.apply(v);
        }
    }
    Ok(())
}

/// Checks `offsets [E + 1]` against `m` rows: non-decreasing, from 0 to m.
fn check_offsets(op: &'static str, offsets: &[u32], m: usize) -> Result<usize> {
    let e = offsets.len().saturating_sub(1);
    let ok = e > 0 && offsets[0] == 0 && offsets[e] as usize == m && offsets.windows(2).all(|p| p[0] <= p[1]);
    if !ok {
        return Err(bad(
            op,
            format!("offsets must rise from 0 to M = {m} over E + 1 entries"),
        ));
    }
    Ok(e)
}

/// Grouped product (twin of `moe_grouped_gemm_bf16`): for the rows of each
/// expert x, `out (= or +=) a B_x` with `B_x` the x-th `[n, k]` matrix of
/// `b` used transposed (`trans_b`) or the x-th `[k, n]`.
/// `out [M, n]`, `a [M, k]`, `b [E, n, k]` / `[E, k, n]`.
pub fn moe_grouped_matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    offsets: &[u32],
    k: usize,
    n: usize,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "moe_grouped_matmul";
    let m = a.len().checked_div(k).unwrap_or(out.len().checked_div(n).unwrap_or(0));
    let e = check_offsets(OP, offsets, m)?;
    check_lens(
        OP,
        &[
            ("out", out.len(), m * n),
            ("a", a.len(), m * k),
            ("b", b.len(), e * n * k),
        ],
    )?;
    for x in 0..e {
        let (r0, r1) = (offsets[x] as usize, offsets[x + 1] as usize);
        if r0 == r1 {
            continue;
        }
        let mut g = Gemm::new(r1 - r0, k, n);
        if trans_b {
            g = g.tb();
        }
        if accumulate {
            g = g.acc();
        }
        matmul(
            &mut out[r0 * n..r1 * n],
            &a[r0 * k..r1 * k],
            &b[x * n * k..(x + 1) * n * k],
            g,
        )?;
    }
    Ok(())
}

/// Fused gate/up products and SwiGLU (twin of `moe_grouped_gate_up_bf16`):
/// `g = xe w_gate_x^T`, `u = xe w_up_x^T`, `act = store(silu(g) u)`.
/// `g, u, act [M, F]`, `xe [M, C]`, `w_gate, w_up [E, F, C]`.
pub fn moe_grouped_gate_up(
    g: &mut [f32],
    u: &mut [f32],
    act: &mut [f32],
    xe: &[f32],
    w_gate: &[f32],
    w_up: &[f32],
    offsets: &[u32],
    c: usize,
    f: usize,
    store: Store,
) -> Result<()> {
    check_lens("moe_grouped_gate_up", &[("act", act.len(), g.len())])?;
    moe_grouped_matmul(g, xe, w_gate, offsets, c, f, true, false)?;
    moe_grouped_matmul(u, xe, w_up, offsets, c, f, true, false)?;
    super::wide(
        #[inline(always)]
        || {
            for ((o, &gv), &uv) in act.iter_mut().zip(g.iter()).zip(u.iter()) {
                *o = store.apply(gv / (1.0 + crate::Real::exp_fast(-gv)) * uv);
            }
        },
    );
    Ok(())
}

/// Grouped weight gradient (twin of `moe_grouped_wgrad_bf16`):
/// `dw[x] += a_x^T b_x` over the rows of expert x. `dw [E, n1, n2]`,
/// `a [M, n1]`, `b [M, n2]`.
pub fn moe_grouped_wgrad(dw: &mut [f32], a: &[f32], b: &[f32], offsets: &[u32], n1: usize, n2: usize) -> Result<()> {
    const OP: &str = "moe_grouped_wgrad";
    let m = a.len().checked_div(n1).unwrap_or(b.len().checked_div(n2).unwrap_or(0));
    let e = check_offsets(OP, offsets, m)?;
    check_lens(
        OP,
        &[
            ("dw", dw.len(), e * n1 * n2),
            ("a", a.len(), m * n1),
            ("b", b.len(), m * n2),
        ],
    )?;
    for x in 0..e {
        let (r0, r1) = (offsets[x] as usize, offsets[x + 1] as usize);
        if r0 == r1 {
            continue;
        }
        matmul(
            &mut dw[x * n1 * n2..(x + 1) * n1 * n2],
            &a[r0 * n1..r1 * n1],
            &b[r0 * n2..r1 * n2],
            Gemm::new(n1, r1 - r0, n2).ta().acc(),
        )?;
    }
    Ok(())
}

/// SwiGLU backward with stored outputs (twin of `moe_swiglu_backward_bf16`):
/// `dg = store(da u (s + g s (1 - s)))`, `du = store(da g s)`, s = sigmoid(g).
pub fn moe_swiglu_backward(
    dg: &mut [f32],
    du: &mut [f32],
    da: &[f32],
    g: &[f32],
    u: &[f32],
    store: Store,
) -> Result<()> {
    let n = da.len();
    check_lens(
        "moe_swiglu_backward",
        &[
            ("dg", dg.len(), n),
            ("du", du.len(), n),
            ("g", g.len(), n),
            ("u", u.len(), n),
        ],
    )?;
    super::wide(
        #[inline(always)]
        || {
            for i in 0..n {
                let (gv, d) = (g[i], da[i]);
                let s = 1.0 / (1.0 + crate::Real::exp_fast(-gv));
                du[i] = store.apply(d * gv * s);
                dg[i] = store.apply(d * u[i] * (s + gv * s * (1.0 - s)));
            }
        },
    );
    Ok(())
}

/// Weighted un-permute (twin of `moe_combine_f32`): `out[t] (= or +=)
/// sum_j w[t, j] src[inv[t, j]]` in slot order; every weight 1 when `w` is
/// `None` (the gather's backward). `out [N, C]`, `src [N K, C]`.
pub fn moe_combine(
    out: &mut [f32],
    src: &[f32],
    w: Option<&[f32]>,
    inv: &[u32],
    n: usize,
    c: usize,
    k: usize,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "moe_combine";
    check_lens(
        OP,
        &[
            ("out", out.len(), n * c),
            ("src", src.len(), n * k * c),
            ("w", w.map_or(n * k, |w| w.len()), n * k),
            ("inv", inv.len(), n * k),
        ],
    )?;
    super::check_indices(OP, inv, n * k)?;
    let mut acc = vec![0f32; c];
    for t in 0..n {
        acc.fill(0.0);
        for j in 0..k {
            let r = inv[t * k + j] as usize;
            let wt = w.map_or(1.0, |w| w[t * k + j]);
            for (a, &v) in acc.iter_mut().zip(&src[r * c..(r + 1) * c]) {
                *a += wt * v;
            }
        }
        let o = &mut out[t * c..(t + 1) * c];
        for (o, &a) in o.iter_mut().zip(&acc) {
            *o = if accumulate { *o + a } else { a };
        }
    }
    Ok(())
}

/// Backward of the weighted combine (twin of `moe_combine_backward_bf16`):
/// `dw[t, j] = dy[t] . ye[inv[t, j]]`, `dye[inv[t, j]] = store(w[t, j] dy[t])`
/// (both assigned).
pub fn moe_combine_backward(
    dw: &mut [f32],
    dye: &mut [f32],
    dy: &[f32],
    ye: &[f32],
    w: &[f32],
    inv: &[u32],
    n: usize,
    c: usize,
    k: usize,
    store: Store,
) -> Result<()> {
    const OP: &str = "moe_combine_backward";
    check_lens(
        OP,
        &[
            ("dw", dw.len(), n * k),
            ("dye", dye.len(), n * k * c),
            ("dy", dy.len(), n * c),
            ("ye", ye.len(), n * k * c),
            ("w", w.len(), n * k),
            ("inv", inv.len(), n * k),
        ],
    )?;
    super::check_indices(OP, inv, n * k)?;
    for t in 0..n {
        let g = &dy[t * c..(t + 1) * c];
        for j in 0..k {
            let r = inv[t * k + j] as usize;
            let wt = w[t * k + j];
            dw[t * k + j] = g.iter().zip(&ye[r * c..(r + 1) * c]).map(|(a, b)| a * b).sum();
            for (d, &gv) in dye[r * c..(r + 1) * c].iter_mut().zip(g) {
                *d = store.apply(wt * gv);
            }
        }
    }
    Ok(())
}

/// Aux-loss-free balancing (twin of `moe_bias_update_f32`; the rule of
/// `aha_moe_model::Model::update_expert_bias`): `bias[x] -= speed` where
/// `counts[x]` is above the mean count, `+= speed` where below.
pub fn moe_bias_update(bias: &mut [f32], counts: &[u32], speed: f32) -> Result<()> {
    check_lens("moe_bias_update", &[("bias", bias.len(), counts.len())])?;
    let e = counts.len() as u64;
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    for (b, &c) in bias.iter_mut().zip(counts) {
        let c = c as u64 * e;
        if c > total {
            *b -= speed;
        } else if c < total {
            *b += speed;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The twins' own invariants: the selection is `topk`'s, the permutation
    //! is stable and inverted by `inv`, counts / offsets / tiles agree.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::needless_range_loop)]

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn softmax_routing_picks_what_topk_picks() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let (n, e) = (rng.random_range(1..20), rng.random_range(1..40));
            let k = rng.random_range(1..=e);
            // A few repeated values, so ties are exercised.
            let logits: Vec<f32> = (0..n * e).map(|_| rng.random_range(0..6) as f32 * 0.5).collect();
            let (mut p, mut ids, mut w, mut d) = (vec![0.0; n * e], vec![0; n * k], vec![0.0; n * k], vec![0.0; n]);
            moe_route_softmax(&mut p, &mut ids, &mut w, &mut d, &logits, n, e, k, true).unwrap();
            let (mut tv, mut ti) = (vec![0f32; n * k], vec![0u32; n * k]);
            crate::cpu::topk(&mut tv, &mut ti, &p, n, e, k).unwrap();
            assert_eq!(ids, ti);
            for t in 0..n {
                let s: f32 = w[t * k..(t + 1) * k].iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "renormalised weights sum to {s}");
            }
        }
    }

    #[test]
    fn group_limited_routing_stays_in_the_kept_groups() {
        let mut rng = StdRng::seed_from_u64(2);
        let (n, e, g, tg, k) = (30, 16, 4, 2, 4);
        let logits: Vec<f32> = (0..n * e).map(|_| rng.random_range(-3.0..3.0)).collect();
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.2..0.2)).collect();
        let (mut s, mut ids, mut w, mut d) = (vec![0.0; n * e], vec![0; n * k], vec![0.0; n * k], vec![0.0; n]);
        moe_route_sigmoid_group(
            &mut s,
            &mut ids,
            &mut w,
            &mut d,
            &logits,
            Some(&bias),
            n,
            e,
            k,
            g,
            tg,
            true,
            2.5,
        )
        .unwrap();
        for t in 0..n {
            let it = &ids[t * k..(t + 1) * k];
            let mut groups: Vec<u32> = it.iter().map(|&i| i / 4).collect();
            groups.sort_unstable();
            groups.dedup();
            assert!(groups.len() <= tg, "token {t} uses groups {groups:?}");
            let sum: f32 = w[t * k..(t + 1) * k].iter().sum();
            assert!((sum - 2.5).abs() < 1e-5, "weights sum to the scaling factor, got {sum}");
            let mut u = it.to_vec();
            u.dedup();
            assert_eq!(u.len(), k, "distinct experts");
        }
    }

    #[test]
    fn permutation_is_stable_and_inverted_by_inv() {
        let mut rng = StdRng::seed_from_u64(3);
        for round in 0..30 {
            let (n, e) = (rng.random_range(0..50), rng.random_range(1..12));
            let k = rng.random_range(1..=e);
            // Distinct experts per token, skewed towards low ids (some get none);
            // every third round all tokens pick expert 0 first.
            let mut ids = Vec::with_capacity(n * k);
            for _ in 0..n {
                let mut all: Vec<u32> = (0..e as u32).collect();
                for j in 0..k {
                    let pick = if round % 3 == 0 && j == 0 {
                        0
                    } else {
                        rng.random_range(j..e.min(j + 3))
                    };
                    all.swap(j, pick);
                }
                ids.extend_from_slice(&all[..k]);
            }
            let m = n * k;
            let (mut counts, mut frac) = (vec![0; e], vec![0.0; e]);
            let (mut off, mut tiles) = (vec![0; e + 1], vec![0; e + 1]);
            moe_count(&mut counts, &mut off, &mut tiles, &mut frac, &ids, e).unwrap();
            assert_eq!(off[e] as usize, m);
            for x in 0..e {
                assert_eq!(off[x + 1] - off[x], counts[x]);
                assert_eq!(tiles[x + 1] - tiles[x], counts[x].div_ceil(64));
            }
            if m > 0 {
                assert!((frac.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            let (mut tok, mut slot, mut inv) = (vec![0; m], vec![0; m], vec![0; m]);
            moe_permute(&mut tok, &mut slot, &mut inv, &ids, &off, k).unwrap();
            for r in 0..m {
                let p = inv[r] as usize;
                assert_eq!(
                    (tok[p] as usize, slot[p] as usize),
                    (r / k, r % k),
                    "inv inverts the permutation"
                );
            }
            for x in 0..e {
                let seg = off[x] as usize..off[x + 1] as usize;
                for p in seg.clone() {
                    assert_eq!(ids[tok[p] as usize * k + slot[p] as usize], x as u32);
                }
                assert!(
                    tok[seg].windows(2).all(|w| w[0] < w[1]),
                    "stable: tokens ascend within expert {x}"
                );
            }
            if round % 3 == 0 && n > 0 {
                assert_eq!(counts[0] as usize, n);
            }
        }
    }

    #[test]
    fn bad_offsets_and_ids_are_errors() {
        let ids = [0u32, 1, 1, 0];
        let (mut tok, mut slot, mut inv) = ([0; 4], [0; 4], [0; 4]);
        assert!(moe_permute(&mut tok, &mut slot, &mut inv, &ids, &[0, 1, 4], 2).is_err());
        assert!(moe_permute(&mut tok, &mut slot, &mut inv, &[0, 2, 1, 0], &[0, 2, 4], 2).is_err());
        assert!(moe_permute(&mut tok, &mut slot, &mut inv, &ids, &[0, 2, 4], 2).is_ok());
        let mut out = [0f32; 4];
        assert!(moe_grouped_matmul(&mut out, &[0.0; 4], &[0.0; 4], &[0, 3, 2], 2, 1, true, false).is_err());
        let (mut c, mut o, mut t, mut f) = ([0; 2], [0; 3], [0; 3], [0.0; 2]);
        assert!(moe_count(&mut c, &mut o, &mut t, &mut f, &[0, 2], 2).is_err());
    }

    #[test]
    fn bias_update_moves_towards_balance() {
        let mut b = [0f32; 4];
        moe_bias_update(&mut b, &[5, 1, 3, 3], 0.01).unwrap();
        assert_eq!(b, [-0.01, 0.01, 0.0, 0.0]);
    }

    #[test]
    fn bf16_store_rounds_to_nearest_even() {
        assert_eq!(Store::Bf16.apply(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(Store::Bf16.apply(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(Store::F32.apply(1.0 + 1.0 / 256.0), 1.0 + 1.0 / 256.0);
    }
}
