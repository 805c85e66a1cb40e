//! ferry's disk-image library.
//!
//! Replica disks at the recovery site, failover exports, test-failover
//! overlays and failback targets are all images in one of these formats:
//!
//! | format        | module          | random writes | notes                                  |
//! |---------------|-----------------|---------------|----------------------------------------|
//! | `raw`         | [`raw`]         | yes           | holes reported through SEEK_HOLE       |
//! | `vhd-fixed`   | [`vhd`]         | yes           | what Azure page blobs hold             |
//! | `vhd-dynamic` | [`vhd`]         | yes           | 2 MiB blocks, crash-safe allocation    |
//! | `vhd-diff`    | [`vhd`]         | yes           | parent by locator, UUID/time checked   |
//! | `vmdk-sparse` | [`vmdk`]        | yes           | monolithicSparse, redundant GD kept    |
//! | `vmdk-flat`   | [`vmdk`]        | yes           | descriptor + `-flat.vmdk` extent       |
//! | `vmdk-stream` | [`vmdk`]        | ascending     | streamOptimized, zlib grains, markers  |
//!
//! [`open`] detects the format from the file's content; [`create`] makes a
//! new image. Both return a boxed [`Image`]. Parsers never trust a size
//! field for an allocation: every table is bounded by the file it lives in.

#![warn(missing_docs)]

pub mod convert;
pub mod error;
mod fileio;
pub mod image;
pub mod raw;
pub mod vhd;
pub mod vmdk;

use std::path::{Path, PathBuf};

pub use error::{Error, ErrorKind, Result};
pub use fileio::is_zero;
pub use image::{parse_size, Extent, Format, Image, Problem, SyncPolicy, SECTOR};

use fileio::ImageFile;

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Parent image, required for `vhd-diff`.
    pub parent: Option<PathBuf>,
    /// Round the size up to what the format needs instead of refusing it
    /// (Azure's whole-MiB rule for `vhd-fixed`, whole sectors elsewhere).
    pub round: bool,
    /// Crash-consistency policy while the image is written.
    pub sync: SyncPolicy,
}

/// Options for [`open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Crash-consistency policy for writes.
    pub sync: SyncPolicy,
}

impl OpenOptions {
    /// Read-only.
    pub fn read_only() -> Self {
        OpenOptions {
            writable: false,
            sync: SyncPolicy::Ordered,
        }
    }

    /// Read-write with ordered (crash-safe) metadata updates.
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            sync: SyncPolicy::Ordered,
        }
    }
}

/// Magic at the start of every format this crate detects by content.
mod magic {
    /// VHD footer cookie (footer copy at 0 for dynamic disks, at the end for fixed).
    pub const VHD_COOKIE: &[u8; 8] = b"conectix";
    /// VMDK sparse extent header ("KDMV" little-endian).
    pub const VMDK_SPARSE: &[u8; 4] = b"KDMV";
    /// First line of a VMDK text descriptor.
    pub const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
}

/// Detect an image's format from its content, without opening it fully.
pub fn detect(path: &Path) -> Result<Format> {
    let file = ImageFile::open(path, false)?;
    detect_file(&file)
}

fn detect_file(file: &ImageFile) -> Result<Format> {
    let len = file.len()?;
    let mut head = [0u8; 512];
    let head_len = usize::try_from(len.min(512)).expect("at most 512");
    file.read_exact_at(&mut head[..head_len], 0)?;
    let head = &head[..head_len];
    if head.starts_with(magic::VMDK_SPARSE) {
        return vmdk::detect_sparse(file);
    }
    if head.starts_with(magic::VMDK_DESCRIPTOR) {
        return Ok(Format::VmdkFlat);
    }
    if head.starts_with(magic::VHD_COOKIE) || (len >= 512 && ends_with_vhd_footer(file, len)?) {
        return vhd::detect(file);
    }
    Ok(Format::Raw)
}

fn ends_with_vhd_footer(file: &ImageFile, len: u64) -> Result<bool> {
    let tail: [u8; 8] = file.read_array(len - 512)?;
    Ok(&tail == magic::VHD_COOKIE)
}

/// Open an image, detecting its format from its content.
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn Image>> {
    let format = detect(path)?;
    open_as(path, format, options)
}

/// Open an image as a known format (no detection: a raw file that happens to
/// end in a VHD footer can be opened as raw this way).
pub fn open_as(path: &Path, format: Format, options: OpenOptions) -> Result<Box<dyn Image>> {
    Ok(match format {
        Format::Raw => Box::new(raw::RawImage::open(path, options.writable)?),
        Format::VhdFixed | Format::VhdDynamic | Format::VhdDiff => vhd::open(path, options)?,
        Format::VmdkSparse | Format::VmdkFlat | Format::VmdkStream => vmdk::open(path, options)?,
    })
}

/// Create a new image of `size` bytes. Existing files are never overwritten.
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn Image>> {
    if options.parent.is_some() && format != Format::VhdDiff {
        return Err(Error::invalid(format!("{format} images take no parent")).at_path(path));
    }
    Ok(match format {
        Format::Raw => Box::new(raw::RawImage::create(path, size)?),
        Format::VhdFixed | Format::VhdDynamic | Format::VhdDiff => {
            vhd::create(path, format, size, options)?
        }
        Format::VmdkSparse | Format::VmdkFlat | Format::VmdkStream => {
            vmdk::create(path, format, size, options)?
        }
    })
}

/// The chain of images from `image` to its last ancestor.
pub fn chain(image: &dyn Image) -> Vec<(PathBuf, Format)> {
    let mut out = vec![(image.path().to_path_buf(), image.format())];
    let mut cur = image.parent();
    while let Some(p) = cur {
        out.push((p.path().to_path_buf(), p.format()));
        cur = p.parent();
    }
    out
}

/// Helpers shared by the unit tests of every format.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A scratch directory removed when dropped.
    #[derive(Debug)]
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("ferry-vhd-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            TempDir(dir)
        }

        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Deterministic pseudo-random bytes (xorshift), for patterns.
    pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// Deterministic data that is partly compressible (runs of a counter
    /// between pseudo-random stretches), for the stream-optimized writer.
    pub(crate) fn compressible_pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                if (i / 700) % 3 == 0 {
                    u8::try_from(i % 251).unwrap()
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                }
            })
            .collect()
    }

    /// Whether qemu-img is installed: unit tests cross-check with it when it
    /// is (the rig tier always does).
    pub(crate) fn have_qemu_img() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok()
    }

    /// Run qemu-img and return (success, stdout+stderr).
    pub(crate) fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// qemu-img's verdict on a VMDK: `check` clean, and `compare` equal to
    /// `model` (written to the scratch file `raw`).
    pub(crate) fn qemu_vmdk_agrees(vmdk: &str, model: &[u8], raw: &std::path::Path) {
        let (ok, out) = qemu_img(&["check", "-f", "vmdk", vmdk]);
        assert!(ok, "qemu-img check: {out}");
        std::fs::write(raw, model).unwrap();
        let raw = raw.to_str().unwrap();
        let (ok, out) = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", raw, vmdk]);
        assert!(ok, "qemu-img compare: {out}");
    }
}
