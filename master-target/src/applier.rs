//! The applier: replays a disk's journal, in order, into its replica image.
//!
//! A [`Replica`] is the disk image kept at the recovery site for one
//! protected disk (VHD dynamic by default; raw and VHD fixed are allowed).
//! [`apply_pending`] takes every change set the journal holds beyond its
//! applied watermark ([`Journal::applied`]), opens the sealed payload
//! (AES-256-GCM with the change-set header as associated data, then zstd),
//! writes the extents into the replica in order, makes the image durable
//! ([`Replica::flush`]) and only then moves the watermark
//! ([`Journal::set_applied`]) to the change set's `last_seq`.
//!
//! # Applying one change set
//!
//! 1. Unpack the payload with the nonce its header names (the sender
//!    guarantees its uniqueness). Authentication fails before anything is written:
//!    a wrong key or a tampered payload leaves the replica and the
//!    watermark untouched ([`ApplyErrorKind::Crypto`]).
//! 2. Validate every extent before the first write: each must lie inside
//!    the replica (`offset + length <= size`, checked arithmetic), and the
//!    Write extents' lengths must sum to exactly the unpacked data length.
//!    A violation is [`ApplyErrorKind::InvalidChangeSet`]; nothing is written.
//! 3. Apply the extents in order. A Write extent takes the next `length`
//!    bytes of the unpacked data. Zero and Trim extents make the range read
//!    as zeros: runs the image reports as unallocated (guaranteed zero, see
//!    `ferry_vhd::Image::map`) are left alone, allocated runs are overwritten
//!    with zeros in pieces of at most [`ZERO_CHUNK`] bytes. (Trim is not
//!    turned into deallocation: the image library has no discard call yet.)
//! 4. `replica.flush()`, then `journal.set_applied(last_seq)`.
//!
//! # Crash safety and idempotence
//!
//! The watermark only moves after the image data of every change set up to
//! it is durable (step 4 order), so after a crash the replica holds at
//! least everything up to the watermark. It may hold more: a crash after
//! some writes of change set `k` (or after its flush, before its watermark
//! write) leaves the replica with a prefix-of-writes of `k` beyond the
//! watermark `w = last_seq(k-1)`. On restart the applier replays from `w`,
//! i.e. change set `k` again from its first extent, then `k+1`, ...
//!
//! Replaying is harmless because applying a change set is a deterministic
//! function of the payload alone, not of the image's prior content: every
//! extent overwrites its whole range with bytes that come from the change
//! set (data or zeros), and extents are applied in the same order each
//! time. So for any byte, its final value after replaying `k..` is the
//! value the last extent covering it (in journal order) gives it, whatever
//! a partial earlier attempt left there; bytes that no replayed extent
//! covers were not touched by the partial attempt either (it applied a
//! subset of the same extents), so they hold what change sets `<= w` left.
//! Hence `apply(apply_partial(S, k), k..) = apply(S, k..)`. The same holds
//! for the "skip unallocated runs" shortcut of Zero/Trim: a run the image
//! reports unallocated already reads zeros, which is the extent's result.
//! Image metadata (VHD block allocation) is kept consistent by the image
//! library's [`SyncPolicy::Ordered`], under which a crash leaves an image
//! that opens and reads what was written before it (a block allocated but
//! not yet referenced is at worst leaked space, never wrong data).

use std::fs;
use std::path::{Path, PathBuf};

use ferry_protocol::message::{ChangeSet, ExtentOp};
use ferry_protocol::payload::{unpack_change_set, Key};
use ferry_vhd::{CreateOptions, Format, Image, OpenOptions, SyncPolicy};

use crate::journal::Journal;
use crate::materialize::zero_allocated;

/// Largest piece of zeros written at once for Zero/Trim extents (1 MiB).
pub const ZERO_CHUNK: usize = 1 << 20;

/// What went wrong while applying, for the caller to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApplyErrorKind {
    /// The journal failed (reading a change set, or recording the
    /// watermark); see [`crate::ErrorKind`] in the source error.
    Journal,
    /// The replica image failed (open, create, read, write, flush).
    Image,
    /// The payload did not authenticate: wrong key, wrong nonce convention,
    /// or tampered data. Nothing of the change set was written.
    Crypto,
    /// The payload authenticated but could not be decoded (decompression,
    /// chunk table).
    Payload,
    /// The change set does not fit the replica: an extent beyond the
    /// replica size, or Write lengths that disagree with the data length.
    /// Nothing of the change set was written.
    InvalidChangeSet,
    /// The replica file exists but is not what the caller asked for
    /// (format or size), or the format is not one a replica may have.
    Replica,
}

/// An applier error.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A journal error.
    #[error("journal: {0}")]
    Journal(#[from] crate::Error),
    /// An image error.
    #[error("replica image: {0}")]
    Image(#[from] ferry_vhd::Error),
    /// A payload error of the change set ending at `last_seq`.
    #[error("change set ending at seq {last_seq}: payload: {source}")]
    Payload {
        /// `last_seq` of the change set.
        last_seq: u64,
        /// The protocol error (kind `Crypto` for authentication failures).
        #[source]
        source: ferry_protocol::Error,
    },
    /// The change set ending at `last_seq` cannot be applied.
    #[error("change set ending at seq {last_seq}: {detail}")]
    InvalidChangeSet {
        /// `last_seq` of the change set.
        last_seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// The replica is not what was asked for.
    #[error("replica {path}: {detail}")]
    Replica {
        /// The replica path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl ApplyError {
    /// The kind, to branch on.
    pub fn kind(&self) -> ApplyErrorKind {
        match self {
            ApplyError::Journal(_) => ApplyErrorKind::Journal,
            ApplyError::Image(_) => ApplyErrorKind::Image,
            ApplyError::Payload { source, .. } => {
                if source.kind() == ferry_protocol::ErrorKind::Crypto {
                    ApplyErrorKind::Crypto
                } else {
                    ApplyErrorKind::Payload
                }
            }
            ApplyError::InvalidChangeSet { .. } => ApplyErrorKind::InvalidChangeSet,
            ApplyError::Replica { .. } => ApplyErrorKind::Replica,
        }
    }
}

/// Result with [`ApplyError`].
pub type Result<T> = std::result::Result<T, ApplyError>;

/// What one [`apply_pending`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Change sets applied (each flushed and recorded in the watermark).
    pub change_sets: u64,
    /// Bytes of Write extents written.
    pub bytes_written: u64,
    /// Bytes covered by Zero and Trim extents (whether or not zeros had to
    /// be written: unallocated runs are skipped).
    pub zero_bytes: u64,
    /// The watermark after the call (`None`: nothing was ever applied).
    pub last_applied: Option<u64>,
}

/// A disk's replica image at the recovery site.
#[derive(Debug)]
pub struct Replica {
    image: Box<dyn Image>,
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Replica {
    /// Open the replica at `path`, or create it (empty, `size` bytes, with
    /// [`SyncPolicy::Ordered`]) when the file does not exist. `format` is
    /// [`Format::VhdDynamic`] by default; [`Format::Raw`] and
    /// [`Format::VhdFixed`] are also accepted (VHD fixed needs a whole-MiB
    /// size; the image library's error is returned otherwise).
    ///
    /// Creation is atomic: the image is built as `PATH.creating`, flushed,
    /// and renamed into place (a crash leaves no half-made replica at
    /// `path`). An existing file must have the asked format and size.
    pub fn open_or_create(path: &Path, format: Format, size: u64) -> Result<Replica> {
        let replica_err = |detail: String| ApplyError::Replica {
            path: path.to_path_buf(),
            detail,
        };
        if !matches!(format, Format::VhdDynamic | Format::VhdFixed | Format::Raw) {
            return Err(replica_err(format!(
                "format {format} is not a replica format (vhd-dynamic, vhd-fixed, raw)"
            )));
        }
        let exists = path
            .try_exists()
            .map_err(|e| ferry_vhd::Error::io(e, "stat replica").at_path(path))?;
        if !exists {
            create_atomically(path, format, size)?;
        }
        let image = ferry_vhd::open_as(path, format, OpenOptions::read_write())?;
        if image.format() != format {
            return Err(replica_err(format!(
                "is {}, expected {format}",
                image.format()
            )));
        }
        if image.size() != size {
            return Err(replica_err(format!(
                "size {} bytes, expected {size}",
                image.size()
            )));
        }
        Ok(Replica { image })
    }

    /// Open an existing image that is to be written in place (an adopted
    /// image: the original disk of a failed-over machine). Its format must
    /// be one of [`crate::site::AdoptedImage::FORMATS`] and match the
    /// content, and its size the disk's; it is never created.
    pub fn open_adopted(path: &Path, format: Format, size: u64) -> Result<Replica> {
        let replica_err = |detail: String| ApplyError::Replica {
            path: path.to_path_buf(),
            detail,
        };
        if !crate::site::AdoptedImage::FORMATS.contains(&format) {
            return Err(replica_err(format!(
                "format {format} cannot be written in place"
            )));
        }
        let image = ferry_vhd::open_as(path, format, OpenOptions::read_write())?;
        if image.size() != size {
            return Err(replica_err(format!(
                "size {} bytes, the disk is {size}",
                image.size()
            )));
        }
        Ok(Replica { image })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        self.image.path()
    }

    /// The image format.
    pub fn format(&self) -> Format {
        self.image.format()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.image.read_at(buf, offset)?)
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        Ok(self.image.flush()?)
    }

    /// Bytes of the disk stored in the image file.
    pub fn allocated_bytes(&mut self) -> Result<u64> {
        Ok(self.image.allocated_bytes()?)
    }

    /// The underlying image (for failover exports, checks, maps).
    pub fn image_mut(&mut self) -> &mut dyn Image {
        self.image.as_mut()
    }

    /// Make `[offset, offset + length)` read as zeros, writing zeros only
    /// over runs the image stores data for.
    fn zero_range(&mut self, offset: u64, length: u64, zeros: &[u8]) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        Ok(zero_allocated(self.image.as_mut(), offset, length, zeros)?)
    }
}

fn create_atomically(path: &Path, format: Format, size: u64) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".creating");
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ferry_vhd::Error::io(e, "remove stale temp replica").into()),
    }
    let opts = CreateOptions {
        parent: None,
        round: false,
        sync: SyncPolicy::Ordered,
    };
    let made = ferry_vhd::create(&tmp, format, size, &opts).and_then(|mut img| img.flush());
    if let Err(e) = made {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    fs::rename(&tmp, path).map_err(|e| ferry_vhd::Error::io(e, "rename replica").at_path(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ferry_vhd::Error::io(e, "sync replica directory").at_path(dir))?;
    Ok(())
}

/// Check every extent of `cs` against the replica size and the Write data
/// length before anything is written.
fn validate(cs: &ChangeSet, data_len: usize, size: u64) -> Result<()> {
    let last_seq = cs.header.last_seq;
    let bad = |detail: String| ApplyError::InvalidChangeSet { last_seq, detail };
    let mut write_bytes: u64 = 0;
    for (i, x) in cs.header.extents.iter().enumerate() {
        match x.offset.checked_add(x.length) {
            Some(end) if end <= size => {}
            _ => {
                return Err(bad(format!(
                    "extent {i} ({:?} {}+{}) lies beyond the replica size {size}",
                    x.op, x.offset, x.length
                )))
            }
        }
        if x.op == ExtentOp::Write {
            write_bytes = write_bytes
                .checked_add(x.length)
                .ok_or_else(|| bad("write extent lengths overflow".into()))?;
        }
    }
    if write_bytes != u64_of(data_len) {
        return Err(bad(format!(
            "write extents cover {write_bytes} bytes, the payload holds {data_len}"
        )));
    }
    Ok(())
}

/// Apply one unpacked change set. `data` has been checked by [`validate`].
fn apply_one(
    cs: &ChangeSet,
    data: &[u8],
    replica: &mut Replica,
    zeros: &[u8],
    stats: &mut ApplyStats,
) -> Result<()> {
    let last_seq = cs.header.last_seq;
    let mut at = 0usize;
    for x in &cs.header.extents {
        match x.op {
            ExtentOp::Write => {
                let piece = usize::try_from(x.length)
                    .ok()
                    .and_then(|n| at.checked_add(n))
                    .and_then(|end| data.get(at..end))
                    .ok_or_else(|| ApplyError::InvalidChangeSet {
                        last_seq,
                        detail: "write extent runs past the payload".into(),
                    })?;
                if !piece.is_empty() {
                    replica.image.write_at(piece, x.offset)?;
                }
                at += piece.len();
                stats.bytes_written += x.length;
            }
            ExtentOp::Zero | ExtentOp::Trim => {
                replica.zero_range(x.offset, x.length, zeros)?;
                stats.zero_bytes += x.length;
            }
        }
    }
    Ok(())
}

/// Apply every change set of `journal` beyond its applied watermark to
/// `replica`, in order; see the module docs. After each change set the
/// replica is flushed and then the watermark set to its `last_seq`, so an
/// error leaves the watermark at the last change set fully applied and
/// durable (the stats of the sets applied before the error are lost with
/// the error; [`Journal::applied`] tells where it stopped).
pub fn apply_pending(
    journal: &mut Journal,
    replica: &mut Replica,
    key: &Key,
) -> Result<ApplyStats> {
    let mut stats = ApplyStats {
        last_applied: journal.applied(),
        ..ApplyStats::default()
    };
    loop {
        let from = match journal.applied() {
            None => 0,
            Some(a) => match a.checked_add(1) {
                Some(f) => f,
                None => break,
            },
        };
        let cs = match journal.iter_from(from).next() {
            None => break,
            Some(r) => r?,
        };
        if journal.applied().is_some_and(|a| cs.header.last_seq <= a) {
            // iter_from never yields these; stay safe if it ever did.
            break;
        }
        let last_seq = cs.header.last_seq;
        replica.apply_change_set(&cs, key, &mut stats)?;
        // Order matters: the watermark moves only once the data is durable.
        journal.set_applied(last_seq)?;
    }
    Ok(stats)
}

impl Replica {
    /// Apply one change set (steps 1 to 3 of the module docs) and flush the
    /// image; the caller then records `cs.header.last_seq` as applied.
    /// Counts into `stats` (`change_sets`, bytes, `last_applied`).
    pub fn apply_change_set(
        &mut self,
        cs: &ChangeSet,
        key: &Key,
        stats: &mut ApplyStats,
    ) -> Result<()> {
        let last_seq = cs.header.last_seq;
        let data = unpack_change_set(cs, key)
            .map_err(|source| ApplyError::Payload { last_seq, source })?;
        validate(cs, data.len(), self.size())?;
        let zeros = vec![0u8; ZERO_CHUNK];
        apply_one(cs, &data, self, &zeros, stats)?;
        self.flush()?;
        stats.change_sets += 1;
        stats.last_applied = Some(last_seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
