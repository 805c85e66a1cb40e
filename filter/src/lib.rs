//! ferry-filter: the write interceptor.
//!
//! `ferry filter` serves each protected disk over NBD ([`nbd`], adapted by
//! [`export`]) and records every write in write order ([`order`]) into the
//! disk's shared-memory ring, falling back from data to metadata to bitmap
//! tracking when the ring overflows ([`tracker`]), with an activity log and
//! dirty bitmap on disk for crash safety ([`disk`], `ferry_ring::meta`).
//! Backing I/O goes through io_uring ([`uring`]); [`control`] answers
//! `ferry filter status` and `ferry filter tag`; [`freeze`] makes tags
//! app-consistent; [`daemon`] ties it together. [`group`] is the
//! coordinator of group-consistent points across hosts (hold, tag, release
//! on every member's control socket).

pub mod config;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod error;
pub mod export;
pub mod freeze;
pub mod group;
pub mod grouplink;
pub mod kernel;
pub mod nbd;
pub mod order;
pub mod tracker;
pub mod uring;

pub use error::{Error, ErrorKind, Result};

/// FNV-1a, 64 bits: a hash of state paths whose every step is written
/// here, so names derived from it (the kernel NBD backend identifier, the
/// ring directory) stay the same across ferry and Rust versions, unlike
/// std's `DefaultHasher`.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}
