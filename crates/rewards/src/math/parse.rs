//! A recursive-descent parser from answer tokens to [`Node`].
//!
//! Grammar, loosest first: `;`-groups, then `,`/`and`/`or` lists, then
//! relation chains (`=`, `<`, `\le`, `\in`, ...), unions, sums (`+ - \pm`),
//! products (`* / :` and juxtaposition), unary signs, postfix (`^ _ ! %`),
//! primaries (numbers, letters, `\frac`, `\sqrt[n]`, functions, brackets,
//! `\{...\}`, `|x|`, matrices, `\text`).

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Zero};

use super::ast::{Node, RelOp};
use super::lex::{Tok, FUNCS};

/// Why an answer did not parse.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParseError(pub String);

type PResult<T> = std::result::Result<T, ParseError>;

const MAX_DEPTH: usize = 60;

pub(crate) struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

fn err<T>(s: impl Into<String>) -> PResult<T> {
    Err(ParseError(s.into()))
}

/// Parse a decimal literal into an exact rational.
pub(crate) fn parse_decimal(s: &str) -> Option<BigRational> {
    let (int, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if int.len() + frac.len() > 4000 {
        return None;
    }
    let digits = format!("{int}{frac}");
    let digits = if digits.is_empty() { "0".to_string() } else { digits };
    let num: BigInt = digits.parse().ok()?;
    let den = num_traits::pow(BigInt::from(10), frac.len());
    Some(BigRational::new(num, den))
}

impl Parser {
    pub(crate) fn new(toks: Vec<Tok>) -> Self {
        Parser { toks, pos: 0, depth: 0 }
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err("nesting too deep");
        }
        Ok(())
    }

    /// Parse everything.
    pub(crate) fn parse_all(&mut self) -> PResult<Node> {
        let mut groups = vec![self.parse_list(&[Tok::Semi])?];
        while self.eat(&Tok::Semi) {
            if self.peek().is_none() {
                break;
            }
            groups.push(self.parse_list(&[Tok::Semi])?);
        }
        if self.pos < self.toks.len() {
            return err(format!("unexpected {:?}", self.toks[self.pos]));
        }
        if groups.len() == 1 {
            return Ok(groups.remove(0));
        }
        // `p=5, q=2; p=7, q=2`: each group of assignments is one tuple.
        let groups = groups
            .into_iter()
            .map(|g| match g {
                Node::List(items) if items.iter().all(is_assignment) => Node::Tuple {
                    open: '(',
                    close: ')',
                    items,
                },
                other => other,
            })
            .collect();
        Ok(Node::List(groups))
    }

    fn at_end(&self, stops: &[Tok]) -> bool {
        match self.peek() {
            None => true,
            Some(t) => {
                stops.contains(t)
                    || matches!(
                        t,
                        Tok::RParen | Tok::RBrack | Tok::RBrace | Tok::RSet | Tok::Amp | Tok::RowSep | Tok::End(_)
                    )
            }
        }
    }

    /// `a, b and c`: a List when there is more than one item.
    fn parse_list(&mut self, stops: &[Tok]) -> PResult<Node> {
        self.enter()?;
        let mut items = Vec::new();
        loop {
            while self.eat(&Tok::Sep) || self.eat(&Tok::Comma) {}
            if self.at_end(stops) {
                break;
            }
            items.push(self.parse_rel()?);
            if !(matches!(self.peek(), Some(Tok::Comma | Tok::Sep))) {
                break;
            }
        }
        self.depth -= 1;
        match items.len() {
            0 => err("empty"),
            1 => Ok(items.remove(0)),
            _ => Ok(Node::List(items)),
        }
    }

    fn parse_rel(&mut self) -> PResult<Node> {
        let first = self.parse_union()?;
        let mut sides = vec![first];
        let mut ops = Vec::new();
        while let Some(Tok::Rel(op)) = self.peek().cloned() {
            self.pos += 1;
            ops.push(op);
            sides.push(self.parse_union()?);
        }
        if ops.is_empty() {
            return Ok(sides.remove(0));
        }
        Ok(Node::Rel { sides, ops })
    }

    fn parse_union(&mut self) -> PResult<Node> {
        let first = self.parse_add()?;
        if self.peek() != Some(&Tok::Cup) {
            return Ok(first);
        }
        let mut parts = vec![first];
        while self.eat(&Tok::Cup) {
            parts.push(self.parse_add()?);
        }
        Ok(Node::Union(parts))
    }

    fn parse_add(&mut self) -> PResult<Node> {
        self.enter()?;
        let mut terms = vec![self.parse_mul()?];
        loop {
            match self.peek() {
                Some(Tok::Plus) => {
                    self.pos += 1;
                    terms.push(self.parse_mul()?);
                }
                Some(Tok::Minus) => {
                    self.pos += 1;
                    terms.push(Node::Neg(Box::new(self.parse_mul()?)));
                }
                Some(Tok::Pm) | Some(Tok::Mp) => {
                    self.pos += 1;
                    let rhs = self.parse_mul()?;
                    let lhs = if terms.len() == 1 {
                        terms.remove(0)
                    } else {
                        Node::Add(std::mem::take(&mut terms))
                    };
                    terms = vec![Node::PlusMinus(Box::new(lhs), Box::new(rhs))];
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Node::Add(terms)
        })
    }

    fn starts_factor(&self) -> bool {
        matches!(
            self.peek(),
            Some(
                Tok::Num(_)
                    | Tok::Letter(_)
                    | Tok::Cmd(_)
                    | Tok::LParen
                    | Tok::LBrace
                    | Tok::LBrack
                    | Tok::Begin(_)
                    | Tok::LSet
                    | Tok::Text(_)
                    | Tok::Unit
            )
        )
    }

    fn parse_mul(&mut self) -> PResult<Node> {
        self.enter()?;
        let mut acc = self.parse_unary()?;
        loop {
            match self.peek() {
                Some(Tok::Star) => {
                    self.pos += 1;
                    let r = self.parse_unary()?;
                    acc = mul(acc, r);
                }
                Some(Tok::Slash) | Some(Tok::Colon) => {
                    self.pos += 1;
                    let r = self.parse_unary()?;
                    acc = Node::Div(Box::new(acc), Box::new(r));
                }
                Some(Tok::Text(_)) | Some(Tok::Unit) => {
                    // A unit after a value: dropped, with its power (`cm^2`).
                    self.pos += 1;
                    if self.eat(&Tok::Caret) {
                        self.parse_script()?;
                    }
                }
                Some(Tok::LBrack) if matches!(acc, Node::Num { .. }) => break,
                _ if self.starts_factor() => {
                    // `2 3` is not a product (nor 23): two numbers side by side
                    // are a malformed answer, not a hedge that multiplies out.
                    if matches!(self.peek(), Some(Tok::Num(_))) && ends_with_number(&acc) {
                        return err("two numbers side by side");
                    }
                    let r = self.parse_postfix()?;
                    acc = if is_int_literal(&acc) && is_simple_fraction(&r) {
                        // Mixed number: 3\frac{1}{2}.
                        Node::Add(vec![acc, r])
                    } else {
                        mul(acc, r)
                    };
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(acc)
    }

    fn parse_unary(&mut self) -> PResult<Node> {
        self.enter()?;
        let r = match self.peek() {
            Some(Tok::Minus) => {
                self.pos += 1;
                Node::Neg(Box::new(self.parse_unary()?))
            }
            Some(Tok::Plus) => {
                self.pos += 1;
                self.parse_unary()?
            }
            Some(Tok::Pm) | Some(Tok::Mp) => {
                self.pos += 1;
                Node::PlusMinus(Box::new(Node::int(0)), Box::new(self.parse_unary()?))
            }
            _ => self.parse_postfix()?,
        };
        self.depth -= 1;
        Ok(r)
    }

    /// An exponent or subscript: `{...}`, `-1`, or one character.
    fn parse_script(&mut self) -> PResult<Node> {
        self.enter()?;
        let r = match self.peek().cloned() {
            Some(Tok::LBrace) => {
                self.pos += 1;
                let inner = if self.peek() == Some(&Tok::RBrace) {
                    Node::Text(String::new())
                } else {
                    self.parse_list(&[])?
                };
                if !self.eat(&Tok::RBrace) {
                    return err("unclosed script");
                }
                inner
            }
            Some(Tok::Minus) => {
                self.pos += 1;
                Node::Neg(Box::new(self.parse_script()?))
            }
            Some(Tok::Num(n)) if n.len() > 1 && !n.contains('.') => {
                // `x^23` is x^2 * 3 in LaTeX: take one digit.
                let (first, rest) = n.split_at(1);
                self.toks[self.pos] = Tok::Num(rest.to_string());
                num_node(first)?
            }
            _ => self.parse_primary()?,
        };
        self.depth -= 1;
        Ok(r)
    }

    fn parse_postfix(&mut self) -> PResult<Node> {
        self.enter()?;
        let mut base = self.parse_primary()?;
        loop {
            match self.peek() {
                Some(Tok::Caret) => {
                    self.pos += 1;
                    let e = self.parse_script()?;
                    base = Node::Pow(Box::new(base), Box::new(e));
                }
                Some(Tok::Under) => {
                    self.pos += 1;
                    let sub = self.parse_script()?;
                    base = subscript(base, sub)?;
                }
                Some(Tok::Bang) => {
                    self.pos += 1;
                    base = Node::Func("fact".into(), vec![base]);
                }
                Some(Tok::Percent) => {
                    self.pos += 1;
                    base = Node::Percent(Box::new(base));
                }
                Some(Tok::Prime) => {
                    self.pos += 1;
                    base = match base {
                        Node::Sym(s) => Node::Sym(format!("{s}'")),
                        other => Node::Func("prime".into(), vec![other]),
                    };
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(base)
    }

    /// A braced argument (`\frac{a}{b}`) or a single token (`\frac12`).
    fn parse_arg(&mut self) -> PResult<Node> {
        match self.peek().cloned() {
            Some(Tok::LBrace) => {
                self.pos += 1;
                let inner = self.parse_list(&[])?;
                if !self.eat(&Tok::RBrace) {
                    return err("unclosed argument");
                }
                Ok(inner)
            }
            Some(Tok::Num(n)) if n.len() > 1 && !n.contains('.') => {
                let (first, rest) = n.split_at(1);
                self.toks[self.pos] = Tok::Num(rest.to_string());
                num_node(first)
            }
            _ => self.parse_primary(),
        }
    }

    /// Items of a bracketed sequence up to a closing bracket.
    fn parse_items(&mut self) -> PResult<(Vec<Node>, char)> {
        let mut items = Vec::new();
        loop {
            match self.peek() {
                Some(Tok::RParen) => {
                    self.pos += 1;
                    return Ok((items, ')'));
                }
                Some(Tok::RBrack) => {
                    self.pos += 1;
                    return Ok((items, ']'));
                }
                Some(Tok::Comma) | Some(Tok::Semi) => {
                    self.pos += 1;
                }
                None => return err("unclosed bracket"),
                _ => items.push(self.parse_rel()?),
            }
        }
    }

    fn parse_primary(&mut self) -> PResult<Node> {
        self.enter()?;
        let Some(t) = self.next() else {
            return err("unexpected end");
        };
        let r = match t {
            Tok::Num(n) => num_node(&n)?,
            Tok::Letter(l) => Node::Sym(l),
            Tok::Text(t) => Node::Text(t),
            Tok::Cmd(c) => self.command(&c)?,
            Tok::LBrace => {
                if self.eat(&Tok::RBrace) {
                    Node::Set(Vec::new())
                } else {
                    let inner = self.parse_list(&[])?;
                    if !self.eat(&Tok::RBrace) {
                        return err("unclosed brace");
                    }
                    inner
                }
            }
            Tok::LParen | Tok::LBrack => {
                let open = if t == Tok::LParen { '(' } else { '[' };
                let (mut items, close) = self.parse_items()?;
                match items.len() {
                    0 => return err("empty brackets"),
                    1 if (open == '(' && close == ')') || (open == '[' && close == ']') => items.remove(0),
                    1 => return err("one item in mixed brackets"),
                    _ => Node::Tuple { open, close, items },
                }
            }
            Tok::LSet => {
                let mut items = Vec::new();
                loop {
                    match self.peek() {
                        Some(Tok::RSet) => {
                            self.pos += 1;
                            break;
                        }
                        Some(Tok::Comma) | Some(Tok::Semi) | Some(Tok::Sep) => self.pos += 1,
                        None => return err("unclosed set"),
                        _ => items.push(self.parse_rel()?),
                    }
                }
                Node::Set(items)
            }
            Tok::Pipe => {
                let inner = self.parse_add()?;
                if !self.eat(&Tok::Pipe) {
                    return err("unclosed |");
                }
                Node::Func("abs".into(), vec![inner])
            }
            Tok::Begin(env) => self.matrix(&env)?,
            other => return err(format!("unexpected {other:?}")),
        };
        self.depth -= 1;
        Ok(r)
    }

    fn matrix(&mut self, env: &str) -> PResult<Node> {
        let mut rows: Vec<Vec<Node>> = vec![Vec::new()];
        loop {
            match self.peek().cloned() {
                Some(Tok::End(e)) => {
                    self.pos += 1;
                    if e != env {
                        return err("mismatched \\end");
                    }
                    break;
                }
                Some(Tok::Amp) => self.pos += 1,
                Some(Tok::RowSep) => {
                    self.pos += 1;
                    rows.push(Vec::new());
                }
                None => return err("unclosed environment"),
                _ => {
                    let cell = self.parse_rel()?;
                    if let Some(r) = rows.last_mut() {
                        r.push(cell);
                    }
                }
            }
        }
        rows.retain(|r| !r.is_empty());
        if rows.is_empty() {
            return err("empty matrix");
        }
        Ok(Node::Matrix(rows))
    }

    fn command(&mut self, c: &str) -> PResult<Node> {
        match c {
            "frac" => {
                let a = self.parse_arg()?;
                let b = self.parse_arg()?;
                Ok(Node::Div(Box::new(a), Box::new(b)))
            }
            "binom" | "dbinom" | "tbinom" => {
                let a = self.parse_arg()?;
                let b = self.parse_arg()?;
                Ok(Node::Func("binom".into(), vec![a, b]))
            }
            "sqrt" => {
                if self.eat(&Tok::LBrack) {
                    let (mut items, close) = self.parse_items()?;
                    if items.len() != 1 || close != ']' {
                        return err("bad root index");
                    }
                    let n = items.remove(0);
                    let x = self.parse_arg()?;
                    Ok(Node::Func("root".into(), vec![x, n]))
                } else {
                    let x = self.parse_arg()?;
                    Ok(Node::Func("sqrt".into(), vec![x]))
                }
            }
            "pi" => Ok(Node::Sym("pi".into())),
            "infty" => Ok(Node::Sym("infty".into())),
            "emptyset" => Ok(Node::Set(Vec::new())),
            f if FUNCS.contains(&f) => {
                let mut power = None;
                if self.eat(&Tok::Caret) {
                    power = Some(self.parse_script()?);
                }
                let arg = match self.peek() {
                    Some(Tok::LParen) => {
                        self.pos += 1;
                        let (mut items, _) = self.parse_items()?;
                        if items.len() != 1 {
                            return err("function of several arguments");
                        }
                        items.remove(0)
                    }
                    _ => self.parse_postfix()?,
                };
                let name = if f == "lg" { "log".to_string() } else { f.to_string() };
                match power {
                    Some(Node::Neg(inner)) if *inner == Node::int(1) && ["sin", "cos", "tan"].contains(&f) => {
                        Ok(Node::Func(format!("arc{f}"), vec![arg]))
                    }
                    Some(p) => Ok(Node::Pow(Box::new(Node::Func(name, vec![arg])), Box::new(p))),
                    None => Ok(Node::Func(name, vec![arg])),
                }
            }
            // Accents and font commands keep their argument's meaning.
            "mathbf" | "vec" | "hat" | "bar" | "overline" | "tilde" | "overrightarrow" | "widehat" | "mathcal"
            | "boxed" | "fbox" => self.parse_arg(),
            other => Ok(Node::Sym(other.to_string())),
        }
    }
}

fn num_node(s: &str) -> PResult<Node> {
    match parse_decimal(s) {
        Some(value) => Ok(Node::Num {
            value,
            decimal: s.contains('.'),
        }),
        None => err("number too long"),
    }
}

fn mul(a: Node, b: Node) -> Node {
    match a {
        Node::Mul(mut v) => {
            v.push(b);
            Node::Mul(v)
        }
        a => Node::Mul(vec![a, b]),
    }
}

fn ends_with_number(n: &Node) -> bool {
    match n {
        Node::Num { .. } => true,
        Node::Mul(v) => v.last().is_some_and(ends_with_number),
        _ => false,
    }
}

fn is_int_literal(n: &Node) -> bool {
    matches!(n, Node::Num { value, decimal: false } if value.is_integer())
}

fn is_simple_fraction(n: &Node) -> bool {
    matches!(n, Node::Div(a, b) if is_int_literal(a) && is_int_literal(b))
}

fn is_assignment(n: &Node) -> bool {
    matches!(n, Node::Rel { sides, ops } if ops.len() == 1 && ops[0] == RelOp::Eq && sides[0].is_name())
}

/// `x_1` -> symbol `x_1`; `204_5` -> the number 204 in base 5.
fn subscript(base: Node, sub: Node) -> PResult<Node> {
    let sub_text = match &sub {
        Node::Num { value, decimal: false } if value.is_integer() => value.to_integer().to_string(),
        Node::Sym(s) => s.clone(),
        Node::Mul(v) => match Node::Mul(v.clone()).as_word() {
            Some(w) => w,
            None => return Ok(base),
        },
        _ => format!("{sub:?}"),
    };
    match base {
        Node::Sym(s) => Ok(Node::Sym(format!("{s}_{sub_text}"))),
        Node::Num { value, decimal: false } if value.is_integer() => {
            let radix: u32 = match sub_text.parse() {
                Ok(r) if (2..=36).contains(&r) => r,
                _ => return err("bad base"),
            };
            let digits = value.to_integer().to_string();
            match BigInt::parse_bytes(digits.as_bytes(), radix) {
                Some(v) => Ok(Node::Num {
                    value: BigRational::from_integer(v),
                    decimal: false,
                }),
                None => err("digit out of range for base"),
            }
        }
        other => Ok(other),
    }
}

/// Zero and one as rationals (kept here for the evaluator).
pub(crate) fn zero() -> BigRational {
    BigRational::zero()
}

/// One as a rational.
pub(crate) fn one() -> BigRational {
    BigRational::one()
}
