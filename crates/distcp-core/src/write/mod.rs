//! Writing DCP checkpoints that `torch.distributed.checkpoint.load` reads, byte for byte as torch writes them.
//!
//! Layers: [`value`] (what the caller saves; tensors borrow the caller's bytes) → [`mod@flatten`] (torch's flat keys)
//! → [`record`] (one item as a `torch.save` archive: [`pickler`] for `data.pkl`, [`zip_writer`] for the zip) →
//! [`metadata_writer`] (`.metadata`) → [`mod@save`] (the data file, fsyncs and the crash-safe commit).

pub mod flatten;
#[doc(hidden)]
pub mod metadata_writer;
#[doc(hidden)]
pub mod ranks;
#[doc(hidden)]
pub mod record;
pub mod save;
pub mod value;

// the formats' writers live beside their readers (`pickle::write`, `zip::write`); these names stay for callers
#[doc(hidden)]
pub use crate::pickle::write as pickler;
#[doc(hidden)]
pub use crate::zip::write as zip_writer;
pub use flatten::{flatten, unflatten, FlatItem, Layout, Nested};
pub use save::{save, SaveOptions, SaveSummary};
pub use value::{from_tagged_json, SaveValue, TensorRef};
