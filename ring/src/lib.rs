//! ferry-ring: the meeting point of `ferry filter` (producer) and
//! `ferry sidecar` (consumer) on a protected host.
//!
//! - [`ring`]: the per-disk write-order ring in shared memory: records in a
//!   valid write order, with payloads while there is room (data state).
//! - [`meta`]: the per-disk persistent tracking file: activity log of hot
//!   extents, dirty bitmap, clean-shutdown flag (crash safety, bitmap state).

#![warn(missing_docs)]

pub mod error;
pub mod meta;
pub mod ring;

pub use error::{Error, ErrorKind, Result};
