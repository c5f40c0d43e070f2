//! The MLP of a decoder layer: a dense SwiGLU, or a mixture of experts with
//! either routing rule, plus shared experts; forward and backward.
//!
//! | name | shape |
//! |---|---|
//! | x, dx, y, dy | [N, C] |
//! | router logits, probs / scores | [N, E] (f32) |
//! | ids, w | [N, K] chosen experts and their weights |
//! | xe, ye | [M = N*K, C], token rows grouped by expert (`offsets[e]..offsets[e+1]`) |

use aha_tensor::cpu::{self, Gemm};
use aha_tensor::profile::{self, Phase};
use rayon::prelude::*;

use crate::config::{MoeConfig, Router};
use crate::error::Result;
use crate::linear::{linear_bwd, linear_fwd};
use crate::params::{MlpSlots, Slot};

/// `a = silu(g) * u`, profiled as an activation.
fn swiglu(a: &mut [f32], g: &[f32], u: &[f32]) -> Result<()> {
    let _prof = profile::scope(Phase::Activation);
    Ok(cpu::swiglu(a, g, u)?)
}

/// Backward of [`swiglu`], profiled as an activation.
fn swiglu_backward(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) -> Result<()> {
    let _prof = profile::scope(Phase::Activation);
    Ok(cpu::swiglu_backward(dg, du, da, g, u)?)
}

/// Saved by a SwiGLU MLP's forward.
pub(crate) struct MlpActs {
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
}

/// SwiGLU MLP over `n` rows: `down(silu(gate x) * up x)`.
pub(crate) fn mlp_fwd(p: &[f32], s: &MlpSlots, x: &[f32], n: usize) -> Result<(Vec<f32>, MlpActs)> {
    let _prof = profile::scope(Phase::Mlp);
    let f = s.gate.out;
    let mut g = vec![0f32; n * f];
    let mut u = vec![0f32; n * f];
    linear_fwd(&mut g, x, p, &s.gate, n)?;
    linear_fwd(&mut u, x, p, &s.up, n)?;
    let mut a = vec![0f32; n * f];
    swiglu(&mut a, &g, &u)?;
    let mut y = vec![0f32; n * s.down.out];
    linear_fwd(&mut y, &a, p, &s.down, n)?;
    Ok((y, MlpActs { g, u, a }))
}

/// Backward of [`mlp_fwd`]: accumulates into `dx` and the parameter gradients.
pub(crate) fn mlp_bwd(
    p: &[f32],
    gr: &mut [f32],
    s: &MlpSlots,
    acts: &MlpActs,
    x: &[f32],
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
) -> Result<()> {
    let _prof = profile::scope(Phase::Mlp);
    let f = s.gate.out;
    let mut da = vec![0f32; n * f];
    linear_bwd(Some(&mut da), gr, dy, &acts.a, p, &s.down, n)?;
    let (mut dg, mut du) = (vec![0f32; n * f], vec![0f32; n * f]);
    swiglu_backward(&mut dg, &mut du, &da, &acts.g, &acts.u)?;
    linear_bwd(Some(&mut *dx), gr, &dg, x, p, &s.gate, n)?;
    linear_bwd(Some(dx), gr, &du, x, p, &s.up, n)?;
    Ok(())
}

/// Saved by an MoE layer's forward.
pub(crate) struct MoeActs {
    /// Softmax probabilities or sigmoid scores [N, E].
    probs: Vec<f32>,
    ids: Vec<u32>,
    /// Final routing weights [N, K].
    w: Vec<f32>,
    /// Renormalisation denominator per token (1 when not renormalised).
    denom: Vec<f32>,
    /// Token of each permuted row.
    perm: Vec<u32>,
    /// Which of the token's K slots each permuted row is.
    slot: Vec<u32>,
    offsets: Vec<usize>,
    xe: Vec<f32>,
    ge: Vec<f32>,
    ue: Vec<f32>,
    ae: Vec<f32>,
    ye: Vec<f32>,
    shared: Option<MlpActs>,
    /// Tokens routed to each expert, for load balancing.
    pub load: Vec<u32>,
}

impl MoeActs {
    /// Sum over tokens of each expert's router probability (softmax router).
    pub(crate) fn prob_sums(&self, e: usize) -> Vec<f64> {
        let mut s = vec![0f64; e];
        for row in self.probs.chunks(e) {
            for (a, &p) in s.iter_mut().zip(row) {
                *a += p as f64;
            }
        }
        s
    }
}

/// A routing decision: (probs or scores [N, E], ids [N, K], weights [N, K], denominators [N]).
type Routing = (Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>);

/// Picks experts for every token.
fn route(cfg: &MoeConfig, logits: &[f32], bias: Option<&[f32]>, n: usize) -> Result<Routing> {
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let mut ids = vec![0u32; n * k];
    let mut w = vec![0f32; n * k];
    let mut denom = vec![1f32; n];
    match cfg.router {
        Router::SoftmaxTopK => {
            let mut probs = vec![0f32; n * e];
            cpu::softmax_forward(&mut probs, logits, n, e)?;
            cpu::topk(&mut w, &mut ids, &probs, n, e, k)?;
            if cfg.norm_topk_prob {
                for i in 0..n {
                    let s: f32 = w[i * k..(i + 1) * k].iter().sum();
                    denom[i] = s;
                    w[i * k..(i + 1) * k].iter_mut().for_each(|x| *x /= s);
                }
            }
            Ok((probs, ids, w, denom))
        }
        Router::SigmoidGroupLimited {
            n_group,
            topk_group,
            routed_scaling_factor,
        } => {
            let scores: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            let per = e / n_group;
            let mut choice = vec![0f32; e];
            let mut gscore = vec![0f32; n_group];
            let (mut gv, mut gi) = (vec![0f32; topk_group], vec![0u32; topk_group]);
            let (mut two, mut two_i) = ([0f32; 2], [0u32; 2]);
            let mut kept = vec![false; n_group];
            for t in 0..n {
                let s = &scores[t * e..(t + 1) * e];
                for j in 0..e {
                    choice[j] = s[j] + bias.map_or(0.0, |b| b[j]);
                }
                for (g, gs) in gscore.iter_mut().enumerate() {
                    cpu::topk(&mut two, &mut two_i, &choice[g * per..(g + 1) * per], 1, per, 2)?;
                    *gs = two[0] + two[1];
                }
                cpu::topk(&mut gv, &mut gi, &gscore, 1, n_group, topk_group)?;
                kept.fill(false);
                for &g in &gi {
                    kept[g as usize] = true;
                }
                for j in 0..e {
                    if !kept[j / per] {
                        choice[j] = 0.0;
                    }
                }
                let (wt, it) = (&mut w[t * k..(t + 1) * k], &mut ids[t * k..(t + 1) * k]);
                let mut tmp = vec![0f32; k];
                cpu::topk(&mut tmp, it, &choice, 1, e, k)?;
                for (wj, &ij) in wt.iter_mut().zip(it.iter()) {
                    *wj = s[ij as usize];
                }
                if cfg.norm_topk_prob {
                    let d = wt.iter().sum::<f32>() + 1e-20;
                    denom[t] = d;
                    wt.iter_mut().for_each(|x| *x /= d);
                }
                wt.iter_mut().for_each(|x| *x *= routed_scaling_factor);
            }
            Ok((scores, ids, w, denom))
        }
    }
}

/// MoE forward over normed input `x [N, C]`.
pub(crate) fn moe_fwd(
    cfg: &MoeConfig,
    p: &[f32],
    router: Slot,
    bias: Option<Slot>,
    experts: &[MlpSlots],
    shared: Option<&MlpSlots>,
    x: &[f32],
    n: usize,
    c: usize,
) -> Result<(Vec<f32>, MoeActs)> {
    let _prof = profile::scope(Phase::Routing);
    let (e, k, f) = (cfg.n_experts, cfg.top_k, cfg.expert_dim);
    let mut logits = vec![0f32; n * e];
    cpu::matmul(&mut logits, x, router.of(p), Gemm::new(n, c, e).tb())?;
    let (probs, ids, w, denom) = route(cfg, &logits, bias.map(|b| b.of(p)), n)?;
    // Group token rows by expert: counts, exclusive scan, stable scatter.
    let mut load = vec![0u32; e];
    for &i in &ids {
        load[i as usize] += 1;
    }
    let mut offsets = vec![0usize; e + 1];
    for j in 0..e {
        offsets[j + 1] = offsets[j] + load[j] as usize;
    }
    let m = n * k;
    let mut next = offsets.clone();
    let mut perm = vec![0u32; m];
    let mut slot = vec![0u32; m];
    for (r, &ex) in ids.iter().enumerate() {
        let row = next[ex as usize];
        next[ex as usize] += 1;
        perm[row] = (r / k) as u32;
        slot[row] = (r % k) as u32;
    }
    let mut xe = vec![0f32; m * c];
    if c > 0 {
        xe.par_chunks_mut(c)
            .zip(perm.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(dst, &tok)| dst.copy_from_slice(&x[tok as usize * c..(tok as usize + 1) * c]));
    }
    let experts_prof = profile::scope(Phase::Experts);
    let (mut ge, mut ue, mut ae, mut ye) = (
        vec![0f32; m * f],
        vec![0f32; m * f],
        vec![0f32; m * f],
        vec![0f32; m * c],
    );
    // One task per expert, each product on one thread: the experts' small
    // products ([~N K / E, C] x [C, F]) run side by side instead of each
    // being split across the cores.
    let tasks: Vec<_> = experts
        .iter()
        .zip(split_rows(&mut ge, &offsets, f))
        .zip(split_rows(&mut ue, &offsets, f))
        .zip(split_rows(&mut ae, &offsets, f))
        .zip(split_rows(&mut ye, &offsets, c))
        .enumerate()
        .filter(|(j, _)| offsets[j + 1] > offsets[*j])
        .collect();
    // Products on pool threads count nowhere by themselves: 3 of [M, C] x [C, F].
    profile::add_flops(6 * (m * c * f) as u64);
    tasks
        .into_par_iter()
        .map(|(j, ((((s, g), u), a), y))| {
            let (r0, r1) = (offsets[j], offsets[j + 1]);
            let rows = r1 - r0;
            let xr = &xe[r0 * c..r1 * c];
            linear_fwd(g, xr, p, &s.gate, rows)?;
            linear_fwd(u, xr, p, &s.up, rows)?;
            cpu::swiglu(a, g, u)?;
            linear_fwd(y, a, p, &s.down, rows)
        })
        .collect::<Result<Vec<()>>>()?;
    drop(experts_prof);
    let mut y = vec![0f32; n * c];
    let rows_of = token_rows(&perm, n, k);
    if c > 0 {
        y.par_chunks_mut(c)
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(t, yt)| {
                for &row in &rows_of[t * k..(t + 1) * k] {
                    let row = row as usize;
                    let wt = w[t * k + slot[row] as usize];
                    for (o, &v) in yt.iter_mut().zip(&ye[row * c..(row + 1) * c]) {
                        *o += wt * v;
                    }
                }
            });
    }
    let shared_acts = match shared {
        Some(s) => {
            let (ys, a) = mlp_fwd(p, s, x, n)?;
            cpu::add_inplace(&mut y, &ys)?;
            Some(a)
        }
        None => None,
    };
    Ok((
        y,
        MoeActs {
            probs,
            ids,
            w,
            denom,
            perm,
            slot,
            offsets,
            xe,
            ge,
            ue,
            ae,
            ye,
            shared: shared_acts,
            load,
        },
    ))
}

/// Token rows per parallel task in the permutation passes.
const ROWS_PER_TASK: usize = 64;

/// For each token, the `k` permuted rows that hold its copies, ascending
/// (`out[t * k .. (t + 1) * k]`): the order the serial scatter visited them,
/// so per-token sums add in the same order.
fn token_rows(perm: &[u32], n: usize, k: usize) -> Vec<u32> {
    let mut out = vec![0u32; n * k];
    let mut seen = vec![0usize; n];
    for (row, &tok) in perm.iter().enumerate() {
        let t = tok as usize;
        if seen[t] < k {
            out[t * k + seen[t]] = row as u32;
            seen[t] += 1;
        }
    }
    out
}

/// `buf` cut into one slice per expert: rows `offsets[j]..offsets[j + 1]`
/// of `width` elements.
fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (a, b) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
        out.push(a);
        buf = b;
    }
    out
}

/// The routed experts' backward without adapters or biases, one task per expert
/// with single-threaded products: `dxe` (assigned per expert's rows) and
/// each expert's weight gradients, computed into task-local buffers and
/// then added into `gr` (the tasks cannot share `gr`).
#[allow(clippy::too_many_arguments)]
fn experts_bwd_parallel(
    p: &[f32],
    gr: &mut [f32],
    experts: &[MlpSlots],
    a: &MoeActs,
    dye: &[f32],
    dxe: &mut [f32],
    c: usize,
    f: usize,
) -> Result<()> {
    let off = &a.offsets;
    // dA, dX (two) and the three weight gradients: 6 of [M, C] x [C, F].
    profile::add_flops(12 * (off.last().copied().unwrap_or(0) * c * f) as u64);
    let tasks: Vec<_> = experts
        .iter()
        .zip(split_rows(dxe, off, c))
        .enumerate()
        .filter(|(j, _)| off[j + 1] > off[*j])
        .collect();
    type Wgrads = (usize, Vec<f32>, Vec<f32>, Vec<f32>);
    let grads: Vec<Wgrads> = tasks
        .into_par_iter()
        .map(|(j, (s, dx))| {
            let (r0, r1) = (off[j], off[j + 1]);
            let rows = r1 - r0;
            let (dy, xr) = (&dye[r0 * c..r1 * c], &a.xe[r0 * c..r1 * c]);
            let (g, u, act) = (&a.ge[r0 * f..r1 * f], &a.ue[r0 * f..r1 * f], &a.ae[r0 * f..r1 * f]);
            let mut da = vec![0f32; rows * f];
            cpu::matmul(&mut da, dy, s.down.w.of(p), Gemm::new(rows, c, f))?;
            let (mut dg, mut du) = (vec![0f32; rows * f], vec![0f32; rows * f]);
            cpu::swiglu_backward(&mut dg, &mut du, &da, g, u)?;
            cpu::matmul(dx, &dg, s.gate.w.of(p), Gemm::new(rows, f, c))?;
            cpu::matmul(dx, &du, s.up.w.of(p), Gemm::new(rows, f, c).acc())?;
            let (mut dw_down, mut dw_gate, mut dw_up) = (vec![0f32; c * f], vec![0f32; f * c], vec![0f32; f * c]);
            cpu::matmul(&mut dw_down, dy, act, Gemm::new(c, rows, f).ta())?;
            cpu::matmul(&mut dw_gate, &dg, xr, Gemm::new(f, rows, c).ta())?;
            cpu::matmul(&mut dw_up, &du, xr, Gemm::new(f, rows, c).ta())?;
            Ok((j, dw_down, dw_gate, dw_up))
        })
        .collect::<Result<_>>()?;
    for (j, dw_down, dw_gate, dw_up) in grads {
        let s = &experts[j];
        for (l, dw) in [(&s.down, dw_down), (&s.gate, dw_gate), (&s.up, dw_up)] {
            if l.frozen {
                continue;
            }
            for (d, v) in l.w.of_mut(gr).iter_mut().zip(dw) {
                *d += v;
            }
        }
    }
    Ok(())
}

/// MoE backward: accumulates into `dx [N, C]` and the parameter gradients.
pub(crate) fn moe_bwd(
    cfg: &MoeConfig,
    p: &[f32],
    gr: &mut [f32],
    router: Slot,
    experts: &[MlpSlots],
    shared: Option<&MlpSlots>,
    a: &MoeActs,
    aux_dprob: Option<&[f32]>,
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    dx: &mut [f32],
) -> Result<()> {
    let _prof = profile::scope(Phase::Routing);
    let (e, k, f) = (cfg.n_experts, cfg.top_k, cfg.expert_dim);
    let m = n * k;
    // d routing weight of each (token, slot) = dy[token] . ye[row]; dye = w dy[token].
    let mut dw = vec![0f32; n * k];
    let mut dye = vec![0f32; m * c];
    if c > 0 {
        let dots: Vec<f32> = dye
            .par_chunks_mut(c)
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .map(|(row, d)| {
                let (tok, sl) = (a.perm[row] as usize, a.slot[row] as usize);
                let g = &dy[tok * c..(tok + 1) * c];
                let wt = a.w[tok * k + sl];
                for (d, &gv) in d.iter_mut().zip(g) {
                    *d = wt * gv;
                }
                crate::attn::dot(g, &a.ye[row * c..(row + 1) * c])
            })
            .collect();
        for (row, (&tok, &sl)) in a.perm.iter().zip(&a.slot).enumerate() {
            dw[tok as usize * k + sl as usize] = dots[row];
        }
    }
    let experts_prof = profile::scope(Phase::Experts);
    let mut dxe = vec![0f32; m * c];
    // Adapters and biases take the per-expert path through `linear_bwd`.
    let adapted = experts.iter().any(|s| {
        [&s.gate, &s.up, &s.down]
            .iter()
            .any(|l| l.b.is_some() || l.lora.is_some_and(|lo| lo.enabled))
    });
    if !adapted {
        experts_bwd_parallel(p, gr, experts, a, &dye, &mut dxe, c, f)?;
    }
    for (j, s) in experts.iter().enumerate().filter(|_| adapted) {
        let (r0, r1) = (a.offsets[j], a.offsets[j + 1]);
        if r0 == r1 {
            continue;
        }
        let rows = r1 - r0;
        let mut da = vec![0f32; rows * f];
        linear_bwd(
            Some(&mut da),
            gr,
            &dye[r0 * c..r1 * c],
            &a.ae[r0 * f..r1 * f],
            p,
            &s.down,
            rows,
        )?;
        let (mut dg, mut du) = (vec![0f32; rows * f], vec![0f32; rows * f]);
        swiglu_backward(&mut dg, &mut du, &da, &a.ge[r0 * f..r1 * f], &a.ue[r0 * f..r1 * f])?;
        let xr = &a.xe[r0 * c..r1 * c];
        linear_bwd(Some(&mut dxe[r0 * c..r1 * c]), gr, &dg, xr, p, &s.gate, rows)?;
        linear_bwd(Some(&mut dxe[r0 * c..r1 * c]), gr, &du, xr, p, &s.up, rows)?;
    }
    drop(experts_prof);
    let rows_of = token_rows(&a.perm, n, k);
    if c > 0 {
        dx[..n * c]
            .par_chunks_mut(c)
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(t, dxt)| {
                for &row in &rows_of[t * k..(t + 1) * k] {
                    let row = row as usize;
                    for (d, &v) in dxt.iter_mut().zip(&dxe[row * c..(row + 1) * c]) {
                        *d += v;
                    }
                }
            });
    }
    // Routing weights back to the router logits (selection is not differentiated).
    let mut dlogits = vec![0f32; n * e];
    for t in 0..n {
        let wt = &a.w[t * k..(t + 1) * k];
        let dwt = &dw[t * k..(t + 1) * k];
        let it = &a.ids[t * k..(t + 1) * k];
        let pr = &a.probs[t * e..(t + 1) * e];
        let dl = &mut dlogits[t * e..(t + 1) * e];
        match cfg.router {
            Router::SoftmaxTopK => {
                // w = p_sel / S (or p_sel): d p_sel = (dw - sum dw w) / S.
                let corr: f32 = if cfg.norm_topk_prob {
                    dwt.iter().zip(wt).map(|(d, w)| d * w).sum()
                } else {
                    0.0
                };
                let mut dp = match aux_dprob {
                    Some(d) => d.to_vec(),
                    None => vec![0f32; e],
                };
                for j in 0..k {
                    dp[it[j] as usize] += (dwt[j] - corr) / a.denom[t];
                }
                let dot: f32 = dp.iter().zip(pr).map(|(d, q)| d * q).sum();
                for j in 0..e {
                    dl[j] = pr[j] * (dp[j] - dot);
                }
            }
            Router::SigmoidGroupLimited {
                routed_scaling_factor: rsf,
                ..
            } => {
                // w = rsf * u, u = s_sel / S (or s_sel); ds_sel = (du - sum du u) / S.
                let du: Vec<f32> = dwt.iter().map(|d| d * rsf).collect();
                let corr: f32 = if cfg.norm_topk_prob {
                    du.iter().zip(wt).map(|(d, w)| d * w / rsf).sum()
                } else {
                    0.0
                };
                for j in 0..k {
                    let ex = it[j] as usize;
                    let ds = (du[j] - corr) / a.denom[t];
                    dl[ex] += ds * pr[ex] * (1.0 - pr[ex]);
                }
            }
        }
    }
    cpu::matmul(dx, &dlogits, router.of(p), Gemm::new(n, e, c).acc())?;
    // A LoRA layout freezes the router with every base tensor.
    if !experts.iter().any(|m| m.gate.frozen) {
        cpu::matmul(router.of_mut(gr), &dlogits, x, Gemm::new(e, n, c).ta().acc())?;
    }
    if let (Some(s), Some(sa)) = (shared, &a.shared) {
        mlp_bwd(p, gr, s, sa, x, dy, n, dx)?;
    }
    Ok(())
}
