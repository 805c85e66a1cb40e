//! Rig tier property test: random writes (512 B to 4 MiB, random offsets,
//! overwrites) into dynamic VHD, differencing VHD and sparse VMDK through the
//! library, the same writes into a raw file, then `qemu-img compare` must
//! call them identical, over many seeds.

use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_tests::{expect_code, pattern, qemu_img, Scratch};
use ferry_vhd::{create, CreateOptions, Format};
use proptest::prelude::*;

const SIZE: u64 = 40 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn writes() -> impl Strategy<Value = Vec<(u64, usize, u64)>> {
    let one = (0..SIZE, 512usize..=(4 << 20), any::<u64>(), any::<bool>()).prop_map(
        |(offset, len, seed, aligned)| {
            let offset = if aligned { offset / 512 * 512 } else { offset };
            let len = len.min(usize::try_from(SIZE - offset).unwrap()).max(1);
            (offset, len, seed)
        },
    );
    prop::collection::vec(one, 1..16)
}

fn run(format: Format, writes: &[(u64, usize, u64)]) -> Result<(), TestCaseError> {
    let dir = Scratch::new(&format!("prop-{}", format.name()));
    let raw_path = dir.path("model.raw");
    let raw = std::fs::File::create(&raw_path).unwrap();
    raw.set_len(SIZE).unwrap();
    let image_path = dir.path("image");
    let mut options = CreateOptions::default();
    let mut size = SIZE;
    if format == Format::VhdDiff {
        // qemu reads a differencing VHD without its parent, so the parent is
        // empty here; differencing over real parent data is covered by the
        // library's own property test and the CLI test.
        let parent = dir.path("parent.vhd");
        create(&parent, Format::VhdDynamic, SIZE, &CreateOptions::default()).unwrap();
        options.parent = Some(parent);
        size = 0;
    }
    let mut image = create(&image_path, format, size, &options).unwrap();
    for &(offset, len, seed) in writes {
        let data = pattern(seed, len);
        image.write_at(&data, offset).unwrap();
        raw.write_all_at(&data, offset).unwrap();
    }
    image.finish().unwrap();
    drop(image);
    let out = ferry_tests::qemu_compare_raw(&raw_path, &image_path, format.name());
    prop_assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if format == Format::VmdkSparse {
        expect_code(
            &qemu_img(["check", "-f", "vmdk", s(&image_path)]),
            0,
            "qemu-img check",
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_vhd_random_writes(w in writes()) {
        run(Format::VhdDynamic, &w)?;
    }

    #[test]
    fn differencing_vhd_random_writes(w in writes()) {
        run(Format::VhdDiff, &w)?;
    }

    #[test]
    fn sparse_vmdk_random_writes(w in writes()) {
        run(Format::VmdkSparse, &w)?;
    }
}
