//! Typed messages carried in frames, with explicit encode/decode.
//!
//! Encoding rules (version 2, all integers little-endian):
//!
//! * `str`: u8 byte length (0..=255) then that many bytes of UTF-8.
//! * `vec<T>`: u32 element count then the elements; every count has a
//!   documented bound and is checked against the bytes remaining (count ×
//!   minimum element size) before anything is allocated.
//! * `bool`: u8, 0 or 1; enums: u8 discriminant; anything else is malformed.
//! * A message must consume its frame payload exactly; trailing bytes are
//!   malformed.
//!
//! | kind | message | body |
//! |---|---|---|
//! | 1 | [`Hello`] | protocol u16, host str, disks vec<name str, size u64, ring_generation u64>, retention_secs u64 |
//! | 2 | [`Welcome`] | target str, resume vec<name str, next_seq u64, epoch u64, consistent_from u64> |
//! | 3 | [`ChangeSet`] | [`ChangeSetHeader`], payload_len u32, payload (sealed) |
//! | 4 | [`Ack`] | disk str, epoch u64, last_seq u64 |
//! | 5 | [`Reject`] | code u16, message str |
//! | 6 | [`Heartbeat`] | time_ns u64 |
//! | 7 | [`Progress`] | disk str, lag_records u64, lag_bytes u64, lag_ns u64, time_ns u64 |
//! | 8 | [`BlockHashes`] | disk str, block_size u32, ranges vec<offset u64, length u64>, hashes vec<[u8; 16]> |
//! | 9 | [`HashDiff`] | disk str, blocks u32, bitmap (blocks + 7) / 8 bytes, bit i (LSB first) = block i differs, padding bits zero |
//!
//! [`ChangeSetHeader`]: host str, disk str, epoch u64, kind u8
//! (0 write-order, 1 resync), first_seq u64, last_seq u64, prev_end_seq u64,
//! nonce_stream u32, nonce_counter u64, key_salt [u8; 16], consistent_from u64,
//! tags vec<seq u64, name str, app bool, time_ns u64>, extents vec<seq u64, offset u64,
//! length u64, op u8 (0 write, 1 zero, 2 trim)>, chunks vec<raw_len u32,
//! stored_len u32, compressed bool>. Its exact encoding
//! ([`encode_header_aad`]) is the AES-GCM associated data of the payload.

use std::io::{Read, Write};

use crate::error::{Error, ErrorKind, Result};
use crate::frame::{self, Frame};

/// Frame kinds of the messages.
pub mod kind {
    /// [`super::Hello`]: sidecar → target, first frame on a connection.
    pub const HELLO: u16 = 1;
    /// [`super::Welcome`]: target → sidecar, answer to Hello.
    pub const WELCOME: u16 = 2;
    /// [`super::ChangeSet`]: sidecar → target.
    pub const CHANGE_SET: u16 = 3;
    /// [`super::Ack`]: target → sidecar, sent only once the change set is durable.
    pub const ACK: u16 = 4;
    /// [`super::Reject`]: either direction.
    pub const REJECT: u16 = 5;
    /// [`super::Heartbeat`]: either direction.
    pub const HEARTBEAT: u16 = 6;
    /// [`super::Progress`]: sidecar → target, the source side's lag.
    pub const PROGRESS: u16 = 7;
    /// [`super::BlockHashes`]: sidecar → target, before a resync set.
    pub const BLOCK_HASHES: u16 = 8;
    /// [`super::HashDiff`]: target → sidecar, answer to BlockHashes.
    pub const HASH_DIFF: u16 = 9;
}

/// Bytes of [`ChangeSetHeader::key_salt`].
pub const KEY_SALT_LEN: usize = 16;
/// Most block hashes in one [`BlockHashes`] (with 64 KiB blocks: 4 GiB).
pub const MAX_HASHES: usize = 1 << 16;
/// Largest block of the checksum exchange (a power of two, 512 B ..= this).
pub const MAX_HASH_BLOCK: u32 = 1 << 20;
/// Most ranges in one [`BlockHashes`].
pub const MAX_RANGES: usize = MAX_EXTENTS;
/// Bytes of one block hash (see `crate::payload::block_hash`).
pub const HASH_LEN: usize = 16;

/// [`Reject::code`] values; the one place errors become wire codes.
pub mod reject {
    /// The peer speaks another protocol version.
    pub const BAD_VERSION: u16 = 1;
    /// The first message was not a Hello, or a message came out of order.
    pub const UNEXPECTED: u16 = 2;
    /// The host has no credentials (data key) at the target.
    pub const UNKNOWN_HOST: u16 = 3;
    /// The host named is not the one the client certificate proves.
    pub const NOT_YOUR_HOST: u16 = 4;
    /// A change set for a disk this connection did not announce, or of
    /// another host.
    pub const NOT_YOUR_DISK: u16 = 5;
    /// The change set does not follow the last durable one (its
    /// `prev_end_seq` differs): a resync is needed.
    pub const GAP: u16 = 6;
    /// The change set's epoch is older than the target's.
    pub const STALE_EPOCH: u16 = 7;
    /// A frame or message that does not decode or validate.
    pub const MALFORMED: u16 = 8;
    /// The payload does not authenticate under the disk's key.
    pub const BAD_SEAL: u16 = 9;
    /// The disk's size or another property disagrees with the replica.
    pub const MISMATCH: u16 = 10;
    /// The target failed (I/O, full disk); the sender retries later.
    pub const INTERNAL: u16 = 11;
    /// The host was failed over at the target: replication is stopped
    /// until it is protected again; the sender keeps its changes.
    pub const FAILED_OVER: u16 = 12;
}

/// Protocol version carried in [`Hello::protocol`]. Peers of another
/// version are refused (`reject::BAD_VERSION`); 2 added
/// [`Hello::retention_secs`], 3 [`DiskResume::seeded`].
pub const PROTOCOL_VERSION: u16 = 3;
/// Longest string, in bytes.
pub const MAX_STR: usize = 255;
/// Most disks in a Hello or Welcome.
pub const MAX_DISKS: usize = 1024;
/// Most tags in one change set.
pub const MAX_TAGS: usize = 4096;
/// Most extents in one change set.
pub const MAX_EXTENTS: usize = 1 << 20;
/// Most payload chunks in one change set (1 GiB of raw data).
pub const MAX_CHUNKS: usize = 1024;
/// Largest raw chunk: 1 MiB.
pub const CHUNK_SIZE: usize = 1 << 20;
/// AES-GCM tag length appended to the sealed payload.
pub const TAG_LEN: usize = TAG_LEN_U8 as usize;
const TAG_LEN_U8: u8 = 16;

/// One disk announced by the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHello {
    /// Disk name, unique per host.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Generation of the disk's ring (changes when the ring is recreated).
    pub ring_generation: u64,
}

/// Sidecar → target: who I am and which disks I protect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u16,
    /// Host name.
    pub host: String,
    /// Protected disks.
    pub disks: Vec<DiskHello>,
    /// The host policy's retention window in seconds (how long the target
    /// keeps recovery points); 0 = let the target use its default.
    pub retention_secs: u64,
}

/// Where the target wants a disk's stream to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskResume {
    /// Disk name.
    pub name: String,
    /// Next sequence the target expects.
    pub next_seq: u64,
    /// Epoch the target holds for the disk.
    pub epoch: u64,
    /// The consistency the target last recorded (the last durable set's
    /// [`ChangeSetHeader::consistent_from`]); 0: inconsistent or unknown.
    pub consistent_from: u64,
    /// The replica already holds data (an image adopted for a failback, a
    /// copy kept by a reprotect, or earlier sets): resync data is worth a
    /// checksum exchange first, and a sender that never shipped to this
    /// replica resyncs the whole disk (holes included) rather than its
    /// allocated regions. Encoded as one byte, 0 or 1 (protocol 3).
    pub seeded: bool,
}

/// Target → sidecar: answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Target name.
    pub target: String,
    /// Resume points, one per known disk.
    pub resume: Vec<DiskResume>,
}

/// Whether a change set is part of the write order or resync data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChangeKind {
    /// Writes in ring order; every prefix is crash consistent.
    WriteOrder = 0,
    /// Regions re-read from the source; order is not meaningful.
    Resync = 1,
}

/// What an extent does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExtentOp {
    /// Data follows in the payload (`length` bytes).
    Write = 0,
    /// The range reads as zeros; no payload.
    Zero = 1,
    /// The range was discarded; no payload.
    Trim = 2,
}

/// A recovery-point tag inserted into the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Sequence the tag follows.
    pub seq: u64,
    /// Tag name.
    pub name: String,
    /// Application consistent (file systems frozen) rather than crash consistent.
    pub app: bool,
    /// When the filter recorded it (UNIX time, nanoseconds, source clock).
    pub time_ns: u64,
}

/// One extent of a change set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Sequence of the write.
    pub seq: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Operation.
    pub op: ExtentOp,
}

/// One chunk of the (pre-sealing) payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Bytes of raw data the chunk holds (1..=[`CHUNK_SIZE`]).
    pub raw_len: u32,
    /// Bytes the chunk occupies in the payload.
    pub stored_len: u32,
    /// zstd frame (true) or raw bytes (false; then `stored_len == raw_len`).
    pub compressed: bool,
}

/// Description of a change set; authenticated as AES-GCM associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetHeader {
    /// Source host.
    pub host: String,
    /// Disk name.
    pub disk: String,
    /// Replication epoch of the disk.
    pub epoch: u64,
    /// Write-order or resync.
    pub kind: ChangeKind,
    /// First sequence in the set.
    pub first_seq: u64,
    /// Last sequence in the set (inclusive).
    pub last_seq: u64,
    /// Last sequence of the previous set (0 with `first_seq == 0` for the first).
    pub prev_end_seq: u64,
    /// AES-GCM nonce, first part: the sender's stream (a sidecar session,
    /// persisted so that it never repeats under one key).
    pub nonce_stream: u32,
    /// AES-GCM nonce, second part: a counter the sender never reuses within
    /// its stream. The sender alone guarantees (key, stream, counter) is
    /// unique; retransmitting the same sealed set reuses it with the same
    /// plaintext, which reveals nothing.
    pub nonce_counter: u64,
    /// Random per sender session: the payload is sealed under the disk key
    /// derived with it (`crate::payload::Key::for_salt`), so nonces from
    /// sessions that restarted their counters never meet under one key.
    pub key_salt: [u8; KEY_SALT_LEN],
    /// Consistency claim of the sender: `0` means the replica is not a
    /// consistent prefix of the source's write order after this set (a
    /// resync is running or pending); otherwise, once this set is applied,
    /// the replica equals the source at every sequence from
    /// `consistent_from` through `last_seq`.
    pub consistent_from: u64,
    /// Recovery-point tags.
    pub tags: Vec<Tag>,
    /// Extents; the Write extents' data is the payload, in extent order.
    pub extents: Vec<Extent>,
    /// Payload chunks, in order.
    pub chunks: Vec<ChunkInfo>,
}

/// A change set: header plus sealed payload (chunks concatenated, then
/// AES-256-GCM, tag appended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    /// The header.
    pub header: ChangeSetHeader,
    /// Sealed payload: `sum(stored_len) + TAG_LEN` bytes.
    pub payload: Vec<u8>,
}

/// Target → sidecar: the change set ending at `last_seq` is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Disk name.
    pub disk: String,
    /// Epoch of the acknowledged set.
    pub epoch: u64,
    /// Last sequence now durable.
    pub last_seq: u64,
}

/// Refusal with a code and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Machine-readable code.
    pub code: u16,
    /// Human-readable reason.
    pub message: String,
}

/// Liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's clock, nanoseconds.
    pub time_ns: u64,
}

/// Sidecar → target: how far the source side is behind (the RPO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Disk name.
    pub disk: String,
    /// Records in the ring (and spool) not yet acknowledged.
    pub lag_records: u64,
    /// Payload bytes of those records.
    pub lag_bytes: u64,
    /// Age of the oldest of them, nanoseconds (0: none).
    pub lag_ns: u64,
    /// Sender's clock (UNIX time, nanoseconds).
    pub time_ns: u64,
}

/// Sidecar → target: hashes of the blocks a resync set would carry, so that
/// the target says which it already holds. Each range is cut into blocks of
/// `block_size` bytes from its offset (the last one shorter); `hashes` has
/// one entry per block, ranges in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    /// Disk name.
    pub disk: String,
    /// Block size in bytes (1..).
    pub block_size: u32,
    /// (offset, length) of each range.
    pub ranges: Vec<(u64, u64)>,
    /// One hash per block.
    pub hashes: Vec<[u8; HASH_LEN]>,
}

impl BlockHashes {
    /// Blocks the ranges cut into (what `hashes.len()` must be); None if
    /// the count overflows.
    pub fn blocks(&self) -> Option<u64> {
        let bs = u64::from(self.block_size.max(1));
        self.ranges
            .iter()
            .try_fold(0u64, |n, &(_, len)| n.checked_add(len.div_ceil(bs)))
    }

    /// Block size a power of two in 512 ..= [`MAX_HASH_BLOCK`], one hash
    /// per block.
    fn check(&self) -> Result<()> {
        if !self.block_size.is_power_of_two() || !(512..=MAX_HASH_BLOCK).contains(&self.block_size)
        {
            return Err(Error::malformed(format!(
                "block_hashes: block size {} (a power of two, 512..={MAX_HASH_BLOCK})",
                self.block_size
            )));
        }
        if self.blocks() != u64::try_from(self.hashes.len()).ok() {
            return Err(Error::malformed(format!(
                "block_hashes: {} hashes for {:?} blocks",
                self.hashes.len(),
                self.blocks()
            )));
        }
        Ok(())
    }
}

/// Target → sidecar: which blocks of a [`BlockHashes`] differ from the
/// replica (after everything received before was applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashDiff {
    /// Disk name.
    pub disk: String,
    /// One flag per block, true = differs (must be sent).
    pub differs: Vec<bool>,
}

/// Any message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`ChangeSet`].
    ChangeSet(ChangeSet),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Reject`].
    Reject(Reject),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Progress`].
    Progress(Progress),
    /// See [`BlockHashes`].
    BlockHashes(BlockHashes),
    /// See [`HashDiff`].
    HashDiff(HashDiff),
}

// ---------------------------------------------------------------- writer

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn str(&mut self, what: &str, s: &str) -> Result<()> {
        let n = u8::try_from(s.len())
            .map_err(|_| Error::too_large(format!("{what}: {} bytes, max {MAX_STR}", s.len())))?;
        self.u8(n);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn count(&mut self, what: &str, n: usize, max: usize) -> Result<()> {
        if n > max {
            return Err(Error::too_large(format!("{what}: {n} entries, max {max}")));
        }
        let n = u32::try_from(n).map_err(|_| Error::too_large(format!("{what}: {n} entries")))?;
        self.u32(n);
        Ok(())
    }
}

// ---------------------------------------------------------------- reader

struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, what: &str, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::truncated(format!(
                "{what}: need {n} bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(what, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::malformed(format!("{what}: bool byte {v}"))),
        }
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = usize::from(self.u8(what)?);
        let b = self.take(what, n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|e| Error::malformed(format!("{what}: invalid UTF-8: {e}")))
    }
    /// A vector count, bounded by `max` and by the bytes left
    /// (`min_elem` bytes per element), so allocation by it is safe.
    fn count(&mut self, what: &str, max: usize, min_elem: usize) -> Result<usize> {
        let n = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if n > max {
            return Err(Error::too_large(format!("{what}: {n} entries, max {max}")));
        }
        if n.saturating_mul(min_elem) > self.remaining() {
            return Err(Error::truncated(format!(
                "{what}: {n} entries need at least {} bytes, have {}",
                n.saturating_mul(min_elem),
                self.remaining()
            )));
        }
        Ok(n)
    }
    fn finish(&self, what: &str) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::malformed(format!(
                "{what}: {} trailing bytes",
                self.remaining()
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- messages

impl Hello {
    fn encode_into(&self, e: &mut Enc) -> Result<()> {
        e.u16(self.protocol);
        e.str("hello.host", &self.host)?;
        e.count("hello.disks", self.disks.len(), MAX_DISKS)?;
        for d in &self.disks {
            e.str("hello.disk.name", &d.name)?;
            e.u64(d.size);
            e.u64(d.ring_generation);
        }
        e.u64(self.retention_secs);
        Ok(())
    }
    fn decode_from(d: &mut Dec<'_>) -> Result<Self> {
        let protocol = d.u16("hello.protocol")?;
        let host = d.str("hello.host")?;
        let n = d.count("hello.disks", MAX_DISKS, 1 + 8 + 8)?;
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            disks.push(DiskHello {
                name: d.str("hello.disk.name")?,
                size: d.u64("hello.disk.size")?,
                ring_generation: d.u64("hello.disk.ring_generation")?,
            });
        }
        let retention_secs = d.u64("hello.retention_secs")?;
        Ok(Hello {
            protocol,
            host,
            disks,
            retention_secs,
        })
    }
}

impl Welcome {
    fn encode_into(&self, e: &mut Enc) -> Result<()> {
        e.str("welcome.target", &self.target)?;
        e.count("welcome.resume", self.resume.len(), MAX_DISKS)?;
        for r in &self.resume {
            e.str("welcome.resume.name", &r.name)?;
            e.u64(r.next_seq);
            e.u64(r.epoch);
            e.u64(r.consistent_from);
            e.u8(u8::from(r.seeded));
        }
        Ok(())
    }
    fn decode_from(d: &mut Dec<'_>) -> Result<Self> {
        let target = d.str("welcome.target")?;
        let n = d.count("welcome.resume", MAX_DISKS, 1 + 8 + 8 + 8 + 1)?;
        let mut resume = Vec::with_capacity(n);
        for _ in 0..n {
            resume.push(DiskResume {
                name: d.str("welcome.resume.name")?,
                next_seq: d.u64("welcome.resume.next_seq")?,
                epoch: d.u64("welcome.resume.epoch")?,
                consistent_from: d.u64("welcome.resume.consistent_from")?,
                seeded: match d.u8("welcome.resume.seeded")? {
                    0 => false,
                    1 => true,
                    v => return Err(Error::malformed(format!("welcome.resume.seeded {v}"))),
                },
            });
        }
        Ok(Welcome { target, resume })
    }
}

impl ChangeKind {
    fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(ChangeKind::WriteOrder),
            1 => Ok(ChangeKind::Resync),
            v => Err(Error::malformed(format!("change set kind {v}"))),
        }
    }
}

impl ExtentOp {
    fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(ExtentOp::Write),
            1 => Ok(ExtentOp::Zero),
            2 => Ok(ExtentOp::Trim),
            v => Err(Error::malformed(format!("extent op {v}"))),
        }
    }
}

impl ChangeSetHeader {
    /// Check the header's invariants: `first_seq <= last_seq`;
    /// `prev_end_seq < first_seq` (or both 0 for a disk's very first set);
    /// for write-order sets every extent's seq lies in `[first_seq, last_seq]`;
    /// counts within bounds; each chunk 1..=[`CHUNK_SIZE`] raw bytes, raw
    /// chunks stored at their raw size, compressed ones no larger; and the
    /// Write extents' lengths sum to the chunks' raw lengths.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::malformed(format!("change set header: {m}")));
        if self.first_seq > self.last_seq {
            return bad(format!(
                "first_seq {} > last_seq {}",
                self.first_seq, self.last_seq
            ));
        }
        let first_ever = self.prev_end_seq == 0 && self.first_seq == 0;
        if !(self.prev_end_seq < self.first_seq || first_ever) {
            return bad(format!(
                "prev_end_seq {} not before first_seq {}",
                self.prev_end_seq, self.first_seq
            ));
        }
        if self.kind == ChangeKind::Resync && self.consistent_from != 0 {
            return bad(format!(
                "a resync set cannot claim consistency (consistent_from {})",
                self.consistent_from
            ));
        }
        if self.consistent_from > self.last_seq {
            return bad(format!(
                "consistent_from {} after last_seq {}",
                self.consistent_from, self.last_seq
            ));
        }
        if self.tags.len() > MAX_TAGS
            || self.extents.len() > MAX_EXTENTS
            || self.chunks.len() > MAX_CHUNKS
        {
            return Err(Error::too_large(format!(
                "change set header: {} tags, {} extents, {} chunks (max {MAX_TAGS}, {MAX_EXTENTS}, {MAX_CHUNKS})",
                self.tags.len(),
                self.extents.len(),
                self.chunks.len()
            )));
        }
        let mut write_bytes: u64 = 0;
        for (i, x) in self.extents.iter().enumerate() {
            if self.kind == ChangeKind::WriteOrder
                && !(self.first_seq..=self.last_seq).contains(&x.seq)
            {
                return bad(format!(
                    "extent {i} seq {} outside [{}, {}]",
                    x.seq, self.first_seq, self.last_seq
                ));
            }
            if x.offset.checked_add(x.length).is_none() {
                return bad(format!("extent {i} offset + length overflows"));
            }
            if x.op == ExtentOp::Write {
                write_bytes = match write_bytes.checked_add(x.length) {
                    Some(v) => v,
                    None => return bad("write lengths overflow".into()),
                };
            }
        }
        let mut raw_bytes: u64 = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            let raw = usize::try_from(c.raw_len).unwrap_or(usize::MAX);
            if raw == 0 || raw > CHUNK_SIZE {
                return Err(Error::new(
                    if raw == 0 {
                        ErrorKind::Malformed
                    } else {
                        ErrorKind::TooLarge
                    },
                    format!("change set header: chunk {i} raw_len {raw}, must be 1..={CHUNK_SIZE}"),
                ));
            }
            if c.compressed && (c.stored_len == 0 || c.stored_len > c.raw_len) {
                return bad(format!(
                    "chunk {i} compressed to {} of {} bytes",
                    c.stored_len, c.raw_len
                ));
            }
            if !c.compressed && c.stored_len != c.raw_len {
                return bad(format!(
                    "raw chunk {i} stored_len {} != raw_len {}",
                    c.stored_len, c.raw_len
                ));
            }
            raw_bytes += u64::from(c.raw_len);
        }
        if write_bytes != raw_bytes {
            return bad(format!(
                "write extents cover {write_bytes} bytes, chunks hold {raw_bytes}"
            ));
        }
        Ok(())
    }

    /// Total raw bytes of the payload (sum of `raw_len`).
    pub fn raw_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.raw_len)).sum()
    }

    /// Total stored bytes of the payload before sealing (sum of `stored_len`).
    pub fn stored_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.stored_len)).sum()
    }

    fn encode_into(&self, e: &mut Enc) -> Result<()> {
        self.validate()?;
        e.str("change_set.host", &self.host)?;
        e.str("change_set.disk", &self.disk)?;
        e.u64(self.epoch);
        e.u8(self.kind as u8);
        e.u64(self.first_seq);
        e.u64(self.last_seq);
        e.u64(self.prev_end_seq);
        e.u32(self.nonce_stream);
        e.u64(self.nonce_counter);
        e.0.extend_from_slice(&self.key_salt);
        e.u64(self.consistent_from);
        e.count("change_set.tags", self.tags.len(), MAX_TAGS)?;
        for t in &self.tags {
            e.u64(t.seq);
            e.str("change_set.tag.name", &t.name)?;
            e.bool(t.app);
            e.u64(t.time_ns);
        }
        e.count("change_set.extents", self.extents.len(), MAX_EXTENTS)?;
        for x in &self.extents {
            e.u64(x.seq);
            e.u64(x.offset);
            e.u64(x.length);
            e.u8(x.op as u8);
        }
        e.count("change_set.chunks", self.chunks.len(), MAX_CHUNKS)?;
        for c in &self.chunks {
            e.u32(c.raw_len);
            e.u32(c.stored_len);
            e.bool(c.compressed);
        }
        Ok(())
    }

    fn decode_from(d: &mut Dec<'_>) -> Result<Self> {
        let host = d.str("change_set.host")?;
        let disk = d.str("change_set.disk")?;
        let epoch = d.u64("change_set.epoch")?;
        let kind = ChangeKind::from_u8(d.u8("change_set.kind")?)?;
        let first_seq = d.u64("change_set.first_seq")?;
        let last_seq = d.u64("change_set.last_seq")?;
        let prev_end_seq = d.u64("change_set.prev_end_seq")?;
        let nonce_stream = d.u32("change_set.nonce_stream")?;
        let nonce_counter = d.u64("change_set.nonce_counter")?;
        let key_salt = d.array::<KEY_SALT_LEN>("change_set.key_salt")?;
        let consistent_from = d.u64("change_set.consistent_from")?;
        let n = d.count("change_set.tags", MAX_TAGS, 8 + 1 + 1 + 8)?;
        let mut tags = Vec::with_capacity(n);
        for _ in 0..n {
            tags.push(Tag {
                seq: d.u64("change_set.tag.seq")?,
                name: d.str("change_set.tag.name")?,
                app: d.bool("change_set.tag.app")?,
                time_ns: d.u64("change_set.tag.time_ns")?,
            });
        }
        let n = d.count("change_set.extents", MAX_EXTENTS, 8 + 8 + 8 + 1)?;
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            extents.push(Extent {
                seq: d.u64("change_set.extent.seq")?,
                offset: d.u64("change_set.extent.offset")?,
                length: d.u64("change_set.extent.length")?,
                op: ExtentOp::from_u8(d.u8("change_set.extent.op")?)?,
            });
        }
        let n = d.count("change_set.chunks", MAX_CHUNKS, 4 + 4 + 1)?;
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            chunks.push(ChunkInfo {
                raw_len: d.u32("change_set.chunk.raw_len")?,
                stored_len: d.u32("change_set.chunk.stored_len")?,
                compressed: d.bool("change_set.chunk.compressed")?,
            });
        }
        let h = ChangeSetHeader {
            host,
            disk,
            epoch,
            kind,
            first_seq,
            last_seq,
            prev_end_seq,
            nonce_stream,
            nonce_counter,
            key_salt,
            consistent_from,
            tags,
            extents,
            chunks,
        };
        h.validate()?;
        Ok(h)
    }

    /// Decode a header from exactly `bytes` (the inverse of [`encode_header_aad`]).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut d = Dec::new(bytes);
        let h = Self::decode_from(&mut d)?;
        d.finish("change_set header")?;
        Ok(h)
    }
}

/// The header's exact encoding, used as the AES-GCM associated data of its
/// payload. Fails only if the header is invalid (see
/// [`ChangeSetHeader::validate`]) or a string is longer than [`MAX_STR`].
pub fn encode_header_aad(h: &ChangeSetHeader) -> Result<Vec<u8>> {
    let mut e = Enc(Vec::with_capacity(
        64 + h.tags.len() * 16 + h.extents.len() * 25 + h.chunks.len() * 9,
    ));
    h.encode_into(&mut e)?;
    Ok(e.0)
}

fn check_payload_len(h: &ChangeSetHeader, len: usize) -> Result<()> {
    let want = h.stored_len() + u64::from(TAG_LEN_U8);
    if u64::try_from(len).ok() != Some(want) {
        return Err(Error::malformed(format!(
            "change set payload {len} bytes, header says {want} (chunks + tag)"
        )));
    }
    Ok(())
}

impl ChangeSet {
    fn encode_into(&self, e: &mut Enc) -> Result<()> {
        self.header.encode_into(e)?;
        check_payload_len(&self.header, self.payload.len())?;
        let n = u32::try_from(self.payload.len())
            .map_err(|_| Error::too_large("change set payload exceeds u32"))?;
        e.u32(n);
        e.0.extend_from_slice(&self.payload);
        Ok(())
    }
    fn decode_from(d: &mut Dec<'_>) -> Result<Self> {
        let header = ChangeSetHeader::decode_from(d)?;
        let n = usize::try_from(d.u32("change_set.payload_len")?).unwrap_or(usize::MAX);
        check_payload_len(&header, n)?;
        let payload = d.take("change_set.payload", n)?.to_vec();
        Ok(ChangeSet { header, payload })
    }
}

fn decode_block_hashes(d: &mut Dec<'_>) -> Result<BlockHashes> {
    let disk = d.str("block_hashes.disk")?;
    let block_size = d.u32("block_hashes.block_size")?;
    let n = d.count("block_hashes.ranges", MAX_RANGES, 16)?;
    let mut ranges = Vec::with_capacity(n);
    for _ in 0..n {
        ranges.push((
            d.u64("block_hashes.range.offset")?,
            d.u64("block_hashes.range.length")?,
        ));
    }
    let n = d.count("block_hashes.hashes", MAX_HASHES, HASH_LEN)?;
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        hashes.push(d.array::<HASH_LEN>("block_hashes.hash")?);
    }
    let m = BlockHashes {
        disk,
        block_size,
        ranges,
        hashes,
    };
    m.check()?;
    Ok(m)
}

impl ChangeSet {
    /// Write as one frame (body at most `max` bytes) without copying the
    /// payload: frame header, the encoded header part, then the payload as
    /// held. The bytes are exactly those of [`Message::write_to`].
    pub fn write_frame_to(&self, w: &mut impl Write, max: usize) -> Result<()> {
        let mut e = Enc(Vec::with_capacity(256));
        self.header.encode_into(&mut e)?;
        check_payload_len(&self.header, self.payload.len())?;
        let n = u32::try_from(self.payload.len())
            .map_err(|_| Error::too_large("change set payload exceeds u32"))?;
        e.u32(n);
        let body = e.0.len() + self.payload.len();
        if body > max {
            return Err(Error::too_large(format!(
                "frame payload {body} bytes, max {max}"
            )));
        }
        let body = u32::try_from(body).map_err(|_| Error::too_large("frame exceeds u32"))?;
        w.write_all(&frame::encode_header(kind::CHANGE_SET, body))?;
        w.write_all(&e.0)?;
        w.write_all(&self.payload)?;
        Ok(())
    }
}

impl Message {
    /// The frame kind of this message.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Welcome(_) => kind::WELCOME,
            Message::ChangeSet(_) => kind::CHANGE_SET,
            Message::Ack(_) => kind::ACK,
            Message::Reject(_) => kind::REJECT,
            Message::Heartbeat(_) => kind::HEARTBEAT,
            Message::Progress(_) => kind::PROGRESS,
            Message::BlockHashes(_) => kind::BLOCK_HASHES,
            Message::HashDiff(_) => kind::HASH_DIFF,
        }
    }

    /// Encode the message body (the frame payload).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut e = Enc(Vec::new());
        match self {
            Message::Hello(m) => m.encode_into(&mut e)?,
            Message::Welcome(m) => m.encode_into(&mut e)?,
            Message::ChangeSet(m) => m.encode_into(&mut e)?,
            Message::Ack(m) => {
                e.str("ack.disk", &m.disk)?;
                e.u64(m.epoch);
                e.u64(m.last_seq);
            }
            Message::Reject(m) => {
                e.u16(m.code);
                e.str("reject.message", &m.message)?;
            }
            Message::Heartbeat(m) => e.u64(m.time_ns),
            Message::Progress(m) => {
                e.str("progress.disk", &m.disk)?;
                e.u64(m.lag_records);
                e.u64(m.lag_bytes);
                e.u64(m.lag_ns);
                e.u64(m.time_ns);
            }
            Message::BlockHashes(m) => {
                m.check()?;
                e.str("block_hashes.disk", &m.disk)?;
                e.u32(m.block_size);
                e.count("block_hashes.ranges", m.ranges.len(), MAX_RANGES)?;
                for &(offset, length) in &m.ranges {
                    e.u64(offset);
                    e.u64(length);
                }
                e.count("block_hashes.hashes", m.hashes.len(), MAX_HASHES)?;
                for h in &m.hashes {
                    e.0.extend_from_slice(h);
                }
            }
            Message::HashDiff(m) => {
                e.str("hash_diff.disk", &m.disk)?;
                e.count("hash_diff.blocks", m.differs.len(), MAX_HASHES)?;
                let mut bits = vec![0u8; m.differs.len().div_ceil(8)];
                for (i, &d) in m.differs.iter().enumerate() {
                    if d {
                        bits[i / 8] |= 1 << (i % 8);
                    }
                }
                e.0.extend_from_slice(&bits);
            }
        }
        Ok(e.0)
    }

    /// Decode a message body of frame kind `kind`; the body must be consumed
    /// exactly.
    pub fn decode(kind: u16, body: &[u8]) -> Result<Self> {
        let mut d = Dec::new(body);
        let m = match kind {
            kind::HELLO => Message::Hello(Hello::decode_from(&mut d)?),
            kind::WELCOME => Message::Welcome(Welcome::decode_from(&mut d)?),
            kind::CHANGE_SET => Message::ChangeSet(ChangeSet::decode_from(&mut d)?),
            kind::ACK => Message::Ack(Ack {
                disk: d.str("ack.disk")?,
                epoch: d.u64("ack.epoch")?,
                last_seq: d.u64("ack.last_seq")?,
            }),
            kind::REJECT => Message::Reject(Reject {
                code: d.u16("reject.code")?,
                message: d.str("reject.message")?,
            }),
            kind::HEARTBEAT => Message::Heartbeat(Heartbeat {
                time_ns: d.u64("heartbeat.time_ns")?,
            }),
            kind::BLOCK_HASHES => Message::BlockHashes(decode_block_hashes(&mut d)?),
            kind::HASH_DIFF => {
                let disk = d.str("hash_diff.disk")?;
                let n = d.count("hash_diff.blocks", MAX_HASHES, 0)?;
                let bits = d.take("hash_diff.bitmap", n.div_ceil(8))?;
                // Bits past the last block must be zero (one encoding per message).
                if n % 8 != 0 && bits[n / 8] >> (n % 8) != 0 {
                    return Err(Error::malformed(
                        "hash_diff.bitmap: bits set past the last block",
                    ));
                }
                let differs = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
                Message::HashDiff(HashDiff { disk, differs })
            }
            kind::PROGRESS => Message::Progress(Progress {
                disk: d.str("progress.disk")?,
                lag_records: d.u64("progress.lag_records")?,
                lag_bytes: d.u64("progress.lag_bytes")?,
                lag_ns: d.u64("progress.lag_ns")?,
                time_ns: d.u64("progress.time_ns")?,
            }),
            k => return Err(Error::malformed(format!("unknown message kind {k}"))),
        };
        d.finish("message")?;
        Ok(m)
    }

    /// Decode a message from a frame.
    pub fn from_frame(f: &Frame) -> Result<Self> {
        Self::decode(f.kind, &f.payload)
    }

    /// Encode as a complete frame (header + body), at most `max` body bytes.
    pub fn to_frame_bytes(&self, max: usize) -> Result<Vec<u8>> {
        frame::encode_frame(self.kind(), &self.encode()?, max)
    }

    /// Write as one frame (body at most [`frame::MAX_FRAME`]).
    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        frame::write_frame(w, self.kind(), &self.encode()?)
    }

    /// Read one frame of at most `max` body bytes and decode it.
    pub fn read_from(r: &mut impl Read, max: usize) -> Result<Self> {
        Self::from_frame(&frame::read_frame(r, max)?)
    }
}

#[cfg(test)]
mod tests;
