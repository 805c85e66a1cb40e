//! Golden-byte tests: VHD images that qemu-img 10.0 made (see
//! `golden/README.md` for the exact commands), decoded field by field, and
//! read back through ferry.

mod common;

use common::{golden, GoldenDir};
use ferry_vhd::vhd::footer::*;
use ferry_vhd::{open, Format, OpenOptions};

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `qemu-img create -f vpc -o subformat=fixed,force_size=on fixed-1M.vhd 1M`,
/// then 4 KiB of 0xab at 0 and 4 KiB of 0xcd at 1044480 (the last 4 KiB).
#[test]
fn qemu_fixed_vhd_with_force_size() {
    let dir = GoldenDir::new("fixed");
    let path = golden(&dir, "fixed-1M.vhd");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), (1 << 20) + 512, "data + footer, nothing else");
    let f: &[u8; FOOTER_SIZE] = bytes[1 << 20..].try_into().unwrap();
    assert_eq!(&f[F_COOKIE..F_COOKIE + 8], b"conectix", "cookie");
    assert_eq!(
        be32(f, F_FEATURES),
        FEATURES_RESERVED,
        "features: only the reserved bit"
    );
    assert_eq!(be32(f, F_VERSION), VERSION_1_0, "format version 1.0");
    assert_eq!(
        be64(f, F_DATA_OFFSET),
        NO_DATA_OFFSET,
        "fixed: no dynamic header"
    );
    assert_eq!(
        &f[F_CREATOR_APP..F_CREATOR_APP + 4],
        b"qem2",
        "qemu's force_size creator"
    );
    assert_eq!(
        be32(f, F_CREATOR_VERSION),
        0x0005_0003,
        "qemu creator version"
    );
    assert_eq!(be32(f, F_CREATOR_OS), CREATOR_OS_WI2K, "Wi2k");
    assert_eq!(be64(f, F_ORIGINAL_SIZE), 1 << 20, "original size");
    assert_eq!(be64(f, F_CURRENT_SIZE), 1 << 20, "current size");
    assert_eq!(
        (
            u16::from_be_bytes([f[F_CYLINDERS], f[F_CYLINDERS + 1]]),
            f[F_HEADS],
            f[F_SECTORS]
        ),
        FORCE_SIZE_GEOMETRY,
        "force_size writes the maximum geometry"
    );
    assert_eq!(be32(f, F_DISK_TYPE), 2, "fixed");
    assert_eq!(be32(f, F_CHECKSUM), checksum(f, F_CHECKSUM), "checksum");
    assert_eq!(f[F_SAVED_STATE], 0, "no saved state");
    assert!(
        f[F_SAVED_STATE + 1..].iter().all(|&b| b == 0),
        "reserved bytes are zero"
    );

    // Our decoder models every field: decode then encode gives qemu's bytes.
    let footer = Footer::decode(f).unwrap();
    assert_eq!(&footer.encode(), f);
    assert_eq!(footer.disk_type, DiskType::Fixed);

    let mut img = open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::VhdFixed);
    assert_eq!(img.size(), 1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xab));
    assert!(buf[4096..1_044_480].iter().all(|&b| b == 0));
    assert!(buf[1_044_480..].iter().all(|&b| b == 0xcd));
    assert!(img.check().unwrap().is_empty());
}

/// `qemu-img create -f vpc dynamic-8M.vhd 8M` (CHS-rounded to 8390656 bytes),
/// then 4 KiB of 0xab at 0 and 4 KiB of 0xcd at 5 MiB.
#[test]
fn qemu_dynamic_vhd() {
    let dir = GoldenDir::new("dynamic");
    let path = golden(&dir, "dynamic-8M.vhd");
    let bytes = std::fs::read(&path).unwrap();
    let size = 241 * 4 * 17 * 512; // qemu's CHS for 8M: 241 cylinders, 4 heads, 17 sectors
    let copy: &[u8; FOOTER_SIZE] = bytes[..512].try_into().unwrap();
    let end: &[u8; FOOTER_SIZE] = bytes[bytes.len() - 512..].try_into().unwrap();
    assert_eq!(copy, end, "footer copy at 0 equals the footer at the end");
    assert_eq!(
        be64(copy, F_DATA_OFFSET),
        512,
        "dynamic header right after the copy"
    );
    assert_eq!(&copy[F_CREATOR_APP..F_CREATOR_APP + 4], b"qemu");
    assert_eq!(be64(copy, F_CURRENT_SIZE), size);
    assert_eq!(
        (
            u16::from_be_bytes([copy[F_CYLINDERS], copy[F_CYLINDERS + 1]]),
            copy[F_HEADS],
            copy[F_SECTORS]
        ),
        (241, 4, 17)
    );
    assert_eq!(be32(copy, F_DISK_TYPE), 3, "dynamic");
    let footer = Footer::decode(copy).unwrap();
    assert_eq!(&footer.encode(), copy);

    let h: &[u8; HEADER_SIZE] = bytes[512..512 + HEADER_SIZE].try_into().unwrap();
    assert_eq!(&h[H_COOKIE..H_COOKIE + 8], b"cxsparse", "header cookie");
    assert_eq!(be64(h, H_DATA_OFFSET), u64::MAX, "unused data offset");
    assert_eq!(be64(h, H_TABLE_OFFSET), 1536, "BAT right after the header");
    assert_eq!(be32(h, H_VERSION), VERSION_1_0);
    assert_eq!(be32(h, H_MAX_TABLE_ENTRIES), 5, "ceil(8390656 / 2 MiB)");
    assert_eq!(be32(h, H_BLOCK_SIZE), DEFAULT_BLOCK_SIZE, "2 MiB blocks");
    assert_eq!(be32(h, H_CHECKSUM), checksum(h, H_CHECKSUM));
    assert!(
        h[H_PARENT_UUID..].iter().all(|&b| b == 0),
        "no parent fields, locators or reserved bytes"
    );
    let header = DynamicHeader::decode(h).unwrap();
    assert_eq!(&header.encode(), h);

    // BAT: block 0 at sector 4 (right after the 512-byte BAT padding at
    // 2048), block 2 (5 MiB) at sector 4 + 1 + 4096 = 4101; the rest unused.
    let bat: Vec<u32> = (0..5).map(|i| be32(&bytes, 1536 + 4 * i)).collect();
    assert_eq!(bat, [4, u32::MAX, 4101, u32::MAX, u32::MAX]);
    // Block 0's sector bitmap: qemu sets every bit.
    assert!(bytes[2048..2560].iter().all(|&b| b == 0xff));
    assert_eq!(
        bytes.len(),
        2048 + 2 * (512 + (2 << 20)) + 512,
        "two blocks and the footer"
    );

    let mut img = open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::VhdDynamic);
    assert_eq!(img.size(), size);
    let mut buf = vec![0u8; usize::try_from(size).unwrap()];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xab));
    assert!(buf[5 << 20..(5 << 20) + 4096].iter().all(|&b| b == 0xcd));
    let nonzero = buf.iter().filter(|&&b| b != 0).count();
    assert_eq!(nonzero, 8192, "nothing else");
    let allocated: u64 = img
        .map(0, size)
        .unwrap()
        .iter()
        .filter(|e| e.allocated)
        .map(|e| e.length)
        .sum();
    assert_eq!(allocated, 4 << 20, "blocks 0 and 2");
    assert!(img.check().unwrap().is_empty());
}

/// Mutating one field at a time of qemu's image gives an error that names it.
#[test]
fn qemu_dynamic_vhd_field_mutations_are_named() {
    let dir = GoldenDir::new("dynamic-mut");
    let path = golden(&dir, "dynamic-8M.vhd");
    let good = std::fs::read(&path).unwrap();
    let footer_at = good.len() - 512;
    let cases: [(usize, u8, &str); 5] = [
        (
            1536 + 3,
            0x01,
            "BAT entry 0 points at a block (512..2098176) over the header (512..1536)",
        ),
        (footer_at + F_CURRENT_SIZE + 7, 0x01, "checksum"),
        (512 + H_BLOCK_SIZE + 3, 0x01, "checksum"),
        (512 + H_COOKIE, b'x', "cxsparse"),
        (1536 + 11, 0x77, "BAT entry 2"),
    ];
    for (at, value, expect) in cases {
        let mut bytes = good.clone();
        bytes[at] = value;
        if at >= footer_at {
            // Break the copy at 0 as well, or it would stand in for the end footer.
            bytes[at - footer_at] = value;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = open(&path, OpenOptions::read_only()).unwrap_err();
        assert!(e.to_string().contains(expect), "byte {at}: {e}");
        assert_eq!(e.path(), Some(path.as_path()), "{e}");
    }
}
