//! The tagged tree of [`distcp_core::value`] (the one codec of a Python value across the language boundary) as a
//! JS value: a mechanical conversion between JS values and `serde_json::Value`, on the JS thread, in the call. The
//! tags and what they mean stay the core's rule; this only carries JSON-shaped data across napi without a JSON text
//! in between (JSON.stringify on one side and serde_json parsing on the other).
//!
//! Not napi's `serde-json` conversion: it stops at 1,000,000 values and 128 levels (a MoE state dict has more
//! leaves than that, and a tagged dict takes three levels, `{"$d": [[k, v]]}`), and it turns integers beyond
//! 2^32 into floats, which the codec refuses as untagged non-integers.

use crate::errors::{internal, invalid_input, Result};
use distcp_core::limits::MAX_NESTING;
use napi::bindgen_prelude::{Null, ToNapiValue, TypeName, Unknown};
use napi::{sys, Env, JsValue, ValueType};
use serde_json::{Map, Number, Value as Json};
use std::ptr;

/// JSON levels a tree may take: the core refuses values nested deeper than [`MAX_NESTING`], and one value takes at
/// most three levels (a dict: object, entry list, pair). Deeper input (a cycle, a hand-made tree) stops here, long
/// before the stack would.
const MAX_JSON_DEPTH: usize = 3 * (MAX_NESTING + 2);

/// The most items reserved for an array before they are read: a JS array's length is not a count of its items.
const PREALLOCATED_ITEMS: usize = 1 << 16;

/// Integers a JS number holds exactly (`Number.MAX_SAFE_INTEGER`): within it a whole number is an int, as
/// `JSON.stringify` + serde_json made it.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A tagged tree going to JS (`readObject`): converted to JS objects and arrays when napi returns it.
pub struct TaggedJs(pub Json);

impl TypeName for TaggedJs {
  fn type_name() -> &'static str {
    "TaggedValue"
  }
  fn value_type() -> ValueType {
    ValueType::Unknown
  }
}

impl ToNapiValue for TaggedJs {
  unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
    // SAFETY: `env` is the live environment napi passes for this conversion, on the JS thread.
    unsafe { to_js(env, &val.0) }
  }
}

/// `v` (what the TypeScript layer built: null, booleans, numbers, strings, arrays and plain objects) as JSON, the
/// form the core's codec reads. Anything else, or deeper nesting than the codec can take, is
/// `ERR_DISTCP_INVALID_INPUT`, naming `what`.
pub fn json_from_js(env: &Env, v: Unknown<'_>, what: &str) -> Result<Json> {
  // SAFETY: `env` and `v` are the live handles of the current call, on the JS thread.
  unsafe { from_js(env.raw(), v.raw(), what, 0) }
}

/// Raw napi calls, not napi-rs's wrappers: a state dict has tens of thousands of leaves, and the wrappers' extra
/// type checks, key copies and C strings made this walk slower than JSON.stringify plus serde_json.
///
/// # Safety
/// `env` must be the live environment of the current call and `v` a handle of its scope, on the JS thread.
unsafe fn from_js(env: sys::napi_env, v: sys::napi_value, what: &str, depth: usize) -> Result<Json> {
  let fail = |e: napi::Error| internal(e);
  let mut ty = 0;
  // SAFETY (every napi call below): `env` is live and every handle passed belongs to the current scope (the
  // caller's promise); out-pointers are locals of the right type.
  napi::check_status!(unsafe { sys::napi_typeof(env, v, &mut ty) }).map_err(fail)?;
  Ok(match ty {
    sys::ValueType::napi_null => Json::Null,
    sys::ValueType::napi_boolean => {
      let mut b = false;
      napi::check_status!(unsafe { sys::napi_get_value_bool(env, v, &mut b) }).map_err(fail)?;
      Json::Bool(b)
    }
    sys::ValueType::napi_string => Json::String(unsafe { string(env, v) }?),
    sys::ValueType::napi_number => {
      let mut n = 0f64;
      napi::check_status!(unsafe { sys::napi_get_value_double(env, v, &mut n) }).map_err(fail)?;
      if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
        Json::Number(Number::from(n as i64))
      } else {
        Json::Number(
          Number::from_f64(n).ok_or_else(|| invalid_input(format!("{what}: {n} is not a finite number")))?,
        )
      }
    }
    sys::ValueType::napi_object => {
      if depth >= MAX_JSON_DEPTH {
        return Err(invalid_input(format!("{what}: nested more than {MAX_NESTING} levels deep")));
      }
      let mut is_array = false;
      napi::check_status!(unsafe { sys::napi_is_array(env, v, &mut is_array) }).map_err(fail)?;
      if is_array {
        let len = unsafe { array_len(env, v) }?;
        // not `len` itself: a sparse array may claim 2^32 - 1 items (its first hole, `undefined`, is refused below)
        let mut out = Vec::with_capacity((len as usize).min(PREALLOCATED_ITEMS));
        for i in 0..len {
          let mut item = ptr::null_mut();
          napi::check_status!(unsafe { sys::napi_get_element(env, v, i, &mut item) }).map_err(fail)?;
          out.push(unsafe { from_js(env, item, what, depth + 1) }?);
        }
        Json::Array(out)
      } else {
        // own enumerable string keys, as JSON.stringify takes them
        let mut keys = ptr::null_mut();
        napi::check_status!(unsafe {
          sys::napi_get_all_property_names(
            env,
            v,
            sys::KeyCollectionMode::own_only,
            sys::KeyFilter::enumerable | sys::KeyFilter::skip_symbols,
            sys::KeyConversion::numbers_to_strings,
            &mut keys,
          )
        })
        .map_err(fail)?;
        let n = unsafe { array_len(env, keys) }?;
        let mut out = Map::new();
        for i in 0..n {
          let (mut key, mut item) = (ptr::null_mut(), ptr::null_mut());
          napi::check_status!(unsafe { sys::napi_get_element(env, keys, i, &mut key) }).map_err(fail)?;
          napi::check_status!(unsafe { sys::napi_get_property(env, v, key, &mut item) }).map_err(fail)?;
          out.insert(unsafe { string(env, key) }?, unsafe { from_js(env, item, what, depth + 1) }?);
        }
        Json::Object(out)
      }
    }
    other => {
      let name = match other {
        sys::ValueType::napi_undefined => "undefined",
        sys::ValueType::napi_symbol => "a symbol",
        sys::ValueType::napi_function => "a function",
        sys::ValueType::napi_bigint => "a bigint",
        _ => "an external value",
      };
      return Err(invalid_input(format!("{what}: {name} cannot be part of a tagged value")));
    }
  })
}

/// # Safety
/// As [`from_js`]; `v` must be an array.
unsafe fn array_len(env: sys::napi_env, v: sys::napi_value) -> Result<u32> {
  let mut len = 0u32;
  // SAFETY: the caller's promise.
  napi::check_status!(unsafe { sys::napi_get_array_length(env, v, &mut len) }).map_err(internal)?;
  Ok(len)
}

/// The string `v` holds, from its UTF-16 units: emnapi's UTF-8 encoder (Emscripten's `stringToUTF8`) joins a lone
/// surrogate with whatever unit follows it into another character, which no check on the UTF-8 could see;
/// `String::from_utf16` refuses it.
///
/// # Safety
/// As [`from_js`]; `v` must be a string.
#[cfg(target_family = "wasm")]
unsafe fn string(env: sys::napi_env, v: sys::napi_value) -> Result<String> {
  // SAFETY: the caller's promise.
  let units = unsafe { utf16(env, v) }?;
  String::from_utf16(&units).map_err(|_| invalid_input("a string with a lone surrogate (not valid Unicode)"))
}

/// The string `v` holds, in one napi call when it is short (keys, dtype names, float bits: nearly every string of a
/// tagged tree), in two otherwise.
///
/// # Safety
/// As [`from_js`]; `v` must be a string.
#[cfg(not(target_family = "wasm"))]
unsafe fn string(env: sys::napi_env, v: sys::napi_value) -> Result<String> {
  let mut small = [0u8; 64];
  let mut len = 0usize;
  // SAFETY (all three calls): the caller's promise; napi writes at most `buf size - 1` bytes plus a NUL.
  napi::check_status!(unsafe {
    sys::napi_get_value_string_utf8(env, v, small.as_mut_ptr().cast(), small.len(), &mut len)
  })
  .map_err(internal)?;
  // napi stops before a character that does not fit whole: the string surely fit only if the room left could
  // have taken any character (UTF-8 has up to 4 bytes per character), else it is read again at its full length
  let bytes = if len + 4 < small.len() {
    small[..len].to_vec()
  } else {
    napi::check_status!(unsafe { sys::napi_get_value_string_utf8(env, v, ptr::null_mut(), 0, &mut len) })
      .map_err(internal)?;
    let cap = len.checked_add(1).ok_or_else(|| invalid_input("a string too long to copy"))?;
    let mut buf = vec![0u8; cap];
    napi::check_status!(unsafe {
      sys::napi_get_value_string_utf8(env, v, buf.as_mut_ptr().cast(), cap, &mut len)
    })
    .map_err(internal)?;
    buf.truncate(len);
    buf
  };
  let text =
    String::from_utf8(bytes).map_err(|e| invalid_input(format!("a string that is not UTF-8: {e}")))?;
  // napi writes a lone surrogate as U+FFFD: such a string is refused, not silently changed (as serde_json refused
  // it in JSON text)
  if text.contains('\u{FFFD}') {
    // SAFETY: the caller's promise.
    let units = unsafe { utf16(env, v) }?;
    String::from_utf16(&units)
      .map_err(|_| invalid_input("a string with a lone surrogate (not valid Unicode)"))?;
  }
  Ok(text)
}

/// The UTF-16 code units of the string `v`.
///
/// # Safety
/// As [`from_js`]; `v` must be a string.
unsafe fn utf16(env: sys::napi_env, v: sys::napi_value) -> Result<Vec<u16>> {
  let mut len = 0usize;
  // SAFETY (both calls): the caller's promise; napi writes at most `cap - 1` units plus a NUL.
  napi::check_status!(unsafe { sys::napi_get_value_string_utf16(env, v, ptr::null_mut(), 0, &mut len) })
    .map_err(internal)?;
  let cap = len.checked_add(1).ok_or_else(|| invalid_input("a string too long to copy"))?;
  let mut buf = vec![0u16; cap];
  napi::check_status!(unsafe { sys::napi_get_value_string_utf16(env, v, buf.as_mut_ptr(), cap, &mut len) })
    .map_err(internal)?;
  buf.truncate(len);
  Ok(buf)
}

/// `v` as a JS value: objects and arrays as they are, numbers as JS numbers (an int beyond 2^53 never gets here:
/// the codec tags it `$i`).
///
/// # Safety
/// `env` must be the live environment of the current call, on the JS thread.
unsafe fn to_js(env: sys::napi_env, v: &Json) -> napi::Result<sys::napi_value> {
  // SAFETY (every block below): `env` is live (the caller's promise); the handles made here belong to the current
  // handle scope.
  match v {
    Json::Null => unsafe { Null::to_napi_value(env, Null) },
    Json::Bool(b) => unsafe { bool::to_napi_value(env, *b) },
    Json::Number(n) => unsafe { f64::to_napi_value(env, n.as_f64().unwrap_or(f64::NAN)) },
    Json::String(s) => unsafe { <&str>::to_napi_value(env, s) },
    Json::Array(items) => {
      let mut arr = ptr::null_mut();
      napi::check_status!(unsafe { sys::napi_create_array_with_length(env, items.len(), &mut arr) })?;
      for (i, x) in items.iter().enumerate() {
        let item = unsafe { to_js(env, x) }?;
        // a JS array holds fewer than 2^32 items: a longer list cannot be built in JS at all
        let i =
          u32::try_from(i).map_err(|_| napi::Error::from_reason("a list longer than a JS array can be"))?;
        napi::check_status!(unsafe { sys::napi_set_element(env, arr, i, item) })?;
      }
      Ok(arr)
    }
    Json::Object(o) => {
      let mut obj = ptr::null_mut();
      napi::check_status!(unsafe { sys::napi_create_object(env, &mut obj) })?;
      for (k, x) in o {
        let item = unsafe { to_js(env, x) }?;
        let mut key = ptr::null_mut();
        napi::check_status!(unsafe {
          sys::napi_create_string_utf8(env, k.as_ptr().cast(), k.len() as isize, &mut key)
        })?;
        napi::check_status!(unsafe { sys::napi_set_property(env, obj, key, item) })?;
      }
      Ok(obj)
    }
  }
}
