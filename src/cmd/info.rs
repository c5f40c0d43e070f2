//! `aha info`: the compute devices and whether NVRTC is available, as one
//! JSON line; with `--model`, that folder's weights loaded and described.

use std::path::PathBuf;

use anyhow::Result;

/// The arguments of `aha info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Device to resolve: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// A Hugging Face model folder to load (into host memory, f32).
    #[arg(long)]
    model: Option<PathBuf>,
}

/// Prints the JSON line.
pub fn run(a: &InfoArgs) -> Result<()> {
    let (device, model) = (a.device.as_str(), a.model.as_deref());
    let resolved: aha_tensor::Device = device.parse()?;
    let gpus = aha_cuda_kernels::device_count();
    let gpu_names: Vec<String> = (0..gpus)
        .filter_map(|i| aha_cuda_kernels::Gpu::get(i).ok())
        .map(|g| {
            let (ma, mi) = g.compute_capability();
            format!("{} (sm_{ma}{mi})", g.name())
        })
        .collect();
    let nvrtc = match aha_cuda_kernels::nvrtc::nvrtc() {
        Ok(nv) => serde_json::json!({"found": true, "version": format!("{}.{}", nv.version.0, nv.version.1)}),
        Err(e) => serde_json::json!({"found": false, "error": e.to_string()}),
    };
    let model = match model {
        Some(dir) => {
            let t0 = std::time::Instant::now();
            let m = aha_moe_model::Model::load(dir)?;
            let load_s = t0.elapsed().as_secs_f64();
            let dtypes: std::collections::BTreeSet<String> = aha_moe_model::params::checkpoint_index(dir)?
                .values()
                .map(|l| format!("{:?}", l.dtype))
                .collect();
            serde_json::json!({
                "dir": dir.display().to_string(),
                "architecture": format!("{:?}", m.config.arch),
                "parameters": m.params.len(),
                "layers": m.config.num_layers,
                "dtypes_on_disk": dtypes,
                "host_bytes": m.params.len() * 4,
                "load_s": load_s,
            })
        }
        None => serde_json::Value::Null,
    };
    let line = serde_json::json!({
        "aha": env!("CARGO_PKG_VERSION"),
        "model": model,
        "device": resolved.to_string(),
        "cpu_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "gpus": gpu_names,
        "no_gpu_reason": aha_cuda_kernels::no_gpu_reason(),
        "nvrtc": nvrtc,
        "kernel_files": aha_cuda_kernels::SOURCES.iter().map(|s| s.file).collect::<Vec<_>>(),
    });
    println!("{line}");
    Ok(())
}
