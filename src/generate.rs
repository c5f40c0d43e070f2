//! `aha generate` and `aha bench generate`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use aha_moe_model::{Model, ModelConfig, Policy, Precision};
use aha_sampler::chat::{self, ChatTemplate};
use aha_sampler::{load_tokenizer, EngineConfig, Sampler, SamplingParams};
use aha_tensor::Device;
use anyhow::{bail, Context, Result};

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
    let mut lines: Vec<(usize, String)> = Vec::new();
    if aha_trainer::data::is_parquet(path) {
        for (n, v) in aha_trainer::data::read_parquet(path)? {
            lines.push((n, v.to_string()));
        }
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}: read error", path.display(), i + 1))?;
            if !line.trim().is_empty() {
                lines.push((i + 1, line));
            }
        }
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let i = n - 1;
        let v = chat::json_value(&line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let field = |k: &str| v.get_attr(k).ok().filter(|x| !x.is_undefined() && !x.is_none());
        let text = ["prompt", "question", "problem"]
            .iter()
            .find_map(|k| field(k).and_then(|x| x.as_str().map(str::to_string)));
        let messages = field("messages");
        if let Some(m) = &messages {
            if m.kind() != chat::ValueKind::Seq {
                bail!("{}:{}: `messages` must be an array", path.display(), i + 1);
            }
        }
        if text.is_none() && messages.is_none() {
            bail!(
                "{}:{}: no string field `prompt`, `question` or `problem` and no `messages`",
                path.display(),
                i + 1
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

/// Options of `aha generate`.
pub struct GenerateArgs<'a> {
    pub model: &'a Path,
    pub prompts: Option<&'a Path>,
    pub prompt_ids: Option<&'a str>,
    pub template: &'a str,
    pub n: usize,
    pub params: SamplingParams,
    /// `auto`, `cpu` or `cuda[:N]`.
    pub device: &'a str,
    pub out: Option<&'a Path>,
}

/// Generates and writes one JSON line per completion.
pub fn run(a: &GenerateArgs<'_>) -> Result<()> {
    let model = Model::load(a.model)?;
    let device = match a.device {
        "auto" if aha_cuda_kernels::device_count() > 0 && aha_moe_model::gpu::gpu_support(&model.config).is_ok() => {
            Device::Cuda(0)
        }
        "auto" => Device::Cpu,
        d => d.parse()?,
    };
    let tok = load_tokenizer(a.model).ok();
    let mut texts: Vec<String> = Vec::new();
    let prompts: Vec<Vec<u32>> = match (a.prompts, a.prompt_ids) {
        (Some(path), None) => {
            let tok = tok
                .as_ref()
                .with_context(|| format!("{}: --prompts needs a tokenizer.json", a.model.display()))?;
            texts = template_prompts(path, a.template, a.model)?;
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
    let gen_eos = generation_eos(a.model);
    if device != Device::Cpu {
        aha_moe_model::gpu::gpu_support(&model.config)
            .map_err(|e| anyhow::anyhow!("--device {device}: {e}; use --device cpu"))?;
    }
    let policy = Policy::new(model, device, Precision::F32)?;
    let engine = Sampler::new(&policy, tok.as_ref(), EngineConfig::default(), &gen_eos)?;
    let mut bar = SamplingBar::new("generate");
    let (completions, stats) = engine.generate_with_progress(&prompts, a.n, &a.params, &mut |p| bar.update(p))?;
    bar.finish();
    eprintln!(
        "generated {} completions, {} tokens in {:.2} s ({:.0} tokens/s)",
        completions.len(),
        stats.generated_tokens,
        stats.total_s,
        stats.generated_tokens as f64 / stats.total_s.max(1e-9)
    );
    write_completions(a.out, &completions, &prompts, &texts)
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

/// Sampling progress on stderr: on a terminal, one bar redrawn in place at
/// most ten times a second; otherwise (a log file, a pipe) a plain line at
/// every tenth of the completions, so logs stay short.
pub(crate) struct SamplingBar {
    label: &'static str,
    tty: bool,
    drawn: bool,
    last_draw: f64,
    last_tenth: usize,
}

impl SamplingBar {
    /// A bar whose lines start with `label`.
    pub(crate) fn new(label: &'static str) -> SamplingBar {
        SamplingBar {
            label,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_draw: f64::NEG_INFINITY,
            last_tenth: 0,
        }
    }

    /// Reports `p`.
    pub(crate) fn update(&mut self, p: &aha_sampler::Progress) {
        if self.tty {
            if p.elapsed_s - self.last_draw >= 0.1 || p.finished == p.total {
                eprint!("\r{}: {}\x1b[K", self.label, progress_bar(p, 30));
                self.last_draw = p.elapsed_s;
                self.drawn = true;
            }
        } else {
            let tenth = (p.finished * 10).checked_div(p.total).unwrap_or(10);
            if tenth > self.last_tenth {
                eprintln!("{}: {}", self.label, progress_bar(p, 30));
                self.last_tenth = tenth;
            }
        }
    }

    /// Ends the bar's line on a terminal.
    pub(crate) fn finish(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// One line of progress: a bar of `width` cells, completions done, tokens,
/// speed and live sequences.
fn progress_bar(p: &aha_sampler::Progress, width: usize) -> String {
    let frac = if p.total == 0 {
        1.0
    } else {
        p.finished as f64 / p.total as f64
    };
    let full = ((frac * width as f64).floor() as usize).min(width);
    format!(
        "[{}{}] {}/{} completions  {} tokens  {:.0} tokens/s  {} live  {:.1} s",
        "#".repeat(full),
        ".".repeat(width - full),
        p.finished,
        p.total,
        p.generated_tokens,
        p.generated_tokens as f64 / p.elapsed_s.max(1e-9),
        p.live,
        p.elapsed_s
    )
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

/// Sizes of `aha bench generate`.
pub struct GenerateBench<'a> {
    /// A Hugging Face config.json.
    pub config: &'a Path,
    /// Prompts, decoded together.
    pub batch: usize,
    /// Tokens per prompt.
    pub prompt: usize,
    /// New tokens per prompt.
    pub new: usize,
    /// Seed of weights, prompts and sampling.
    pub seed: u64,
    /// `cpu`, `cuda[:N]` or `auto`.
    pub device: &'a str,
    /// `f32` or `bf16` (GPU).
    pub precision: &'a str,
}

/// `aha bench generate`: random weights, `batch` prompts of `prompt` random
/// tokens, `new` sampled tokens each (T 1.0, top-p 0.95), on the CPU engine
/// or the GPU engine, one JSON line.
pub fn bench(b: &GenerateBench<'_>) -> Result<serde_json::Value> {
    let (config, batch, prompt, new, seed) = (b.config, b.batch, b.prompt, b.new, b.seed);
    anyhow::ensure!(
        batch > 0 && prompt > 0 && new > 0,
        "need --batch, --prompt and --new >= 1"
    );
    let cfg = ModelConfig::from_path(config).with_context(|| format!("reading {}", config.display()))?;
    let mut model = Model::random(cfg, seed, 0.02);
    model.config.eos_token_ids.clear(); // every sequence generates `new` tokens, like the peer's run
    let v = model.config.vocab_size as u64;
    let mut state = seed ^ 0xbe7c;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..prompt)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % v) as u32
                })
                .collect()
        })
        .collect();
    let precision: Precision = b.precision.parse()?;
    let device = aha_moe_model::resolve_device(b.device, &model.config, precision)?;
    let policy = Policy::new(model, device, precision)?;
    let engine = Sampler::new(
        &policy,
        None,
        EngineConfig {
            max_batch: batch.max(1),
            ..EngineConfig::default()
        },
        &[],
    )?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_new_tokens: new,
        seed,
        ..SamplingParams::default()
    };
    // Warm up once (allocator, thread pool), then time.
    engine.generate(
        &prompts[..1],
        1,
        &SamplingParams {
            max_new_tokens: 2,
            ..params.clone()
        },
    )?;
    let (out, s) = engine.generate(&prompts, 1, &params)?;
    let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
    Ok(serde_json::json!({
        "bench": "generate",
        "config": config.display().to_string(),
        "device": device.to_string(),
        "precision": precision.to_string(),
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "threads": rayon::current_num_threads(),
        "tokens_per_s": generated as f64 / s.total_s,
        "total_s": s.total_s,
        "forward_s": s.forward_s,
        "sample_s": s.sample_s,
        "bookkeeping_s": s.total_s - s.forward_s - s.sample_s,
        "steps": s.steps,
        "peak_kv_blocks": s.peak_blocks,
    }))
}

#[cfg(test)]
mod tests {
    use super::progress_bar;

    #[test]
    fn progress_bar_fills_with_the_finished_share() {
        let p = aha_sampler::Progress {
            finished: 5,
            total: 20,
            live: 15,
            generated_tokens: 1000,
            elapsed_s: 2.0,
        };
        assert_eq!(
            progress_bar(&p, 8),
            "[##......] 5/20 completions  1000 tokens  500 tokens/s  15 live  2.0 s"
        );
        let done = aha_sampler::Progress { finished: 20, ..p };
        assert!(progress_bar(&done, 8).starts_with("[########] 20/20"));
    }
}
