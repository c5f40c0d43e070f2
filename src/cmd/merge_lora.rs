//! `aha merge-lora`: a PEFT LoRA adapter merged into its base model
//! (W += alpha/r B A), written as a plain Hugging Face folder.

use std::path::PathBuf;

use anyhow::Result;

/// The arguments of `aha merge-lora`.
#[derive(clap::Args, Debug)]
pub struct MergeLoraArgs {
    /// The base model folder.
    #[arg(long)]
    model: PathBuf,
    /// The adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

/// Merges and saves; prints one JSON line.
pub fn run(a: &MergeLoraArgs) -> Result<()> {
    let adapted = aha_moe_model::Model::load(&a.model)?.load_adapter(&a.adapter)?;
    let cfg = adapted.layout.lora.clone();
    let merged = adapted.merge_lora()?;
    merged.save(&a.out, 4 << 30)?;
    let line = serde_json::json!({
        "out": a.out.display().to_string(),
        "adapted_linears": adapted.layout.entries.iter().filter(|e| aha_moe_model::lora::is_adapter(e)).count() / 2,
        "r": cfg.as_ref().map(|c| c.r),
        "scale": cfg.as_ref().map(|c| c.scale()),
    });
    println!("{line}");
    Ok(())
}
