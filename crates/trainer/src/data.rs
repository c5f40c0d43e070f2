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

/// Reads a JSONL set of math problems.
pub fn read_math_jsonl(path: &Path) -> Result<Vec<MathExample>> {
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let prompt = ["prompt", "question", "problem"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
            .ok_or_else(|| bad(path, n, "no string field `prompt`, `question` or `problem`"))?;
        let raw = ["answer", "gold"]
            .iter()
            .find_map(|k| v.get(*k).filter(|x| !x.is_null()))
            .ok_or_else(|| bad(path, n, "no field `answer` or `gold`"))?;
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
            other => {
                return Err(bad(
                    path,
                    n,
                    format!("`answer` must be a string or a number, got {other}"),
                ))
            }
        };
        if gold.is_empty() {
            return Err(bad(path, n, "empty answer"));
        }
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
