//! The per-disk write-order ring in shared memory.
//!
//! One file per protected disk, created by the producer (`ferry filter`) in
//! `/dev/shm` and mapped `MAP_SHARED` by it and by the consumer (`ferry
//! sidecar`). Single producer, single consumer per ring (each role takes an
//! open-file-description lock on the file, released by the kernel when its
//! process dies). Indexes and payload positions are monotonic `u64`s that
//! never wrap (`index % slots` is the slot, `pos % payload bytes` the place
//! in the payload area). The producer release-stores `published` after it
//! wrote a slot; the consumer acquire-loads it before it reads one, and
//! release-stores `committed` after the target acknowledged; the producer
//! acquire-loads that before it reuses slots or payload bytes.
//!
//! # File layout (version 1, little-endian; offsets in [`layout`])
//!
//! ```text
//!  0      +-------------------------------------------------------------+
//!         | static header (written once, crc32c-protected)              |
//!         |   0 magic "FERRYRNG"   8 version u32   12 header size u32    |
//!         |  16 record size u32   20 slots u32     24 payload bytes u64  |
//!         |  32 disk size u64     40 generation    48 created ns u64     |
//!         |  56 slots offset u64  64 payload offset u64                  |
//!         |  72 payload align u32 76 flags u32     80 disk name [64]     |
//!         | 144 header crc32c u32                                        |
//!  256    | producer line: published u64, payload_head u64,             |
//!         |                wake u32 (futex), producer pid u32           |
//!  512    | consumer line: committed u64, heartbeat ns u64,             |
//!         |                consumer pid u32, waiting u32                |
//!  4096   +-------------------------------------------------------------+
//!         | record slots: `slots` x 64 bytes                            |
//!         |   0 seq  8 timestamp ns  16 offset  24 length               |
//!         |  32 payload pos (u64::MAX: none)  40 aux                    |
//!         |  48 checksum u32  52 kind u8  53 flags u8  54 reserved[2]   |
//!         |  56 record crc32c u32  60 reserved[4]                       |
//!  payload_offset (end of slots rounded up to 4096)                     |
//!         +-------------------------------------------------------------+
//!         | payload area: `payload bytes`, a byte ring of 4096-aligned  |
//!         | payloads; a payload never wraps around the end (it skips to |
//!         | the start instead)                                          |
//!         +-------------------------------------------------------------+
//! ```
//!
//! # Protocol
//!
//! - Record slot `i % slots` is free for record `i` when
//!   `i - committed < slots`; records in `committed..published` are the
//!   consumer's to read, and stay still until it commits them.
//! - Payload bytes are reserved in order at `payload_head`. The producer
//!   frees them from the oldest region still needed: an outstanding
//!   reservation, or a published record with payload not yet committed.
//!   Reservations may be published in any order and may be cancelled
//!   (dropped). The consumer reads a payload only for a record below
//!   `published`, and only until it commits that record.
//! - A producer that dies loses its unpublished reservations;
//!   [`Producer::reopen`] rebuilds the payload accounting from the
//!   uncommitted records and continues after them. A consumer that dies
//!   resumes at `committed`: later records are delivered again, earlier
//!   ones never.
//! - [`Producer::create`] builds a new file under a temporary name and
//!   renames it over the path, with a new generation: a consumer of the
//!   old file learns it from [`Consumer::check_generation`] (Stale).

mod consumer;
pub mod layout;
mod producer;
mod record;
mod shm;
#[cfg(test)]
mod tests;

pub use consumer::{Consumer, Lag, RecordView};
pub use layout::{FLAG_FUA, FLAG_HAS_PAYLOAD, NO_PAYLOAD};
pub use producer::{Geometry, NewRecord, PayloadSlot, Producer, PublishError};
pub use record::{payload_checksum, Record, RecordKind};
pub use shm::now_ns;
