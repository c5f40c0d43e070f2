//! Evaluation and training data: JSONL, one example a line, or Parquet, one
//! example a row (as the Hugging Face hub stores datasets), with the field
//! names of the public sets as they are (GSM8K `question`/`answer` with the
//! final `#### N`; MATH-500, AIME 2024 and AMC 2023 `problem`/`answer`) and
//! of the user's own sets (`prompt`, `question` or `problem`; `answer` or
//! `gold`). A bad line is an error naming the file and line; in a Parquet
//! file the "line" is the 1-based row.

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
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg: msg.to_string(),
    }
}

/// The records of a data file as JSON values with their 1-based line
/// numbers: a `.parquet` file is read as Parquet (see [`read_parquet`]),
/// anything else as JSONL, blank lines skipped; a line that is not JSON is an
/// error naming file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    if is_parquet(path) {
        return read_parquet(path);
    }
    read_record_lines(path)?
        .into_iter()
        .map(|(n, line)| {
            serde_json::from_str(&line)
                .map(|v| (n, v))
                .map_err(|e| bad(path, n, format!("not valid JSON: {e}")))
        })
        .collect()
}

/// The records of a data file as their JSON text with 1-based line
/// numbers, for readers that parse the JSON themselves (to keep the
/// written order of object keys, for example): a JSONL file's non-blank
/// lines as written, a `.parquet` file's rows as JSON objects.
pub fn read_record_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    if is_parquet(path) {
        return Ok(read_parquet(path)?
            .into_iter()
            .map(|(n, v)| (n, v.to_string()))
            .collect());
    }
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| bad(path, i + 1, format!("read error: {e}")))?;
        if !line.trim().is_empty() {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

/// Whether `path` names a Parquet file (by its `.parquet` extension).
pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The rows of a Parquet file as JSON objects (column name to value; lists
/// and structs nested; binary columns base64), numbered from 1, over every
/// row group. Pages may be uncompressed or snappy-compressed, as the Hugging
/// Face hub writes them; another codec, or a file that is not Parquet, is an
/// error naming the file (and the row, where one row fails).
pub fn read_parquet(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(f).map_err(|e| Error::DataFile {
        path: path.to_path_buf(),
        msg: format!("not a readable Parquet file: {e}"),
    })?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::DataFile {
        path: path.to_path_buf(),
        msg: format!("reading Parquet rows: {e}"),
    })?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| {
            let msg = e.to_string();
            match msg.split("Disabled feature at compile time: ").nth(1) {
                Some(codec) => bad(
                    path,
                    n,
                    format!("pages compressed with {codec}, which aha does not read (it reads uncompressed and snappy pages; rewrite the file with one of those, e.g. pyarrow's `compression=\"snappy\"`)"),
                ),
                None => bad(path, n, format!("Parquet row: {msg}")),
            }
        })?;
        out.push((n, row.to_json_value()));
    }
    Ok(out)
}

/// Which fields of a line hold the question and the reference answer, for
/// sets with other names (TRL reads a fixed `prompt` column; here
/// `prompt_field` / `answer_field`). `None`: the usual names (`prompt`,
/// `question` or `problem`; `answer` or `gold`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// The question's field.
    pub prompt: Option<String>,
    /// The reference answer's field.
    pub answer: Option<String>,
}

impl Fields {
    fn prompt_names(&self) -> String {
        match &self.prompt {
            Some(f) => format!("`{f}`"),
            None => "`prompt`, `question` or `problem`".into(),
        }
    }

    fn answer_names(&self) -> String {
        match &self.answer {
            Some(f) => format!("`{f}`"),
            None => "`answer` or `gold`".into(),
        }
    }
}

/// The reference answer of a row: `answer` or `gold` (or the field
/// `fields.answer` names) as text (a GSM8K solution reduced to its final
/// `#### N`, a whole-number float written without `.0`); `Ok(None)` when
/// the row has none.
fn gold_of_row(v: &serde_json::Value, fields: &Fields) -> std::result::Result<Option<String>, String> {
    let default = ["answer", "gold"];
    let names: Vec<&str> = match &fields.answer {
        Some(f) => vec![f.as_str()],
        None => default.to_vec(),
    };
    let Some(raw) = names.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null())) else {
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
        other => {
            return Err(format!(
                "{} must be a string or a number, got {other}",
                fields.answer_names()
            ))
        }
    };
    if gold.is_empty() {
        return Err("empty answer".into());
    }
    Ok(Some(gold))
}

fn prompt_of_row<'a>(v: &'a serde_json::Value, fields: &Fields) -> Option<&'a str> {
    match &fields.prompt {
        Some(f) => v.get(f.as_str()).and_then(|x| x.as_str()),
        None => ["prompt", "question", "problem"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str())),
    }
}

/// Reads a JSONL set of math problems.
pub fn read_math_jsonl(path: &Path) -> Result<Vec<MathExample>> {
    read_math_jsonl_fields(path, &Fields::default())
}

/// [`read_math_jsonl`] with the question and answer in the fields `fields` names.
pub fn read_math_jsonl_fields(path: &Path, fields: &Fields) -> Result<Vec<MathExample>> {
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let prompt = prompt_of_row(&v, fields)
            .ok_or_else(|| bad(path, n, format!("no string field {}", fields.prompt_names())))?;
        let gold = gold_of_row(&v, fields)
            .map_err(|e| bad(path, n, e))?
            .ok_or_else(|| bad(path, n, format!("no field {}", fields.answer_names())))?;
        out.push(MathExample {
            prompt: prompt.to_string(),
            gold,
        });
    }
    if out.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
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
    read_rows_jsonl_fields(path, need_gold, &Fields::default())
}

/// [`read_rows_jsonl`] with the question and answer in the fields `fields` names.
pub fn read_rows_jsonl_fields(path: &Path, need_gold: bool, fields: &Fields) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let prompt = prompt_of_row(&v, fields)
            .ok_or_else(|| bad(path, n, format!("no string field {}", fields.prompt_names())))?
            .to_string();
        let gold = gold_of_row(&v, fields).map_err(|e| bad(path, n, e))?;
        if need_gold && gold.is_none() {
            return Err(bad(
                path,
                n,
                format!("no field {} (an accuracy reward needs one)", fields.answer_names()),
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
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
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

/// Where a run stands in its data: epochs without replacement, each a
/// permutation of the set drawn from the seed and the epoch number (so the
/// cursor alone, saved in a checkpoint, gives the rest of the order back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Completed passes over the set.
    pub epoch: u64,
    /// Items of the current epoch's order already taken.
    pub position: usize,
}

/// The order of epoch `epoch` over `n` items under `seed` (Fisher-Yates).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = crate::toy::Rng::new(seed ^ (epoch.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

impl Cursor {
    /// The next `k` item indices of a set of `n` (`n` > 0), moving to the
    /// next epoch's order when one ends.
    pub fn take(&mut self, n: usize, k: usize, seed: u64) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        if n == 0 {
            return out;
        }
        let mut order = epoch_order(n, seed, self.epoch);
        while out.len() < k {
            if self.position >= n {
                self.epoch += 1;
                self.position = 0;
                order = epoch_order(n, seed, self.epoch);
            }
            out.push(order[self.position]);
            self.position += 1;
        }
        out
    }

    /// Epochs done as a fraction (TRL's `epoch`).
    pub fn fraction(&self, n: usize) -> f64 {
        self.epoch as f64 + self.position as f64 / n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_takes_every_item_once_and_a_saved_cursor_continues_the_order() {
        let (n, seed) = (7, 3);
        let mut c = Cursor::default();
        let all: Vec<usize> = (0..10).flat_map(|_| c.take(n, 3, seed)).collect();
        for e in 0..4 {
            let mut epoch: Vec<usize> = all[e * n..(e + 1) * n].to_vec();
            epoch.sort_unstable();
            assert_eq!(epoch, (0..n).collect::<Vec<_>>(), "epoch {e}");
        }
        assert_ne!(all[..n], all[n..2 * n], "epochs reshuffle");
        assert_eq!(c, Cursor { epoch: 4, position: 2 });
        // Resume from the cursor after 4 takes: the same continuation.
        let mut a = Cursor::default();
        for _ in 0..4 {
            a.take(n, 3, seed);
        }
        let saved: Cursor = serde_json::from_value(serde_json::to_value(a).unwrap()).unwrap();
        let mut b = saved;
        let rest: Vec<usize> = (0..6).flat_map(|_| b.take(n, 3, seed)).collect();
        assert_eq!(rest, all[12..30]);
        assert_eq!(rest, (0..6).flat_map(|_| a.take(n, 3, seed)).collect::<Vec<_>>());
    }

    #[test]
    fn other_field_names_are_read_and_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("aha-fields-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("q.jsonl");
        std::fs::write(
            &p,
            "{\"input\": \"1+1=\", \"target\": 2, \"answer\": \"9\"}\n{\"input\": \"2+2=\"}\n",
        )
        .unwrap();
        let f = Fields {
            prompt: Some("input".into()),
            answer: Some("target".into()),
        };
        let rows = read_rows_jsonl_fields(&p, false, &f).unwrap();
        assert_eq!(rows[0].prompt, "1+1=");
        assert_eq!(rows[0].example["gold"], serde_json::json!("2"));
        let e = read_math_jsonl_fields(&p, &f).unwrap_err().to_string();
        assert!(e.contains("q.jsonl:2") && e.contains("`target`"), "{e}");
        let e = read_rows_jsonl(&p, false).unwrap_err().to_string();
        assert!(e.contains("q.jsonl:1") && e.contains("`prompt`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
