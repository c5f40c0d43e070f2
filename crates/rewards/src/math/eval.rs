//! Exact (big rational) and floating-point evaluation of answer trees.

use std::collections::BTreeSet;

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{Signed, ToPrimitive, Zero};

use super::ast::Node;
use super::parse::{one, zero};

/// Largest size, in bits, of an exact intermediate value: `2^(10^6)` is
/// still exact, `10^(10^9)` falls back to floating point (and compares as
/// unequal rather than as two infinities).
const MAX_BITS: u64 = 400_000;
/// Largest `n` for which `n!` is computed exactly.
const MAX_FACTORIAL: u64 = 20_000;

fn bits(r: &BigRational) -> u64 {
    r.numer().bits() + r.denom().bits()
}

fn int_root(n: &BigInt, k: u32) -> Option<BigInt> {
    if n.is_negative() {
        if k % 2 == 1 {
            return int_root(&-n, k).map(|r| -r);
        }
        return None;
    }
    let r = n.nth_root(k);
    if num_traits::pow(r.clone(), k as usize) == *n {
        Some(r)
    } else {
        None
    }
}

/// The exact rational `root`-th root of `x`, when there is one.
fn rational_root(x: &BigRational, k: u32) -> Option<BigRational> {
    Some(BigRational::new(int_root(x.numer(), k)?, int_root(x.denom(), k)?))
}

fn small_int(r: &BigRational) -> Option<i64> {
    if r.is_integer() {
        r.to_integer().to_i64()
    } else {
        None
    }
}

/// Evaluate exactly: numbers, `+ - * /`, integer powers, perfect roots,
/// factorials and binomials. `None` when the value is irrational, symbolic
/// or too large.
pub(crate) fn exact(n: &Node) -> Option<BigRational> {
    let r = match n {
        Node::Num { value, .. } => value.clone(),
        Node::Add(v) => {
            let mut acc = zero();
            for t in v {
                acc += exact(t)?;
            }
            acc
        }
        Node::Mul(v) => {
            let mut acc = one();
            for t in v {
                acc *= exact(t)?;
                if bits(&acc) > MAX_BITS {
                    return None;
                }
            }
            acc
        }
        Node::Neg(a) => -exact(a)?,
        Node::Div(a, b) => {
            let d = exact(b)?;
            if d.is_zero() {
                return None;
            }
            exact(a)? / d
        }
        Node::Percent(a) => exact(a)? / BigRational::from_integer(100.into()),
        Node::Pow(a, b) => {
            let base = exact(a)?;
            let e = exact(b)?;
            let num = small_int(&BigRational::from_integer(e.numer().clone()))?;
            let den = e.denom().to_u32()?;
            if den > 64 {
                return None;
            }
            let base = if den > 1 { rational_root(&base, den)? } else { base };
            let mag = num.unsigned_abs();
            if base.is_zero() && num < 0 {
                return None;
            }
            if bits(&base).saturating_mul(mag) > MAX_BITS && !(base.is_zero() || base.abs() == one()) {
                return None;
            }
            let p = num_traits::pow(base, mag as usize);
            if num < 0 {
                p.recip()
            } else {
                p
            }
        }
        Node::Func(f, args) => match (f.as_str(), args.as_slice()) {
            ("sqrt", [x]) => rational_root(&exact(x)?, 2)?,
            ("root", [x, k]) => {
                let k = small_int(&exact(k)?)?;
                if !(1..=64).contains(&k) {
                    return None;
                }
                rational_root(&exact(x)?, k as u32)?
            }
            ("abs", [x]) => exact(x)?.abs(),
            ("fact", [x]) => {
                let k = small_int(&exact(x)?)?;
                if !(0..=MAX_FACTORIAL as i64).contains(&k) {
                    return None;
                }
                let mut acc = BigInt::from(1);
                for i in 2..=k {
                    acc *= i;
                }
                BigRational::from_integer(acc)
            }
            ("binom", [a, b]) => {
                let n = small_int(&exact(a)?)?;
                let k = small_int(&exact(b)?)?;
                if !(0..=MAX_FACTORIAL as i64).contains(&n) || k < 0 || k > n {
                    return BigRational::from_integer(0.into()).into();
                }
                let mut acc = BigInt::from(1);
                for i in 0..k {
                    acc = acc * (n - i) / (i + 1);
                }
                BigRational::from_integer(acc)
            }
            _ => return None,
        },
        _ => return None,
    };
    if bits(&r) > MAX_BITS {
        return None;
    }
    Some(r)
}

/// Whether the tree contains a number written with a decimal point.
pub(crate) fn has_decimal(n: &Node) -> bool {
    match n {
        Node::Num { decimal, .. } => *decimal,
        other => children(other).iter().any(|c| has_decimal(c)),
    }
}

fn children(n: &Node) -> Vec<&Node> {
    match n {
        Node::Add(v) | Node::Mul(v) | Node::Set(v) | Node::List(v) | Node::Union(v) | Node::Func(_, v) => {
            v.iter().collect()
        }
        Node::Tuple { items, .. } => items.iter().collect(),
        Node::Neg(a) | Node::Percent(a) => vec![a],
        Node::Div(a, b) | Node::Pow(a, b) | Node::PlusMinus(a, b) => vec![a, b],
        Node::Matrix(rows) => rows.iter().flatten().collect(),
        Node::Rel { sides, .. } => sides.iter().collect(),
        Node::Num { .. } | Node::Sym(_) | Node::Text(_) => Vec::new(),
    }
}

/// The free symbols of a tree (named constants excluded).
pub(crate) fn symbols(n: &Node, out: &mut BTreeSet<String>) {
    match n {
        Node::Sym(s) if !matches!(s.as_str(), "pi" | "e" | "infty") => {
            out.insert(s.clone());
        }
        other => {
            for c in children(other) {
                symbols(c, out);
            }
        }
    }
}

fn factorial_f64(x: f64) -> f64 {
    if x < 0.0 || x.fract() != 0.0 || x > 170.0 {
        return f64::NAN;
    }
    (2..=(x as u64)).fold(1.0, |acc, i| acc * i as f64)
}

/// Evaluate in f64 with the symbols bound by `env`. NaN where undefined.
pub(crate) fn float(n: &Node, env: &dyn Fn(&str) -> f64) -> f64 {
    match n {
        Node::Num { value, .. } => value.to_f64().unwrap_or(f64::NAN),
        Node::Sym(s) => match s.as_str() {
            "pi" => std::f64::consts::PI,
            "e" => std::f64::consts::E,
            "infty" => f64::INFINITY,
            other => env(other),
        },
        Node::Add(v) => v.iter().map(|t| float(t, env)).sum(),
        Node::Mul(v) => v.iter().map(|t| float(t, env)).product(),
        Node::Neg(a) => -float(a, env),
        Node::Div(a, b) => float(a, env) / float(b, env),
        Node::Percent(a) => float(a, env) / 100.0,
        Node::Pow(a, b) => {
            let (x, y) = (float(a, env), float(b, env));
            if x < 0.0 && y.fract() != 0.0 {
                // Odd roots of negatives: x^(p/q) with q odd.
                if let Some(q) = exact(b).map(|e| e.denom().clone()) {
                    if q.clone() % 2 == BigInt::from(1) {
                        let r = (-x).powf(y);
                        let p_odd = exact(b).is_some_and(|e| e.numer().clone() % 2 != BigInt::from(0));
                        return if p_odd { -r } else { r };
                    }
                }
            }
            x.powf(y)
        }
        Node::Func(f, args) => {
            let a: Vec<f64> = args.iter().map(|t| float(t, env)).collect();
            match (f.as_str(), a.as_slice()) {
                ("sqrt", [x]) => x.sqrt(),
                ("root", [x, k]) => {
                    if *x < 0.0 && (*k as i64) % 2 == 1 {
                        -(-x).powf(1.0 / k)
                    } else {
                        x.powf(1.0 / k)
                    }
                }
                ("abs", [x]) => x.abs(),
                ("fact", [x]) => factorial_f64(*x),
                ("binom", [n, k]) => factorial_f64(*n) / (factorial_f64(*k) * factorial_f64(n - k)),
                ("sin", [x]) => x.sin(),
                ("cos", [x]) => x.cos(),
                ("tan", [x]) => x.tan(),
                ("sec", [x]) => 1.0 / x.cos(),
                ("csc", [x]) => 1.0 / x.sin(),
                ("cot", [x]) => 1.0 / x.tan(),
                ("arcsin", [x]) => x.asin(),
                ("arccos", [x]) => x.acos(),
                ("arctan", [x]) => x.atan(),
                ("sinh", [x]) => x.sinh(),
                ("cosh", [x]) => x.cosh(),
                ("tanh", [x]) => x.tanh(),
                ("ln", [x]) | ("log", [x]) => x.ln(),
                ("exp", [x]) => x.exp(),
                _ => f64::NAN,
            }
        }
        _ => f64::NAN,
    }
}
