//! Saving a model as a whole Hugging Face folder: the parameters in the
//! dtype the source had (or one the caller picks), sharded with an index
//! above a size, the source's tensors the model does not use (DeepSeek-V3's
//! multi-token-prediction layers) written back, `config.json` without the
//! quantization it no longer has, and every other file of the source folder
//! (tokenizer, chat template, generation config, ...) copied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::params::{checkpoint_files, checkpoint_index, scale_name, Layout};
use crate::st::{self, TensorLoc};

/// The dtype a save writes the parameters in.
///
/// In configs and on the command line: `same`, `f32`, `bf16`, `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum SaveDtype {
    /// Each tensor in the dtype it had in the source folder (FP8 weights,
    /// dequantized on load, as bf16); f32 where there is no source.
    #[default]
    #[serde(rename = "same")]
    Source,
    /// float32.
    #[serde(rename = "f32")]
    F32,
    /// bfloat16 (round to nearest even).
    #[serde(rename = "bf16")]
    Bf16,
    /// float16.
    #[serde(rename = "f16")]
    F16,
}

impl std::str::FromStr for SaveDtype {
    type Err = Error;

    /// `same` (the source's dtypes), `f32`, `bf16` or `f16`, as the
    /// training commands' `--save-dtype` spells them.
    fn from_str(s: &str) -> Result<SaveDtype> {
        match s {
            "same" => Ok(SaveDtype::Source),
            "f32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            "f16" | "float16" => Ok(SaveDtype::F16),
            other => Err(Error::Input {
                op: "save dtype",
                msg: format!("unknown save dtype {other:?}; expected same, f32, bf16 or f16"),
            }),
        }
    }
}

impl std::fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SaveDtype::Source => "same",
            SaveDtype::F32 => "f32",
            SaveDtype::Bf16 => "bf16",
            SaveDtype::F16 => "f16",
        })
    }
}

/// How [`crate::Model::save_as`] writes a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    /// The parameters' dtype on disk.
    pub dtype: SaveDtype,
    /// Shard above this many bytes (`model-0000i-of-0000n.safetensors` and
    /// `model.safetensors.index.json`).
    pub max_shard_bytes: usize,
    /// Write the source's tensors of layers past `num_hidden_layers`
    /// (DeepSeek-V3's multi-token-prediction layers, which the model loads
    /// but does not run) back with their bytes and dtype unchanged; FP8 ones
    /// are dequantized to the save dtype since the saved config has no
    /// quantization. False drops them.
    pub keep_extra_layers: bool,
}

impl Default for SaveOptions {
    fn default() -> SaveOptions {
        SaveOptions {
            dtype: SaveDtype::Source,
            max_shard_bytes: 5 << 30,
            keep_extra_layers: true,
        }
    }
}

/// Files of a source folder a save never copies: the weights it rewrites
/// (or would leave stale) and `config.json`, which it rewrites.
fn not_copied(name: &str) -> bool {
    name == "config.json"
        || name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
        || name.ends_with(".bin.index.json")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name.ends_with(".gguf")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a tensor's bytes come from.
enum Data<'a> {
    /// f32 parameters, converted to the target dtype.
    Floats(&'a [f32]),
    /// Raw bytes on disk, written unchanged.
    Raw(TensorLoc),
    /// Raw bytes read ahead (saving over the source folder).
    Bytes(Vec<u8>),
    /// An FP8 weight and its block scales, dequantized to the target dtype.
    Fp8(TensorLoc, TensorLoc),
}

struct Item<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Data<'a>,
}

impl Item<'_> {
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

fn float_dtype(d: SaveDtype, source: Option<Dtype>) -> Dtype {
    match d {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
        SaveDtype::Source => match source {
            Some(Dtype::F8_E4M3) => Dtype::BF16,
            Some(d @ (Dtype::BF16 | Dtype::F16 | Dtype::F32)) => d,
            _ => Dtype::F32,
        },
    }
}

/// The layer index of `model.layers.<l>.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

fn materialize(item: &Item<'_>, cfg: &ModelConfig, path: &Path) -> Result<Vec<u8>> {
    Ok(match &item.data {
        Data::Floats(v) => encode(v, item.dtype),
        Data::Raw(loc) => st::read_tensor(loc)?,
        Data::Bytes(b) => b.clone(),
        Data::Fp8(w, s) => {
            let bad = |msg: String| Error::Checkpoint {
                path: path.to_path_buf(),
                msg,
            };
            let Some(blocks) = cfg.fp8 else {
                return Err(bad(format!("`{}` is F8_E4M3 without quantization_config", item.name)));
            };
            let (rows, cols) = (item.shape[0], item.shape[1]);
            let want = [rows.div_ceil(blocks.rows), cols.div_ceil(blocks.cols)];
            let mut wv = vec![0f32; rows * cols];
            let mut sv = vec![0f32; want[0] * want[1]];
            if s.shape != want || st::decode_tensor(&mut wv, w)?.is_none() || st::decode_tensor(&mut sv, s)?.is_none() {
                return Err(bad(format!("`{}`: cannot dequantize with its scales", item.name)));
            }
            for (r, row) in wv.chunks_exact_mut(cols.max(1)).enumerate() {
                for (c, x) in row.iter_mut().enumerate() {
                    *x *= sv[(r / blocks.rows) * want[1] + c / blocks.cols];
                }
            }
            encode(&wv, item.dtype)
        }
    })
}

/// Writes the parameters (and, from `source`, the tensors of extra layers)
/// to `dir` in HF layout with `format: pt`, sharded above
/// `opts.max_shard_bytes`. Returns the dtype the embedding was written in.
pub fn save_params_as(
    dir: &Path,
    cfg: &ModelConfig,
    layout: &Layout,
    data: &[f32],
    source: Option<&Path>,
    opts: &SaveOptions,
) -> Result<Dtype> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let src_index: BTreeMap<String, TensorLoc> = match source {
        Some(s) if checkpoint_files(s).is_ok() => checkpoint_index(s)?,
        _ => BTreeMap::new(),
    };
    let same_dir = match source {
        Some(s) => s.canonicalize().ok() == dir.canonicalize().ok(),
        None => false,
    };
    let mut items: Vec<Item<'_>> = layout
        .entries
        .iter()
        .filter(|e| !crate::lora::is_adapter(e))
        .map(|e| Item {
            name: e.name.clone(),
            dtype: float_dtype(opts.dtype, src_index.get(&e.name).map(|l| l.dtype)),
            shape: e.shape.clone(),
            data: Data::Floats(e.slot.of(data)),
        })
        .collect();
    let embed_dtype = items.first().map(|i| i.dtype).unwrap_or(Dtype::F32);
    if opts.keep_extra_layers {
        for (name, loc) in &src_index {
            if layer_of(name).is_none_or(|l| l < cfg.num_layers) {
                continue;
            }
            let is_scale = name.ends_with(".weight_scale_inv");
            let fp8_scale = is_scale
                && name
                    .strip_suffix("_scale_inv")
                    .and_then(|w| src_index.get(w))
                    .is_some_and(|w| w.dtype == Dtype::F8_E4M3);
            if fp8_scale {
                continue; // folded into its weight below
            }
            let item = if loc.dtype == Dtype::F8_E4M3 {
                let scale = scale_name(name).and_then(|s| src_index.get(&s));
                match (scale, loc.shape.len()) {
                    (Some(s), 2) => Item {
                        name: name.clone(),
                        dtype: float_dtype(opts.dtype, Some(Dtype::F8_E4M3)),
                        shape: loc.shape.clone(),
                        data: Data::Fp8(loc.clone(), s.clone()),
                    },
                    _ => {
                        return Err(Error::Checkpoint {
                            path: loc.file.clone(),
                            msg: format!("`{name}` is F8_E4M3 without a 2-D shape and block scales"),
                        })
                    }
                }
            } else {
                Item {
                    name: name.clone(),
                    dtype: loc.dtype,
                    shape: loc.shape.clone(),
                    data: if same_dir {
                        Data::Bytes(st::read_tensor(loc)?)
                    } else {
                        Data::Raw(loc.clone())
                    },
                }
            };
            items.push(item);
        }
        if same_dir && items.iter().any(|i| matches!(i.data, Data::Fp8(..))) {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "saving over the FP8 source folder would overwrite the weights being converted; save elsewhere"
                    .into(),
            });
        }
    }

    let mut shards: Vec<Vec<Item<'_>>> = vec![vec![]];
    let mut bytes = 0usize;
    let mut total = 0usize;
    for item in items {
        let sz = item.nbytes();
        total += sz;
        if bytes > 0 && bytes + sz > opts.max_shard_bytes {
            shards.push(vec![]);
            bytes = 0;
        }
        bytes += sz;
        if let Some(last) = shards.last_mut() {
            last.push(item);
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = dir.join(&fname);
        let buffers = shard
            .iter()
            .map(|it| materialize(it, cfg, &path))
            .collect::<Result<Vec<_>>>()?;
        let views = shard
            .iter()
            .zip(&buffers)
            .map(|(it, b)| {
                safetensors::tensor::TensorView::new(it.dtype, it.shape.clone(), b)
                    .map(|v| (it.name.clone(), v))
                    .map_err(|e| Error::Checkpoint {
                        path: path.clone(),
                        msg: format!("tensor `{}`: {e}", it.name),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            msg: format!("write failed: {e}"),
        })?;
        for it in shard {
            weight_map.insert(it.name.clone(), serde_json::Value::String(fname.clone()));
        }
    }
    let index_path = dir.join("model.safetensors.index.json");
    if n > 1 {
        let idx = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        std::fs::write(&index_path, serde_json::to_string_pretty(&idx).unwrap_or_default()).map_err(io(&index_path))?;
    } else if index_path.exists() {
        // A stale index from an earlier sharded save would shadow the new file.
        std::fs::remove_file(&index_path).map_err(io(&index_path))?;
    }
    Ok(embed_dtype)
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// Writes `config.json` from the source's (every key kept) minus
/// `quantization_config`, with `torch_dtype` / `dtype` naming `saved`, and
/// copies every other file of the source folder (not its weights, not its
/// subfolders) into `dir`.
pub fn copy_folder(src: &Path, dir: &Path, saved: Dtype) -> Result<()> {
    let same_dir = src.canonicalize().ok() == dir.canonicalize().ok();
    let cfg_path = src.join("config.json");
    if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        if let Some(o) = v.as_object_mut() {
            o.remove("quantization_config");
            for k in ["torch_dtype", "dtype"] {
                if o.contains_key(k) {
                    o.insert(k.into(), serde_json::Value::String(dtype_name(saved).into()));
                }
            }
        }
        let out = dir.join("config.json");
        let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
        std::fs::write(&out, text).map_err(io(&out))?;
    }
    if same_dir {
        return Ok(());
    }
    for entry in std::fs::read_dir(src).map_err(io(src))? {
        let entry = entry.map_err(io(src))?;
        let from = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !from.is_file() || not_copied(name) {
            continue;
        }
        std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
    }
    Ok(())
}
