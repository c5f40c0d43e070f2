//! Element types and the host storage that holds them.

use half::{bf16, f16};

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float: the CPU's compute type and the GPU's master weights.
    F32,
    /// bfloat16: the GPU's compute type; HF checkpoints are usually stored in it.
    BF16,
    /// IEEE half.
    F16,
    /// 32-bit signed int.
    I32,
    /// 64-bit signed int (token ids as transformers writes them).
    I64,
    /// 32-bit unsigned int (token ids, expert ids).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 => 8,
        }
    }

    /// True for the float types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
}

/// Host storage: one owned, contiguous vector of one element type.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
    /// i32 elements.
    I32(Vec<i32>),
    /// i64 elements.
    I64(Vec<i64>),
    /// u32 elements.
    U32(Vec<u32>),
}

impl CpuStorage {
    /// The element type held.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::I32 => CpuStorage::I32(vec![0; len]),
            DType::I64 => CpuStorage::I64(vec![0; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        }
    }

    /// Every element widened to f64 (exact for all types but large i64).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            CpuStorage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::BF16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            CpuStorage::F16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            CpuStorage::I32(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::I64(v) => v.iter().map(|&x| x as f64).collect(),
            CpuStorage::U32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// Converts to `dtype`: floats round to nearest even, floats to ints
    /// truncate toward zero (saturating), as `as` casts do.
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        if self.dtype() == dtype {
            return self.clone();
        }
        // f32 is exact for every source but large i64/u32; go through it for
        // floats, and through i64 for ints, so no precision is lost needlessly.
        match (self, dtype) {
            (CpuStorage::F32(v), DType::BF16) => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            (CpuStorage::F32(v), DType::F16) => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            (CpuStorage::BF16(v), DType::F32) => CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect()),
            (CpuStorage::F16(v), DType::F32) => CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect()),
            (CpuStorage::I64(v), DType::I32) => CpuStorage::I32(v.iter().map(|&x| x as i32).collect()),
            (CpuStorage::I64(v), DType::U32) => CpuStorage::U32(v.iter().map(|&x| x as u32).collect()),
            (CpuStorage::I32(v), DType::I64) => CpuStorage::I64(v.iter().map(|&x| x as i64).collect()),
            (CpuStorage::U32(v), DType::I64) => CpuStorage::I64(v.iter().map(|&x| x as i64).collect()),
            (_, _) => {
                let wide = self.to_f64_vec();
                match dtype {
                    DType::F32 => CpuStorage::F32(wide.iter().map(|&x| x as f32).collect()),
                    DType::BF16 => CpuStorage::BF16(wide.iter().map(|&x| bf16::from_f64(x)).collect()),
                    DType::F16 => CpuStorage::F16(wide.iter().map(|&x| f16::from_f64(x)).collect()),
                    DType::I32 => CpuStorage::I32(wide.iter().map(|&x| x as i32).collect()),
                    DType::I64 => CpuStorage::I64(wide.iter().map(|&x| x as i64).collect()),
                    DType::U32 => CpuStorage::U32(wide.iter().map(|&x| x as u32).collect()),
                }
            }
        }
    }
}

/// A Rust type that can be a tensor element.
pub trait Element: Copy + Send + Sync + 'static + std::fmt::Debug {
    /// Its [`DType`].
    const DTYPE: DType;
    /// Wraps a vector into storage.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// Borrows storage as this type, if it holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Mutably borrows storage as this type, if it holds this type.
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$d(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$d(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$d(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

element!(f32, F32);
element!(bf16, BF16);
element!(f16, F16);
element!(i32, I32);
element!(i64, I64);
element!(u32, U32);
