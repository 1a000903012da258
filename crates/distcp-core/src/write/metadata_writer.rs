//! `.metadata` as a protocol-2 pickle of `torch.distributed.checkpoint.metadata.Metadata` that every torch from
//! 2.0 on loads (spec §2.5): variant-A `TensorProperties` (`torch.distributed._shard.sharded_tensor.metadata`,
//! with `MEM_FORMAT_ENCODING`), no `StorageMeta` (the class does not exist before 2.4), `planner_data` with every
//! key, and optionally `version` (a plain str attribute, which older versions simply keep).

use crate::error::{Error, Result};
use crate::metadata::{ItemMetadata, Metadata, PathElem, StorageInfo, StorageKey, TensorMetadata};
use crate::write::pickler::Pickler;
use std::path::Path;

use crate::metadata::{DCP_FILESYSTEM, DCP_METADATA, SHARD_METADATA};

/// `CURRENT_DCP_VERSION` of torch ≥ 2.9.
pub const DCP_VERSION: &str = "1.0.0";

/// What goes into `.metadata`, in the order it is written.
#[derive(Debug, Clone, Copy)]
pub struct MetadataDoc<'a> {
  /// `state_dict_metadata`, in flattening order.
  pub items: &'a [(String, ItemMetadata)],
  /// `planner_data`: each flat key's path (torch's default planner lists every key); `None` writes `None`.
  pub planner_data: Option<&'a [(String, Vec<PathElem>)]>,
  /// `storage_data`, in the order the items were written. A tensor chunk's key has `offset: Some(..)`.
  pub storage_data: &'a [(StorageKey, StorageInfo)],
  /// `Metadata.version` (`"1.0.0"` in torch ≥ 2.9); `None` leaves it out.
  pub version: Option<&'a str>,
}

fn size(p: &mut Pickler, dims: &[u64]) {
  p.global("torch", "Size");
  let _ = p.tuple::<()>(1, |p| {
    p.int_tuple(dims);
    Ok(())
  });
  p.reduce();
}

fn tensor_item(p: &mut Pickler, t: &TensorMetadata) {
  let _ = p.dataclass::<()>(
    DCP_METADATA,
    "TensorStorageMetadata",
    Some(|p: &mut Pickler| {
      p.dict::<()>(3, |p, i| {
        match i {
          0 => {
            p.str_const("properties");
            // TensorProperties.__getstate__ → (dtype, layout, requires_grad, memory format, pin_memory)
            p.global(SHARD_METADATA, "TensorProperties");
            p.tuple::<()>(0, |_| Ok(()))?;
            p.newobj();
            p.tuple::<()>(5, |p| {
              p.global("torch", t.properties.dtype.name());
              p.global("torch", "strided");
              p.bool(t.properties.requires_grad);
              p.global(SHARD_METADATA, "MEM_FORMAT_ENCODING");
              p.tuple::<()>(1, |p| {
                p.int(0); // TORCH_CONTIGUOUS_FORMAT
                Ok(())
              })?;
              p.reduce();
              p.bool(t.properties.pin_memory);
              Ok(())
            })?;
            p.build();
          }
          1 => {
            p.str_const("size");
            size(p, &t.size);
          }
          _ => {
            p.str_const("chunks");
            p.list::<()>(t.chunks.len(), |p, c| {
              let chunk = &t.chunks[c];
              p.dataclass::<()>(
                DCP_METADATA,
                "ChunkStorageMetadata",
                Some(|p: &mut Pickler| {
                  p.dict::<()>(2, |p, j| {
                    if j == 0 {
                      p.str_const("offsets");
                      size(p, &chunk.offsets);
                    } else {
                      p.str_const("sizes");
                      size(p, &chunk.sizes);
                    }
                    Ok(())
                  })
                }),
              )
            })?;
          }
        }
        Ok(())
      })
    }),
  );
}

/// Pickles `doc`. Errors when a tensor chunk's storage key matches no chunk of its tensor.
pub fn metadata_pickle(doc: &MetadataDoc, path: &Path) -> Result<Vec<u8>> {
  // MetadataIndex.index of each chunk key = its position in the tensor's chunk list
  let mut indices = Vec::with_capacity(doc.storage_data.len());
  for (key, _) in doc.storage_data {
    let index = match &key.offset {
      None => None,
      Some(off) => {
        let tensor = doc.items.iter().find_map(|(k, item)| match item {
          ItemMetadata::Tensor(t) if *k == key.fqn => Some(t),
          _ => None,
        });
        match tensor.and_then(|t| t.chunks.iter().position(|c| &c.offsets == off)) {
          Some(i) => Some(i),
          None => {
            return Err(Error::Metadata {
              path: path.to_path_buf(),
              reason: format!("storage entry for `{}` at {off:?} matches no chunk of that tensor", key.fqn),
            })
          }
        }
      }
    };
    indices.push(index);
  }

  let mut p = Pickler::sharing_strings();
  let fields = 3 + usize::from(doc.version.is_some());
  let _ = p.dataclass::<()>(
    DCP_METADATA,
    "Metadata",
    Some(|p: &mut Pickler| {
      p.dict::<()>(fields, |p, field| {
        match field {
          0 => {
            p.str_const("state_dict_metadata");
            p.dict::<()>(doc.items.len(), |p, i| {
              let (key, item) = &doc.items[i];
              p.str(key);
              match item {
                ItemMetadata::Tensor(t) => tensor_item(p, t),
                ItemMetadata::Bytes => {
                  p.dataclass::<()>(DCP_METADATA, "BytesStorageMetadata", None::<fn(&mut Pickler) -> _>)?
                }
              }
              Ok(())
            })?;
          }
          1 => {
            p.str_const("planner_data");
            match doc.planner_data {
              None => p.none(),
              Some(pd) => p.dict::<()>(pd.len(), |p, i| {
                let (key, path) = &pd[i];
                p.str(key);
                p.tuple::<()>(path.len(), |p| {
                  for e in path {
                    match e {
                      PathElem::Key(k) => p.str(k),
                      PathElem::Index(i) => p.int(*i),
                    }
                  }
                  Ok(())
                })
              })?,
            }
          }
          2 => {
            p.str_const("storage_data");
            p.dict::<()>(doc.storage_data.len(), |p, i| {
              let (key, info) = &doc.storage_data[i];
              let n = 2 + usize::from(key.offset.is_some());
              p.dataclass::<()>(
                DCP_METADATA,
                "MetadataIndex",
                Some(|p: &mut Pickler| {
                  p.dict::<()>(n, |p, j| {
                    match j {
                      0 => {
                        p.str_const("fqn");
                        p.str(&key.fqn);
                      }
                      1 => {
                        p.str_const("index");
                        match indices[i] {
                          Some(x) => p.uint(x as u64),
                          None => p.none(),
                        }
                      }
                      _ => {
                        p.str_const("offset");
                        size(p, key.offset.as_deref().unwrap_or(&[]));
                      }
                    }
                    Ok(())
                  })
                }),
              )?;
              let n = 3 + usize::from(!info.transform_descriptors.is_empty());
              p.dataclass::<()>(
                DCP_FILESYSTEM,
                "_StorageInfo",
                Some(|p: &mut Pickler| {
                  p.dict::<()>(n, |p, j| {
                    match j {
                      0 => {
                        p.str_const("relative_path");
                        p.str(&info.relative_path);
                      }
                      1 => {
                        p.str_const("offset");
                        p.uint(info.offset);
                      }
                      2 => {
                        p.str_const("length");
                        p.uint(info.length);
                      }
                      _ => {
                        p.str_const("transform_descriptors");
                        p.list::<()>(info.transform_descriptors.len(), |p, d| {
                          p.str(&info.transform_descriptors[d]);
                          Ok(())
                        })?;
                      }
                    }
                    Ok(())
                  })
                }),
              )
            })?;
          }
          _ => {
            p.str_const("version");
            p.str(doc.version.unwrap_or(DCP_VERSION));
          }
        }
        Ok(())
      })
    }),
  );
  Ok(p.finish())
}

impl Metadata {
  /// This metadata as a `.metadata` pickle (spec §2.5). `planner_data` and `storage_data` are written in item
  /// order (storage entries of one item by chunk order, then anything left by file and offset), so the bytes
  /// are deterministic.
  pub fn to_pickle(&self, path: &Path) -> Result<Vec<u8>> {
    let planner: Option<Vec<(String, Vec<PathElem>)>> = self.planner_data.as_ref().map(|pd| {
      let mut out: Vec<(String, Vec<PathElem>)> =
        self.items.iter().filter_map(|(k, _)| pd.get(k).map(|p| (k.clone(), p.clone()))).collect();
      let mut rest: Vec<_> =
        pd.iter().filter(|(k, _)| self.item(k).is_none()).map(|(k, p)| (k.clone(), p.clone())).collect();
      rest.sort_by(|a, b| a.0.cmp(&b.0));
      out.extend(rest);
      out
    });
    let mut storage: Vec<(StorageKey, StorageInfo)> =
      self.storage_data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    storage.sort_by(|(ka, va), (kb, vb)| {
      (&va.relative_path, va.offset, &ka.fqn, &ka.offset).cmp(&(
        &vb.relative_path,
        vb.offset,
        &kb.fqn,
        &kb.offset,
      ))
    });
    metadata_pickle(
      &MetadataDoc {
        items: &self.items,
        planner_data: planner.as_deref(),
        storage_data: &storage,
        version: self.version.as_deref(),
      },
      path,
    )
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::dtype::DType;
  use crate::metadata::{Chunk, TensorProperties};

  fn sample() -> Metadata {
    let mut md = Metadata::default();
    md.items.push((
      "w".into(),
      ItemMetadata::Tensor(TensorMetadata {
        properties: TensorProperties {
          dtype: DType::BFloat16,
          requires_grad: false,
          pin_memory: false,
          module: SHARD_METADATA.into(),
        },
        size: vec![2, 3],
        chunks: vec![Chunk { offsets: vec![0, 0], sizes: vec![2, 3] }],
      }),
    ));
    md.items.push((
      "s".into(),
      ItemMetadata::Tensor(TensorMetadata {
        properties: TensorProperties {
          dtype: DType::Float32,
          requires_grad: false,
          pin_memory: false,
          module: SHARD_METADATA.into(),
        },
        size: vec![],
        chunks: vec![Chunk { offsets: vec![], sizes: vec![] }],
      }),
    ));
    md.items.push(("step".into(), ItemMetadata::Bytes));
    md.planner_data = Some(
      [
        ("w".to_string(), vec![PathElem::Key("w".into())]),
        ("s".to_string(), vec![PathElem::Key("s".into())]),
        ("step".to_string(), vec![PathElem::Key("o".into()), PathElem::Index(3)]),
      ]
      .into_iter()
      .collect(),
    );
    let info = |offset, length| StorageInfo {
      relative_path: "__0_0.distcp".into(),
      offset,
      length,
      transform_descriptors: vec![],
    };
    md.storage_data.insert(StorageKey { fqn: "step".into(), offset: None }, info(0, 1261));
    md.storage_data
      .insert(StorageKey { fqn: "w".into(), offset: Some(vec![0, 0]) }, info(1261, 5_000_000_000));
    md.storage_data.insert(StorageKey { fqn: "s".into(), offset: Some(vec![]) }, info(5_000_001_261, 10));
    md.version = Some(DCP_VERSION.into());
    md
  }

  #[test]
  fn round_trips_through_the_reader() {
    let md = sample();
    let bytes = md.to_pickle(Path::new(".metadata")).unwrap();
    let back = Metadata::parse(&bytes, Path::new(".metadata")).unwrap();
    assert_eq!(back.items, md.items);
    assert_eq!(back.planner_data, md.planner_data);
    assert_eq!(back.storage_data, md.storage_data);
    assert_eq!(back.version.as_deref(), Some(DCP_VERSION));
    assert!(back.storage_meta.is_none());
    assert_eq!(back.tensor_properties_module(), Some(SHARD_METADATA));
    // deterministic
    assert_eq!(md.to_pickle(Path::new(".metadata")).unwrap(), bytes);
  }

  #[test]
  fn a_storage_key_without_a_chunk_is_an_error() {
    let mut md = sample();
    md.storage_data.insert(
      StorageKey { fqn: "w".into(), offset: Some(vec![1, 0]) },
      StorageInfo { relative_path: "x".into(), offset: 0, length: 1, transform_descriptors: vec![] },
    );
    let e = md.to_pickle(Path::new(".metadata")).unwrap_err();
    assert!(e.to_string().contains("matches no chunk"), "{e}");
  }
}
