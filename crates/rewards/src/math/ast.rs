//! The answer tree the parser builds and the comparison walks.

use num_rational::BigRational;

/// A relation between two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    /// `=`
    Eq,
    /// `\approx`
    Approx,
    /// `\neq`
    Ne,
    /// `<`
    Lt,
    /// `\le`
    Le,
    /// `>`
    Gt,
    /// `\ge`
    Ge,
    /// `\in`
    In,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A number as written; `decimal` when written with a decimal point (a
    /// rounded value).
    Num {
        /// Its exact value.
        value: BigRational,
        /// Written with a decimal point.
        decimal: bool,
    },
    /// A variable or a named constant (`pi`, `e`, `infty` are recognised).
    Sym(String),
    /// Free text (`\text{Evelyn}`), compared as a string.
    Text(String),
    /// Sum of terms.
    Add(Vec<Node>),
    /// Product of factors.
    Mul(Vec<Node>),
    /// Negation.
    Neg(Box<Node>),
    /// Quotient.
    Div(Box<Node>, Box<Node>),
    /// Power.
    Pow(Box<Node>, Box<Node>),
    /// A function applied to arguments (`sin`, `sqrt`, `root`, `abs`, `fact`, `ln`, ...).
    Func(String, Vec<Node>),
    /// `a \pm b`: the set {a + b, a - b}.
    PlusMinus(Box<Node>, Box<Node>),
    /// `x\%`.
    Percent(Box<Node>),
    /// A bracketed sequence of two or more items: a tuple, a point or an
    /// interval, with its brackets.
    Tuple {
        /// `(` or `[`.
        open: char,
        /// `)` or `]`.
        close: char,
        /// The items.
        items: Vec<Node>,
    },
    /// `\{a, b\}`, or several separate answers: order does not matter.
    Set(Vec<Node>),
    /// A bare comma-separated list `a, b, c`.
    List(Vec<Node>),
    /// A matrix, by rows.
    Matrix(Vec<Vec<Node>>),
    /// `A \cup B`.
    Union(Vec<Node>),
    /// A relation chain `a op b op c ...` (`sides.len() == ops.len() + 1`).
    Rel {
        /// The operands.
        sides: Vec<Node>,
        /// The operators between them.
        ops: Vec<RelOp>,
    },
}

impl Node {
    /// A Num node from an integer.
    pub fn int(v: i64) -> Node {
        Node::Num {
            value: BigRational::from_integer(v.into()),
            decimal: false,
        }
    }

    /// Whether this is a "name": symbols, subscripted symbols, products,
    /// quotients and powers of names, a tuple of names (`(p, q)`), with no
    /// number and no sum. `x`, `f(x)`, `NO/BO`, `A:B`, `y_1`, `(x, y)`.
    pub fn is_name(&self) -> bool {
        match self {
            Node::Sym(s) => !matches!(s.as_str(), "pi" | "e" | "infty"),
            Node::Mul(v) => v.iter().all(Node::is_name),
            Node::Div(a, b) => a.is_name() && b.is_name(),
            Node::Pow(a, _) => a.is_name(),
            Node::Func(f, args) => !matches!(f.as_str(), "fact" | "abs") && args.iter().all(Node::is_name),
            Node::Tuple { items, .. } => items.iter().all(Node::is_name),
            Node::Text(_) => true,
            _ => false,
        }
    }

    /// If this is a word written as letters (`Even` parsed as `E*v*e*n`), the word.
    pub fn as_word(&self) -> Option<String> {
        match self {
            Node::Sym(s) if s.chars().count() == 1 => Some(s.clone()),
            Node::Text(t) => Some(t.clone()),
            Node::Mul(v) => {
                let mut w = String::new();
                for f in v {
                    w.push_str(&f.as_word()?);
                }
                Some(w)
            }
            _ => None,
        }
    }
}
