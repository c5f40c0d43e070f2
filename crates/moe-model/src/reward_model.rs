//! [`RewardModel`]: a Hugging Face `*ForSequenceClassification` folder with
//! one label, the scalar reward model of R1's all-scenario RL stage.
//!
//! The body is the causal LM's ([`Model`], the same layout and loading
//! without the lm head), placed on the CPU or a GPU through [`Policy`]; the
//! head is `score.weight [1, C]` (no bias), applied to the final normed
//! hidden state of each sequence's last non-pad token, as transformers'
//! `*ForSequenceClassification` does. Only the `B` pooled rows `[B, C]`
//! leave the device; the head is one dot product per sequence on the host.
//!
//! ```no_run
//! use aha_moe_model::{Precision, RewardModel};
//! use aha_tensor::Device;
//!
//! let rm = RewardModel::load(std::path::Path::new("path/to/rm"), Device::Cpu, Precision::F32)?;
//! let scores = rm.score(&[vec![5, 9, 2], vec![7, 7]], 8)?;
//! assert_eq!(scores.len(), 2);
//! # Ok::<(), aha_moe_model::Error>(())
//! ```

use std::path::Path;

use aha_tensor::Device;
use serde_json::Value;

use crate::config::{Arch, ModelConfig};
use crate::error::{input_err, Error, Result};
use crate::model::Model;
use crate::params::{checkpoint_index, load_params_except, Layout};
use crate::policy::{Policy, Precision};
use crate::st;

/// The architectures taken (`architectures` in `config.json`), with the
/// `model_type` each needs. transformers builds all of them the same way
/// (`GenericForSequenceClassification`): the decoder, then a bias-free
/// `score` linear read at the last non-pad token.
pub const ARCHITECTURES: [(&str, Arch); 4] = [
    ("Qwen2ForSequenceClassification", Arch::Qwen2),
    ("LlamaForSequenceClassification", Arch::Llama),
    ("Qwen3ForSequenceClassification", Arch::Qwen3),
    ("Qwen3MoeForSequenceClassification", Arch::Qwen3Moe),
];

/// The name of the score head's weight in the checkpoint.
pub const SCORE_WEIGHT: &str = "score.weight";

/// What `config.json` says about the head, besides the body's config.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadConfig {
    /// The architecture named in `architectures`.
    pub architecture: String,
    /// `pad_token_id`: the token transformers' pooling skips at the end.
    pub pad_token_id: Option<u32>,
}

/// A loaded scalar reward model on its device (see the module docs).
pub struct RewardModel {
    body: Policy,
    /// `score.weight` as `[C]`.
    head: Vec<f32>,
    config: ModelConfig,
    head_config: HeadConfig,
}

impl std::fmt::Debug for RewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RewardModel({}, {}, {})",
            self.head_config.architecture,
            self.body.device(),
            self.body.precision()
        )
    }
}

/// Reads `config.json` of a sequence-classification folder (or the file
/// itself): the body's config, with the lm head dropped (tied, so the
/// layout holds none), and the head's. Refuses any architecture but
/// [`ARCHITECTURES`], an architecture whose `model_type` differs, and a
/// label count other than one, naming the file and the key.
pub fn read_config(path: &Path) -> Result<(ModelConfig, HeadConfig)> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
        path: file.clone(),
        source,
    })?;
    let mut cfg = ModelConfig::from_json_str(&text, &file)?;
    let err = |msg: String| Error::Config {
        path: file.clone(),
        msg,
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let names: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
    let archs: Vec<&str> = match v.get("architectures") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
        _ => vec![],
    };
    let architecture = match archs.as_slice() {
        [one] => *one,
        _ => {
            return Err(err(format!(
                "`architectures` must name one sequence-classification model ({}), got {}",
                names.join(", "),
                v.get("architectures").map_or("nothing".to_string(), |a| a.to_string())
            )))
        }
    };
    let Some((_, arch)) = ARCHITECTURES.iter().find(|(n, _)| *n == architecture) else {
        return Err(err(format!(
            "architecture `{architecture}` is not a supported reward model (one of {})",
            names.join(", ")
        )));
    };
    if *arch != cfg.arch {
        return Err(err(format!(
            "architecture `{architecture}` does not go with model_type {}",
            v.get("model_type").map_or("(none)".to_string(), |m| m.to_string())
        )));
    }
    // transformers: `num_labels` sets `id2label`; with neither, 2 labels.
    let labels = match (v.get("num_labels"), v.get("id2label")) {
        (Some(n), _) if !n.is_null() => n
            .as_u64()
            .ok_or_else(|| err(format!("`num_labels` must be a non-negative integer, got {n}")))?
            as usize,
        (_, Some(Value::Object(m))) => m.len(),
        _ => {
            return Err(err(
                "neither `num_labels` nor `id2label` is given (transformers then assumes 2 labels); a scalar reward model has one"
                    .into(),
            ))
        }
    };
    if labels != 1 {
        return Err(err(format!(
            "num_labels is {labels}; a scalar reward model has exactly one label"
        )));
    }
    let pad_token_id = match v.get("pad_token_id") {
        None | Some(Value::Null) => None,
        Some(p) => Some(
            p.as_u64()
                .filter(|&p| (p as usize) < cfg.vocab_size)
                .ok_or_else(|| err(format!("`pad_token_id` must be a token id below vocab_size, got {p}")))?
                as u32,
        ),
    };
    // The body without its lm head: tied, so the layout has no `lm_head.weight`.
    cfg.tie_word_embeddings = true;
    Ok((
        cfg,
        HeadConfig {
            architecture: architecture.to_string(),
            pad_token_id,
        },
    ))
}

/// Reads `score.weight [1, C]` (f32, bf16 or f16) of a folder's checkpoint.
fn read_head(dir: &Path, c: usize) -> Result<Vec<f32>> {
    let index = checkpoint_index(dir)?;
    let ck = |msg: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let Some(loc) = index.get(SCORE_WEIGHT) else {
        return Err(ck(format!(
            "`{SCORE_WEIGHT}` is missing: a sequence-classification checkpoint has a score head [1, {c}]"
        )));
    };
    if loc.shape != [1, c] {
        return Err(ck(format!(
            "`{SCORE_WEIGHT}` in {} has shape {:?}; a one-label head over hidden size {c} is [1, {c}]",
            loc.file.display(),
            loc.shape
        )));
    }
    let mut head = vec![0f32; c];
    let float = matches!(
        loc.dtype,
        safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16
    );
    if !float || st::decode_floats(&mut head, loc.dtype, &st::read_tensor(loc)?).is_none() {
        return Err(ck(format!(
            "`{SCORE_WEIGHT}` in {} has dtype {:?}; supported: F32, BF16, F16",
            loc.file.display(),
            loc.dtype
        )));
    }
    Ok(head)
}

impl RewardModel {
    /// Loads a sequence-classification folder onto `device` (from
    /// [`crate::resolve_device`]) in `precision`: the config checks of
    /// [`read_config`], the score head, then the body with every tensor
    /// checked as [`Model::load`] checks them.
    pub fn load(dir: &Path, device: Device, precision: Precision) -> Result<RewardModel> {
        let (config, head_config) = read_config(dir)?;
        let head = read_head(dir, config.hidden_size)?;
        let layout = Layout::new(&config);
        let params = load_params_except(dir, &config, &layout, &[SCORE_WEIGHT])?;
        let model = Model {
            config: config.clone(),
            layout,
            params,
            source_dir: Some(dir.to_path_buf()),
        };
        RewardModel::new(model, head, head_config, device, precision)
    }

    /// A reward model from a body and a head `score.weight` (`[C]`),
    /// placed on `device`.
    pub fn new(
        body: Model,
        head: Vec<f32>,
        head_config: HeadConfig,
        device: Device,
        precision: Precision,
    ) -> Result<RewardModel> {
        let c = body.config.hidden_size;
        if head.len() != c {
            return Err(input_err(
                "reward model",
                format!("a head of {} values for hidden size {c}", head.len()),
            ));
        }
        let config = body.config.clone();
        let mut body = Policy::new(body, device, precision)?;
        // Scoring never runs a backward: on a GPU keep only each layer's
        // input rather than every activation (same forward, less memory).
        body.set_recompute(true);
        Ok(RewardModel {
            body,
            head,
            config,
            head_config,
        })
    }

    /// The body's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The head's config (architecture, pad token).
    pub fn head_config(&self) -> &HeadConfig {
        &self.head_config
    }

    /// The device it runs on.
    pub fn device(&self) -> Device {
        self.body.device()
    }

    /// The longest sequence it scores (`max_position_embeddings`).
    pub fn max_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The position transformers reads a sequence's score at: the last
    /// token that is not `pad_token_id` (position 0 when every token is
    /// one), or the last token when the config has no pad token. A
    /// sequence that ends in the pad token (Qwen's `<|endoftext|>` is both
    /// its pad and its end of text) is scored at the token before it, as
    /// transformers and TRL score it.
    pub fn score_position(&self, ids: &[u32]) -> usize {
        match self.head_config.pad_token_id {
            Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
            None => ids.len().saturating_sub(1),
        }
    }

    /// Scores sequences in one forward, right-padded to the longest of
    /// them: one reward per sequence, read at [`RewardModel::score_position`].
    pub fn score_batch(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let b = seqs.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(input_err("reward model", format!("sequence {i} is empty")));
        }
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        if t > self.max_len() {
            return Err(input_err(
                "reward model",
                format!("{t} tokens exceed max_position_embeddings {}", self.max_len()),
            ));
        }
        let pad = self.head_config.pad_token_id.unwrap_or(0);
        let mut ids = vec![pad; b * t];
        let mut rows = Vec::with_capacity(b);
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            rows.push((i * t + self.score_position(s)) as u32);
        }
        let fwd = self.body.forward(&ids, b, t)?;
        let hidden = self.body.hidden_rows(&fwd, &rows)?;
        let c = self.config.hidden_size;
        Ok(hidden
            .chunks_exact(c.max(1))
            .map(|h| {
                h.iter()
                    .zip(&self.head)
                    .map(|(&x, &w)| x as f64 * w as f64)
                    .sum::<f64>() as f32
            })
            .collect())
    }

    /// Scores any number of sequences, `batch_size` per forward: sorted by
    /// length first so that each batch pads little, results in the input
    /// order.
    pub fn score(&self, seqs: &[Vec<u32>], batch_size: usize) -> Result<Vec<f32>> {
        if batch_size == 0 {
            return Err(input_err("reward model", "batch size must be >= 1"));
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(input_err("reward model", format!("sequence {i} is empty")));
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![0f32; seqs.len()];
        for chunk in order.chunks(batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            for (&i, s) in chunk.iter().zip(self.score_batch(&batch)?) {
                out[i] = s;
            }
        }
        Ok(out)
    }
}
