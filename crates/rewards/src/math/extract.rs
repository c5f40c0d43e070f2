//! Finding the final answer in a completion.

/// A span of the text and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) content: String,
}

/// Every `\boxed{...}` / `\fbox{...}` with matched braces, in order.
/// Unclosed boxes are skipped.
pub(crate) fn boxes(s: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(off) = find_any(&s[i..], &["\\boxed", "\\fbox"]) {
        let start = i + off.0;
        let mut j = start + off.1;
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        if j < bytes.len() && bytes[j] == b'{' {
            if let Some(end) = match_brace(bytes, j) {
                out.push(Span {
                    start,
                    end: end + 1,
                    content: s[j + 1..end].to_string(),
                });
                i = end + 1;
                continue;
            }
        } else if j > start + off.1 || (j < bytes.len() && bytes[j].is_ascii_alphanumeric()) {
            // `\boxed 5`: up to the next space or `$`.
            let st = j;
            while j < bytes.len() && !matches!(bytes[j], b' ' | b'$' | b'\n') {
                j += 1;
            }
            if j > st {
                out.push(Span {
                    start,
                    end: j,
                    content: s[st..j].to_string(),
                });
            }
        }
        i = (start + off.1).min(s.len());
    }
    out
}

fn find_any(s: &str, pats: &[&str]) -> Option<(usize, usize)> {
    pats.iter()
        .filter_map(|p| s.find(p).map(|i| (i, p.len())))
        .min_by_key(|x| x.0)
}

/// Index of the `}` matching the `{` at `open`, skipping escaped braces.
fn match_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = open;
    while j < b.len() {
        match b[j] {
            b'\\' => {
                j += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
        j += 1;
    }
    None
}

/// The content of the last `<answer>...</answer>`.
pub(crate) fn answer_tag(s: &str) -> Option<Span> {
    let st = s.rfind("<answer>")?;
    let body = st + "<answer>".len();
    let end = s[body..].find("</answer>")? + body;
    Some(Span {
        start: st,
        end: end + "</answer>".len(),
        content: s[body..end].to_string(),
    })
}

/// Math environments `$$..$$`, `$..$`, `\(..\)`, `\[..\]`, in order.
pub(crate) fn math_envs(s: &str) -> Vec<Span> {
    let b = s.as_bytes();
    let at = |i: usize, p: &str| b[i..].starts_with(p.as_bytes());
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (open, close): (&str, &str) = if at(i, "$$") {
            ("$$", "$$")
        } else if b[i] == b'$' && (i == 0 || b[i - 1] != b'\\') {
            ("$", "$")
        } else if at(i, "\\(") {
            ("\\(", "\\)")
        } else if at(i, "\\[") {
            ("\\[", "\\]")
        } else {
            i += 1;
            continue;
        };
        let body = i + open.len();
        let mut j = body;
        let mut found = None;
        while j < b.len() {
            if close == "$" && at(j, "\\$") {
                j += 2;
                continue;
            }
            if close == "$" && at(j, "$$") {
                break;
            }
            if at(j, close) {
                found = Some(j);
                break;
            }
            j += 1;
        }
        match found {
            Some(e) if e > body => {
                out.push(Span {
                    start: i,
                    end: e + close.len(),
                    content: s[body..e].to_string(),
                });
                i = e + close.len();
            }
            Some(e) => i = e + close.len(),
            None => i += open.len(),
        }
    }
    out
}

/// The text after the last "final answer is" / "the answer is", up to the
/// end of its sentence (or its math environment).
pub(crate) fn final_answer_phrase(s: &str) -> Option<Span> {
    let lower = s.to_ascii_lowercase();
    let (pos, len) = ["final answer is", "the answer is", "final answer:"]
        .iter()
        .filter_map(|p| lower.rfind(p).map(|i| (i, p.len())))
        .max_by_key(|x| x.0)?;
    let mut st = pos + len;
    let b = s.as_bytes();
    while st < b.len() && matches!(b[st], b' ' | b':' | b'\n') {
        st += 1;
    }
    let rest = &s[st..];
    if let Some(env) = math_envs(rest).into_iter().next() {
        if env.start == 0 {
            return Some(Span {
                start: st,
                end: st + env.end,
                content: env.content,
            });
        }
    }
    let end = [". ", ".\n", "\n", "<|"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
        .unwrap_or(rest.len());
    let content = rest[..end].trim().trim_end_matches('.').to_string();
    if content.is_empty() || content.chars().count() > 200 {
        return None;
    }
    Some(Span {
        start: st,
        end: st + end,
        content,
    })
}

/// Numbers in free text, normalised (`1,000.99` -> `1000.99`, `2,74` ->
/// `2.74`, `1 000` -> `1000`, `.4` -> `.4`), with a `%` when followed by
/// `%`, `percent` or `pct`.
pub(crate) fn plain_numbers(s: &str) -> Vec<Span> {
    let c: Vec<(usize, char)> = s.char_indices().collect();
    let n = c.len();
    let digit = |k: usize| k < n && c[k].1.is_ascii_digit();
    let mut out = Vec::new();
    let mut k = 0;
    while k < n {
        let lead_dot = c[k].1 == '.' && digit(k + 1) && (k == 0 || !c[k - 1].1.is_ascii_digit());
        if !(digit(k) || lead_dot) || (k > 0 && (c[k - 1].1.is_ascii_alphabetic() || c[k - 1].1 == '_')) {
            k += 1;
            continue;
        }
        let neg = k > 0 && c[k - 1].1 == '-' && (k < 2 || !c[k - 2].1.is_ascii_alphanumeric());
        let start = if neg { k - 1 } else { k };
        let mut j = k;
        while digit(j) {
            j += 1;
        }
        let int_len = j - k;
        let mut text: String = c[k..j].iter().map(|x| x.1).collect();
        // Thousands groups with ',' or ' '.
        let first_ok = (1..=3).contains(&int_len) && c[k].1 != '0';
        let mut grouped = false;
        for sep in [',', ' '] {
            if !first_ok || grouped {
                break;
            }
            let mut g = j;
            let mut groups = 0;
            while g + 3 < n + 1
                && g < n
                && c[g].1 == sep
                && digit(g + 1)
                && digit(g + 2)
                && digit(g + 3)
                && !digit(g + 4)
            {
                g += 4;
                groups += 1;
            }
            // `1,234` followed by `,5` would be a list: not a number.
            if groups > 0 && !(sep == ',' && g + 1 < n && c[g].1 == ',' && digit(g + 1)) {
                text = c[k..g].iter().map(|x| x.1).filter(|ch| ch.is_ascii_digit()).collect();
                j = g;
                grouped = true;
            }
        }
        // Decimal part: '.' always; ',' (decimal comma) when not a list.
        if j < n && (c[j].1 == '.' || (c[j].1 == ',' && !grouped)) && digit(j + 1) {
            let mut e = j + 1;
            while digit(e) {
                e += 1;
            }
            // A decimal comma needs two digits after it or a zero before it
            // (`1,22`, `0,5`); `-2,1` is a list.
            let short_frac = e - (j + 1) < 2 && !(int_len == 1 && c[k].1 == '0');
            let list_like = c[j].1 == ','
                && (short_frac || (e < n && c[e].1 == ',' && digit(e + 1)) || (start > 1 && c[start - 1].1 == ','));
            if !list_like {
                text.push('.');
                text.extend(c[j + 1..e].iter().map(|x| x.1));
                j = e;
            }
        }
        if lead_dot {
            text = c[k..j].iter().map(|x| x.1).collect();
        }
        if neg {
            text.insert(0, '-');
        }
        // Percent suffix.
        let mut e = j;
        while e < n && c[e].1 == ' ' {
            e += 1;
        }
        let tail: String = c[e..n.min(e + 8)].iter().map(|x| x.1).collect();
        let mut end = j;
        for (p, len) in [("\\%", 2), ("%", 1), ("percent", 7), ("pct", 3)] {
            if tail.starts_with(p) {
                text.push('%');
                end = e + len;
                break;
            }
        }
        let byte_start = c[start].0;
        let byte_end = if end < n { c[end].0 } else { s.len() };
        out.push(Span {
            start: byte_start,
            end: byte_end,
            content: text,
        });
        k = end.max(k + 1);
    }
    out
}

/// Whether two answers next to each other belong together (`\boxed{1}
/// and \boxed{2}`, `$1$, $2$`): the text between them is at most three short
/// words with no sentence end.
pub(crate) fn joins(between: &str) -> bool {
    let mut t = between.to_string();
    for p in [
        "\\text{",
        "\\mathrm{",
        "\\quad",
        "\\qquad",
        "\\(",
        "\\)",
        "\\[",
        "\\]",
        "$",
        "}",
        "{",
        ",",
        ";",
        "\\,",
        "\\ ",
    ] {
        t = t.replace(p, " ");
    }
    if t.contains('.') || t.contains(':') || between.contains("\n\n") || t.contains('\\') {
        return false;
    }
    t.split_whitespace().count() <= 3
}

/// The last item and the items before it that join with it.
pub(crate) fn last_group(spans: &[Span], s: &str) -> Vec<Span> {
    let Some(last) = spans.last() else { return Vec::new() };
    let mut group = vec![last.clone()];
    for w in spans.windows(2).rev() {
        let (a, b) = (&w[0], &w[1]);
        if b.start != group[0].start {
            break;
        }
        if a.end <= b.start && joins(&s[a.end..b.start]) {
            group.insert(0, a.clone());
        } else {
            break;
        }
    }
    group
}
