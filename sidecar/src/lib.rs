//! ferry-sidecar: the process server on the protected host. It drains each
//! disk's write-order ring (filled by `ferry filter`), packs the records
//! into change sets, seals them and ships them to the target, committing
//! the ring only after the target's durable ack.
//!
//! * [`batch`]: [`Batcher`] turns ring records, in ring order, into change
//!   sets ([`Pending`]); the rules are in its module docs.
//! * [`ship`]: [`drain_once`], the transactional drain over a [`Transport`].
//! * [`stamp`]: nonces that never repeat and the consistency claim.
//! * [`exchange`]: the checksum exchange that drops resync blocks the
//!   target already holds.
//! * [`spool`]: the bounded on-disk spool that keeps draining the ring in
//!   write order while the target is unreachable.
//! * [`net`]: the wire (Hello/Welcome, change sets and acks, bandwidth limit).
//! * [`policy`]: the standalone policy file (point intervals, retention,
//!   compression, bandwidth).
//! * [`filterctl`]: the filter's control socket (status, barrier, tag, resync-all).
//! * [`daemon`]: `ferry sidecar` (one shipping thread per disk, reconnects,
//!   epochs, metrics).
//! * [`tags`]: [`load_tag_names`], tag names from the filter's `tags.jsonl`.
//! * [`uring_read`]: [`uring_read::DirectReader`], O_DIRECT re-reads through io_uring.
//! * [`error`]: the crate's one error type.

pub mod batch;
pub mod daemon;
pub mod error;
pub mod exchange;
pub mod filterctl;
pub mod net;
pub mod policy;
pub mod ship;
pub mod spool;
pub mod stamp;
pub mod tags;
pub mod uring_read;

pub use batch::{BatchLimits, Batcher, Pending, ReadAt};
pub use error::{Error, ErrorKind, Result};
pub use ship::{
    drain_once, Ack, CountingStamp, DrainStats, ShipOptions, Stamp, Transport, ZSTD_LEVEL,
};
pub use tags::load_tag_names;

#[cfg(test)]
mod tests;
