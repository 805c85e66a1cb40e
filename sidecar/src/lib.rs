//! ferry-sidecar: the process server on the protected host. It drains each
//! disk's write-order ring (filled by `ferry filter`), packs the records
//! into change sets, seals them and ships them to the target, committing
//! the ring only after the target's durable ack.
//!
//! So far (no network, io_uring or daemon yet):
//! * [`batch`]: [`Batcher`] turns ring records, in ring order, into change
//!   sets ([`Pending`]); the rules are in its module docs.
//! * [`ship`]: [`drain_once`], the transactional drain over a [`Transport`].
//! * [`tags`]: [`load_tag_names`], tag names from the filter's `tags.jsonl`.
//! * [`error`]: the crate's one error type.

pub mod batch;
pub mod error;
pub mod ship;
pub mod tags;

pub use batch::{BatchLimits, Batcher, Pending, ReadAt};
pub use error::{Error, ErrorKind, Result};
pub use ship::{drain_once, sidecar_nonce, Ack, DrainStats, Transport, ZSTD_LEVEL};
pub use tags::load_tag_names;

#[cfg(test)]
mod tests;
