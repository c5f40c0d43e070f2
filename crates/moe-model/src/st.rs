//! Reading and writing safetensors files as aha-tensor host storage.

use std::collections::HashMap;
use std::path::Path;

use aha_tensor::CpuStorage;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One tensor read from a file: name, shape, elements.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    /// The tensor's name in the file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its elements, in the file's dtype.
    pub data: CpuStorage,
}

fn ck(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a whole file into memory.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Converts one view to host storage (f32, bf16, f16, i64, i32, u32 supported).
pub fn view_to_storage(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<CpuStorage> {
    fn cast<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
        // Copy: the mapping is not guaranteed to be aligned for T.
        b.chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect()
    }
    Ok(match dtype {
        Dtype::F32 => CpuStorage::F32(cast::<f32>(bytes)),
        Dtype::BF16 => CpuStorage::BF16(cast::<u16>(bytes).into_iter().map(bf16::from_bits).collect()),
        Dtype::F16 => CpuStorage::F16(cast::<u16>(bytes).into_iter().map(f16::from_bits).collect()),
        Dtype::I64 => CpuStorage::I64(cast::<i64>(bytes)),
        Dtype::I32 => CpuStorage::I32(cast::<i32>(bytes)),
        Dtype::U32 => CpuStorage::U32(cast::<u32>(bytes)),
        other => {
            return Err(ck(
                path,
                format!("tensor `{name}` has dtype {other:?}; supported: F32, BF16, F16, I64, I32, U32"),
            ))
        }
    })
}

/// Every tensor of a safetensors file.
pub fn read_file(path: &Path) -> Result<Vec<NamedTensor>> {
    let bytes = read_bytes(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ck(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let data = view_to_storage(path, &name, view.dtype(), view.data())?;
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes f32 tensors (name, shape, data) to one safetensors file with
/// `format: pt` metadata, as transformers expects.
pub fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map(|v| (name.clone(), v))
                .map_err(|e| ck(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ck(path, format!("write failed: {e}")))
}
