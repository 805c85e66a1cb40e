//! The disks as NBD exports: the adapter between the protocol layer
//! ([`crate::nbd`]) and [`Disk`]. Maps disk failures to NBD errors in one place.

use std::any::Any;
use std::sync::Arc;

use ferry_ring::ring::RecordKind;

use crate::disk::{Disk, IoFailure, WriteData};
use crate::nbd::wire::{NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO};
use crate::nbd::{
    Backend, BlockSizes, Export, ExportInfo, MetaContext, NbdError, WriteBuffer, WriteTarget,
};
use crate::order::Range;

/// Every protected disk of the host, by name.
#[derive(Debug)]
pub struct Exports {
    disks: Vec<Arc<Disk>>,
}

impl Exports {
    /// The export table over `disks`.
    pub fn new(disks: Vec<Arc<Disk>>) -> Self {
        Exports { disks }
    }

    fn find(&self, name: &str) -> Option<&Arc<Disk>> {
        self.disks.iter().find(|d| d.name() == name)
    }
}

impl Backend for Exports {
    fn export_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.name().to_string()).collect()
    }

    fn export(&self, name: &str) -> Option<ExportInfo> {
        let disk = self.find(name)?;
        let mut info = ExportInfo::new(disk.size());
        // FLUSH is an fdatasync of the one backing descriptor every
        // connection writes through, so it covers writes completed on any
        // connection: multi-conn is true.
        info.can_multi_conn = true;
        info.dirty_bitmap = true;
        info.block_sizes = BlockSizes {
            min: disk.block_size(),
            preferred: disk.block_size().max(4096),
            max: crate::nbd::DEFAULT_MAX_BLOCK,
        };
        info.description = Some(format!("ferry-protected disk {name}"));
        Some(info)
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let disk = Arc::clone(self.find(name)?);
        Some(Arc::new(DiskExport(disk)))
    }
}

/// One connection's view of a disk.
#[derive(Debug)]
struct DiskExport(Arc<Disk>);

/// A write payload buffer handed to the protocol layer.
struct Payload(WriteData);

impl WriteTarget for Payload {
    fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// The one place disk failures become NBD errors.
fn nbd_error(failure: IoFailure) -> NbdError {
    match failure {
        IoFailure::Io | IoFailure::Tracking => NbdError::Io,
    }
}

impl Export for DiskExport {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.0.read(offset, buf).map_err(nbd_error)
    }

    fn write_buffer(&self, len: usize) -> Result<WriteBuffer, NbdError> {
        Ok(WriteBuffer::Custom(Box::new(Payload(
            self.0.write_buffer(len),
        ))))
    }

    fn write(&self, offset: u64, data: WriteBuffer, fua: bool) -> Result<(), NbdError> {
        let data = match data {
            WriteBuffer::Heap(bytes) => WriteData::Heap {
                data: bytes,
                full: None,
            },
            WriteBuffer::Custom(custom) => match custom.into_any().downcast::<Payload>() {
                Ok(payload) => payload.0,
                Err(_) => return Err(NbdError::Io),
            },
        };
        self.0.write(offset, data, fua).map_err(nbd_error)
    }

    fn flush(&self) -> Result<(), NbdError> {
        self.0.flush().map_err(nbd_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        self.0
            .discard(offset, len, RecordKind::Trim, fua, false)
            .map_err(nbd_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), NbdError> {
        self.0
            .discard(offset, len, RecordKind::WriteZeroes, fua, no_hole)
            .map_err(nbd_error)
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<(), NbdError> {
        // The page cache is the backing file's; nothing to prefetch into.
        Ok(())
    }

    fn block_status(
        &self,
        context: MetaContext,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        let runs: Vec<(u64, u32)> = match context {
            MetaContext::BaseAllocation => self
                .0
                .allocation(offset, len)
                .into_iter()
                .map(|(n, allocated)| {
                    (
                        n,
                        if allocated {
                            0
                        } else {
                            NBD_STATE_HOLE | NBD_STATE_ZERO
                        },
                    )
                })
                .collect(),
            MetaContext::DirtyBitmap => dirty_runs(&self.0.dirty_ranges(), offset, len),
        };
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (n, flags) in runs {
            let mut left = n;
            while left > 0 {
                // Extents are u32 lengths; keep them block aligned.
                let piece = left.min(u64::from(u32::MAX) & !4095);
                out.push((u32::try_from(piece).unwrap_or(u32::MAX), flags));
                left -= piece;
            }
        }
        if out.is_empty() {
            out.push((
                u32::try_from(len.min(u64::from(u32::MAX) & !4095))
                    .unwrap_or(4096)
                    .max(1),
                0,
            ));
        }
        Ok(out)
    }
}

/// `[offset, offset + len)` as (length, DIRTY or 0) runs over sorted, merged `dirty`.
fn dirty_runs(dirty: &[Range], offset: u64, len: u64) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut runs = Vec::new();
    let mut pos = offset;
    for r in dirty
        .iter()
        .filter(|r| r.offset + r.len > offset && r.offset < end)
    {
        let start = r.offset.max(pos);
        if start > pos {
            runs.push((start - pos, 0));
        }
        let stop = (r.offset + r.len).min(end);
        if stop > start {
            runs.push((stop - start, NBD_STATE_DIRTY));
            pos = stop;
        }
    }
    if pos < end {
        runs.push((end - pos, 0));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_cover_the_range_exactly() {
        let dirty = [
            Range {
                offset: 4096,
                len: 4096,
            },
            Range {
                offset: 16384,
                len: 100,
            },
        ];
        assert_eq!(
            dirty_runs(&dirty, 0, 32768),
            vec![
                (4096, 0),
                (4096, NBD_STATE_DIRTY),
                (8192, 0),
                (100, NBD_STATE_DIRTY),
                (32768 - 16484, 0)
            ]
        );
        assert_eq!(
            dirty_runs(&dirty, 5000, 1000),
            vec![(1000, NBD_STATE_DIRTY)]
        );
        assert_eq!(dirty_runs(&[], 0, 10), vec![(10, 0)]);
    }
}
