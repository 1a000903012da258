//! The writer's view of the value model ([`crate::value`]): what a caller hands [`crate::write::save()`].

pub use crate::value::*;
