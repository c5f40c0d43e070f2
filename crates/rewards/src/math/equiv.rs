//! Equivalence of two parsed answers.
//!
//! Exact where possible (big rationals), then a decimal-rounding rule, then
//! a numeric fallback at random points for symbolic expressions. Sets and
//! bare lists in the gold are order-insensitive; tuples, intervals and
//! matrices are ordered.

use std::collections::BTreeSet;
use std::time::Instant;

use num_rational::BigRational;
use num_traits::{Signed, ToPrimitive, Zero};

use super::ast::{Node, RelOp};
use super::eval::{exact, float, has_decimal, symbols};

/// Relative tolerance of the numeric fallback for expressions that are not
/// exact rationals (radicals, pi, symbolic identities checked at points).
pub const NUMERIC_REL_TOL: f64 = 1e-9;
/// A decimal matches an irrational or non-terminating value when it is that
/// value correctly rounded to its own number of digits and carries at least
/// this relative precision (`0.3` is not `1/3`, `0.33333` is).
pub const DECIMAL_MIN_REL_PRECISION: f64 = 1e-4;

const SAMPLE_POINTS: usize = 6;
const MAX_ITEMS: usize = 64;

/// Comparison state: the deadline.
pub(crate) struct Ctx {
    pub(crate) deadline: Instant,
    pub(crate) timed_out: bool,
}

impl Ctx {
    fn expired(&mut self) -> bool {
        if Instant::now() > self.deadline {
            self.timed_out = true;
        }
        self.timed_out
    }
}

/// Turn what an answer says into the value it names: `x = 5` -> `5`,
/// `z = 1 + 1 = 2` -> `2`, `x = 1/3 \approx 0.33` -> `1/3`, `x \in S` -> `S`,
/// `a \pm b` -> `{a + b, a - b}`.
pub(crate) fn resolve(n: Node) -> Node {
    let n = match n {
        Node::Rel { sides, ops } => resolve_rel(sides, ops),
        Node::List(v) => Node::List(v.into_iter().map(resolve).collect()),
        Node::Set(v) => Node::Set(v.into_iter().map(resolve).collect()),
        Node::Tuple { open, close, items } => Node::Tuple {
            open,
            close,
            items: items.into_iter().map(resolve).collect(),
        },
        Node::Union(v) => Node::Union(v.into_iter().map(resolve).collect()),
        other => other,
    };
    let n = match matrix_value(&n, 0) {
        Some(rows) if !matches!(n, Node::Matrix(_)) => Node::Matrix(rows),
        _ => n,
    };
    expand_pm(n)
}

/// Largest matrix side and tree size for matrix arithmetic.
const MAX_MATRIX_SIDE: usize = 8;
const MAX_MATRIX_NODES: usize = 20_000;

fn node_size(n: &Node, budget: usize) -> usize {
    if budget == 0 {
        return 1;
    }
    1 + match n {
        Node::Add(v) | Node::Mul(v) | Node::Func(_, v) | Node::Set(v) | Node::List(v) | Node::Union(v) => {
            let mut t = 0;
            for c in v {
                t += node_size(c, budget.saturating_sub(t));
                if t >= budget {
                    break;
                }
            }
            t
        }
        Node::Neg(a) | Node::Percent(a) => node_size(a, budget),
        Node::Div(a, b) | Node::Pow(a, b) | Node::PlusMinus(a, b) => {
            let t = node_size(a, budget);
            t + node_size(b, budget.saturating_sub(t))
        }
        _ => 0,
    }
}

fn matrix_nodes(m: &[Vec<Node>]) -> usize {
    let mut t = 0;
    for c in m.iter().flatten() {
        t += node_size(c, MAX_MATRIX_NODES.saturating_sub(t));
        if t >= MAX_MATRIX_NODES {
            break;
        }
    }
    t
}

fn contains_matrix(n: &Node) -> bool {
    match n {
        Node::Matrix(_) => true,
        Node::Add(v) | Node::Mul(v) => v.iter().any(contains_matrix),
        Node::Neg(a) => contains_matrix(a),
        Node::Div(a, b) | Node::Pow(a, b) => contains_matrix(a) || contains_matrix(b),
        _ => false,
    }
}

fn map_entries(m: Vec<Vec<Node>>, f: impl Fn(Node) -> Node) -> Vec<Vec<Node>> {
    m.into_iter().map(|r| r.into_iter().map(&f).collect()).collect()
}

fn matmul(a: &[Vec<Node>], b: &[Vec<Node>]) -> Option<Vec<Vec<Node>>> {
    let inner = a.first()?.len();
    if b.len() != inner || b.iter().any(|r| r.len() != b[0].len()) {
        return None;
    }
    let cols = b[0].len();
    let out: Vec<Vec<Node>> = a
        .iter()
        .map(|row| {
            (0..cols)
                .map(|j| {
                    Node::Add(
                        (0..inner)
                            .map(|k| Node::Mul(vec![row[k].clone(), b[k][j].clone()]))
                            .collect(),
                    )
                })
                .collect()
        })
        .collect();
    (matrix_nodes(&out) < MAX_MATRIX_NODES).then_some(out)
}

/// The value of a matrix expression (sums, scalar and matrix products,
/// negation, division by a scalar, small integer powers) as a matrix of
/// entry expressions; `None` when `n` is not one or it gets too large.
fn matrix_value(n: &Node, depth: usize) -> Option<Vec<Vec<Node>>> {
    if depth > 16 || !contains_matrix(n) {
        return None;
    }
    let shape_ok = |m: &Vec<Vec<Node>>| {
        !m.is_empty()
            && m.len() <= MAX_MATRIX_SIDE
            && m.iter().all(|r| r.len() == m[0].len() && r.len() <= MAX_MATRIX_SIDE)
    };
    let m = match n {
        Node::Matrix(rows) => rows.clone(),
        Node::Neg(a) => map_entries(matrix_value(a, depth + 1)?, |e| Node::Neg(Box::new(e))),
        Node::Div(a, b) if !contains_matrix(b) => {
            map_entries(matrix_value(a, depth + 1)?, |e| Node::Div(Box::new(e), b.clone()))
        }
        Node::Add(terms) => {
            let mut acc: Option<Vec<Vec<Node>>> = None;
            for t in terms {
                let m = matrix_value(t, depth + 1)?;
                acc = Some(match acc {
                    None => m,
                    Some(a) => {
                        if a.len() != m.len() || a.iter().zip(&m).any(|(x, y)| x.len() != y.len()) {
                            return None;
                        }
                        a.into_iter()
                            .zip(m)
                            .map(|(x, y)| x.into_iter().zip(y).map(|(p, q)| Node::Add(vec![p, q])).collect())
                            .collect()
                    }
                });
            }
            acc?
        }
        Node::Mul(factors) => {
            let mut scalars = Vec::new();
            let mut acc: Option<Vec<Vec<Node>>> = None;
            for f in factors {
                if contains_matrix(f) {
                    let m = matrix_value(f, depth + 1)?;
                    acc = Some(match acc {
                        None => m,
                        Some(a) => matmul(&a, &m)?,
                    });
                } else {
                    scalars.push(f.clone());
                }
            }
            let m = acc?;
            if scalars.is_empty() {
                m
            } else {
                map_entries(m, |e| {
                    let mut v = scalars.clone();
                    v.push(e);
                    Node::Mul(v)
                })
            }
        }
        Node::Pow(a, k) => {
            let base = matrix_value(a, depth + 1)?;
            let k = exact(k)?;
            let k = if k.is_integer() {
                k.to_integer().to_usize()?
            } else {
                return None;
            };
            if !(1..=8).contains(&k) || base.len() != base[0].len() {
                return None;
            }
            let mut acc = base.clone();
            for _ in 1..k {
                acc = matmul(&acc, &base)?;
            }
            acc
        }
        _ => return None,
    };
    (shape_ok(&m) && matrix_nodes(&m) < MAX_MATRIX_NODES).then_some(m)
}

fn resolve_rel(mut sides: Vec<Node>, ops: Vec<RelOp>) -> Node {
    if ops.contains(&RelOp::In) {
        if let Some(last) = sides.pop() {
            return resolve(last);
        }
    }
    let all_eq = ops.iter().all(|o| matches!(o, RelOp::Eq | RelOp::Approx));
    if all_eq && !sides.is_empty() {
        if sides.len() >= 3 {
            // The last value that follows an `=` (`x = 1/3 \approx 0.33` -> 1/3);
            // `z = 1 + 1 = 2` stays the assignment `z = 2`.
            let idx = ops
                .iter()
                .rposition(|o| *o == RelOp::Eq)
                .map(|i| i + 1)
                .unwrap_or(sides.len() - 1);
            let value = resolve(sides.swap_remove(idx));
            if sides[0].is_name() {
                return Node::Rel {
                    sides: vec![sides.swap_remove(0), value],
                    ops: vec![RelOp::Eq],
                };
            }
            return value;
        }
        if sides.len() == 2 && ops[0] == RelOp::Approx && sides[0].is_name() {
            return resolve(sides.swap_remove(1));
        }
        // `x = 5` stays an equation: whether it means its value depends on
        // the other side (see `equivalent`).
    }
    Node::Rel { sides, ops }
}

fn expand_pm(n: Node) -> Node {
    if !has_pm(&n) {
        return n;
    }
    let mut variants = vec![n];
    while variants.iter().any(has_pm) && variants.len() < 16 {
        let mut next = Vec::new();
        for v in variants {
            if has_pm(&v) {
                next.push(replace_pm(&v, false).0);
                next.push(replace_pm(&v, true).0);
            } else {
                next.push(v);
            }
        }
        variants = next;
    }
    Node::Set(variants)
}

fn has_pm(n: &Node) -> bool {
    match n {
        Node::PlusMinus(..) => true,
        Node::Add(v) | Node::Mul(v) | Node::Func(_, v) => v.iter().any(has_pm),
        Node::Neg(a) | Node::Percent(a) => has_pm(a),
        Node::Div(a, b) | Node::Pow(a, b) => has_pm(a) || has_pm(b),
        _ => false,
    }
}

/// Replace the first `a \pm b` by `a + b` or `a - b`; returns whether one was replaced.
fn replace_pm(n: &Node, minus: bool) -> (Node, bool) {
    match n {
        Node::PlusMinus(a, b) => {
            let b = if minus { Node::Neg(b.clone()) } else { (**b).clone() };
            (Node::Add(vec![(**a).clone(), b]), true)
        }
        Node::Add(v) | Node::Mul(v) | Node::Func(_, v) => {
            let mut done = false;
            let items: Vec<Node> = v
                .iter()
                .map(|c| {
                    if done {
                        c.clone()
                    } else {
                        let (r, d) = replace_pm(c, minus);
                        done = d;
                        r
                    }
                })
                .collect();
            let node = match n {
                Node::Add(_) => Node::Add(items),
                Node::Mul(_) => Node::Mul(items),
                Node::Func(f, _) => Node::Func(f.clone(), items),
                _ => unreachable_node(),
            };
            (node, done)
        }
        Node::Neg(a) => {
            let (r, d) = replace_pm(a, minus);
            (Node::Neg(Box::new(r)), d)
        }
        Node::Percent(a) => {
            let (r, d) = replace_pm(a, minus);
            (Node::Percent(Box::new(r)), d)
        }
        Node::Div(a, b) | Node::Pow(a, b) => {
            let (ra, da) = replace_pm(a, minus);
            let (rb, db) = if da {
                ((**b).clone(), false)
            } else {
                replace_pm(b, minus)
            };
            let node = if matches!(n, Node::Div(..)) {
                Node::Div(Box::new(ra), Box::new(rb))
            } else {
                Node::Pow(Box::new(ra), Box::new(rb))
            };
            (node, da || db)
        }
        other => (other.clone(), false),
    }
}

fn unreachable_node() -> Node {
    Node::Text(String::new())
}

fn unwrap_single(n: &Node) -> &Node {
    match n {
        Node::List(v) | Node::Set(v) if v.len() == 1 => unwrap_single(&v[0]),
        other => other,
    }
}

/// Whether `pred` says what `gold` says.
pub(crate) fn equivalent(gold: &Node, pred: &Node, ctx: &mut Ctx) -> bool {
    if ctx.expired() {
        return false;
    }
    let gold = unwrap_single(gold);
    let pred = unwrap_single(pred);
    // Math-Verify's direction: an equation answering a value question counts
    // by its right side (`BC = 5` for 5, `2x = 6` for 6); an assignment in
    // the gold (`x = 5`) asks for its value; two equations compare as
    // equations.
    match (eq_rhs(gold), eq_rhs(pred)) {
        (None, Some(p)) if !matches!(gold, Node::Rel { .. }) => return equivalent(gold, p, ctx),
        (Some(g), None) if !matches!(pred, Node::Rel { .. }) => {
            return is_assignment(gold) && equivalent(g, pred, ctx);
        }
        _ => {}
    }
    match (gold, pred) {
        (Node::Text(_), _) | (_, Node::Text(_)) => words_equal(gold, pred),
        (Node::List(g) | Node::Set(g), Node::List(p) | Node::Set(p)) => unordered(g, p, ctx),
        (Node::List(g), Node::Tuple { items: p, .. }) => unordered(g, p, ctx),
        (Node::Tuple { items: g, .. }, Node::List(p)) => ordered(g, p, ctx),
        (
            Node::Tuple {
                open: go,
                close: gc,
                items: g,
            },
            Node::Tuple {
                open: po,
                close: pc,
                items: p,
            },
        ) => go == po && gc == pc && ordered(g, p, ctx),
        // A relation answering an interval is not read as a set (Math-Verify
        // compares the other direction only).
        (Node::Rel { .. }, Node::Tuple { .. }) => match rel_to_interval(gold) {
            Some(i) => equivalent(&i, pred, ctx),
            None => false,
        },
        (Node::Union(g), Node::Union(p)) => unordered(g, p, ctx),
        (Node::Matrix(g), Node::Matrix(p)) => {
            g.len() == p.len()
                && g.iter().zip(p).all(|(gr, pr)| gr.len() == pr.len())
                && g.iter()
                    .flatten()
                    .zip(p.iter().flatten())
                    .all(|(a, b)| equivalent(a, b, ctx))
        }
        (Node::Rel { sides: gs, ops: go }, Node::Rel { sides: ps, ops: po }) => relations_equal(gs, go, ps, po, ctx),
        (Node::Percent(g), Node::Percent(p)) => scalar_equal(g, p, ctx),
        (Node::Percent(g), p) => scalar_equal(g, p, ctx) || scalar_equal(gold, p, ctx),
        (g, Node::Percent(p)) => scalar_equal(g, p, ctx) || scalar_equal(g, pred, ctx),
        (g, p) if is_scalar(g) && is_scalar(p) => scalar_equal(g, p, ctx),
        _ => false,
    }
}

/// The right side of an equation chain written with `=` only.
fn eq_rhs(n: &Node) -> Option<&Node> {
    match n {
        Node::Rel { sides, ops } if ops.iter().all(|o| *o == RelOp::Eq) => sides.last(),
        _ => None,
    }
}

/// `x = 5`, `f(x) = ...`, `(a, b) = ...`: a name on the left.
fn is_assignment(n: &Node) -> bool {
    matches!(n, Node::Rel { sides, ops } if ops.iter().all(|o| *o == RelOp::Eq) && sides[0].is_name())
}

fn is_scalar(n: &Node) -> bool {
    !matches!(
        n,
        Node::List(_)
            | Node::Set(_)
            | Node::Tuple { .. }
            | Node::Matrix(_)
            | Node::Union(_)
            | Node::Rel { .. }
            | Node::Text(_)
    )
}

fn words_equal(a: &Node, b: &Node) -> bool {
    let norm = |n: &Node| {
        n.as_word().map(|w| {
            w.chars()
                .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '.' | ','))
                .collect::<String>()
                .to_lowercase()
        })
    };
    match (norm(a), norm(b)) {
        (Some(x), Some(y)) => !x.is_empty() && x == y,
        _ => false,
    }
}

fn ordered(g: &[Node], p: &[Node], ctx: &mut Ctx) -> bool {
    g.len() == p.len() && g.len() <= MAX_ITEMS && g.iter().zip(p).all(|(a, b)| equivalent(a, b, ctx))
}

/// Set equality: every item of each side equals some item of the other
/// (repeats count once, as in Math-Verify's sets).
fn unordered(g: &[Node], p: &[Node], ctx: &mut Ctx) -> bool {
    if g.is_empty() != p.is_empty() || g.len() > MAX_ITEMS || p.len() > MAX_ITEMS {
        return false;
    }
    let mut p_hit = vec![false; p.len()];
    for a in g {
        let mut found = false;
        for (j, b) in p.iter().enumerate() {
            if equivalent(a, b, ctx) {
                p_hit[j] = true;
                found = true;
            }
        }
        if !found {
            return false;
        }
    }
    p_hit.into_iter().all(|h| h)
}

/// `a < x < b` or `x > a` as an interval, when the bound side is a name.
fn rel_to_interval(n: &Node) -> Option<Node> {
    let Node::Rel { sides, ops } = n else { return None };
    let inf = || Node::Sym("infty".into());
    let ninf = || Node::Neg(Box::new(Node::Sym("infty".into())));
    let strict = |o: &RelOp| matches!(o, RelOp::Lt | RelOp::Gt);
    match (sides.as_slice(), ops.as_slice()) {
        ([a, x, b], [o1, o2]) if x.is_name() => {
            let up = matches!(o1, RelOp::Lt | RelOp::Le) && matches!(o2, RelOp::Lt | RelOp::Le);
            let down = matches!(o1, RelOp::Gt | RelOp::Ge) && matches!(o2, RelOp::Gt | RelOp::Ge);
            if up {
                Some(interval(a.clone(), b.clone(), strict(o1), strict(o2)))
            } else if down {
                Some(interval(b.clone(), a.clone(), strict(o2), strict(o1)))
            } else {
                None
            }
        }
        ([x, a], [o]) | ([a, x], [o]) if x.is_name() => {
            let x_left = sides[0].is_name();
            let greater = matches!(o, RelOp::Gt | RelOp::Ge) == x_left;
            if !matches!(o, RelOp::Lt | RelOp::Le | RelOp::Gt | RelOp::Ge) {
                return None;
            }
            if greater {
                Some(interval(a.clone(), inf(), strict(o), true))
            } else {
                Some(interval(ninf(), a.clone(), true, strict(o)))
            }
        }
        _ => None,
    }
}

fn interval(lo: Node, hi: Node, open_lo: bool, open_hi: bool) -> Node {
    Node::Tuple {
        open: if open_lo { '(' } else { '[' },
        close: if open_hi { ')' } else { ']' },
        items: vec![lo, hi],
    }
}

fn diff(l: &Node, r: &Node) -> Node {
    Node::Add(vec![l.clone(), Node::Neg(Box::new(r.clone()))])
}

/// Normal form of a two-sided relation: `(expr, kind)` with `expr > 0`,
/// `expr >= 0`, `expr = 0` or `expr != 0`.
fn normal_rel(l: &Node, op: RelOp, r: &Node) -> Option<(Node, u8)> {
    Some(match op {
        RelOp::Lt => (diff(r, l), 0),
        RelOp::Gt => (diff(l, r), 0),
        RelOp::Le => (diff(r, l), 1),
        RelOp::Ge => (diff(l, r), 1),
        RelOp::Eq => (diff(l, r), 2),
        RelOp::Ne => (diff(l, r), 3),
        RelOp::Approx | RelOp::In => return None,
    })
}

fn relations_equal(gs: &[Node], go: &[RelOp], ps: &[Node], po: &[RelOp], ctx: &mut Ctx) -> bool {
    if go.len() == 1 && po.len() == 1 {
        let (Some((ge, gk)), Some((pe, pk))) = (normal_rel(&gs[0], go[0], &gs[1]), normal_rel(&ps[0], po[0], &ps[1]))
        else {
            return false;
        };
        if gk != pk {
            return false;
        }
        // Equations may be scaled by any non-zero constant, inequalities by a positive one.
        return proportional(&ge, &pe, gk < 2, ctx);
    }
    if let (Some(a), Some(b)) = (
        rel_to_interval(&Node::Rel {
            sides: gs.to_vec(),
            ops: go.to_vec(),
        }),
        rel_to_interval(&Node::Rel {
            sides: ps.to_vec(),
            ops: po.to_vec(),
        }),
    ) {
        return equivalent(&a, &b, ctx);
    }
    go == po && ordered(gs, ps, ctx)
}

/// Deterministic sample values for the symbols, away from 0 and 1.
fn sample(point: usize, idx: usize) -> f64 {
    let x = ((point * 7919 + idx * 104_729 + 17) % 1000) as f64 / 1000.0;
    0.35 + 1.9 * x + 0.013 * (point as f64 + 1.0).sqrt()
}

fn point_values(a: &Node, b: &Node) -> Vec<(f64, f64)> {
    let mut syms = BTreeSet::new();
    symbols(a, &mut syms);
    symbols(b, &mut syms);
    let names: Vec<String> = syms.into_iter().collect();
    let points = if names.is_empty() { 1 } else { SAMPLE_POINTS };
    (0..points)
        .map(|p| {
            let env = |s: &str| {
                names
                    .iter()
                    .position(|n| n == s)
                    .map(|i| sample(p, i))
                    .unwrap_or(f64::NAN)
            };
            (float(a, &env), float(b, &env))
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-300) || a == b
}

fn proportional(a: &Node, b: &Node, positive: bool, ctx: &mut Ctx) -> bool {
    if ctx.expired() {
        return false;
    }
    if let (Some(x), Some(y)) = (exact(a), exact(b)) {
        // Relations between constants: both must hold or fail alike.
        return x.is_zero() == y.is_zero() && x.signum() == y.signum();
    }
    let vals = point_values(a, b);
    let mut ratio: Option<f64> = None;
    let mut valid = 0;
    for (x, y) in vals {
        if !x.is_finite() || !y.is_finite() {
            continue;
        }
        if x.abs() < 1e-12 && y.abs() < 1e-12 {
            valid += 1;
            continue;
        }
        if y == 0.0 || x == 0.0 {
            return false;
        }
        let r = x / y;
        match ratio {
            None => ratio = Some(r),
            Some(r0) if !close(r, r0, 1e-8) => return false,
            _ => {}
        }
        valid += 1;
    }
    valid >= 2 && ratio.is_none_or(|r| if positive { r > 0.0 } else { r != 0.0 })
}

fn infinity_sign(n: &Node) -> Option<i8> {
    match n {
        Node::Sym(s) if s == "infty" => Some(1),
        Node::Neg(a) => infinity_sign(a).map(|s| -s),
        Node::Add(v) if v.len() == 1 => infinity_sign(&v[0]),
        _ => None,
    }
}

/// Digits after the decimal point of a (possibly negated) decimal literal.
fn decimal_digits(n: &Node) -> Option<(BigRational, usize)> {
    match n {
        Node::Num { value, decimal: true } => {
            let mut k = 0;
            let mut v = value.clone();
            while !v.is_integer() && k < 400 {
                v *= BigRational::from_integer(10.into());
                k += 1;
            }
            Some((value.clone(), k))
        }
        Node::Neg(a) => decimal_digits(a).map(|(v, k)| (-v, k)),
        _ => None,
    }
}

fn rounding_match(dec: &BigRational, digits: usize, other: f64) -> bool {
    let Some(d) = dec.to_f64() else { return false };
    let half_ulp = 0.5 * 10f64.powi(-(digits as i32));
    if other == 0.0 {
        return d == 0.0;
    }
    (d - other).abs() <= half_ulp * (1.0 + 1e-9) + 1e-15 * other.abs()
        && 10f64.powi(-(digits as i32)) <= DECIMAL_MIN_REL_PRECISION * other.abs()
}

fn scalar_equal(a: &Node, b: &Node, ctx: &mut Ctx) -> bool {
    if ctx.expired() {
        return false;
    }
    if let (Some(x), Some(y)) = (infinity_sign(a), infinity_sign(b)) {
        return x == y;
    }
    if infinity_sign(a).is_some() || infinity_sign(b).is_some() {
        return false;
    }
    let (ea, eb) = (exact(a), exact(b));
    if let (Some(x), Some(y)) = (&ea, &eb) {
        if x == y {
            return true;
        }
        // Two exact values that differ: only a rounded decimal may still match.
        let (da, db) = (decimal_digits(a), decimal_digits(b));
        return match (da, db) {
            (Some((d, k)), None) => {
                terminates_within(y, k).not_and(|| rounding_match(&d, k, y.to_f64().unwrap_or(f64::NAN)))
            }
            (None, Some((d, k))) => {
                terminates_within(x, k).not_and(|| rounding_match(&d, k, x.to_f64().unwrap_or(f64::NAN)))
            }
            _ => false,
        };
    }
    let vals = point_values(a, b);
    if let Some((d, k)) = decimal_digits(a).or_else(|| decimal_digits(b)) {
        if ea.is_none() || eb.is_none() {
            let (x, y) = vals.first().copied().unwrap_or((f64::NAN, f64::NAN));
            let other = if decimal_digits(a).is_some() { y } else { x };
            if other.is_finite() && (ea.is_some() != eb.is_some()) {
                return rounding_match(&d, k, other);
            }
        }
    }
    let tol = if has_decimal(a) || has_decimal(b) {
        1e-6
    } else {
        NUMERIC_REL_TOL
    };
    let mut valid = 0;
    for (x, y) in vals {
        if x.is_nan() && y.is_nan() {
            continue;
        }
        if !x.is_finite() || !y.is_finite() || !close(x, y, tol) {
            return false;
        }
        valid += 1;
    }
    valid >= 1
}

/// Whether `x` has an exact decimal expansion with at most `k` digits (then a
/// decimal of `k` digits that differs from it is simply wrong).
fn terminates_within(x: &BigRational, k: usize) -> bool {
    let mut v = x.clone();
    for _ in 0..=k {
        if v.is_integer() {
            return true;
        }
        v *= BigRational::from_integer(10.into());
    }
    v.is_integer()
}

trait NotAnd {
    fn not_and(self, f: impl FnOnce() -> bool) -> bool;
}

impl NotAnd for bool {
    fn not_and(self, f: impl FnOnce() -> bool) -> bool {
        !self && f()
    }
}
