//! `aha logprobs`: score token sequences with a model folder and write the
//! logits and next-token log-probs as safetensors.

use std::path::{Path, PathBuf};

use aha_moe_model::st::{read_file, write_f32};
use aha_moe_model::Model;
use aha_tensor::{CpuStorage, Device};
use anyhow::{bail, Context, Result};

use super::options::Placement;

/// The arguments of `aha logprobs`.
#[derive(clap::Args, Debug)]
#[command(mut_arg("precision", |a| a.help(
    "f32 (the GPU matches the CPU to 1e-4) or bf16 (bf16 products with f32 sums: on the GPU also flash attention and the lm head; within ~0.1 nats)"
)))]
pub struct LogprobsArgs {
    /// A Hugging Face model folder (config.json, *.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// `input_ids` in a .safetensors file (int64 [B,T]) or a JSON list of token-id lists.
    #[arg(long)]
    input: PathBuf,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    place: Placement,
}

/// Runs `aha logprobs`.
pub fn run(a: &LogprobsArgs) -> Result<()> {
    score(&a.model, &a.input, &a.out, &a.place.device, &a.place.precision)
}

/// Reads `[B, T]` token ids from a safetensors file (`input_ids`, int64 or
/// int32) or from a JSON list of equally long lists.
pub fn read_ids(path: &Path) -> Result<(Vec<u32>, usize, usize)> {
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    if is_st {
        let t = read_file(path)?
            .into_iter()
            .find(|t| t.name == "input_ids")
            .with_context(|| format!("{}: no tensor named input_ids", path.display()))?;
        if t.shape.len() != 2 {
            bail!("{}: input_ids must be [B, T], got {:?}", path.display(), t.shape);
        }
        let ids: Vec<i64> = match t.data {
            CpuStorage::I64(v) => v,
            CpuStorage::I32(v) => v.into_iter().map(i64::from).collect(),
            other => bail!(
                "{}: input_ids must be int64 or int32, got {:?}",
                path.display(),
                other.dtype()
            ),
        };
        let ids = ids
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                u32::try_from(x).with_context(|| format!("{}: input_ids[{i}] = {x} is not a token id", path.display()))
            })
            .collect::<Result<Vec<u32>>>()?;
        return Ok((ids, t.shape[0], t.shape[1]));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of token-id lists", path.display()))?;
    let t = rows.first().map_or(0, |r| r.len());
    if rows.is_empty() || t == 0 {
        bail!("{}: no tokens", path.display());
    }
    if let Some(i) = rows.iter().position(|r| r.len() != t) {
        bail!(
            "{}: row {i} has {} tokens, row 0 has {t}; rows must be equally long",
            path.display(),
            rows[i].len()
        );
    }
    let b = rows.len();
    Ok((rows.into_iter().flatten().collect(), b, t))
}

/// Runs the model and writes `logits [B, T, V]` and `token_logprobs [B, T-1]`.
///
/// On `cuda:N` the grouped-query models (Qwen2, Qwen3, Qwen3-MoE) run on the
/// GPU (`aha_moe_model::gpu`); MLA models are refused with the reason.
/// `auto` takes GPU 0 when there is one and the model runs there, else the CPU.
pub fn score(model_dir: &Path, input: &Path, out: &Path, device: &str, precision: &str) -> Result<()> {
    let precision = match precision {
        "f32" => aha_moe_model::gpu::GpuPrecision::F32,
        "bf16" => aha_moe_model::gpu::GpuPrecision::Bf16,
        other => anyhow::bail!("--precision {other:?}: expected f32 or bf16"),
    };
    let model = Model::load(model_dir)?;
    let device = if device == "auto" {
        let gpu_ok = aha_cuda_kernels::device_count() > 0 && aha_moe_model::gpu::gpu_support(&model.config).is_ok();
        if gpu_ok {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    } else {
        device.parse()?
    };
    let (ids, b, t) = read_ids(input)?;
    let mut targets = vec![0u32; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            targets[r * t + i] = ids[r * t + i + 1];
        }
    }
    let (logits, logp) = match device {
        Device::Cuda(ordinal) => {
            aha_moe_model::gpu::gpu_support(&model.config)
                .map_err(|e| anyhow::anyhow!("--device {device}: {e}; use --device cpu"))?;
            let gpu = aha_moe_model::gpu::GpuModel::upload_with(&model, ordinal, precision)?;
            let logits = gpu.logits(&ids, b, t)?;
            (logits, gpu.token_logprobs(&ids, b, t, &targets)?.0)
        }
        Device::Cpu => {
            if precision == aha_moe_model::gpu::GpuPrecision::Bf16 {
                aha_tensor::cpu::set_product_precision(aha_tensor::cpu::ProductPrecision::Bf16);
            }
            let acts = model.forward(&ids, b, t)?;
            let logits = model.logits_of(&acts.hidden)?;
            (logits, model.token_logprobs(&acts, &targets)?.0)
        }
    };
    let lp: Vec<f32> = (0..b).flat_map(|r| logp[r * t..r * t + t - 1].to_vec()).collect();
    let v = model.config.vocab_size;
    write_f32(
        out,
        &[
            ("logits".to_string(), vec![b, t, v], &logits[..]),
            ("token_logprobs".to_string(), vec![b, t - 1], &lp[..]),
        ],
    )?;
    Ok(())
}
