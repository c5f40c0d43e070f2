//! LaTeX answer normalisation and tokens.

use super::ast::RelOp;

/// Commands that `\\name` (a doubled backslash, as written by some JSON
/// exporters) is taken to mean.
const KNOWN_COMMANDS: &[&str] = &[
    "frac", "dfrac", "tfrac", "cfrac", "left", "right", "boxed", "sqrt", "text", "mathrm", "mbox", "cdot", "times",
    "pi", "infty", "le", "leq", "ge", "geq", "pm", "in", "cup", "begin", "end", "sin", "cos", "tan", "ln", "log",
    "circ", "textbf", "mathbf", "quad", "qquad", "div", "neq", "approx",
];

/// Unit words dropped after a value (`125 miles`, `15 cm`).
const UNITS: &[&str] = &[
    "cm", "mm", "km", "ft", "feet", "foot", "inch", "inches", "mile", "miles", "meter", "meters", "metres", "units",
    "unit", "degrees", "degree", "dollars", "dollar", "cents", "cent", "hours", "hour", "minutes", "minute", "seconds",
    "second", "days", "day", "years", "year", "kg", "grams", "gram", "lb", "lbs", "pounds", "mph", "sq", "square",
    "cubic", "liters", "litres", "ml", "students", "people", "ways", "points", "times",
];

/// Function names recognised with or without a backslash.
pub(crate) const FUNCS: &[&str] = &[
    "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln", "log", "exp",
    "lg",
];

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Num(String),
    Letter(String),
    Unit,
    Cmd(String),
    Text(String),
    LBrace,
    RBrace,
    LParen,
    RParen,
    LBrack,
    RBrack,
    LSet,
    RSet,
    Plus,
    Minus,
    Star,
    Slash,
    Caret,
    Under,
    Bang,
    Pm,
    Mp,
    Rel(RelOp),
    Comma,
    Semi,
    Amp,
    RowSep,
    Colon,
    Percent,
    Pipe,
    Prime,
    Sep,
    Cup,
    Begin(String),
    End(String),
}

/// String-level clean-up before tokenising: doubled backslashes before
/// known commands, thousands separators (`{,}`, `,\!`), degree signs,
/// currency, spacing commands and Unicode operators.
pub(crate) fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '\\' && i + 1 < b.len() && b[i + 1] == '\\' {
            // `\\name` -> `\name` for known commands, else a row separator.
            let rest: String = b[i + 2..b.len().min(i + 12)].iter().collect();
            if KNOWN_COMMANDS
                .iter()
                .any(|k| rest.starts_with(k) && !rest[k.len()..].starts_with(|ch: char| ch.is_ascii_alphabetic()))
            {
                i += 1;
                continue;
            }
            out.push_str("\\\\");
            i += 2;
            continue;
        }
        match c {
            '−' | '–' => out.push('-'),
            '×' | '·' => out.push('*'),
            '÷' => out.push('/'),
            'π' => out.push_str("\\pi "),
            '∞' => out.push_str("\\infty "),
            '√' => out.push_str("\\sqrt"),
            '²' => out.push_str("^2"),
            '³' => out.push_str("^3"),
            '°' => {}
            '\u{a0}' | '\n' | '\r' | '\t' | '\u{c}' => out.push(' '),
            _ => out.push(c),
        }
        i += 1;
    }
    let mut s = out;
    for (from, to) in [
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\degree", ""),
        (",\\! ", ","),
        (",\\!", ","),
        ("\\!", ""),
        ("\\$", ""),
        ("\\displaystyle", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
        ("\\left.", ""),
        ("\\right.", ""),
        ("\\bigl", ""),
        ("\\bigr", ""),
        ("\\Bigl", ""),
        ("\\Bigr", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("\\qquad", " "),
        ("\\quad", " "),
        ("~", " "),
        ("$", " "),
    ] {
        if s.contains(from) {
            s = s.replace(from, to);
        }
    }
    // `{,}` thousands separators, also with spaces (`14 {, }916`).
    let s = remove_brace_commas(&s);
    let t = s.trim();
    // A whole answer that is one number with thousands separators.
    // A space after a comma makes a list (`12, 345`), as in Math-Verify.
    let squashed: String = t.chars().filter(|c| !c.is_whitespace()).collect();
    if !t.contains(", ") && is_thousands(&squashed) {
        return squashed.replace(',', "");
    }
    t.to_string()
}

/// Drop every `{,}` group (spaces inside or around it too).
fn remove_brace_commas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('{') {
        let after = &rest[p + 1..];
        match after.find('}') {
            Some(q) if after[..q].trim() == "," => {
                out.push_str(rest[..p].trim_end());
                rest = after[q + 1..].trim_start();
            }
            _ => {
                out.push_str(&rest[..=p]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `1,234,567.8`: 1-3 leading digits (not starting with 0 unless alone), then groups of three.
fn is_thousands(t: &str) -> bool {
    let t = t.strip_prefix('-').unwrap_or(t);
    let (int, frac) = match t.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (t, None),
    };
    if let Some(f) = frac {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    let groups: Vec<&str> = int.split(',').collect();
    groups.len() >= 2
        && groups[0].len() <= 3
        && !groups[0].is_empty()
        && !groups[0].starts_with('0')
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()))
        && groups[1..].iter().all(|g| g.len() == 3)
}

/// Read a `{...}` group starting at `b[i] == '{'`; returns its content and the index after it.
fn read_group(b: &[char], i: usize) -> Option<(String, usize)> {
    if b.get(i) != Some(&'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            '\\' => {
                j += 2;
                continue;
            }
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((b[i + 1..j].iter().collect(), j + 1));
                }
            }
            _ => {}
        }
        j += 1;
    }
    None
}

/// Tokenise a normalised answer. `None` on a character that has no meaning
/// in an answer.
pub(crate) fn tokenize(s: &str, max_tokens: usize) -> Option<Vec<Tok>> {
    let b: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if out.len() > max_tokens {
            return None;
        }
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let st = i;
            let mut dot = false;
            while i < b.len() {
                if b[i].is_ascii_digit() {
                    i += 1;
                } else if b[i] == '.' && !dot && b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    dot = true;
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(Tok::Num(b[st..i].iter().collect()));
            continue;
        }
        if c.is_ascii_alphabetic() {
            let st = i;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            let w: String = b[st..i].iter().collect();
            let lw = w.to_ascii_lowercase();
            match lw.as_str() {
                "and" | "or" => out.push(Tok::Sep),
                "percent" | "pct" => out.push(Tok::Percent),
                "pi" => out.push(Tok::Cmd("pi".into())),
                "infty" | "inf" | "infinity" => out.push(Tok::Cmd("infty".into())),
                "sqrt" => out.push(Tok::Cmd("sqrt".into())),
                _ if FUNCS.contains(&lw.as_str()) => out.push(Tok::Cmd(lw)),
                _ if w.len() >= 2 && UNITS.contains(&lw.as_str()) => out.push(Tok::Unit),
                _ => out.extend(w.chars().map(|ch| Tok::Letter(ch.to_string()))),
            }
            continue;
        }
        if c == '\\' {
            let next = b.get(i + 1).copied();
            match next {
                Some('\\') => {
                    out.push(Tok::RowSep);
                    i += 2;
                    continue;
                }
                Some('{') => {
                    out.push(Tok::LSet);
                    i += 2;
                    continue;
                }
                Some('}') => {
                    out.push(Tok::RSet);
                    i += 2;
                    continue;
                }
                Some('%') => {
                    out.push(Tok::Percent);
                    i += 2;
                    continue;
                }
                Some('|') => {
                    out.push(Tok::Pipe);
                    i += 2;
                    continue;
                }
                Some(ch) if ch.is_ascii_alphabetic() => {}
                Some(',' | ';' | '!' | ':' | ' ') => {
                    i += 2;
                    continue;
                }
                _ => return None,
            }
            let st = i + 1;
            i = st;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            let name: String = b[st..i].iter().collect();
            let tok = match name.as_str() {
                "text" | "textnormal" | "textrm" | "textbf" | "textit" | "mathrm" | "mathbf" | "mathit" | "mbox"
                | "rm" | "mathsf" | "boldsymbol" | "mathbb" | "hbox" | "textsf" => {
                    while i < b.len() && b[i] == ' ' {
                        i += 1;
                    }
                    let (content, next) = read_group(&b, i)?;
                    i = next;
                    text_token(&content)
                }
                "operatorname" => {
                    let (content, next) = read_group(&b, i)?;
                    i = next;
                    Some(Tok::Cmd(content.trim().to_string()))
                }
                "begin" | "end" => {
                    let (env, next) = read_group(&b, i)?;
                    i = next;
                    if name == "begin" && env == "array" {
                        if let Some((_, n2)) = read_group(&b, i) {
                            i = n2;
                        }
                    }
                    Some(if name == "begin" {
                        Tok::Begin(env)
                    } else {
                        Tok::End(env)
                    })
                }
                "le" | "leq" | "leqslant" => Some(Tok::Rel(RelOp::Le)),
                "ge" | "geq" | "geqslant" => Some(Tok::Rel(RelOp::Ge)),
                "lt" => Some(Tok::Rel(RelOp::Lt)),
                "gt" => Some(Tok::Rel(RelOp::Gt)),
                "neq" | "ne" => Some(Tok::Rel(RelOp::Ne)),
                "approx" | "simeq" | "sim" => Some(Tok::Rel(RelOp::Approx)),
                "in" => Some(Tok::Rel(RelOp::In)),
                "Rightarrow" | "implies" | "to" | "rightarrow" | "iff" | "Longrightarrow" | "equiv" => {
                    Some(Tok::Rel(RelOp::Eq))
                }
                "cdot" | "times" | "ast" => Some(Tok::Star),
                "div" => Some(Tok::Slash),
                "pm" => Some(Tok::Pm),
                "mp" => Some(Tok::Mp),
                "cup" => Some(Tok::Cup),
                "lbrace" => Some(Tok::LSet),
                "rbrace" => Some(Tok::RSet),
                "lvert" | "rvert" | "vert" | "mid" => Some(Tok::Pipe),
                "langle" => Some(Tok::LParen),
                "rangle" => Some(Tok::RParen),
                "dfrac" | "tfrac" | "cfrac" => Some(Tok::Cmd("frac".into())),
                "varnothing" | "emptyset" => Some(Tok::Cmd("emptyset".into())),
                "dots" | "ldots" | "cdots" | "hline" | "cline" | "limits" | "nonumber" | "notag" | "big" | "Big"
                | "bigg" | "Bigg" | "displaystyle" | "textstyle" | "quad" | "qquad" | "circ" => None,
                "and" | "text_and" => Some(Tok::Sep),
                "infty" => Some(Tok::Cmd("infty".into())),
                "percent" => Some(Tok::Percent),
                _ => Some(Tok::Cmd(name)),
            };
            if let Some(t) = tok {
                out.push(t);
            }
            continue;
        }
        let tok = match c {
            '{' => Tok::LBrace,
            '}' => Tok::RBrace,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBrack,
            ']' => Tok::RBrack,
            '+' => Tok::Plus,
            '-' => Tok::Minus,
            '*' => Tok::Star,
            '/' => Tok::Slash,
            '^' => Tok::Caret,
            '_' => Tok::Under,
            '±' => Tok::Pm,
            ',' => Tok::Comma,
            ';' => Tok::Semi,
            '&' => Tok::Amp,
            '%' => Tok::Percent,
            '|' => Tok::Pipe,
            '\'' => Tok::Prime,
            '≤' => Tok::Rel(RelOp::Le),
            '≥' => Tok::Rel(RelOp::Ge),
            '≠' => Tok::Rel(RelOp::Ne),
            '≈' => Tok::Rel(RelOp::Approx),
            '∈' => Tok::Rel(RelOp::In),
            '∪' => Tok::Cup,
            ':' => {
                if b.get(i + 1) == Some(&'=') {
                    i += 1;
                    Tok::Rel(RelOp::Eq)
                } else {
                    Tok::Colon
                }
            }
            '!' => {
                if b.get(i + 1) == Some(&'=') {
                    i += 1;
                    Tok::Rel(RelOp::Ne)
                } else {
                    Tok::Bang
                }
            }
            '<' => {
                if b.get(i + 1) == Some(&'=') {
                    i += 1;
                    Tok::Rel(RelOp::Le)
                } else {
                    Tok::Rel(RelOp::Lt)
                }
            }
            '>' => {
                if b.get(i + 1) == Some(&'=') {
                    i += 1;
                    Tok::Rel(RelOp::Ge)
                } else {
                    Tok::Rel(RelOp::Gt)
                }
            }
            '=' => {
                if matches!(b.get(i + 1), Some('>' | '<')) {
                    i += 1;
                    match b[i] {
                        // `=>`: "implies", read as the next link of a chain.
                        '>' => Tok::Rel(RelOp::Eq),
                        _ => Tok::Rel(RelOp::Le),
                    }
                } else {
                    Tok::Rel(RelOp::Eq)
                }
            }
            '.' | '?' => {
                // Trailing sentence punctuation inside a box.
                i += 1;
                continue;
            }
            ch if ch.is_alphabetic() => Tok::Letter(ch.to_string()),
            _ => return None,
        };
        out.push(tok);
        i += 1;
    }
    Some(out)
}

fn text_token(content: &str) -> Option<Tok> {
    let t = content.trim();
    let lt = t.to_ascii_lowercase();
    if t.is_empty() {
        return None;
    }
    if matches!(lt.as_str(), "and" | "or" | "," | "and/or") {
        return Some(Tok::Sep);
    }
    if matches!(lt.as_str(), "%" | "percent" | "pct") {
        return Some(Tok::Percent);
    }
    if t.chars().count() == 1 && t.chars().all(char::is_alphabetic) {
        return Some(Tok::Letter(t.to_string()));
    }
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Some(Tok::Num(t.to_string()));
    }
    Some(Tok::Text(t.to_string()))
}
