//! Chat templates: prompts rendered the way `transformers`'
//! `tokenizer.apply_chat_template(messages, tokenize=False, ...)` renders
//! them, from the model folder's `chat_template.jinja` or the
//! `chat_template` of its `tokenizer_config.json`.
//!
//! The engine is minijinja, set up like transformers' `_compile_jinja_template`:
//! `trim_blocks` and `lstrip_blocks` on, trailing newline dropped, loop
//! controls (`{% break %}`), Python string and dict methods (`.strip()`,
//! `.split()`, `.startswith()`, `.items()`, ...), and the three globals HF
//! adds: `raise_exception(msg)`, a `tojson` filter that is `json.dumps` with
//! `ensure_ascii=False` (not Jinja's HTML-escaping one), and
//! `strftime_now(fmt)`. The template sees `messages`, `tools` and
//! `documents` (none unless given), `add_generation_prompt`, the special
//! tokens (`bos_token`, `eos_token`, ...) and any extra keyword variables
//! such as `enable_thinking`.
//!
//! ```
//! use aha_sampler::chat::{json_value, ChatTemplate};
//!
//! let t = ChatTemplate::new(
//!     "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}{% endfor %}\
//!      {% if add_generation_prompt %}<assistant>{% endif %}",
//!     "inline",
//! )?;
//! let messages = json_value(r#"[{"role": "user", "content": " 2 + 2? "}]"#)?;
//! assert_eq!(t.render(&messages, true, &[])?, "<user>2 + 2?<assistant>");
//! # Ok::<(), aha_sampler::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, ErrorKind};

use crate::error::{Error, Result};

/// The kind of a [`Value`] (string, sequence, map, ...).
pub use minijinja::value::ValueKind;
/// A value as templates see it (messages, tools, extra variables).
pub use minijinja::Value;

/// The R1-Zero prompt template of the DeepSeek-R1 report (its Table 1);
/// `{prompt}` is where the question goes.
pub const R1_ZERO: &str = "A conversation between User and Assistant. The user asks a question, and the \
Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user \
with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, \
respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:";

/// The R1-Zero template with `prompt` in place of `{prompt}`.
pub fn render_r1_zero(prompt: &str) -> String {
    R1_ZERO.replace("{prompt}", prompt)
}

/// Special tokens that transformers passes to templates when the tokenizer
/// has them (`tokenizer.special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Parses JSON text into a template [`Value`], keeping object keys in their
/// written order (so `tojson` writes tools back as they were given).
pub fn json_value(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("not valid JSON: {e}")))
}

/// A compiled chat template and the special tokens it renders with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (a file path, usually).
    /// A syntax error is an [`Error::Template`] naming `origin`.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let mut env = hf_environment();
        env.add_template_owned(origin.clone(), source.clone())
            .map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            source,
            origin,
            special_tokens: BTreeMap::new(),
        })
    }

    /// Sets a special token variable such as `bos_token` or `eos_token`.
    pub fn with_special_token(mut self, name: &str, content: &str) -> Self {
        self.special_tokens.insert(name.to_string(), content.to_string());
        self
    }

    /// The default template of a model folder: `chat_template.jinja` if the
    /// folder has one, else `chat_template` of `tokenizer_config.json` (a
    /// string, or a list of `{name, template}` whose `"default"` is taken).
    /// Special tokens come from `tokenizer_config.json` when present.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_named(dir, None)
    }

    /// Like [`ChatTemplate::load`], choosing the template called `name` from
    /// a named list in `tokenizer_config.json` (`None` means `"default"`).
    pub fn load_named(dir: &Path, name: Option<&str>) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| Error::Template {
                origin: config_path.display().to_string(),
                msg: format!("not valid JSON: {e}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::Template {
                    origin: config_path.display().to_string(),
                    msg: e.to_string(),
                })
            }
        };
        let jinja_path = dir.join("chat_template.jinja");
        let mut template = if name.is_none_or(|n| n == "default") && jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path).map_err(|e| Error::Template {
                origin: jinja_path.display().to_string(),
                msg: e.to_string(),
            })?;
            Self::new(source, jinja_path.display().to_string())?
        } else {
            let origin = config_path.display().to_string();
            let Some(config) = &config else {
                return Err(Error::Template {
                    origin: dir.display().to_string(),
                    msg: "no chat_template.jinja and no tokenizer_config.json".into(),
                });
            };
            let source = pick_template(config.get("chat_template"), name).map_err(|msg| Error::Template {
                origin: origin.clone(),
                msg,
            })?;
            Self::new(source, origin)?
        };
        if let Some(config) = &config {
            for key in SPECIAL_TOKENS {
                if let Some(content) = token_content(config.get(key)) {
                    template = template.with_special_token(key, content);
                }
            }
        }
        Ok(template)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (the name used in errors).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A special token's text (`bos_token`, `eos_token`, ...), if set.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).map(String::as_str)
    }

    /// Renders `messages` (a list of objects with `role` and `content`, and
    /// any other fields such as `tool_calls`). `extra` holds keyword
    /// variables (`enable_thinking`, `tools`, ...) and overrides special
    /// tokens of the same name, as in transformers.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool, extra: &[(&str, Value)]) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        for (k, v) in extra {
            ctx.insert((*k).to_string(), v.clone());
        }
        let tmpl = self
            .env
            .get_template(&self.origin)
            .map_err(|e| template_error(&self.origin, &e))?;
        tmpl.render(Value::from_pairs(ctx))
            .map_err(|e| template_error(&self.origin, &e))
    }

    /// Renders one user turn, `[{"role": "user", "content": prompt}]`, with
    /// the generation prompt: what `aha generate --template chat` feeds the
    /// model.
    pub fn render_user_prompt(&self, prompt: &str) -> Result<String> {
        let message = Value::from_pairs([("role", Value::from("user")), ("content", Value::from(prompt))]);
        self.render(&Value::from(vec![message]), true, &[])
    }
}

/// The template text from `chat_template`: a string, or a list of
/// `{name, template}` from which `name` (default `"default"`) is taken.
fn pick_template(v: Option<&serde_json::Value>, name: Option<&str>) -> std::result::Result<String, String> {
    let want = name.unwrap_or("default");
    match v {
        None | Some(serde_json::Value::Null) => Err("no chat_template".into()),
        Some(serde_json::Value::String(s)) => match name {
            None | Some("default") => Ok(s.clone()),
            Some(n) => Err(format!("chat_template is a single template, no template named {n:?}")),
        },
        Some(serde_json::Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let n = item.get("name").and_then(|x| x.as_str());
                let t = item.get("template").and_then(|x| x.as_str());
                match (n, t) {
                    (Some(n), Some(t)) if n == want => return Ok(t.to_string()),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => return Err("chat_template list items need string `name` and `template`".into()),
                }
            }
            Err(format!("no chat template named {want:?} (have {names:?})"))
        }
        Some(_) => Err("chat_template must be a string or a list of {name, template}".into()),
    }
}

/// A special token's text: a string, or an AddedToken-style object with
/// `content`.
fn token_content(v: Option<&serde_json::Value>) -> Option<&str> {
    match v? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

fn template_error(origin: &str, e: &minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    Error::Template {
        origin: origin.to_string(),
        msg,
    }
}

/// minijinja configured like transformers' `_compile_jinja_template`.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Built from constants that are valid, so this cannot fail; fall back to
    // the default syntax rather than panic if it ever did.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
    {
        env.set_syntax(syntax);
    }
    // HF renders with autoescape off whatever the file is called.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC) formatted with Python's
/// `strftime` directives.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

/// Formats UNIX time `secs` (UTC) with the common `strftime` directives
/// (`%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%`, and glibc's `%-d`
/// style unpadded forms); unknown directives are kept as written.
pub fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (tod / 3600, tod % 3600 / 60, tod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let month = MONTHS[(m - 1) as usize];
    let day = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |v: i64, w: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0w$}")
            }
        };
        let s = match spec {
            'Y' => y.to_string(),
            'y' => num(y.rem_euclid(100), 2),
            'm' => num(m, 2),
            'd' => num(d, 2),
            'e' => format!("{d:2}"),
            'H' => num(hh, 2),
            'I' => num(h12, 2),
            'M' => num(mm, 2),
            'S' => num(ss, 2),
            'j' => num(yday, 3),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            'B' => month.to_string(),
            'b' | 'h' => month[..3].to_string(),
            'A' => day.to_string(),
            'a' => day[..3].to_string(),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&s);
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Options of `json.dumps` that HF's `tojson` exposes.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each overridable by keyword.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent_v: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent_v {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(n.max(0) as usize))
        }
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer, a string or none",
                ))
            }
        },
    };
    // Python's defaults: (', ', ': ') without indent, (',', ': ') with it.
    let (mut item_sep, mut key_sep) = if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    if let Some(seps) = separators.filter(|s| !s.is_none()) {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match (
            parts.first().and_then(|p| p.as_str()),
            parts.get(1).and_then(|p| p.as_str()),
        ) {
            (Some(a), Some(b)) if parts.len() == 2 => {
                item_sep = a.to_string();
                key_sep = b.to_string();
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings",
                ))
            }
        }
    }
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if depth > 500 {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: nesting too deep",
        ));
    }
    match v.kind() {
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: Object of type Undefined is not JSON serializable",
            ))
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&python_float_repr(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String | ValueKind::Bytes => write_json_str(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort_by_key(key_string);
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                write_json_str(out, &key_string(k), style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &v.get_item(k)?, style, depth + 1)?;
            }
            newline(out, style, depth);
            out.push('}');
        }
        _ => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, style, depth);
            out.push(']');
        }
    }
    Ok(())
}

fn newline(out: &mut String, style: &JsonStyle, depth: usize) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

/// A map key as `json.dumps` writes it: strings as they are, other
/// scalars as their JSON text.
fn key_string(k: &Value) -> String {
    match k.as_str() {
        Some(s) => s.to_string(),
        None if k.is_none() => "null".into(),
        None if k.kind() == ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        None => k.to_string(),
    }
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, in fixed
/// notation for exponents in [-4, 16) (always with a fractional part), else
/// `d.ddde+XX`.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (21.5, "21.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.125, "123456789.125"),
            (-2.5e20, "-2.5e+20"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:45:09 UTC, a Friday (checked with Python's datetime).
        let t = 1_722_001_509;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %p %j %%", t),
            "Friday July 26, 13:45:09 PM 208 %"
        );
    }
}
