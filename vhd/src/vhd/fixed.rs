//! Fixed VHD: the disk's bytes followed by a 512-byte footer.

use std::path::Path;

use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::FoundFooter;
use crate::error::{Error, Result};
use crate::fileio::{random_bytes, ImageFile};
use crate::image::{Extent, Format, Image, Problem};
use crate::raw::RawImage;

/// A fixed VHD. Data access is that of a raw file limited to `size`.
#[derive(Debug)]
pub struct FixedVhd {
    data: RawImage,
    footer: Footer,
    file_len: u64,
}

impl FixedVhd {
    /// Create a fixed VHD of `size` bytes (already settled to whole MiB).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = ImageFile::create_new(path)?;
        let footer = Footer::new(DiskType::Fixed, size, random_bytes()?);
        // The data area stays a hole: it reads as zeros and costs nothing.
        file.write_all_at(&footer.encode(), size)?;
        file.sync_data()?;
        let file_len = size + FOOTER_SIZE as u64;
        Ok(FixedVhd {
            data: RawImage::from_file(file, size),
            footer,
            file_len,
        })
    }

    /// Open a fixed VHD whose footer was already read.
    pub(crate) fn open(file: ImageFile, found: FoundFooter) -> Result<Self> {
        let file_len = file.len()?;
        let size = found.footer.current_size;
        if size > file_len - FOOTER_SIZE as u64 {
            return Err(Error::corrupt(format!(
                "fixed VHD claims {size} bytes but the file holds only {}",
                file_len - FOOTER_SIZE as u64
            ))
            .at_offset(file_len - FOOTER_SIZE as u64)
            .at_path(file.path()));
        }
        Ok(FixedVhd {
            data: RawImage::from_file(file, size),
            footer: found.footer,
            file_len,
        })
    }

    /// The decoded footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

impl Image for FixedVhd {
    fn format(&self) -> Format {
        Format::VhdFixed
    }

    fn path(&self) -> &Path {
        self.data.path()
    }

    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.data.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.data.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        self.data.flush()
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.data.map(offset, length)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        self.data.allocated_bytes()
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        let data_len = self.file_len - FOOTER_SIZE as u64;
        if self.footer.current_size != data_len {
            problems.push(Problem {
                offset: data_len,
                what: format!(
                    "footer size {} differs from the data area of {data_len} bytes",
                    self.footer.current_size
                ),
                damage: true,
            });
        }
        if !self
            .footer
            .current_size
            .is_multiple_of(super::AZURE_ALIGNMENT)
        {
            problems.push(Problem {
                offset: data_len + super::footer::F_CURRENT_SIZE as u64,
                what: "virtual size is not a whole MiB: Azure will refuse this disk".into(),
                damage: false,
            });
        }
        Ok(problems)
    }
}
