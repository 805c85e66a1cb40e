//! Rig tier: `ferry image` judged by qemu-img, in both directions.

use std::path::Path;

use ferry_tests::{expect_code, ferry, qemu_format, qemu_img, write_half_full_raw, Scratch};

const MIB: u64 = 1 << 20;
/// Source disks are whole MiB (so vhd-fixed takes them) and cross many
/// VHD blocks and VMDK grain tables.
const SIZE: u64 = 72 * MIB;

/// Formats ferry writes from scratch (vhd-diff needs a parent: own test).
const WRITABLE: [&str; 6] = [
    "raw",
    "vhd-fixed",
    "vhd-dynamic",
    "vmdk-sparse",
    "vmdk-flat",
    "vmdk-stream",
];

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_compare(raw: &Path, image: &Path, format: &str) {
    let out = ferry_tests::qemu_compare_raw(raw, image, format);
    expect_code(&out, 0, &format!("qemu-img compare raw vs {format}"));
}

#[test]
fn images_ferry_writes_pass_qemu_img() {
    let dir = Scratch::new("ferry-writes");
    let src = dir.path("src.raw");
    write_half_full_raw(&src, SIZE, 1);
    for format in WRITABLE {
        let dst = dir.path(&format!("out-{format}.img"));
        let out = ferry(["image", "convert", "--format", format, s(&src), s(&dst)]);
        expect_code(&out, 0, &format!("ferry image convert to {format}"));
        qemu_compare(&src, &dst, format);
        if format.starts_with("vmdk") {
            expect_code(
                &qemu_img(["check", "-f", "vmdk", s(&dst)]),
                0,
                &format!("qemu-img check {format}"),
            );
        }
        let info = qemu_img(["info", "--output=json", "-f", qemu_format(format), s(&dst)]);
        expect_code(&info, 0, "qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(
            info["virtual-size"], SIZE,
            "{format}: qemu sees the virtual size"
        );
        expect_code(
            &ferry(["image", "check", s(&dst)]),
            0,
            &format!("ferry image check {format}"),
        );
        expect_code(
            &ferry(["image", "compare", s(&src), s(&dst)]),
            0,
            &format!("ferry compare {format}"),
        );
    }
}

#[test]
fn sparse_targets_leave_zero_blocks_unallocated() {
    let dir = Scratch::new("sparse");
    let src = dir.path("src.raw");
    // 64 MiB with 1 MiB of data in one place.
    std::fs::File::create(&src)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    std::fs::write(dir.path("chunk"), ferry_tests::pattern(3, 1 << 20)).unwrap();
    let data = std::fs::read(dir.path("chunk")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&data, 10 * MIB).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 20 * MIB).unwrap(); // allocated zeros
    }
    for format in ["vhd-dynamic", "vmdk-sparse", "vmdk-stream"] {
        let dst = dir.path(&format!("o-{format}"));
        expect_code(
            &ferry(["image", "convert", "--format", format, s(&src), s(&dst)]),
            0,
            "convert",
        );
        let info = ferry(["image", "info", "--json", s(&dst)]);
        expect_code(&info, 0, "info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let allocated = info["allocated_bytes"].as_u64().unwrap();
        assert!(
            allocated <= 2 * MIB,
            "{format}: {allocated} bytes allocated for 1 MiB of data"
        );
        assert!(allocated >= MIB, "{format}: {allocated}");
        qemu_compare(&src, &dst, format);
    }
}

#[test]
fn differencing_vhd_over_a_parent() {
    let dir = Scratch::new("diff");
    let base_raw = dir.path("base.raw");
    write_half_full_raw(&base_raw, SIZE, 2);
    let base = dir.path("base.vhd");
    expect_code(
        &ferry([
            "image",
            "convert",
            "--format",
            "vhd-dynamic",
            s(&base_raw),
            s(&base),
        ]),
        0,
        "base",
    );
    // The child's content: the base with new data and some zeroed ranges.
    let child_raw = dir.path("child.raw");
    write_half_full_raw(&child_raw, SIZE, 3);
    let child = dir.path("child.vhd");
    let out = ferry([
        "image",
        "convert",
        "--format",
        "vhd-diff",
        "--parent",
        s(&base),
        s(&child_raw),
        s(&child),
    ]);
    expect_code(&out, 0, "convert into a differencing disk");
    expect_code(
        &ferry(["image", "compare", s(&child_raw), s(&child)]),
        0,
        "child content",
    );
    expect_code(
        &ferry(["image", "compare", s(&base_raw), s(&base)]),
        0,
        "parent untouched",
    );
    expect_code(&ferry(["image", "check", s(&child)]), 0, "check child");
    let info = ferry(["image", "info", "--json", s(&child)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "vhd-diff");
    assert_eq!(info["chain"].as_array().unwrap().len(), 2);
    assert_eq!(info["chain"][1]["format"], "vhd-dynamic");
    // qemu's vpc driver has no differencing support: it reads a child as a
    // dynamic disk without its parent. Over an empty parent that view is
    // the whole content, so qemu can judge the child's own blocks.
    let empty = dir.path("empty.vhd");
    expect_code(
        &ferry([
            "image",
            "create",
            "--format",
            "vhd-dynamic",
            "--size",
            &SIZE.to_string(),
            s(&empty),
        ]),
        0,
        "empty",
    );
    let lone = dir.path("lone.vhd");
    let out = ferry([
        "image",
        "convert",
        "--format",
        "vhd-diff",
        "--parent",
        s(&empty),
        s(&child_raw),
        s(&lone),
    ]);
    expect_code(&out, 0, "convert over an empty parent");
    qemu_compare(&child_raw, &lone, "vhd-diff");
}

#[test]
fn images_qemu_img_writes_convert_back_byte_for_byte() {
    let dir = Scratch::new("qemu-writes");
    let src = dir.path("src.raw");
    write_half_full_raw(&src, SIZE, 4);
    let original = std::fs::read(&src).unwrap();
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "fixed.vhd",
            &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
            "vhd-fixed",
        ),
        ("dynamic.vhd", &["-O", "vpc"], "vhd-dynamic"),
        ("sparse.vmdk", &["-O", "vmdk"], "vmdk-sparse"),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            "vmdk-stream",
        ),
        (
            "flat.vmdk",
            &["-O", "vmdk", "-o", "subformat=monolithicFlat"],
            "vmdk-flat",
        ),
    ];
    for (name, qemu_args, format) in cases {
        let image = dir.path(name);
        let mut args = vec!["convert", "-f", "raw"];
        args.extend_from_slice(qemu_args);
        args.extend([s(&src), s(&image)]);
        expect_code(&qemu_img(&args), 0, &format!("qemu-img convert {name}"));
        let info = ferry(["image", "info", "--json", s(&image)]);
        expect_code(&info, 0, &format!("ferry image info {name}"));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], format, "{name} detected");
        expect_code(
            &ferry(["image", "check", s(&image)]),
            0,
            &format!("ferry image check {name}"),
        );
        let back = dir.path(&format!("{name}.raw"));
        expect_code(
            &ferry(["image", "convert", "--format", "raw", s(&image), s(&back)]),
            0,
            "convert back",
        );
        let got = std::fs::read(&back).unwrap();
        // qemu may round the virtual size up; the extra tail must be zeros.
        assert!(
            got.len() >= original.len(),
            "{name}: {} < {}",
            got.len(),
            original.len()
        );
        assert!(
            got[..original.len()] == original[..],
            "{name}: content differs"
        );
        assert!(
            got[original.len()..].iter().all(|&b| b == 0),
            "{name}: non-zero tail"
        );
    }
}

#[test]
fn vhd_fixed_is_what_azure_accepts() {
    let dir = Scratch::new("azure");
    let odd = dir.path("odd.vhd");
    let out = ferry([
        "image",
        "create",
        "--format",
        "vhd-fixed",
        "--size",
        "1000000K",
        s(&odd),
    ]);
    expect_code(&out, 2, "a fixed VHD that is not whole MiB is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--round"),
        "{out:?}"
    );
    assert!(!odd.exists(), "nothing left behind");
    let out = ferry([
        "image",
        "create",
        "--format",
        "vhd-fixed",
        "--size",
        "1000000K",
        "--round",
        s(&odd),
    ]);
    expect_code(&out, 0, "--round");
    let bytes = std::fs::read(&odd).unwrap();
    let size = 977 * MIB; // 1,000,000 KiB rounded up to whole MiB
    assert_eq!(bytes.len() as u64, size + 512, "file = size + footer");
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[0..8], b"conectix");
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        size,
        "current size"
    );
    assert_eq!(
        u16::from_be_bytes([footer[56], footer[57]]),
        65535,
        "cylinders"
    );
    assert_eq!(
        (footer[58], footer[59]),
        (16, 255),
        "heads, sectors per track"
    );
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed disk type"
    );
    let info = qemu_img(["info", "--output=json", "-f", "vpc", s(&odd)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], size);
}

#[test]
fn check_and_compare_exit_codes_and_messages() {
    let dir = Scratch::new("cli");
    let src = dir.path("src.raw");
    write_half_full_raw(&src, 16 * MIB, 5);
    let vhd = dir.path("a.vhd");
    expect_code(
        &ferry([
            "image",
            "convert",
            "--format",
            "vhd-dynamic",
            s(&src),
            s(&vhd),
        ]),
        0,
        "convert",
    );
    // A BAT entry pointing past the end of the file.
    let mut bytes = std::fs::read(&vhd).unwrap();
    bytes[1536..1540].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    std::fs::write(&vhd, &bytes).unwrap();
    let out = ferry(["image", "check", s(&vhd)]);
    expect_code(&out, 1, "check of a damaged image");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("offset 1536") && text.contains("BAT entry 0"),
        "{text}"
    );
    // compare: identical, then one byte off.
    let copy = dir.path("b.raw");
    std::fs::copy(&src, &copy).unwrap();
    expect_code(&ferry(["image", "compare", s(&src), s(&copy)]), 0, "same");
    let mut b = std::fs::read(&copy).unwrap();
    b[12345] ^= 0x40;
    std::fs::write(&copy, &b).unwrap();
    let out = ferry(["image", "compare", s(&src), s(&copy)]);
    expect_code(&out, 1, "different");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("offset 12345"),
        "{out:?}"
    );
    // Converting onto an existing file is refused.
    expect_code(
        &ferry(["image", "convert", "--format", "raw", s(&src), s(&copy)]),
        2,
        "no clobber",
    );
    for verb in ["create", "info", "check", "convert", "compare"] {
        let out = ferry(["image", verb, "--help"]);
        expect_code(&out, 0, "help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{verb} --help"
        );
    }
}
