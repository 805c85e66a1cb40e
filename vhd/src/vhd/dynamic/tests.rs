use super::*;
use crate::testutil::{pattern, TempDir};
use crate::{create, open, CreateOptions, OpenOptions};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn read_all(img: &mut dyn Image) -> Vec<u8> {
    let mut out = vec![0u8; usize::try_from(img.size()).unwrap()];
    img.read_at(&mut out, 0).unwrap();
    out
}

fn diff_options(parent: &Path) -> CreateOptions {
    CreateOptions {
        parent: Some(parent.to_path_buf()),
        ..CreateOptions::default()
    }
}

#[test]
fn dynamic_round_trip_at_odd_offsets() {
    let dir = TempDir::new("dyn-rt");
    let path = dir.path("a.vhd");
    let size = 9 * MIB;
    let mut model = vec![0u8; usize::try_from(size).unwrap()];
    {
        let mut img = create(&path, Format::VhdDynamic, size, &CreateOptions::default()).unwrap();
        for (i, (off, len)) in [
            (0u64, 512usize),
            (1000, 3000),
            (2 * MIB - 7, 20),
            (5 * MIB + 3, 2 << 20),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(i as u64, len);
            img.write_at(&data, off).unwrap();
            let at = usize::try_from(off).unwrap();
            model[at..at + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        assert_eq!(read_all(img.as_mut()), model);
    }
    let mut img = open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::VhdDynamic);
    assert_eq!(read_all(img.as_mut()), model);
    assert!(img.check().unwrap().is_empty());
    let map = img.map(0, size).unwrap();
    assert_eq!(
        map.iter()
            .filter(|e| e.allocated)
            .map(|e| e.length)
            .sum::<u64>(),
        4 * 2 * MIB
    );
}

#[test]
fn reads_and_writes_past_the_end_are_refused() {
    let dir = TempDir::new("dyn-range");
    let mut img = create(
        &dir.path("a.vhd"),
        Format::VhdDynamic,
        4 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    let mut buf = [0u8; 512];
    assert_eq!(
        img.read_at(&mut buf, 4 * MIB - 256).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        img.write_at(&buf, u64::MAX - 10).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn differencing_reads_through_to_parent() {
    let dir = TempDir::new("diff");
    let base = dir.path("base.vhd");
    let size = 6 * MIB;
    let base_data = pattern(1, usize::try_from(size).unwrap());
    {
        let mut img = create(&base, Format::VhdDynamic, size, &CreateOptions::default()).unwrap();
        img.write_at(&base_data, 0).unwrap();
        img.flush().unwrap();
    }
    let child = dir.path("child.vhd");
    let mut model = base_data.clone();
    {
        let mut img = create(&child, Format::VhdDiff, 0, &diff_options(&base)).unwrap();
        assert_eq!(img.size(), size);
        let data = pattern(2, 1500);
        img.write_at(&data, 4097).unwrap();
        model[4097..4097 + 1500].copy_from_slice(&data);
        assert_eq!(read_all(img.as_mut()), model);
    }
    let mut img = open(&child, OpenOptions::read_only()).unwrap();
    assert_eq!(img.format(), Format::VhdDiff);
    assert_eq!(crate::chain(img.as_ref()).len(), 2);
    assert_eq!(read_all(img.as_mut()), model);
    // Only the written sectors (4096..6144 rounded: sectors 8..11) are in the child.
    assert_eq!(img.allocated_bytes().unwrap(), 2 * MIB);
}

#[test]
fn differencing_finds_parent_after_the_pair_is_moved() {
    let dir = TempDir::new("diff-move");
    let sub = dir.path("a");
    std::fs::create_dir(&sub).unwrap();
    create(
        &sub.join("base.vhd"),
        Format::VhdDynamic,
        2 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    create(
        &sub.join("child.vhd"),
        Format::VhdDiff,
        0,
        &diff_options(&sub.join("base.vhd")),
    )
    .unwrap();
    let moved = dir.path("b");
    std::fs::rename(&sub, &moved).unwrap();
    let img = open(&moved.join("child.vhd"), OpenOptions::read_only()).unwrap();
    assert_eq!(img.parent().unwrap().path(), moved.join("base.vhd"));
}

#[test]
fn missing_or_replaced_parent_is_a_parent_error() {
    let dir = TempDir::new("diff-missing");
    let base = dir.path("base.vhd");
    let child = dir.path("child.vhd");
    create(
        &base,
        Format::VhdDynamic,
        2 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    create(&child, Format::VhdDiff, 0, &diff_options(&base)).unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = open(&child, OpenOptions::read_only()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Parent, "{e}");
    assert!(e.to_string().contains("not found"), "{e}");
    // A different disk under the same name has another unique id.
    create(
        &base,
        Format::VhdDynamic,
        2 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    let e = open(&child, OpenOptions::read_only()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Parent);
    assert!(e.to_string().contains("unique id"), "{e}");
}

#[test]
fn a_disk_that_names_itself_as_parent_is_a_loop() {
    let dir = TempDir::new("diff-loop");
    let base = dir.path("base.vhd");
    let child = dir.path("child.vhd");
    create(
        &base,
        Format::VhdDynamic,
        2 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    create(&child, Format::VhdDiff, 0, &diff_options(&base)).unwrap();
    // Point the child at itself: its own uuid and timestamp, locators at its own name.
    let file = ImageFile::open(&child, true).unwrap();
    let footer = read_footer(&file).unwrap().footer;
    let mut header =
        DynamicHeader::decode(&file.read_array::<HEADER_SIZE>(HEADER_OFFSET).unwrap()).unwrap();
    header.parent_uuid = footer.unique_id;
    header.parent_timestamp = footer.timestamp;
    header.parent_name = "child.vhd".into();
    header.locators = [ParentLocator::default(); PARENT_LOCATOR_COUNT];
    file.write_all_at(&header.encode(), HEADER_OFFSET).unwrap();
    let e = open(&child, OpenOptions::read_only()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Parent);
    assert!(e.to_string().contains("loops"), "{e}");
}

/// Bytes of a small dynamic image with two allocated blocks.
fn two_block_image(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let path = dir.path("two.vhd");
    let mut img = create(
        &path,
        Format::VhdDynamic,
        8 * MIB,
        &CreateOptions::default(),
    )
    .unwrap();
    let data = pattern(3, 4096);
    img.write_at(&data, 0).unwrap();
    img.write_at(&data, 4 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn bat_entry_offset(index: usize) -> usize {
    usize::try_from(TABLE_OFFSET).unwrap() + index * 4
}

#[test]
fn hostile_bat_entries_are_refused_with_their_offset() {
    let dir = TempDir::new("dyn-hostile");
    let (path, good) = two_block_image(&dir);
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "past the end",
            Box::new(|b: &mut Vec<u8>| {
                b[bat_entry_offset(1)..][..4].copy_from_slice(&0x00ff_0000u32.to_be_bytes())
            }),
        ),
        (
            "over the header",
            Box::new(|b: &mut Vec<u8>| {
                b[bat_entry_offset(1)..][..4].copy_from_slice(&1u32.to_be_bytes())
            }),
        ),
        (
            "overlapping",
            Box::new(|b: &mut Vec<u8>| {
                let first: [u8; 4] = b[bat_entry_offset(0)..][..4].try_into().unwrap();
                b[bat_entry_offset(2)..][..4].copy_from_slice(&first);
            }),
        ),
    ];
    for (what, mutate) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let e = open(&path, OpenOptions::read_only()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.offset().is_some(), "{what}: {e}");
        assert!(e.path().is_some(), "{what}: {e}");
    }
}

#[test]
fn bad_checksums_and_truncation_are_errors_not_panics() {
    let dir = TempDir::new("dyn-trunc");
    let (path, good) = two_block_image(&dir);
    let mut bytes = good.clone();
    bytes[usize::try_from(HEADER_OFFSET).unwrap() + H_BLOCK_SIZE + 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = open(&path, OpenOptions::read_only()).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    for cut in [
        0usize,
        100,
        511,
        513,
        1600,
        good.len() - 513,
        good.len() - 1,
    ] {
        std::fs::write(&path, &good[..cut]).unwrap();
        if let Ok(mut img) = open(&path, OpenOptions::read_only()) {
            // Whatever opens must read without panicking.
            let size = usize::try_from(img.size()).unwrap();
            let mut buf = vec![0u8; size];
            let _ = img.read_at(&mut buf, 0);
        }
    }
}

#[test]
fn interrupted_allocation_keeps_flushed_data_and_repairs() {
    let dir = TempDir::new("dyn-crash");
    let (path, _) = two_block_image(&dir);
    let mut expected = vec![0u8; usize::try_from(8 * MIB).unwrap()];
    {
        let mut img = open(&path, OpenOptions::read_only()).unwrap();
        img.read_at(&mut expected, 0).unwrap();
    }
    // Simulate a crash after step 1 of an allocation with only the bitmap
    // written over the old footer: no valid footer at the end any more.
    let file = ImageFile::open(&path, true).unwrap();
    let len = file.len().unwrap();
    file.write_all_at(&[0xff; 512], len - 512).unwrap();
    file.write_all_at(&pattern(9, 4096), len).unwrap();
    drop(file);
    let mut img = open(&path, OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; expected.len()];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(got, expected);
    let problems = img.check().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.damage && p.what.contains("copy at offset 0")),
        "{problems:?}"
    );
    drop(img);
    // A read-write open puts the footer back; the image is clean again.
    let mut img = open(&path, OpenOptions::read_write()).unwrap();
    img.write_at(&pattern(4, 512), 6 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut img = open(&path, OpenOptions::read_only()).unwrap();
    assert!(img.check().unwrap().is_empty());
    img.read_at(&mut got[..4096], 0).unwrap();
    assert_eq!(got[..4096], expected[..4096]);
}

#[test]
fn block_written_but_not_linked_reads_as_before() {
    let dir = TempDir::new("dyn-unlinked");
    let (path, _) = two_block_image(&dir);
    // Step 1 and 2 of an allocation done, BAT entry never written.
    let file = ImageFile::open(&path, true).unwrap();
    let len = file.len().unwrap();
    let footer = file.read_array::<FOOTER_SIZE>(len - 512).unwrap();
    file.write_all_at(&[0xff; 512], len - 512).unwrap();
    file.write_all_at(&pattern(5, 2 << 20), len).unwrap();
    file.write_all_at(&footer, len + (2 << 20)).unwrap();
    drop(file);
    let mut img = open(&path, OpenOptions::read_write()).unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(crate::is_zero(&buf));
    let problems = img.check().unwrap();
    assert!(problems.iter().all(|p| !p.damage), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.what.contains("leaked")),
        "{problems:?}"
    );
}

fn apply_writes(img: &mut dyn Image, model: &mut [u8], writes: &[(u64, usize, u64)]) {
    for &(off, len, seed) in writes {
        let data = pattern(seed, len);
        img.write_at(&data, off).unwrap();
        model[usize::try_from(off).unwrap()..][..len].copy_from_slice(&data);
    }
}

fn writes_strategy(size: u64) -> impl Strategy<Value = Vec<(u64, usize, u64)>> {
    prop::collection::vec(
        (0..size, 1usize..(1 << 20), any::<u64>()).prop_map(move |(off, len, seed)| {
            let len = len.min(usize::try_from(size - off).unwrap());
            (off, len, seed)
        }),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn dynamic_matches_a_raw_model(writes in writes_strategy(7 * MIB)) {
        let dir = TempDir::new("dyn-prop");
        let path = dir.path("p.vhd");
        let mut model = vec![0u8; usize::try_from(7 * MIB).unwrap()];
        let mut img = create(&path, Format::VhdDynamic, 7 * MIB, &CreateOptions::default()).unwrap();
        apply_writes(img.as_mut(), &mut model, &writes);
        drop(img);
        let mut img = open(&path, OpenOptions::read_only()).unwrap();
        prop_assert!(read_all(img.as_mut()) == model);
        prop_assert!(img.check().unwrap().is_empty());
    }

    #[test]
    fn differencing_matches_a_raw_model(
        base_writes in writes_strategy(5 * MIB),
        child_writes in writes_strategy(5 * MIB),
    ) {
        let dir = TempDir::new("diff-prop");
        let base = dir.path("base.vhd");
        let mut model = vec![0u8; usize::try_from(5 * MIB).unwrap()];
        let mut img = create(&base, Format::VhdDynamic, 5 * MIB, &CreateOptions::default()).unwrap();
        apply_writes(img.as_mut(), &mut model, &base_writes);
        drop(img);
        let child = dir.path("child.vhd");
        let mut img = create(&child, Format::VhdDiff, 0, &diff_options(&base)).unwrap();
        apply_writes(img.as_mut(), &mut model, &child_writes);
        drop(img);
        let mut img = open(&child, OpenOptions::read_only()).unwrap();
        prop_assert!(read_all(img.as_mut()) == model);
        // The map never calls a region unallocated that holds data.
        for e in img.map(0, 5 * MIB).unwrap().iter().filter(|e| !e.allocated) {
            let range = usize::try_from(e.offset).unwrap()..usize::try_from(e.end()).unwrap();
            prop_assert!(crate::is_zero(&model[range]));
        }
    }
}
