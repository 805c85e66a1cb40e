//! VHD: fixed, dynamic and differencing disks (Microsoft VHD 1.0).
//!
//! Layout of the images this module writes:
//!
//! ```text
//! fixed:        [ data (size bytes) ][ footer 512 ]
//! dynamic/diff: [ footer copy 512 ][ dynamic header 1024 ][ BAT, sector padded ]
//!               [ parent locator data (diff only), sector padded ]
//!               [ block: bitmap 512 | data 2 MiB ] ... [ footer 512 ]
//! ```
//!
//! The geometry is always qemu's `force_size` maximum (65535/16/255) so that
//! every reader takes the size from `current_size`, and fixed disks are
//! whole MiB, as Azure requires.

pub mod dynamic;
pub mod fixed;
pub mod footer;

use std::path::{Path, PathBuf};

use crate::error::{Context, Error, ErrorKind, Result};
use crate::fileio::ImageFile;
use crate::image::{Format, Image};
use crate::{CreateOptions, OpenOptions};

use footer::{DiskType, Footer, FOOTER_SIZE};

/// Azure accepts fixed VHDs whose virtual size is a whole number of MiB.
pub const AZURE_ALIGNMENT: u64 = 1 << 20;
/// Largest VHD: 2040 GiB (the format's 32-bit sector offsets, minus metadata).
pub const MAX_SIZE: u64 = 2040 << 30;
/// How deep a differencing chain may go before we call it a loop.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Which footer of a VHD file was found valid.
#[derive(Debug, Clone)]
pub(crate) struct FoundFooter {
    pub(crate) footer: Footer,
    /// The footer at the end of the file decoded and is the one in use.
    pub(crate) at_end: bool,
    /// Problem with the footer not in use, for `check`.
    pub(crate) other_problem: Option<String>,
}

/// Read the footer: the one at the end of the file, or for dynamic disks the
/// copy at offset 0 when the end one is missing (an interrupted allocation).
pub(crate) fn read_footer(file: &ImageFile) -> Result<FoundFooter> {
    let len = file.len()?;
    if len < FOOTER_SIZE as u64 {
        return Err(
            Error::corrupt(format!("file of {len} bytes is too short for a VHD"))
                .at_path(file.path()),
        );
    }
    let end_offset = len - FOOTER_SIZE as u64;
    let end = Footer::decode(&file.read_array::<FOOTER_SIZE>(end_offset)?)
        .map_err(|e| e.at_offset(end_offset).at_path(file.path()));
    let copy = Footer::decode(&file.read_array::<FOOTER_SIZE>(0)?)
        .map_err(|e| e.at_offset(0).at_path(file.path()));
    match (end, copy) {
        (Ok(end), Ok(copy)) => {
            let other_problem = (end != copy && end.disk_type != DiskType::Fixed)
                .then(|| "footer copy at offset 0 differs from the footer at the end".to_string());
            Ok(FoundFooter {
                footer: end,
                at_end: true,
                other_problem,
            })
        }
        (Ok(end), Err(e)) => {
            let other_problem = (end.disk_type != DiskType::Fixed)
                .then(|| format!("footer copy at offset 0 is unusable: {}", e.message()));
            Ok(FoundFooter {
                footer: end,
                at_end: true,
                other_problem,
            })
        }
        (Err(end_err), Ok(copy)) if copy.disk_type != DiskType::Fixed => Ok(FoundFooter {
            footer: copy,
            at_end: false,
            other_problem: Some(format!(
                "footer at offset {end_offset} is missing or damaged ({}); \
                 the copy at offset 0 is used (an interrupted block allocation leaves this; \
                 opening the image read-write rewrites it)",
                end_err.message()
            )),
        }),
        (Err(end_err), _) => Err(end_err),
    }
}

/// The format of a file that carries a VHD footer.
pub(crate) fn detect(file: &ImageFile) -> Result<Format> {
    Ok(format_of(read_footer(file)?.footer.disk_type))
}

fn format_of(disk_type: DiskType) -> Format {
    match disk_type {
        DiskType::Fixed => Format::VhdFixed,
        DiskType::Dynamic => Format::VhdDynamic,
        DiskType::Differencing => Format::VhdDiff,
    }
}

/// Open any VHD, following a differencing chain.
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn Image>> {
    open_chained(path, options, &mut Vec::new())
}

/// Open a VHD whose children are `visited` (for loop detection).
pub(crate) fn open_chained(
    path: &Path,
    options: OpenOptions,
    visited: &mut Vec<PathBuf>,
) -> Result<Box<dyn Image>> {
    let canonical = path
        .canonicalize()
        .map_err(|e| Error::io(e, "open").at_path(path))?;
    if visited.contains(&canonical) {
        return Err(Error::new(
            ErrorKind::Parent,
            format!("differencing chain loops back to {}", canonical.display()),
        )
        .at_path(path));
    }
    if visited.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::new(
            ErrorKind::Parent,
            format!("differencing chain is deeper than {MAX_CHAIN_DEPTH} images"),
        )
        .at_path(path));
    }
    visited.push(canonical);
    let file = ImageFile::open(path, options.writable)?;
    let found = read_footer(&file)?;
    Ok(match found.footer.disk_type {
        DiskType::Fixed => Box::new(fixed::FixedVhd::open(file, found)?),
        DiskType::Dynamic | DiskType::Differencing => {
            Box::new(dynamic::DynamicVhd::open(file, found, options, visited).path_ctx(path)?)
        }
    })
}

/// Create a VHD of `format` (fixed, dynamic or differencing).
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn Image>> {
    let size = settle_size(format, size, options.round).path_ctx(path)?;
    Ok(match format {
        Format::VhdFixed => Box::new(fixed::FixedVhd::create(path, size)?),
        Format::VhdDynamic => Box::new(dynamic::DynamicVhd::create(path, size, options)?),
        Format::VhdDiff => {
            let parent = options.parent.as_deref().ok_or_else(|| {
                Error::invalid("a vhd-diff image needs a parent (--parent)").at_path(path)
            })?;
            Box::new(dynamic::DynamicVhd::create_child(
                path, parent, size, options,
            )?)
        }
        _ => return Err(Error::invalid(format!("{format} is not a VHD format")).at_path(path)),
    })
}

/// Check (or round) a requested virtual size against the format's rules.
/// A differencing disk passes 0 to mean "the parent's size".
pub fn settle_size(format: Format, size: u64, round: bool) -> Result<u64> {
    let unit = if format == Format::VhdFixed {
        AZURE_ALIGNMENT
    } else {
        crate::SECTOR
    };
    let rounded = size.div_ceil(unit) * unit;
    if rounded != size && !round {
        let what = if format == Format::VhdFixed {
            "Azure accepts fixed VHDs of whole MiB only"
        } else {
            "VHD sizes are whole 512-byte sectors"
        };
        return Err(Error::invalid(format!(
            "size {size} is not a multiple of {unit}: {what}; pass --round to use {rounded}"
        )));
    }
    if rounded > MAX_SIZE {
        return Err(Error::invalid(format!(
            "size {rounded} exceeds the VHD maximum of 2040 GiB"
        )));
    }
    if rounded == 0 && format != Format::VhdDiff {
        return Err(Error::invalid("size must be greater than zero"));
    }
    Ok(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sizes_follow_azure_rule() {
        assert_eq!(
            settle_size(Format::VhdFixed, 64 << 20, false).unwrap(),
            64 << 20
        );
        let e = settle_size(Format::VhdFixed, (64 << 20) + 512, false).unwrap_err();
        assert!(e.to_string().contains("--round"), "{e}");
        assert_eq!(
            settle_size(Format::VhdFixed, (64 << 20) + 512, true).unwrap(),
            65 << 20
        );
        assert_eq!(settle_size(Format::VhdDynamic, 1000, true).unwrap(), 1024);
        assert!(settle_size(Format::VhdDynamic, 3 << 40, true).is_err());
        assert!(settle_size(Format::VhdDynamic, 0, false).is_err());
    }
}
