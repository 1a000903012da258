//! The tensor element types a DCP checkpoint can hold, under the names torch pickles them with.

use std::fmt;

/// The element type of a stored tensor; [`DType::name`] is torch's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
  /// `torch.float64` (IEEE binary64).
  Float64,
  /// `torch.float32` (IEEE binary32).
  Float32,
  /// `torch.float16` (IEEE binary16).
  Float16,
  /// `torch.bfloat16`: the top 16 bits of a binary32.
  BFloat16,
  /// `torch.float8_e4m3fn`: 4 exponent bits, 3 mantissa bits, no infinities.
  Float8E4M3Fn,
  /// `torch.float8_e5m2`: 5 exponent bits, 2 mantissa bits.
  Float8E5M2,
  /// `torch.float8_e4m3fnuz`: e4m3 without negative zero (one NaN).
  Float8E4M3Fnuz,
  /// `torch.float8_e5m2fnuz`: e5m2 without negative zero (one NaN).
  Float8E5M2Fnuz,
  /// `torch.float8_e8m0fnu`: an unsigned power-of-two scale (MX formats).
  Float8E8M0Fnu,
  /// `torch.int64`.
  Int64,
  /// `torch.int32`.
  Int32,
  /// `torch.int16`.
  Int16,
  /// `torch.int8`.
  Int8,
  /// `torch.uint64`.
  UInt64,
  /// `torch.uint32`.
  UInt32,
  /// `torch.uint16`.
  UInt16,
  /// `torch.uint8`.
  UInt8,
  /// `torch.bool`: one byte per element, 0 or 1.
  Bool,
  /// `torch.complex128`: two float64 (real, imaginary).
  Complex128,
  /// `torch.complex64`: two float32 (real, imaginary).
  Complex64,
  /// `torch.complex32`: two float16 (real, imaginary).
  Complex32,
}

use DType::*;

const ALL: [DType; 21] = [
  Float64,
  Float32,
  Float16,
  BFloat16,
  Float8E4M3Fn,
  Float8E5M2,
  Float8E4M3Fnuz,
  Float8E5M2Fnuz,
  Float8E8M0Fnu,
  Int64,
  Int32,
  Int16,
  Int8,
  UInt64,
  UInt32,
  UInt16,
  UInt8,
  Bool,
  Complex128,
  Complex64,
  Complex32,
];

impl DType {
  /// The torch name (`torch.<name>` is the pickled global; never an alias like `float` or `long`).
  pub fn name(self) -> &'static str {
    match self {
      Float64 => "float64",
      Float32 => "float32",
      Float16 => "float16",
      BFloat16 => "bfloat16",
      Float8E4M3Fn => "float8_e4m3fn",
      Float8E5M2 => "float8_e5m2",
      Float8E4M3Fnuz => "float8_e4m3fnuz",
      Float8E5M2Fnuz => "float8_e5m2fnuz",
      Float8E8M0Fnu => "float8_e8m0fnu",
      Int64 => "int64",
      Int32 => "int32",
      Int16 => "int16",
      Int8 => "int8",
      UInt64 => "uint64",
      UInt32 => "uint32",
      UInt16 => "uint16",
      UInt8 => "uint8",
      Bool => "bool",
      Complex128 => "complex128",
      Complex64 => "complex64",
      Complex32 => "complex32",
    }
  }

  /// Accepts torch's primary names and the aliases users type (`float`, `half`, `bf16`, ...).
  pub fn from_name(name: &str) -> Option<DType> {
    let primary = match name {
      "float" | "f32" => "float32",
      "double" | "f64" => "float64",
      "half" | "f16" | "fp16" => "float16",
      "bf16" => "bfloat16",
      "long" => "int64",
      "int" => "int32",
      "short" => "int16",
      "cfloat" => "complex64",
      "cdouble" => "complex128",
      "chalf" => "complex32",
      other => other,
    };
    ALL.iter().copied().find(|d| d.name() == primary)
  }

  /// Bytes per element (complex types count both components).
  pub fn size(self) -> usize {
    match self {
      Float64 | Int64 | UInt64 | Complex64 => 8,
      Float32 | Int32 | UInt32 | Complex32 => 4,
      Float16 | BFloat16 | Int16 | UInt16 => 2,
      Float8E4M3Fn | Float8E5M2 | Float8E4M3Fnuz | Float8E5M2Fnuz | Float8E8M0Fnu | Int8 | UInt8 | Bool => 1,
      Complex128 => 16,
    }
  }

  /// Bytes to swap as one unit when the archive's byte order differs from ours: complex numbers swap per component.
  pub fn swap_unit(self) -> usize {
    match self {
      Complex128 | Complex64 | Complex32 => self.size() / 2,
      _ => self.size(),
    }
  }

  /// Whether elements are (real, imaginary) pairs, which byte swapping and casts treat per component.
  pub fn is_complex(self) -> bool {
    matches!(self, Complex128 | Complex64 | Complex32)
  }

  /// torch's `is_floating_point()`: the real floating dtypes (the ones casts convert between; not complex).
  pub fn is_floating_point(self) -> bool {
    matches!(self, Float64 | Float32 | Float16 | BFloat16 | Float8E4M3Fn | Float8E5M2)
  }

  /// The legacy typed-storage class `torch.save` pairs with `_rebuild_tensor_v2`, or `None` for the dtypes that
  /// go through `_rebuild_tensor_v3` with an `UntypedStorage`.
  pub fn legacy_storage_class(self) -> Option<&'static str> {
    Some(match self {
      Float64 => "DoubleStorage",
      Float32 => "FloatStorage",
      Float16 => "HalfStorage",
      BFloat16 => "BFloat16Storage",
      Int64 => "LongStorage",
      Int32 => "IntStorage",
      Int16 => "ShortStorage",
      Int8 => "CharStorage",
      UInt8 => "ByteStorage",
      Bool => "BoolStorage",
      Complex128 => "ComplexDoubleStorage",
      Complex64 => "ComplexFloatStorage",
      _ => return None,
    })
  }

  /// The dtype a legacy typed-storage class stands for (the inverse of [`DType::legacy_storage_class`]).
  pub fn from_legacy_storage_class(class: &str) -> Option<DType> {
    ALL.iter().copied().find(|d| d.legacy_storage_class() == Some(class))
  }

  /// The dtype string of the safetensors format, where one exists.
  pub fn safetensors_name(self) -> Option<&'static str> {
    Some(match self {
      Float64 => "F64",
      Float32 => "F32",
      Float16 => "F16",
      BFloat16 => "BF16",
      Float8E4M3Fn => "F8_E4M3",
      Float8E5M2 => "F8_E5M2",
      Float8E8M0Fnu => "F8_E8M0",
      Int64 => "I64",
      Int32 => "I32",
      Int16 => "I16",
      Int8 => "I8",
      UInt64 => "U64",
      UInt32 => "U32",
      UInt16 => "U16",
      UInt8 => "U8",
      Bool => "BOOL",
      Complex64 => "C64",
      _ => return None,
    })
  }

  /// The dtype a safetensors dtype string names (the inverse of [`DType::safetensors_name`]).
  pub fn from_safetensors_name(name: &str) -> Option<DType> {
    ALL.iter().copied().find(|d| d.safetensors_name() == Some(name))
  }
}

impl fmt::Display for DType {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(self.name())
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn names_round_trip() {
    for d in ALL {
      assert_eq!(DType::from_name(d.name()), Some(d));
    }
    assert_eq!(DType::from_name("bf16"), Some(BFloat16));
    assert_eq!(DType::from_name("float128"), None);
  }

  #[test]
  fn legacy_storage_classes_are_unique() {
    for d in ALL {
      if let Some(c) = d.legacy_storage_class() {
        assert_eq!(DType::from_legacy_storage_class(c), Some(d));
      }
    }
  }
}
