//! What the sidecar stamps on every change set before sealing it: a nonce
//! that never repeats under the disk's key, and the consistency claim.
//!
//! # Nonces
//!
//! AES-GCM breaks if a (key, nonce) pair ever seals two different
//! plaintexts. A set rebuilt after a failure may hold different data (a
//! Resync set re-reads the device), so the nonce is not derived from the
//! set: each sidecar process takes a fresh 32-bit *stream* number from
//! `STATE/sidecar/nonce-stream` (incremented and fsynced before use), and
//! counts seals within it; and each session seals under the disk key
//! derived with a random 128-bit salt (carried in the header), so even a
//! state directory restored from a backup, which hands out a stream again,
//! never reuses a (key, nonce) pair.
//!
//! # Consistency claim
//!
//! [`Consistency`] decides each set's `consistent_from` (see
//! `ChangeSetHeader::consistent_from`). The replica stops being a prefix of
//! the source's write order when the stream carries re-read data (a Resync
//! set: metadata state, resync of dirty regions, initial copy), when the
//! filter left the data state (a state-change record), or when a new epoch
//! starts (records were lost). It is one again once the filter reports
//! nothing dirty and the data state, at the highest of: the end of the
//! last Resync set, the filter's barrier sequence taken after that set's
//! data was read (every write visible to the read has a sequence at or
//! below it), and the sequence where the inconsistency began.

use std::fs;
use std::io::Write;
use std::path::Path;

use ferry_protocol::message::{ChangeKind, ChangeSetHeader, KEY_SALT_LEN};

use crate::error::{Error, ErrorKind, Result};
use crate::ship::Stamp;

/// File of the last nonce stream used, in the sidecar's state directory.
pub const NONCE_STREAM_FILE: &str = "nonce-stream";

/// Take the next nonce stream number for this process: read, increment,
/// write and fsync (temp + rename) before returning, so a crash never
/// hands the same stream out twice.
pub fn next_nonce_stream(dir: &Path) -> Result<u32> {
    let path = dir.join(NONCE_STREAM_FILE);
    let io = |what: &str, e: std::io::Error| {
        Error::with_source(ErrorKind::Io, format!("{what} {}", path.display()), e)
    };
    let last = match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u32>().map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("nonce stream file {} is damaged; refusing to guess (a reused nonce breaks the encryption)", path.display()),
                e,
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io("read", e)),
    };
    let next = last.checked_add(1).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "nonce streams exhausted in {}: rotate the data keys",
                path.display()
            ),
        )
    })?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp).map_err(|e| io("create", e))?;
        writeln!(f, "{next}").map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
    }
    fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync directory of", e))?;
    Ok(next)
}

/// Hands out nonces: one stream per process, a counter within it, and a
/// random key salt per session (see `Key::for_salt`): even if the stream
/// file were restored from a backup, the salt keeps two sessions apart.
#[derive(Debug, Clone)]
pub struct Nonces {
    stream: u32,
    next: u64,
    salt: [u8; KEY_SALT_LEN],
}

impl Nonces {
    /// Nonces of `stream` (from [`next_nonce_stream`]) under a fresh random
    /// key salt.
    pub fn new(stream: u32) -> Result<Nonces> {
        let mut salt = [0u8; KEY_SALT_LEN];
        getrandom::getrandom(&mut salt)
            .map_err(|e| Error::new(ErrorKind::Io, format!("random key salt: {e}")))?;
        Ok(Nonces {
            stream,
            next: 0,
            salt,
        })
    }

    /// The session's key salt.
    pub fn salt(&self) -> [u8; KEY_SALT_LEN] {
        self.salt
    }

    /// The next unused (stream, counter).
    pub fn take(&mut self) -> (u32, u64) {
        let n = self.next;
        self.next += 1;
        (self.stream, n)
    }
}

/// The consistency claim of one disk's stream; a pure state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consistency {
    since: Option<u64>,
    floor: u64,
}

impl Consistency {
    /// Start from what the target last recorded (0: inconsistent).
    pub fn resume(consistent_from: u64) -> Consistency {
        Consistency {
            since: (consistent_from != 0).then_some(consistent_from),
            floor: consistent_from,
        }
    }

    /// The replica is consistent from this sequence on (None: it is not).
    pub fn since(&self) -> Option<u64> {
        self.since
    }

    /// Something made the replica inconsistent at or before `seq` (a new
    /// epoch, a recreated ring, a resync requested by the target).
    pub fn broken_at(&mut self, seq: u64) {
        self.since = None;
        self.floor = self.floor.max(seq);
    }

    /// The claim for a set with `header`, its data read and the filter's
    /// barrier sequence taken after the read (`high_water`, for Resync
    /// sets). Returns `consistent_from` for the header.
    pub fn claim(&mut self, header: &ChangeSetHeader, state_changes: u64, high_water: u64) -> u64 {
        if header.kind == ChangeKind::Resync || state_changes > 0 {
            self.broken_at(header.last_seq.max(high_water));
            return 0;
        }
        match self.since {
            Some(c) if c <= header.last_seq => c,
            _ => 0,
        }
    }

    /// The filter reports the data state and nothing dirty, and every record
    /// published before that report has been claimed: the replica is
    /// consistent from [`Consistency::since`] once the sets reach it.
    /// `barrier` is the filter's barrier sequence at the report.
    pub fn settle(&mut self, barrier: u64) -> Option<u64> {
        if self.since.is_none() {
            // Sequences start at 1; 0 means "inconsistent" on the wire.
            let c = self.floor.max(barrier).max(1);
            self.since = Some(c);
            self.floor = c;
        }
        self.since
    }
}

/// The daemon's [`Stamp`]: nonces plus the consistency claim, with the
/// filter's barrier taken for every Resync set.
pub struct DiskStamp<'a> {
    /// Nonce source.
    pub nonces: &'a mut Nonces,
    /// The disk's consistency.
    pub consistency: &'a mut Consistency,
    /// The filter's barrier sequence, asked after a Resync set's data was read.
    pub barrier: &'a mut dyn FnMut() -> Result<u64>,
}

impl std::fmt::Debug for DiskStamp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStamp")
            .field("consistency", &self.consistency)
            .finish_non_exhaustive()
    }
}

impl Stamp for DiskStamp<'_> {
    fn stamp(&mut self, header: &mut ChangeSetHeader, state_changes: u64) -> Result<()> {
        let high_water = if header.kind == ChangeKind::Resync {
            (self.barrier)()?
        } else {
            0
        };
        header.consistent_from = self.consistency.claim(header, state_changes, high_water);
        let (stream, counter) = self.nonces.take();
        header.nonce_stream = stream;
        header.nonce_counter = counter;
        header.key_salt = self.nonces.salt();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: ChangeKind, first: u64, last: u64) -> ChangeSetHeader {
        ChangeSetHeader {
            host: "h".into(),
            disk: "d".into(),
            epoch: 1,
            kind,
            first_seq: first,
            last_seq: last,
            prev_end_seq: first - 1,
            nonce_stream: 0,
            nonce_counter: 0,
            key_salt: [0; 16],
            consistent_from: 0,
            tags: Vec::new(),
            extents: Vec::new(),
            chunks: Vec::new(),
        }
    }

    #[test]
    fn resync_breaks_and_settle_restores_at_the_highest_mark() {
        let mut c = Consistency::resume(5);
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 6, 9), 0, 0), 5);
        // A Resync set whose read saw writes up to seq 30.
        assert_eq!(c.claim(&header(ChangeKind::Resync, 10, 12), 0, 30), 0);
        assert_eq!(c.since(), None);
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 13, 20), 0, 0), 0);
        // Settled with barrier 25: consistent from 30 (the read's mark).
        assert_eq!(c.settle(25), Some(30));
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 21, 29), 0, 0), 0);
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 30, 31), 0, 0), 30);
        // Settling again changes nothing.
        assert_eq!(c.settle(99), Some(30));
    }

    #[test]
    fn state_change_and_epoch_break() {
        let mut c = Consistency::resume(1);
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 2, 3), 1, 0), 0);
        assert_eq!(c.since(), None);
        assert_eq!(c.settle(4), Some(4));
        c.broken_at(50);
        assert_eq!(c.claim(&header(ChangeKind::WriteOrder, 51, 52), 0, 0), 0);
        assert_eq!(c.settle(10), Some(50));
        assert_eq!(Consistency::resume(0).since(), None);
    }

    #[test]
    fn nonce_streams_never_repeat() {
        let dir = std::env::temp_dir().join(format!("ferry-nonce-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(next_nonce_stream(&dir).unwrap(), 1);
        assert_eq!(next_nonce_stream(&dir).unwrap(), 2);
        fs::write(dir.join(NONCE_STREAM_FILE), "garbage").unwrap();
        assert_eq!(
            next_nonce_stream(&dir).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut n = Nonces::new(7).unwrap();
        assert_eq!(n.take(), (7, 0));
        assert_eq!(n.take(), (7, 1));
        assert_ne!(n.salt(), Nonces::new(7).unwrap().salt(), "salts are random");
        fs::remove_dir_all(&dir).unwrap();
    }
}
