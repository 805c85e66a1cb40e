//! monolithicFlat VMDK: a small text descriptor plus one raw extent file
//! (`<stem>-flat.vmdk`) holding the disk byte for byte.

use std::path::{Path, PathBuf};

use super::descriptor::{self, Descriptor};
use super::{corrupt_at, RemoveOnError, MAX_CAPACITY_SECTORS, MAX_DESCRIPTOR_BYTES};
use crate::error::{Error, Result};
use crate::fileio::ImageFile;
use crate::image::{Extent, Format, Image, Problem, SECTOR};
use crate::raw::RawImage;
use crate::OpenOptions;

/// A flat VMDK: reads and writes go straight to the extent file.
#[derive(Debug)]
pub(crate) struct FlatImage {
    desc_path: PathBuf,
    extent_path: PathBuf,
    raw: RawImage,
    size: u64,
}

/// Open a flat VMDK from its descriptor (already opened read-only).
pub(crate) fn open(desc_file: ImageFile, options: OpenOptions) -> Result<Box<dyn Image>> {
    let path = desc_file.path().to_path_buf();
    let len = desc_file.len()?;
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(corrupt_at(
            &desc_file,
            0,
            format!(
                "descriptor of {len} bytes is larger than the {MAX_DESCRIPTOR_BYTES}-byte limit"
            ),
        ));
    }
    let mut text = vec![0u8; usize::try_from(len).unwrap_or(0)];
    desc_file.read_exact_at(&mut text, 0)?;
    let desc = Descriptor::parse(&text).map_err(|e| e.at_path(&path))?;
    let create_type = desc.create_type.as_deref().unwrap_or("(none)");
    if !matches!(create_type, "monolithicFlat" | "vmfs") {
        return Err(Error::unsupported(format!(
            "VMDK createType {create_type:?} is not supported (supported: monolithicSparse, \
             monolithicFlat, vmfs with one flat extent, streamOptimized)"
        ))
        .at_path(&path));
    }
    if desc.has_parent() {
        return Err(Error::unsupported("VMDK delta disk with a parent").at_path(&path));
    }
    let [ext] = desc.extents.as_slice() else {
        return Err(Error::unsupported(format!(
            "{create_type} VMDK with {} extents (exactly one is supported)",
            desc.extents.len()
        ))
        .at_path(&path));
    };
    if !matches!(ext.kind.as_str(), "FLAT" | "VMFS") {
        return Err(Error::unsupported(format!(
            "{create_type} VMDK with a {} extent (only FLAT is supported)",
            ext.kind
        ))
        .at_path(&path));
    }
    if ext.offset != 0 {
        return Err(Error::unsupported(format!(
            "flat extent starting at sector {} of its file",
            ext.offset
        ))
        .at_path(&path));
    }
    match ext.access.as_str() {
        "RW" => {}
        "RDONLY" if !options.writable => {}
        other => {
            return Err(Error::unsupported(format!(
                "extent access {other} does not allow {}",
                if options.writable {
                    "writing"
                } else {
                    "reading"
                }
            ))
            .at_path(&path))
        }
    }
    let name = ext
        .file
        .as_deref()
        .ok_or_else(|| Error::corrupt("flat extent line names no file").at_path(&path))?;
    if ext.sectors > MAX_CAPACITY_SECTORS {
        return Err(Error::corrupt(format!(
            "extent of {} sectors is beyond the 64 TiB limit",
            ext.sectors
        ))
        .at_path(&path));
    }
    let size = ext.sectors * SECTOR;
    let extent_path = resolve(&path, name);
    let file = ImageFile::open(&extent_path, options.writable)?;
    let extent_len = file.len()?;
    if extent_len < size && file.raw().metadata().is_ok_and(|m| m.is_file()) {
        return Err(Error::corrupt(format!(
            "extent file is {extent_len} bytes but the descriptor declares {size}"
        ))
        .at_path(&extent_path));
    }
    Ok(Box::new(FlatImage {
        desc_path: path,
        extent_path,
        raw: RawImage::from_file(file, size),
        size,
    }))
}

/// An extent file name relative to the descriptor's directory.
fn resolve(desc: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        desc.parent().unwrap_or(Path::new("")).join(name)
    }
}

impl FlatImage {
    /// Create the descriptor at `path` and a sparse `<stem>-flat.vmdk` beside it.
    pub(crate) fn create(path: &Path, capacity: u64) -> Result<Self> {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| Error::invalid("image file name is not UTF-8").at_path(path))?;
        let extent_name = format!("{stem}-flat.vmdk");
        descriptor::check_file_name(&extent_name).map_err(|e| e.at_path(path))?;
        let extent_path = path.with_file_name(&extent_name);
        let text = descriptor::render(
            "monolithicFlat",
            capacity,
            &format!("FLAT \"{extent_name}\" 0"),
            descriptor::random_cid()?,
        );
        let desc = ImageFile::create_new(path)?;
        let mut guard = RemoveOnError { path, armed: true };
        let raw = RawImage::create(&extent_path, capacity * SECTOR)?;
        let mut extent_guard = RemoveOnError {
            path: &extent_path,
            armed: true,
        };
        desc.write_all_at(text.as_bytes(), 0)?;
        desc.sync_data()?;
        guard.armed = false;
        extent_guard.armed = false;
        Ok(FlatImage {
            desc_path: path.to_path_buf(),
            extent_path: extent_path.clone(),
            raw,
            size: capacity * SECTOR,
        })
    }
}

impl Image for FlatImage {
    fn format(&self) -> Format {
        Format::VmdkFlat
    }

    fn path(&self) -> &Path {
        &self.desc_path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.raw.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.raw.write_at(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        self.raw.flush()
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.raw.map(offset, length)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        self.raw.allocated_bytes()
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        let mut problems = self.raw.check()?;
        let len = std::fs::metadata(&self.extent_path)
            .map_err(|e| Error::io(e, "stat").at_path(&self.extent_path))?;
        if len.is_file() && len.len() < self.size {
            problems.push(Problem {
                offset: 0,
                what: format!(
                    "extent file {} is {} bytes, shorter than the disk ({} bytes)",
                    self.extent_path.display(),
                    len.len(),
                    self.size
                ),
                damage: true,
            });
        }
        Ok(problems)
    }

    fn extra_files(&self) -> Vec<PathBuf> {
        vec![self.extent_path.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{compressible_pattern as pattern, have_qemu_img, qemu_img, TempDir};
    use crate::ErrorKind;

    const MIB: u64 = 1 << 20;

    #[test]
    fn round_trip_and_reopen() {
        let dir = TempDir::new("flat-rt");
        let p = dir.path("disk.vmdk");
        let size = 3 * MIB + 512;
        let mut model = vec![0u8; usize::try_from(size).unwrap()];
        {
            let mut img = FlatImage::create(&p, size / SECTOR).unwrap();
            assert_eq!(img.extra_files(), vec![dir.path("disk-flat.vmdk")]);
            for (k, off) in [1u64, 4095, MIB + 3, size - 1000].into_iter().enumerate() {
                let data = pattern(999, k as u64);
                img.write_at(&data, off).unwrap();
                let o = usize::try_from(off).unwrap();
                model[o..o + 999].copy_from_slice(&data);
            }
            img.flush().unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("createType=\"monolithicFlat\""), "{text}");
        assert!(text.contains(&format!("RW {} FLAT \"disk-flat.vmdk\" 0", size / SECTOR)));
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        assert_eq!(img.format(), Format::VmdkFlat);
        assert_eq!(img.size(), size);
        let mut back = vec![0u8; model.len()];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, model);
        assert!(img.check().unwrap().is_empty());
        let map = img.map(0, size).unwrap();
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), size);
        if have_qemu_img() {
            let raw = dir.path("m.raw");
            std::fs::write(&raw, &model).unwrap();
            let (ok, out) = qemu_img(&[
                "compare",
                "-f",
                "raw",
                "-F",
                "vmdk",
                raw.to_str().unwrap(),
                p.to_str().unwrap(),
            ]);
            assert!(ok, "qemu-img compare: {out}");
        }
        // Refuses to clobber.
        assert!(FlatImage::create(&p, 8).is_err());
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let dir = TempDir::new("flat-bad");
        let p = dir.path("d.vmdk");
        let write = |body: &str| {
            std::fs::write(&p, format!("# Disk DescriptorFile\nversion=1\n{body}")).unwrap();
            super::super::open(&p, OpenOptions::read_only())
                .map(|_| ())
                .unwrap_err()
        };
        let e = write("createType=\"twoGbMaxExtentSparse\"\nRW 8 SPARSE \"a.vmdk\"\n");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("twoGbMaxExtentSparse"));
        std::fs::write(dir.path("d-flat.vmdk"), [0u8; 1024]).unwrap();
        let e = write("createType=\"monolithicFlat\"\nRW 8 FLAT \"d-flat.vmdk\" 0\n");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(e.path(), Some(dir.path("d-flat.vmdk").as_path()));
        let e = write("createType=\"monolithicFlat\"\nRW 2 FLAT \"missing.vmdk\" 0\n");
        assert_eq!(e.kind(), ErrorKind::Io);
        let e = write("createType=\"monolithicFlat\"\nRW 2 FLAT \"d-flat.vmdk\" 0\nRW 2 FLAT \"d-flat.vmdk\" 0\n");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e =
            write("createType=\"monolithicFlat\"\nRW 99999999999999999 FLAT \"d-flat.vmdk\" 0\n");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        std::fs::write(&p, vec![b'#'; 70_000]).unwrap();
        let mut head = b"# Disk DescriptorFile\n".to_vec();
        head.resize(70_000, b' ');
        std::fs::write(&p, head).unwrap();
        let e = super::super::open(&p, OpenOptions::read_only())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        // The good case for contrast.
        std::fs::write(
            &p,
            "# Disk DescriptorFile\ncreateType=\"vmfs\"\nRW 2 VMFS \"d-flat.vmdk\"\n",
        )
        .unwrap();
        assert!(super::super::open(&p, OpenOptions::read_write()).is_ok());
    }

    #[test]
    fn qemu_flat_images_read_identically() {
        if !have_qemu_img() {
            return;
        }
        let dir = TempDir::new("flat-qemu");
        let raw = dir.path("src.raw");
        let model = pattern(usize::try_from(2 * MIB).unwrap(), 5);
        std::fs::write(&raw, &model).unwrap();
        let p = dir.path("q.vmdk");
        let (ok, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        let mut back = vec![0u8; model.len()];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, model);
    }
}
