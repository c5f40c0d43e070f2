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

/// Where one tensor lies in a safetensors file (from its header).
#[derive(Debug, Clone)]
pub struct TensorLoc {
    /// The file.
    pub file: std::path::PathBuf,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of its data in the file.
    pub start: u64,
    /// Byte length of its data.
    pub len: usize,
}

/// The tensors of a safetensors file, read from its header alone (the data
/// stays on disk until [`read_tensor`]), in file order. Offsets are checked
/// against the dtype, the shape and the file's size.
pub fn read_header(path: &Path) -> Result<Vec<(String, TensorLoc)>> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| ck(path, "not a valid safetensors file: shorter than its header length"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(ck(path, format!("not a valid safetensors file: header length {n}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| ck(path, format!("not a valid safetensors file: header is not JSON ({e})")))?;
    let base = 8 + n;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo =
            serde_json::from_value(v).map_err(|e| ck(path, format!("tensor `{name}`: bad header entry ({e})")))?;
        let (a, b) = info.data_offsets;
        let elems: usize = info.shape.iter().product();
        let want = elems
            .checked_mul(info.dtype.bitsize())
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| ck(path, format!("tensor `{name}`: shape {:?} overflows", info.shape)))?;
        if b < a || b - a != want || base + b as u64 > file_len {
            return Err(ck(
                path,
                format!(
                    "tensor `{name}`: data offsets [{a}, {b}] do not fit {:?} {:?} in a {file_len}-byte file",
                    info.dtype, info.shape
                ),
            ));
        }
        out.push((
            name,
            TensorLoc {
                file: path.to_path_buf(),
                dtype: info.dtype,
                shape: info.shape,
                start: base + a as u64,
                len: b - a,
            },
        ));
    }
    out.sort_by_key(|(_, l)| l.start);
    Ok(out)
}

/// The raw bytes of one tensor, read from disk on their own.
pub fn read_tensor(loc: &TensorLoc) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let io = |source| Error::Io {
        path: loc.file.clone(),
        source,
    };
    let f = std::fs::File::open(&loc.file).map_err(io)?;
    let mut buf = vec![0u8; loc.len];
    f.read_exact_at(&mut buf, loc.start).map_err(io)?;
    Ok(buf)
}

/// Bytes a streamed read ([`decode_tensor`]) holds at a time: with it,
/// loading a model needs the f32 result plus 8 MiB, not plus its largest
/// tensor's bytes.
pub const READ_CHUNK_BYTES: usize = 8 << 20;

/// Decodes one floating-point tensor (F32, BF16, F16, F8_E4M3) from disk
/// straight into `dst`, streaming it in [`READ_CHUNK_BYTES`] pieces;
/// `Ok(None)` for any other dtype or a length that is not `dst`'s.
pub fn decode_tensor(dst: &mut [f32], loc: &TensorLoc) -> Result<Option<()>> {
    decode_tensor_chunked(dst, loc, READ_CHUNK_BYTES)
}

/// [`decode_tensor`] with `chunk_bytes` read at a time (rounded down to
/// whole elements, at least one).
pub fn decode_tensor_chunked(dst: &mut [f32], loc: &TensorLoc, chunk_bytes: usize) -> Result<Option<()>> {
    use std::os::unix::fs::FileExt;
    let width = match loc.dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F8_E4M3 => 1,
        _ => return Ok(None),
    };
    if Some(loc.len) != dst.len().checked_mul(width) {
        return Ok(None);
    }
    let io = |source| Error::Io {
        path: loc.file.clone(),
        source,
    };
    let f = std::fs::File::open(&loc.file).map_err(io)?;
    let per = (chunk_bytes / width).max(1);
    let mut buf = vec![0u8; per.min(dst.len()) * width];
    for (i, out) in dst.chunks_mut(per).enumerate() {
        let bytes = &mut buf[..out.len() * width];
        f.read_exact_at(bytes, loc.start + (i * per * width) as u64)
            .map_err(io)?;
        if decode_floats(out, loc.dtype, bytes).is_none() {
            return Ok(None);
        }
    }
    Ok(Some(()))
}

/// The value of an FP8 E4M3 byte (OCP "E4M3FN": bias 7, no infinities,
/// `S.1111.111` is NaN), as PyTorch's `float8_e4m3fn` reads it.
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Decodes floating-point tensor bytes (F32, BF16, F16, F8_E4M3) into
/// `dst`; `None` for any other dtype.
pub fn decode_floats(dst: &mut [f32], dtype: Dtype, bytes: &[u8]) -> Option<()> {
    let ok = match dtype {
        Dtype::F32 => bytes.len() == dst.len() * 4,
        Dtype::BF16 | Dtype::F16 => bytes.len() == dst.len() * 2,
        Dtype::F8_E4M3 => bytes.len() == dst.len(),
        _ => return None,
    };
    if !ok {
        return None;
    }
    match dtype {
        Dtype::F32 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::BF16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(d, b)| *d = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(d, b)| *d = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => {
            let lut: Vec<f32> = (0..=255u8).map(f8_e4m3_to_f32).collect();
            dst.iter_mut().zip(bytes).for_each(|(d, &b)| *d = lut[b as usize]);
        }
    }
    Some(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_bytes_decode_as_pytorch_reads_them() {
        assert_eq!(f8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(f8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8_e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(f8_e4m3_to_f32(0x7f).is_nan() && f8_e4m3_to_f32(0xff).is_nan());
        let mut d = [0f32; 2];
        assert!(decode_floats(&mut d, Dtype::F8_E4M3, &[0x40, 0xc0]).is_some());
        assert_eq!(d, [2.0, -2.0]);
        assert!(decode_floats(&mut d, Dtype::I64, &[0; 16]).is_none());
        assert!(decode_floats(&mut d, Dtype::F32, &[0; 4]).is_none());
    }

    /// Streaming a tensor in pieces of any size (one element, sizes that
    /// split elements, more than the tensor) decodes what reading it whole
    /// does, bit for bit, for every float dtype, at any offset in the file.
    #[test]
    fn chunked_reads_decode_as_whole_ones() -> Result<()> {
        let n = 1001;
        let raw: Vec<u8> = (0..4 * n).map(|i| ((i * 37 + i / 7) % 251) as u8).collect();
        let tensors: Vec<(&str, Dtype, usize)> = vec![
            ("a_f8", Dtype::F8_E4M3, 1),
            ("b_bf16", Dtype::BF16, 2),
            ("c_f16", Dtype::F16, 2),
            ("d_f32", Dtype::F32, 4),
            ("e_i64", Dtype::I64, 8),
        ];
        let views = tensors
            .iter()
            .map(|&(name, dtype, w)| {
                let len = if w == 8 { 8 * 4 } else { n * w };
                let shape = vec![len / w];
                safetensors::tensor::TensorView::new(dtype, shape, &raw[..len]).map(|v| (name.to_string(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| ck(Path::new("<test>"), e.to_string()))?;
        let path = std::env::temp_dir().join(format!("aha-st-chunks-{}.safetensors", std::process::id()));
        safetensors::serialize_to_file(views, None, &path).map_err(|e| ck(&path, e.to_string()))?;
        for (name, loc) in read_header(&path)? {
            let elems = loc.shape[0];
            let mut whole = vec![0f32; elems];
            let known = decode_floats(&mut whole, loc.dtype, &read_tensor(&loc)?).is_some();
            for chunk in [1, 3, 7, 64, 1000, 1 << 20] {
                let mut got = vec![0f32; elems];
                let ok = decode_tensor_chunked(&mut got, &loc, chunk)?.is_some();
                assert_eq!(ok, known, "{name}: chunk {chunk}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&whole), "{name}: chunk {chunk}");
            }
            // A destination of the wrong length is refused, not half-filled.
            assert!(decode_tensor(&mut vec![0f32; elems + 1], &loc)?.is_none());
        }
        std::fs::remove_file(&path).map_err(|source| Error::Io { path, source })?;
        Ok(())
    }
}
