//! The string unions the generated typings carry (`DType`, `CheckpointLayout`), so that TypeScript gets them
//! from the binding instead of casting a `string`. The names stay the core's (`DType::name`, `LayoutKind::name`):
//! the conversion from the core's enum is an exhaustive match (a new core variant does not compile without its
//! string here) and a test holds every string to the core's own name.

use distcp_core::layout::LayoutKind;
use distcp_core::DType as CoreDType;

macro_rules! string_enum {
  ($doc:tt $name:ident from $core:ident { $($variant:ident = $value:tt),* $(,)? } test $test:ident) => {
    #[doc = $doc]
    #[napi_derive::napi(string_enum)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum $name {
      $(#[napi(value = $value)] $variant),*
    }

    impl From<$core> for $name {
      fn from(v: $core) -> Self {
        match v {
          $($core::$variant => $name::$variant),*
        }
      }
    }

    #[cfg(test)]
    #[test]
    fn $test() {
      $(assert_eq!($core::$variant.name(), $value);)*
    }
  };
}

string_enum! {
  "Element types, by their torch names."
  DType from CoreDType {
    Float64 = "float64",
    Float32 = "float32",
    Float16 = "float16",
    BFloat16 = "bfloat16",
    Float8E4M3Fn = "float8_e4m3fn",
    Float8E5M2 = "float8_e5m2",
    Float8E4M3Fnuz = "float8_e4m3fnuz",
    Float8E5M2Fnuz = "float8_e5m2fnuz",
    Float8E8M0Fnu = "float8_e8m0fnu",
    Int64 = "int64",
    Int32 = "int32",
    Int16 = "int16",
    Int8 = "int8",
    UInt64 = "uint64",
    UInt32 = "uint32",
    UInt16 = "uint16",
    UInt8 = "uint8",
    Bool = "bool",
    Complex128 = "complex128",
    Complex64 = "complex64",
    Complex32 = "complex32",
  }
  test dtype_names_are_the_cores
}

string_enum! {
  "What kind of files hold a checkpoint."
  CheckpointLayout from LayoutKind {
    Dcp = "dcp",
    DcpSafetensors = "dcp-safetensors",
    HfStorageSharded = "hf-storage-sharded",
    HfSafetensors = "hf-safetensors",
  }
  test layout_names_are_the_cores
}
