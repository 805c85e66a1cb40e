//! The one small set of traits and types every image format implements.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// Bytes in a sector: the unit of every format this crate handles.
pub const SECTOR: u64 = 512;

/// The image formats ferry reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Format {
    /// A plain file: byte N of the file is byte N of the disk.
    Raw,
    /// VHD fixed: raw data followed by a 512-byte footer (what Azure page blobs hold).
    VhdFixed,
    /// VHD dynamic: footer copy, header, block allocation table, blocks, footer.
    VhdDynamic,
    /// VHD differencing: a dynamic VHD whose unwritten sectors come from a parent.
    VhdDiff,
    /// VMDK monolithicSparse: one file with header, grain directory and tables.
    VmdkSparse,
    /// VMDK monolithicFlat: a text descriptor plus a raw `-flat.vmdk` extent.
    VmdkFlat,
    /// VMDK streamOptimized: zlib-compressed grains with markers, written in order.
    VmdkStream,
}

impl Format {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [Format; 7] = [
        Format::Raw,
        Format::VhdFixed,
        Format::VhdDynamic,
        Format::VhdDiff,
        Format::VmdkSparse,
        Format::VmdkFlat,
        Format::VmdkStream,
    ];

    /// The name used on the command line and in `info --json`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::VhdFixed => "vhd-fixed",
            Format::VhdDynamic => "vhd-dynamic",
            Format::VhdDiff => "vhd-diff",
            Format::VmdkSparse => "vmdk-sparse",
            Format::VmdkFlat => "vmdk-flat",
            Format::VmdkStream => "vmdk-stream",
        }
    }

    /// Parse a command-line format name.
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether unwritten regions of this format take no space (and so zero
    /// blocks should be skipped when converting into it).
    pub fn is_sparse(self) -> bool {
        !matches!(self, Format::VhdFixed | Format::VmdkFlat)
    }

    /// Whether the format accepts writes at any offset (stream-optimized VMDK
    /// must be written in ascending order).
    pub fn random_writes(self) -> bool {
        self != Format::VmdkStream
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A run of the virtual disk and whether the image stores data for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// First byte of the run.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `false` means the run is guaranteed to read as zeros and takes no space
    /// in the image (or its parents); `true` means data is stored for it.
    pub allocated: bool,
}

impl Extent {
    /// One byte past the end of the run.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Append `extent` to `map`, merging with the previous run when they agree.
pub fn push_extent(map: &mut Vec<Extent>, extent: Extent) {
    if extent.length == 0 {
        return;
    }
    if let Some(last) = map.last_mut() {
        if last.allocated == extent.allocated && last.end() == extent.offset {
            last.length += extent.length;
            return;
        }
    }
    map.push(extent);
}

/// How hard an image works to stay consistent if the process dies mid-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// Metadata that points at new data is written only after that data is
    /// durable (fdatasync in between). The default: a crash leaves an image
    /// that opens and reads everything flushed before it.
    #[default]
    Ordered,
    /// No syncs until `flush`: for a freshly created image that nobody reads
    /// before it is finished (conversion into a temporary file).
    Deferred,
}

/// A finding of [`Image::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Byte offset in the image file (or descriptor) where the problem is.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
    /// `true` for damage; `false` for harmless findings (leaked space).
    pub damage: bool,
}

/// The one interface the rest of ferry uses for every image format.
pub trait Image: Send + fmt::Debug {
    /// The image's format.
    fn format(&self) -> Format;

    /// The file this image was opened from (the descriptor for flat VMDK).
    fn path(&self) -> &Path;

    /// Virtual disk size in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the disk's bytes at `offset`. The range must lie inside the disk.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Store `buf` at `offset`. The range must lie inside the disk.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Make every completed write durable.
    fn flush(&mut self) -> Result<()>;

    /// Complete the image: for stream-optimized VMDK, write the trailing
    /// tables and footer. Other formats flush. No writes may follow.
    fn finish(&mut self) -> Result<()> {
        self.flush()
    }

    /// Allocation of `[offset, offset + length)` as ordered, merged runs.
    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// Bytes of the virtual disk stored in this image file alone (not parents).
    fn allocated_bytes(&mut self) -> Result<u64>;

    /// The parent image, for differencing formats.
    fn parent(&self) -> Option<&dyn Image> {
        None
    }

    /// Deep consistency check beyond what `open` already enforces.
    fn check(&mut self) -> Result<Vec<Problem>>;

    /// Files besides `path()` that belong to the image (a flat VMDK's extent).
    fn extra_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Reject a request outside the disk (every format checks the same way).
pub(crate) fn check_range(size: u64, offset: u64, len: usize, op: &'static str) -> Result<()> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(format!(
            "range {offset}+{len} lies beyond the disk size {size}"
        ))
        .during(op)),
    }
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024), e.g. `10G`.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(Error::invalid(format!("unknown size suffix in {text:?}"))),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(format!("not a size: {text:?} (examples: 512, 64M, 10G)")))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("size {text:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(f));
        }
        assert_eq!(Format::from_name("qcow2"), None);
    }

    #[test]
    fn extents_merge() {
        let mut map = Vec::new();
        push_extent(
            &mut map,
            Extent {
                offset: 0,
                length: 10,
                allocated: true,
            },
        );
        push_extent(
            &mut map,
            Extent {
                offset: 10,
                length: 5,
                allocated: true,
            },
        );
        push_extent(
            &mut map,
            Extent {
                offset: 15,
                length: 0,
                allocated: false,
            },
        );
        push_extent(
            &mut map,
            Extent {
                offset: 15,
                length: 5,
                allocated: false,
            },
        );
        assert_eq!(
            map,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    allocated: true
                },
                Extent {
                    offset: 15,
                    length: 5,
                    allocated: false
                }
            ]
        );
    }
}
