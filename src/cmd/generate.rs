//! `aha generate`: sampled completions as JSON lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use aha_moe_model::{Model, Policy, Precision};
use aha_sampler::chat::{self, ChatTemplate};
use aha_sampler::{load_tokenizer, EngineConfig, Sampler, SamplingParams};
use aha_tensor::Device;
use anyhow::{bail, Context, Result};

use super::progress::SamplingBar;

/// One line of a JSONL prompt file.
pub struct PromptLine {
    /// `prompt`, `question` or `problem` (the data sets' field names).
    pub text: Option<String>,
    /// The line's chat `messages` array, object keys in their written order.
    pub messages: Option<chat::Value>,
}

/// Prompt lines from a JSONL file (or a Parquet file, one row a line): each
/// line an object with a `prompt` string (or `question` / `problem`) and/or a
/// `messages` array. A bad line is an error naming the file and line.
pub fn read_prompt_lines(path: &Path) -> Result<Vec<PromptLine>> {
    let lines = aha_trainer::data::read_record_lines(path)?;
    let mut out = Vec::new();
    for (n, line) in lines {
        let v = chat::json_value(&line).with_context(|| format!("{}:{n}: not valid JSON", path.display()))?;
        let field = |k: &str| v.get_attr(k).ok().filter(|x| !x.is_undefined() && !x.is_none());
        let text = ["prompt", "question", "problem"]
            .iter()
            .find_map(|k| field(k).and_then(|x| x.as_str().map(str::to_string)));
        let messages = field("messages");
        if let Some(m) = &messages {
            if m.kind() != chat::ValueKind::Seq {
                bail!("{}:{n}: `messages` must be an array", path.display());
            }
        }
        if text.is_none() && messages.is_none() {
            bail!(
                "{}:{n}: no string field `prompt`, `question` or `problem` and no `messages`",
                path.display()
            );
        }
        out.push(PromptLine { text, messages });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// The prompt texts of `path` wrapped by `template`: `none` (as written),
/// `r1-zero` (the R1-Zero template) or `chat` (the model folder's chat
/// template over the line's `messages`, or one user turn, with the
/// generation prompt).
pub fn template_prompts(path: &Path, template: &str, model_dir: &Path) -> Result<Vec<String>> {
    let chat_template = match template {
        "none" | "r1-zero" => None,
        "chat" => Some(ChatTemplate::load(model_dir)?),
        other => bail!("unknown --template {other:?}: none, r1-zero or chat"),
    };
    read_prompt_lines(path)?
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let need_text = || {
                line.text.clone().with_context(|| {
                    format!(
                        "{}: prompt {}: --template {template} needs a `prompt`, `question` or `problem` field",
                        path.display(),
                        i + 1
                    )
                })
            };
            Ok(match &chat_template {
                None if template == "none" => need_text()?,
                None => chat::render_r1_zero(&need_text()?),
                Some(t) => match &line.messages {
                    Some(m) => t.render(m, true, &[])?,
                    None => t.render_user_prompt(&need_text()?)?,
                },
            })
        })
        .collect()
}

/// The arguments of `aha generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// JSONL or Parquet prompts (`prompt`, `question` or `problem` field; with
    /// `--template chat`, a `messages` array is used when a line has one).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompts: Option<PathBuf>,
    /// Prompts as a JSON list of token-id lists.
    #[arg(long)]
    prompt_ids: Option<String>,
    /// How text prompts are wrapped: none, r1-zero (the R1-Zero plain
    /// template) or chat (the model folder's chat template, with the
    /// generation prompt).
    #[arg(long, default_value = "none")]
    template: String,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[command(flatten)]
    sampling: Sampling,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Cached keys and values on a GPU: bf16 or f32 (exact, slower).
    #[arg(long, default_value = "bf16")]
    kv_dtype: String,
    /// On a GPU, run every step eagerly instead of replaying decode steps
    /// as CUDA graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
    /// Output JSONL (stdout when absent).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How `aha generate` samples (see `aha_sampler::SamplingParams`).
#[derive(clap::Args, Clone, Debug)]
pub struct Sampling {
    /// Maximum new tokens per completion.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below min_p times the top probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Base seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Argmax decoding.
    #[arg(long)]
    greedy: bool,
}

impl Sampling {
    /// The sampler's parameters.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            greedy: self.greedy,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

/// Generates and writes one JSON line per completion.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let params = a.sampling.params();
    let model = Model::load(&a.model)?;
    let device = match a.device.as_str() {
        "auto" if aha_cuda_kernels::device_count() > 0 && aha_moe_model::gpu::gpu_support(&model.config).is_ok() => {
            Device::Cuda(0)
        }
        "auto" => Device::Cpu,
        d => d.parse()?,
    };
    let tok = load_tokenizer(&a.model).ok();
    let mut texts: Vec<String> = Vec::new();
    let prompts: Vec<Vec<u32>> = match (a.prompts.as_deref(), a.prompt_ids.as_deref()) {
        (Some(path), None) => {
            let tok = tok
                .as_ref()
                .with_context(|| format!("{}: --prompts needs a tokenizer.json", a.model.display()))?;
            texts = template_prompts(path, &a.template, &a.model)?;
            texts
                .iter()
                .map(|text| {
                    Ok(tok
                        .encode(text.as_str(), false)
                        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                        .get_ids()
                        .to_vec())
                })
                .collect::<Result<_>>()?
        }
        (None, Some(json)) => {
            serde_json::from_str(json).context("--prompt-ids: expected a JSON list of token-id lists")?
        }
        _ => bail!("give exactly one of --prompts FILE.jsonl and --prompt-ids JSON"),
    };
    let gen_eos = generation_eos(&a.model);
    if device != Device::Cpu {
        aha_moe_model::gpu::gpu_support(&model.config)
            .map_err(|e| anyhow::anyhow!("--device {device}: {e}; use --device cpu"))?;
    }
    let kv_dtype = a.kv_dtype.parse().context("--kv-dtype")?;
    let policy = Policy::new(model, device, Precision::F32)?;
    let cfg = EngineConfig {
        kv_dtype,
        cuda_graphs: !a.no_cuda_graphs,
        ..EngineConfig::default()
    };
    let engine = Sampler::new(&policy, tok.as_ref(), cfg, &gen_eos)?;
    let mut bar = SamplingBar::new("generate");
    let (completions, stats) = engine.generate_with_progress(&prompts, a.n, &params, &mut |p| bar.update(p))?;
    bar.finish();
    eprintln!(
        "generated {} completions, {} tokens in {:.2} s ({:.0} tokens/s)",
        completions.len(),
        stats.generated_tokens,
        stats.total_s,
        stats.generated_tokens as f64 / stats.total_s.max(1e-9)
    );
    write_completions(a.out.as_deref(), &completions, &prompts, &texts)
}

/// One JSON line per completion, to `out` or stdout, with its prompt's
/// token ids (`prompt_ids`) and rendered text (`prompt_text`: the prompt
/// after the template; null for `--prompt-ids`).
fn write_completions(
    out: Option<&Path>,
    completions: &[aha_sampler::Completion],
    prompts: &[Vec<u32>],
    texts: &[String],
) -> Result<()> {
    let mut w: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for c in completions {
        let mut v = serde_json::to_value(c)?;
        v["prompt_ids"] = serde_json::json!(prompts.get(c.prompt_index));
        v["prompt_text"] = serde_json::json!(texts.get(c.prompt_index));
        writeln!(w, "{v}")?;
    }
    w.flush()?;
    Ok(())
}

/// `eos_token_id` of `generation_config.json`, if the folder has one.
fn generation_eos(dir: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return vec![];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec![];
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aha-prompt-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn prompt_lines_take_any_prompt_field_or_messages_and_skip_blank_lines() {
        let p = file(
            "ok.jsonl",
            "{\"question\": \"q1\"}\n\n{\"problem\": \"q2\", \"answer\": 1}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        );
        let lines = read_prompt_lines(&p).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].text.as_deref(), Some("q1"));
        assert_eq!(lines[1].text.as_deref(), Some("q2"));
        assert!(lines[2].text.is_none() && lines[2].messages.is_some());
    }

    #[test]
    fn a_bad_prompt_line_names_the_file_and_its_line() {
        for (name, text, want) in [
            ("json.jsonl", "{\"prompt\": \"a\"}\n\n{oops\n", ":3: not valid JSON"),
            (
                "field.jsonl",
                "{\"prompt\": \"a\"}\n{\"answer\": 2}\n",
                ":2: no string field",
            ),
            (
                "msgs.jsonl",
                "{\"messages\": \"hi\"}\n",
                ":1: `messages` must be an array",
            ),
            ("empty.jsonl", "\n\n", ": no prompts"),
        ] {
            let p = file(name, text);
            let e = format!("{:#}", read_prompt_lines(&p).err().unwrap());
            assert!(e.contains(&format!("{}{want}", p.display())), "{name}: {e}");
        }
    }
}
