//! Evaluation and training data: JSONL, one example a line, with the field
//! names of the public sets as they are (GSM8K `question`/`answer` with the
//! final `#### N`; MATH-500, AIME 2024 and AMC 2023 `problem`/`answer`) and
//! of the user's own sets (`prompt`, `question` or `problem`; `answer` or
//! `gold`). A bad line is an error naming the file and line.

use std::io::BufRead;
use std::path::Path;

use crate::error::{io_err, Error, Result};

/// One problem with its reference answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MathExample {
    /// The question text.
    pub prompt: String,
    /// The reference final answer (LaTeX or plain).
    pub gold: String,
}

fn bad(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Other(format!("{}:{line}: {msg}", path.display()))
}

/// The JSON values of a JSONL file with their 1-based line numbers, blank
/// lines skipped; a line that is not JSON is an error naming file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line).map_err(|e| bad(path, n, format!("not valid JSON: {e}")))?;
        out.push((n, v));
    }
    Ok(out)
}

/// The reference answer of a row: `answer` or `gold` as text (a GSM8K
/// solution reduced to its final `#### N`, a whole-number float written
/// without `.0`); `Ok(None)` when the row has neither.
fn gold_of_row(v: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    let Some(raw) = ["answer", "gold"]
        .iter()
        .find_map(|k| v.get(*k).filter(|x| !x.is_null()))
    else {
        return Ok(None);
    };
    let gold = match raw {
        serde_json::Value::String(s) => match s.rfind("####") {
            // GSM8K: a worked solution whose last line is `#### N`.
            Some(at) => s[at + 4..].trim().replace(',', ""),
            None => s.trim().to_string(),
        },
        serde_json::Value::Number(x) => match x.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => x.to_string(),
        },
        other => return Err(format!("`answer` must be a string or a number, got {other}")),
    };
    if gold.is_empty() {
        return Err("empty answer".into());
    }
    Ok(Some(gold))
}

fn prompt_of_row(v: &serde_json::Value) -> Option<&str> {
    ["prompt", "question", "problem"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
}

/// Reads a JSONL set of math problems.
pub fn read_math_jsonl(path: &Path) -> Result<Vec<MathExample>> {
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let prompt =
            prompt_of_row(&v).ok_or_else(|| bad(path, n, "no string field `prompt`, `question` or `problem`"))?;
        let gold = gold_of_row(&v)
            .map_err(|e| bad(path, n, e))?
            .ok_or_else(|| bad(path, n, "no field `answer` or `gold`"))?;
        out.push(MathExample {
            prompt: prompt.to_string(),
            gold,
        });
    }
    if out.is_empty() {
        return Err(Error::Other(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// One training prompt with its whole dataset row, for the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The question text (`prompt`, `question` or `problem`).
    pub prompt: String,
    /// Every field of the line (`tests`, `nums`, `target`, `language`, ...),
    /// plus `prompt` (the question text) and `gold` (the reference answer
    /// read from `answer` or `gold`, GSM8K's `#### N` reduced) when the line
    /// has one.
    pub example: aha_rewards::Example,
}

/// Reads a JSONL set of prompts with their rows; `need_gold`: a line
/// without an `answer` or `gold` field is an error naming file and line.
pub fn read_rows_jsonl(path: &Path, need_gold: bool) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let prompt = prompt_of_row(&v)
            .ok_or_else(|| bad(path, n, "no string field `prompt`, `question` or `problem`"))?
            .to_string();
        let gold = gold_of_row(&v).map_err(|e| bad(path, n, e))?;
        if need_gold && gold.is_none() {
            return Err(bad(
                path,
                n,
                "no field `answer` or `gold` (an accuracy reward needs one)",
            ));
        }
        let serde_json::Value::Object(mut example) = v else {
            return Err(bad(path, n, "not a JSON object"));
        };
        example.insert("prompt".into(), prompt.clone().into());
        if let Some(g) = gold {
            example.insert("gold".into(), g.into());
        }
        out.push(Row { prompt, example });
    }
    if out.is_empty() {
        return Err(Error::Other(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

/// The unbiased pass@k estimator (Chen et al. 2021) from `n` samples of
/// which `c` are correct: `1 - C(n - c, k) / C(n, k)`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // prod_{i = n-c+1}^{n} (1 - k / i), computed stably.
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}
