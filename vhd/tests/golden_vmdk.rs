//! Golden-byte tests: VMDK images that qemu-img 10.0 made (see
//! `golden/README.md`), decoded field by field, and read back through ferry.
//! Every image holds 4 KiB of 0xab at 0 and 64 KiB of 0xcd at 3 MiB.

mod common;

use common::{golden, GoldenDir};
use ferry_vhd::vmdk::{self, hdr};
use ferry_vhd::{open, Format, OpenOptions};

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn assert_content(format: Format, path: &std::path::Path) {
    let mut img = open(path, OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), format);
    assert_eq!(img.size(), 4 << 20);
    let mut buf = vec![0u8; 4 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0xab),
        "{format}: 0xab at 0"
    );
    assert!(
        buf[3 << 20..(3 << 20) + 65536].iter().all(|&b| b == 0xcd),
        "{format}: 0xcd at 3 MiB"
    );
    assert_eq!(
        buf.iter().filter(|&&b| b != 0).count(),
        4096 + 65536,
        "{format}: nothing else"
    );
    let problems = img.check().unwrap();
    assert!(problems.iter().all(|p| !p.damage), "{format}: {problems:?}");
}

/// `qemu-img create -f vmdk sparse-4M.vmdk 4M` + two writes.
#[test]
fn qemu_monolithic_sparse() {
    let dir = GoldenDir::new("sparse");
    let path = golden(&dir, "sparse-4M.vmdk");
    let b = std::fs::read(&path).unwrap();
    assert_eq!(
        &b[hdr::MAGIC..hdr::MAGIC + 4],
        vmdk::MAGIC,
        "magicNumber KDMV"
    );
    assert_eq!(le32(&b, hdr::VERSION), 1, "version 1");
    assert_eq!(
        le32(&b, hdr::FLAGS),
        vmdk::FLAG_VALID_NEWLINE | vmdk::FLAG_REDUNDANT_GT,
        "flags"
    );
    assert_eq!(le64(&b, hdr::CAPACITY), 8192, "capacity: 4 MiB in sectors");
    assert_eq!(
        le64(&b, hdr::GRAIN_SIZE),
        vmdk::DEFAULT_GRAIN_SECTORS,
        "64 KiB grains"
    );
    assert_eq!(
        le64(&b, hdr::DESC_OFFSET),
        vmdk::DESC_SECTOR,
        "descriptor at sector 1"
    );
    assert_eq!(
        le64(&b, hdr::DESC_SIZE),
        vmdk::DESC_SECTORS,
        "20 descriptor sectors"
    );
    assert_eq!(
        le32(&b, hdr::NUM_GTES_PER_GT),
        vmdk::GTES_PER_GT,
        "512 entries per GT"
    );
    assert_eq!(
        le64(&b, hdr::RGD_OFFSET),
        21,
        "redundant GD right after the descriptor"
    );
    assert_eq!(
        le64(&b, hdr::GD_OFFSET),
        26,
        "GD after the redundant GD and its GT"
    );
    assert_eq!(le64(&b, hdr::OVERHEAD), 128, "grains start at sector 128");
    assert_eq!(b[hdr::UNCLEAN_SHUTDOWN], 0, "cleanly closed");
    assert_eq!(
        b[hdr::NEWLINE_CHARS..hdr::NEWLINE_CHARS + 4],
        vmdk::NEWLINE_CHARS,
        "newline test bytes"
    );
    assert_eq!(
        u16::from_le_bytes([b[hdr::COMPRESS_ALGORITHM], b[hdr::COMPRESS_ALGORITHM + 1]]),
        0
    );
    let descriptor = String::from_utf8_lossy(&b[512..512 + 20 * 512]);
    assert!(
        descriptor.starts_with("# Disk DescriptorFile"),
        "embedded descriptor"
    );
    assert!(descriptor.contains("createType=\"monolithicSparse\""));
    assert!(descriptor.contains("RW 8192 SPARSE \"sparse-4M.vmdk\""));
    // GD (sector 26) -> GT at 27; RGD (21) -> redundant GT at 22.
    assert_eq!(le32(&b, 26 * 512), 27);
    assert_eq!(le32(&b, 21 * 512), 22);
    // GT entry 0 -> grain at sector 128; entry 48 (3 MiB) -> sector 256;
    // both tables agree.
    for gt in [22 * 512, 27 * 512] {
        assert_eq!(le32(&b, gt), 128, "grain 0");
        assert_eq!(le32(&b, gt + 48 * 4), 256, "grain 48");
        assert_eq!(
            (1..512).filter(|&i| le32(&b, gt + 4 * i) != 0).count(),
            1,
            "two grains in all"
        );
    }
    assert_eq!(b.len(), 256 * 512 + 65536, "two grains after the overhead");
    assert_content(Format::VmdkSparse, &path);
}

/// `qemu-img convert -O vmdk -o subformat=streamOptimized`.
#[test]
fn qemu_stream_optimized() {
    let dir = GoldenDir::new("stream");
    let path = golden(&dir, "stream-4M.vmdk");
    let b = std::fs::read(&path).unwrap();
    assert_eq!(&b[..4], b"KDMV");
    assert_eq!(le32(&b, hdr::VERSION), 3, "version 3 for stream-optimized");
    let flags = le32(&b, hdr::FLAGS);
    assert_eq!(
        flags & vmdk::FLAG_COMPRESSED,
        vmdk::FLAG_COMPRESSED,
        "compressed grains"
    );
    assert_eq!(flags & vmdk::FLAG_MARKERS, vmdk::FLAG_MARKERS, "markers");
    assert_eq!(
        u16::from_le_bytes([b[hdr::COMPRESS_ALGORITHM], b[hdr::COMPRESS_ALGORITHM + 1]]),
        vmdk::COMPRESS_DEFLATE,
        "deflate"
    );
    assert_eq!(le64(&b, hdr::CAPACITY), 8192);
    // The first grain's marker at the overhead: LBA 0, then a zlib stream.
    let overhead = usize::try_from(le64(&b, hdr::OVERHEAD)).unwrap() * 512;
    assert_eq!(le64(&b, overhead), 0, "grain marker LBA");
    let compressed = le32(&b, overhead + 8);
    assert!(
        compressed > 0 && compressed < 65536,
        "grain marker size {compressed}"
    );
    assert_eq!(b[overhead + 12], 0x78, "zlib header, not raw deflate");
    assert_content(Format::VmdkStream, &path);
}

/// `qemu-img convert -O vmdk -o subformat=monolithicFlat`: a descriptor and
/// a raw extent.
#[test]
fn qemu_monolithic_flat() {
    let dir = GoldenDir::new("flat");
    let path = golden(&dir, "flat-4M.vmdk");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("createType=\"monolithicFlat\""));
    assert!(text.contains("RW 8192 FLAT \"flat-4M-flat.vmdk\" 0"));
    assert_content(Format::VmdkFlat, &path);
    let img = open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(img.extra_files(), vec![dir.path("flat-4M-flat.vmdk")]);
}
