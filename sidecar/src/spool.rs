//! The on-disk spool: sealed change sets that left the ring while the
//! target was unreachable, kept in write order until they are acknowledged.
//!
//! The ring lives in memory and is small; an outage longer than it holds
//! would push the filter into metadata and then bitmap state (a resync
//! later). The spool stretches that: while disconnected, the sidecar keeps
//! draining through [`SpoolTransport`], which makes each set durable here
//! and "acknowledges" it, so the ring is committed only after the set is on
//! disk (the transactional drain holds with the spool as the first hop).
//! Past its size limit the spool refuses, the ring fills, and the filter
//! falls back as before.
//!
//! # Layout
//!
//! `DIR/{last_seq:020}-{epoch:020}.cs`, one file per change set: the
//! complete protocol frame (16-byte header with length and crc32c of the
//! header, then the ChangeSet message), then [`TRAILER_LEN`] bytes: crc32c
//! of the frame (little endian), since the frame's own checksum covers only
//! its header. Written to `.tmp`, fsynced, renamed, directory fsynced. The name orders the files (sequences only grow). At open, `.tmp`
//! leftovers are removed; a file that does not decode is an error (its
//! records left the ring: the caller must resync).

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_protocol::frame::MAX_FRAME;
use ferry_protocol::message::{ChangeSet, Message};

use crate::error::{Error, ErrorKind, Result};
use crate::ship::{Ack, Transport};

const EXT: &str = "cs";
/// Bytes after the frame: crc32c of the frame, u32 LE.
pub const TRAILER_LEN: usize = 4;

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    last_seq: u64,
    epoch: u64,
    bytes: u64,
}

/// The last set a [`Spool::flush_to`] delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Its last sequence.
    pub last_seq: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Its consistency claim.
    pub consistent_from: u64,
}

/// A directory of spooled change sets; see the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Io,
        format!("spool: {what} {}", path.display()),
        e,
    )
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(&format!(".{EXT}"))?;
    let (last, epoch) = stem.split_once('-')?;
    Some((last.parse().ok()?, epoch.parse().ok()?))
}

impl Spool {
    /// Open (or create) the spool in `dir`, holding at most `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool> {
        fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        let mut entries = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| io("list", dir, e))? {
            let e = e.map_err(|e| io("list", dir, e))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(|e| io("remove leftover", &path, e))?;
                continue;
            }
            let Some((last_seq, epoch)) = parse_name(&name) else {
                continue;
            };
            let bytes = e.metadata().map_err(|e| io("stat", &path, e))?.len();
            entries.push(Entry {
                path,
                last_seq,
                epoch,
                bytes,
            });
        }
        entries.sort_by_key(|e| e.last_seq);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            entries: entries.into(),
            bytes,
        })
    }

    /// Change sets held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `last_seq` of the newest set held.
    pub fn last_seq(&self) -> Option<u64> {
        self.entries.back().map(|e| e.last_seq)
    }

    /// Epoch of the newest set held.
    pub fn last_epoch(&self) -> Option<u64> {
        self.entries.back().map(|e| e.epoch)
    }

    /// Make `cs` durable at the end of the spool, or refuse (TooLarge)
    /// when it would exceed the size limit.
    pub fn push(&mut self, cs: ChangeSet) -> Result<()> {
        let h = &cs.header;
        if self.last_seq().is_some_and(|l| h.last_seq <= l) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "spool: set ending at {} after one ending at {:?}",
                    h.last_seq,
                    self.last_seq()
                ),
            ));
        }
        let name = format!("{:020}-{:020}.{EXT}", h.last_seq, h.epoch);
        let (last_seq, epoch) = (h.last_seq, h.epoch);
        let mut frame = Message::ChangeSet(cs)
            .to_frame_bytes(MAX_FRAME)
            .map_err(|e| Error::protocol("spool: encode change set", e))?;
        let crc = crc32c::crc32c(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        let bytes = u64::try_from(frame.len()).unwrap_or(u64::MAX);
        if self.bytes.saturating_add(bytes) > self.max_bytes {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "spool full: {} of {} bytes used, the set needs {bytes}",
                    self.bytes, self.max_bytes
                ),
            ));
        }
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
            f.write_all(&frame).map_err(|e| io("write", &tmp, e))?;
            f.sync_data().map_err(|e| io("sync", &tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| io("rename", &tmp, e))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync", &self.dir, e))?;
        self.entries.push_back(Entry {
            path,
            last_seq,
            epoch,
            bytes,
        });
        self.bytes += bytes;
        Ok(())
    }

    /// The oldest set held, read back and decoded.
    pub fn front(&self) -> Option<Result<ChangeSet>> {
        let e = self.entries.front()?;
        Some(
            fs::read(&e.path)
                .map_err(|err| io("read", &e.path, err))
                .and_then(|bytes| decode_file(&e.path, &bytes)),
        )
    }

    /// Drop the oldest set (acknowledged by the target).
    pub fn pop_front(&mut self) -> Result<()> {
        if let Some(e) = self.entries.pop_front() {
            fs::remove_file(&e.path).map_err(|err| io("remove", &e.path, err))?;
            self.bytes -= e.bytes;
        }
        Ok(())
    }

    /// Drop everything (the target lost the chain; a resync covers it).
    pub fn clear(&mut self) -> Result<()> {
        while !self.is_empty() {
            self.pop_front()?;
        }
        Ok(())
    }

    /// Send every held set through `transport` in order, dropping each once
    /// acknowledged. Returns what the last acknowledged set was, if any.
    pub fn flush_to(&mut self, transport: &mut dyn Transport) -> Result<Option<Delivered>> {
        let mut acked = None;
        while let Some(cs) = self.front() {
            let cs = cs?;
            let (first, last) = (cs.header.first_seq, cs.header.last_seq);
            let delivered = Delivered {
                last_seq: last,
                epoch: cs.header.epoch,
                consistent_from: cs.header.consistent_from,
            };
            let ack = transport.send(cs)?;
            if ack.last_seq < last {
                return Err(Error::new(
                    ErrorKind::Rejected,
                    format!(
                        "spooled set [{first}, {last}] acknowledged only up to {}",
                        ack.last_seq
                    ),
                ));
            }
            self.pop_front()?;
            acked = Some(delivered);
        }
        Ok(acked)
    }
}

/// Check the trailer of a spool file and decode its change set.
fn decode_file(path: &Path, bytes: &[u8]) -> Result<ChangeSet> {
    let corrupt = |what: String| {
        Error::new(
            ErrorKind::Corrupt,
            format!("spool: {}: {what}", path.display()),
        )
    };
    let split = bytes
        .len()
        .checked_sub(TRAILER_LEN)
        .ok_or_else(|| corrupt("shorter than its trailer".into()))?;
    let (frame, trailer) = bytes.split_at(split);
    let mut want = [0u8; TRAILER_LEN];
    want.copy_from_slice(trailer);
    if crc32c::crc32c(frame) != u32::from_le_bytes(want) {
        return Err(corrupt("checksum mismatch".into()));
    }
    match Message::read_from(&mut &frame[..], MAX_FRAME) {
        Ok(Message::ChangeSet(cs)) => Ok(cs),
        Ok(other) => Err(corrupt(format!("holds message kind {}", other.kind()))),
        Err(err) => Err(Error::with_source(
            ErrorKind::Corrupt,
            format!("spool: {} does not decode", path.display()),
            err,
        )),
    }
}

/// A [`Transport`] into the spool: "acknowledged" once durable on disk.
#[derive(Debug)]
pub struct SpoolTransport<'a> {
    /// The spool.
    pub spool: &'a mut Spool,
}

impl Transport for SpoolTransport<'_> {
    fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
        let last_seq = cs.header.last_seq;
        self.spool.push(cs)?;
        Ok(Ack { last_seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::message::{ChangeKind, ChangeSetHeader, ChunkInfo, Extent, ExtentOp};

    fn set(first: u64, last: u64, n: u32) -> ChangeSet {
        ChangeSet {
            header: ChangeSetHeader {
                host: "h".into(),
                disk: "d".into(),
                epoch: 2,
                kind: ChangeKind::WriteOrder,
                first_seq: first,
                last_seq: last,
                prev_end_seq: first - 1,
                nonce_stream: 1,
                nonce_counter: first,
                key_salt: [0; 16],
                consistent_from: first,
                tags: Vec::new(),
                extents: vec![Extent {
                    seq: first,
                    offset: 0,
                    length: u64::from(n),
                    op: ExtentOp::Write,
                }],
                chunks: vec![ChunkInfo {
                    raw_len: n,
                    stored_len: n,
                    compressed: false,
                }],
            },
            payload: vec![7; usize::try_from(n).unwrap() + 16],
        }
    }

    struct Recorder(Vec<ChangeSet>);
    impl Transport for Recorder {
        fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
            let last_seq = cs.header.last_seq;
            self.0.push(cs);
            Ok(Ack { last_seq })
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn keeps_order_across_reopen_and_flushes() {
        let d = dir("order");
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        let sets = [set(1, 3, 100), set(4, 4, 10), set(5, 9, 1000)];
        for cs in &sets {
            SpoolTransport { spool: &mut s }.send(cs.clone()).unwrap();
        }
        assert_eq!(
            (s.len(), s.last_seq(), s.last_epoch()),
            (3, Some(9), Some(2))
        );
        // A leftover temp file from a crash mid-push is dropped at open.
        fs::write(d.join("x.cs.tmp"), b"partial").unwrap();
        drop(s);
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(s.len(), 3);
        assert!(!d.join("x.cs.tmp").exists());
        let mut r = Recorder(Vec::new());
        let last = s.flush_to(&mut r).unwrap().unwrap();
        assert_eq!((last.last_seq, last.epoch, last.consistent_from), (9, 2, 5));
        assert_eq!(r.0, sets);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_past_the_limit_and_out_of_order() {
        let d = dir("limit");
        let mut s = Spool::open(&d, 3000).unwrap();
        s.push(set(1, 1, 1000)).unwrap();
        s.push(set(2, 2, 1000)).unwrap();
        let e = s.push(set(3, 3, 1000)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
        assert_eq!(
            s.push(set(2, 2, 10)).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(s.len(), 2);
        s.pop_front().unwrap();
        s.push(set(3, 3, 1000)).unwrap();
        s.clear().unwrap();
        assert!(s.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_skip() {
        let d = dir("damaged");
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.push(set(1, 1, 100)).unwrap();
        let path = fs::read_dir(&d).unwrap().next().unwrap().unwrap().path();
        let mut b = fs::read(&path).unwrap();
        b[20] ^= 1;
        fs::write(&path, b).unwrap();
        let s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(s.front().unwrap().unwrap_err().kind(), ErrorKind::Corrupt);
        fs::remove_dir_all(&d).unwrap();
    }
}
