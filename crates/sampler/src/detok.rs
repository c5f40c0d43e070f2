//! Incremental detokenisation that is right when a multi-byte UTF-8
//! character spans tokens: text is released only once the decoded tail no
//! longer ends in a replacement character (U+FFFD) from an incomplete byte
//! sequence. Each step decodes a short window, not the whole completion.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Loads `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer {
        path: file.clone(),
        msg: e.to_string(),
    })
}

/// Decodes ids to text, keeping special tokens such as `<think>` (the
/// rewards read them) and dropping none.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false).map_err(|e| Error::Tokenizer {
        path: "<tokenizer>".into(),
        msg: e.to_string(),
    })
}

/// The state of one sequence's incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// New text made complete by the last token of `ids` (possibly empty).
    pub fn step(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<String> {
        let prefix = decode(tok, &ids[self.prefix_offset..self.read_offset])?;
        let full = decode(tok, &ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}
