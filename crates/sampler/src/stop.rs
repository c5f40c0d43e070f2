//! What both engines do with a sequence after each sampled token: the
//! stop rules (a stop string in the incrementally decoded text, an
//! end-of-sequence id, `max_new_tokens`), in that order, and the finished
//! sequence turned into a [`Completion`]. The CPU [`Engine`](crate::Engine)
//! and the [`GpuEngine`](crate::GpuEngine) differ in how they batch and
//! cache; what ends a sequence and what it returns is this one piece.

use tokenizers::Tokenizer;

use crate::detok::{decode, Detokenizer};
use crate::engine::{Completion, EngineConfig, FinishReason};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;

/// What a sequence has produced so far: its tokens and their log-probs,
/// and the text decoded incrementally (with a tokenizer).
#[derive(Default)]
pub(crate) struct Output {
    /// Index of its prompt.
    pub(crate) prompt: usize,
    /// Which of the prompt's samples it is.
    pub(crate) sample: usize,
    /// Sampled token ids.
    pub(crate) tokens: Vec<u32>,
    /// The log-prob of each.
    pub(crate) logprobs: Vec<f32>,
    detok: Detokenizer,
    text: String,
}

impl Output {
    /// Sample `sample` of prompt `prompt`, nothing generated yet.
    pub(crate) fn new(prompt: usize, sample: usize) -> Output {
        Output {
            prompt,
            sample,
            ..Output::default()
        }
    }

    /// Appends a sampled token.
    pub(crate) fn push(&mut self, token: u32, logprob: f32) {
        self.tokens.push(token);
        self.logprobs.push(logprob);
    }
}

/// A request's stop rules: the engine's end-of-sequence ids with the
/// request's `stop_token_ids`, its stop strings (with a tokenizer) and
/// `max_new_tokens`.
pub(crate) struct StopRules<'a> {
    tokenizer: Option<&'a Tokenizer>,
    eos: Vec<u32>,
    params: &'a SamplingParams,
}

impl<'a> StopRules<'a> {
    /// The rules of `params` for an engine whose end-of-sequence ids are
    /// `eos`.
    pub(crate) fn new(tokenizer: Option<&'a Tokenizer>, eos: &[u32], params: &'a SamplingParams) -> StopRules<'a> {
        let mut eos = eos.to_vec();
        eos.extend_from_slice(&params.stop_token_ids);
        StopRules { tokenizer, eos, params }
    }

    /// Why `out` ends after its newest token, if it does.
    pub(crate) fn check(&self, out: &mut Output) -> Result<Option<FinishReason>> {
        stop_rule(
            self.tokenizer,
            &self.eos,
            self.params,
            &out.tokens,
            &mut out.detok,
            &mut out.text,
        )
    }

    /// `out` as a completion that ended for `reason`.
    pub(crate) fn completion(&self, out: Output, reason: FinishReason) -> Result<Completion> {
        let text = completion_text(self.tokenizer, reason, &out.tokens, out.text)?;
        Ok(Completion {
            prompt_index: out.prompt,
            sample_index: out.sample,
            token_ids: out.tokens,
            text,
            logprobs: out.logprobs,
            finish_reason: reason,
        })
    }

    /// Applies the rules to every sequence of `live` after a step: a
    /// finished one is handed to `finish` (which frees what it holds),
    /// then leaves `live` as a completion appended to `done`; the others
    /// stay, in order. `output` reaches a sequence's [`Output`].
    pub(crate) fn retire<S>(
        &self,
        live: &mut Vec<S>,
        done: &mut Vec<Completion>,
        output: impl Fn(&mut S) -> &mut Output,
        mut finish: impl FnMut(&S),
    ) -> Result<()> {
        let mut keep = Vec::with_capacity(live.len());
        for mut s in live.drain(..) {
            match self.check(output(&mut s))? {
                Some(r) => {
                    finish(&s);
                    let out = std::mem::take(output(&mut s));
                    done.push(self.completion(out, r)?);
                }
                None => keep.push(s),
            }
        }
        *live = keep;
        Ok(())
    }
}

/// The end-of-sequence ids of an engine: the model config's and `extra`,
/// sorted, without repeats.
pub(crate) fn engine_eos(config: &[u32], extra: &[u32]) -> Vec<u32> {
    let mut eos = config.to_vec();
    eos.extend_from_slice(extra);
    eos.sort_unstable();
    eos.dedup();
    eos
}

/// The sizes every engine needs positive.
pub(crate) fn check_config(cfg: &EngineConfig) -> Result<()> {
    if cfg.max_batch == 0 || cfg.block_size == 0 || cfg.kv_blocks == 0 {
        return Err(Error::Invalid(
            "max_batch, block_size and kv_blocks must be positive".into(),
        ));
    }
    Ok(())
}

/// The stop rules after a sequence's newest token (the last of `tokens`):
/// with a tokenizer, the text grows by the token's delta and a stop string
/// in it ends the sequence (the text cut before it); then an end-of-sequence
/// id (`eos`), then `max_new_tokens`.
fn stop_rule(
    tokenizer: Option<&Tokenizer>,
    eos: &[u32],
    params: &SamplingParams,
    tokens: &[u32],
    detok: &mut Detokenizer,
    text: &mut String,
) -> Result<Option<FinishReason>> {
    let Some(&last) = tokens.last() else {
        return Ok(None);
    };
    if let Some(tok) = tokenizer {
        if !eos.contains(&last) {
            let delta = detok.step(tok, tokens)?;
            text.push_str(&delta);
            if let Some(cut) = find_stop(text, &params.stop_strings, delta.len()) {
                text.truncate(cut);
                return Ok(Some(FinishReason::Stop));
            }
        }
    }
    if eos.contains(&last) {
        return Ok(Some(FinishReason::Eos));
    }
    if tokens.len() >= params.max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

/// A finished completion's text: the incremental text when a stop string
/// cut it, else the tokens decoded (an ending EOS left out); empty without
/// a tokenizer.
fn completion_text(
    tokenizer: Option<&Tokenizer>,
    reason: FinishReason,
    tokens: &[u32],
    text: String,
) -> Result<String> {
    match (tokenizer, reason) {
        (Some(_), FinishReason::Stop) => Ok(text),
        (Some(tok), _) => {
            let body = if reason == FinishReason::Eos {
                &tokens[..tokens.len().saturating_sub(1)]
            } else {
                tokens
            };
            decode(tok, body)
        }
        (None, _) => Ok(String::new()),
    }
}

/// The byte offset where the first stop string starts, searching only where
/// the last `delta` bytes of `text` could have completed one (`delta` =
/// the length of the text added since the last search).
pub fn find_stop(text: &str, stops: &[String], delta: usize) -> Option<usize> {
    let mut best: Option<usize> = None;
    for s in stops {
        let mut from = text.len().saturating_sub(delta + s.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(i) = text[from..].find(s.as_str()) {
            let at = from + i;
            best = Some(best.map_or(at, |b| b.min(at)));
        }
    }
    best
}
