//! ferry-master-target: the recovery-site receiver.
//!
//! So far: [`journal`], the per-disk durable journal of change sets (the
//! target acknowledges a change set only once it is durable there), with
//! [`error`], the crate's error type. See the [`journal`] module docs for
//! the on-disk layout, the sequence rules and the crash-safety argument.
//! [`applier`] replays a journal, in order, into the disk's replica image
//! (idempotently: see its module docs for the crash argument).
//! [`site`] holds every disk of the data directory (journal, replica,
//! background applier, `status.json`); [`server`] serves one sidecar
//! connection (Hello/Welcome, checks, durable append, ack or reject);
//! [`daemon`] is `ferry target` (TLS listener, threads, lock); [`points`]
//! indexes the recovery points of applied change sets.
//! [`undo`] is the per-disk undo log: the old contents of every range an
//! applied change set overwrote, to rewind the replica to older points.
//! [`failback`] is the reverse direction: reprotect into seeded replicas
//! (adopted VMDK/VHD images), and failback into them in place;
//! [`qemulock`] tells whether a qemu process writes an image.

pub mod applier;
pub mod clock;
pub mod control;
pub mod daemon;
pub mod error;
pub mod failback;
pub mod failover;
pub mod history;
pub mod hostpolicy;
pub mod journal;
pub mod materialize;
pub mod points;
pub mod qemulock;
/// Low-level helpers shared by the segment files of [`journal`] and [`undo`].
mod segfile;
pub mod server;
pub mod site;
pub mod undo;

#[cfg(test)]
mod testutil;

pub use error::{Error, ErrorKind, Result};
pub use journal::{Appended, Iter, Journal, JournalOptions, Pruned, Recovery};
