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
        let inline = open == "$" || open == "\\(";
        let mut j = body;
        let mut found = None;
        while j < b.len() {
            if inline && b[j] == b'\n' {
                // Inline math stays on one line (as in Math-Verify): an
                // answer broken across lines is not one answer.
                break;
            }
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

/// Whether two math environments next to each other form one answer:
/// only a comma, `and` or `or` between them (Math-Verify's connectors).
pub(crate) fn joins_strict(between: &str) -> bool {
    let t = between.trim();
    let t = t.strip_prefix(',').unwrap_or(t).trim();
    matches!(t, "" | "and" | "or") && !between.trim().is_empty()
}

/// The last environment and the ones before it joined by
/// [`joins_strict`].
pub(crate) fn last_env_group(spans: &[Span], s: &str) -> Vec<Span> {
    let Some(last) = spans.last() else { return Vec::new() };
    let mut group = vec![last.clone()];
    for w in spans.windows(2).rev() {
        let (a, b) = (&w[0], &w[1]);
        if b.start != group[0].start {
            break;
        }
        if a.end <= b.start && joins_strict(&s[a.end..b.start]) {
            group.insert(0, a.clone());
        } else {
            break;
        }
    }
    group
}

/// The group of environments starting with `envs[first]` and the ones after
/// it joined by [`joins_strict`].
fn env_group_from(envs: &[Span], first: usize, s: &str) -> Vec<Span> {
    let mut group = vec![envs[first].clone()];
    for w in envs[first..].windows(2) {
        if w[0].end <= w[1].start && joins_strict(&s[w[0].end..w[1].start]) {
            group.push(w[1].clone());
        } else {
            break;
        }
    }
    group
}

/// A candidate answer: its end in the text and its parts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) parts: Vec<String>,
}

fn is_expr_char(c: u8) -> bool {
    c.is_ascii_digit() || matches!(c, b'.' | b' ' | b'+' | b'-' | b'*' | b'/' | b'^' | b'(' | b')')
}

/// A number or an arithmetic expression of numbers starting at `p` (after a
/// start, a space or `=`, as Math-Verify's anchors require), not followed by
/// `=`. Stays on one line.
fn value_at(s: &str, p: usize) -> Option<Span> {
    let b = s.as_bytes();
    if p >= b.len() {
        return None;
    }
    if p > 0 && !matches!(b[p - 1], b' ' | b'=' | b'\n' | b'\t' | b'$') {
        return None;
    }
    if p > 0 && b[p - 1] == b'$' && (p < 2 || !matches!(b[p - 2], b' ' | b'=' | b'\n')) {
        return None;
    }
    let first_digit = b[p..].iter().take(3).position(|c| c.is_ascii_digit())?;
    if !b[p..p + first_digit].iter().all(|c| matches!(c, b'-' | b'(')) {
        return None;
    }
    // An expression: expression characters with an operator after the first digit.
    let mut e = p + first_digit;
    while e < b.len() && is_expr_char(b[e]) {
        e += 1;
    }
    let mut end = e;
    while end > p && !(b[end - 1].is_ascii_digit() || b[end - 1] == b')') {
        end -= 1;
    }
    let body = &s[p..end];
    let has_op = body[first_digit..]
        .bytes()
        .any(|c| matches!(c, b'+' | b'-' | b'*' | b'/' | b'^'));
    let balanced = body.matches('(').count() == body.matches(')').count();
    let followed_by_eq = |end: usize| s[end..].trim_start_matches([' ', '\t']).starts_with('=');
    if has_op && balanced && end < b.len() + 1 && !followed_by_eq(end) {
        let suffix_ok = end == b.len() || matches!(b[end], b'.' | b',' | b':' | b' ' | b')' | b'$' | b'\n');
        if suffix_ok {
            return Some(Span {
                start: p,
                end,
                content: body.trim().to_string(),
            });
        }
    }
    let num = plain_numbers(&s[p..]).into_iter().next()?;
    if num.start != 0 && !(num.start == 1 && b[p] == b'$') {
        return None;
    }
    if followed_by_eq(p + num.end) {
        return None;
    }
    Some(Span {
        start: p + num.start,
        end: p + num.end,
        content: num.content,
    })
}

fn line_end(s: &str, from: usize) -> usize {
    s[from..].find('\n').map(|i| from + i).unwrap_or(s.len())
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Candidates after one anchor ending at `at`: the first math environment
/// starting within 50 characters (with the environments joined to it), the
/// value after the last `=` within 100 characters of the line, else the
/// first value within 50 characters of the line.
fn after_anchor(s: &str, envs: &[Span], at: usize, out: &mut Vec<Candidate>) {
    let limit = floor_boundary(s, at + 50);
    if let Some(k) = envs.iter().position(|e| e.start >= at && e.start <= limit) {
        let group = env_group_from(envs, k, s);
        if let (Some(f), Some(l)) = (group.first(), group.last()) {
            out.push(Candidate {
                start: f.start,
                end: l.end,
                parts: group.iter().map(|e| e.content.clone()).collect(),
            });
        }
    }
    let eol = line_end(s, at);
    let window_eq = floor_boundary(s, (at + 101).min(eol));
    let mut found = None;
    for (i, _) in s[at..window_eq]
        .match_indices('=')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        let mut p = at + i + 1;
        while p < s.len() && s.as_bytes()[p] == b' ' {
            p += 1;
        }
        if let Some(v) = value_at(s, p) {
            found = Some(v);
            break;
        }
    }
    if found.is_none() {
        let window = floor_boundary(s, (at + 51).min(eol));
        found = (at..window)
            .filter(|&p| s.is_char_boundary(p))
            .find_map(|p| value_at(s, p));
    }
    if let Some(v) = found {
        out.push(Candidate {
            start: v.start,
            end: v.end,
            parts: vec![v.content],
        });
    }
}

/// Answers stated after an anchor, by Math-Verify's priorities: "final
/// answer ... is", then "answer:", then "answer". Within one priority the
/// candidate ending last comes first; the caller takes the first that
/// parses.
pub(crate) fn anchored(s: &str) -> Vec<Vec<Candidate>> {
    let lower = s.to_ascii_lowercase();
    let envs = math_envs(s);
    let mut levels = Vec::new();
    // "final answer is", "final answer to the question is".
    let mut level = Vec::new();
    for (i, _) in lower.match_indices("final answer") {
        let from = i + "final answer".len();
        let window = floor_boundary(s, from + 100 + 3);
        if let Some(k) = lower[from..window].find(" is") {
            let mut at = from + k + 3;
            let b = s.as_bytes();
            if at < b.len() && b[at] == b':' {
                at += 1;
            }
            while at < b.len() && b[at].is_ascii_whitespace() {
                at += 1;
            }
            if let Some(e) = envs.iter().position(|e| e.start == at) {
                let group = env_group_from(&envs, e, s);
                if let (Some(f), Some(l)) = (group.first(), group.last()) {
                    level.push(Candidate {
                        start: f.start,
                        end: l.end,
                        parts: group.iter().map(|e| e.content.clone()).collect(),
                    });
                }
            } else if let Some(v) = value_at(s, at) {
                level.push(Candidate {
                    start: v.start,
                    end: v.end,
                    parts: vec![v.content],
                });
            }
        }
    }
    levels.push(level);
    for anchor in ["answer:", "answer"] {
        let mut level = Vec::new();
        for (i, _) in lower.match_indices(anchor) {
            after_anchor(s, &envs, i + anchor.len(), &mut level);
        }
        levels.push(level);
    }
    for level in &mut levels {
        level.sort_by(|a, b| b.end.cmp(&a.end).then(a.start.cmp(&b.start)));
    }
    levels
}

/// `\frac{a}{b}` with plain numbers, outside math environments.
pub(crate) fn plain_fractions(s: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    for (i, _) in s.match_indices("\\frac{") {
        let num_ok = |t: &str| {
            let t = t.strip_prefix('-').unwrap_or(t);
            !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.' || c == ',')
        };
        let a0 = i + 6;
        let Some(a1) = s[a0..].find('}').map(|k| a0 + k) else {
            continue;
        };
        if a1 + 1 >= b.len() || b[a1 + 1] != b'{' {
            continue;
        }
        let b0 = a1 + 2;
        let Some(b1) = s[b0..].find('}').map(|k| b0 + k) else {
            continue;
        };
        if num_ok(&s[a0..a1]) && num_ok(&s[b0..b1]) {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            out.push(Span {
                start,
                end: b1 + 1,
                content: s[start..=b1].to_string(),
            });
        }
    }
    out
}
