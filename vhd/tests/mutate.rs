//! Property test: hostile images. Valid images of every format (qemu's and
//! ours) with random bytes overwritten and random truncation are opened,
//! read, mapped and checked: any outcome but a panic (or a runaway
//! allocation, which would abort the test) is acceptable, and errors must
//! name the file.

mod common;

use std::path::{Path, PathBuf};

use common::{golden, GoldenDir};
use ferry_vhd::{create, open, CreateOptions, Format, OpenOptions};
use proptest::prelude::*;

/// A seed image: its bytes, and the file name it must have (a differencing
/// child finds its parent beside it).
struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((i ^ (i >> 9)).to_le_bytes()[0])
        })
        .collect()
}

/// Ferry-made images of every format with a little data, plus qemu's goldens.
fn seeds(dir: &GoldenDir) -> Vec<Seed> {
    let mut out = Vec::new();
    for name in [
        "fixed-1M.vhd",
        "dynamic-8M.vhd",
        "sparse-4M.vmdk",
        "stream-4M.vmdk",
        "flat-4M.vmdk",
    ] {
        let path = golden(dir, name);
        out.push(Seed {
            name: leak(format!("qemu-{name}")),
            bytes: std::fs::read(path).unwrap(),
        });
    }
    let parent = dir.path("parent.vhd");
    {
        let mut img = create(
            &parent,
            Format::VhdDynamic,
            6 << 20,
            &CreateOptions::default(),
        )
        .unwrap();
        img.write_at(&pattern(1, 100_000), 1 << 20).unwrap();
    }
    for format in [
        Format::VhdFixed,
        Format::VhdDynamic,
        Format::VhdDiff,
        Format::VmdkSparse,
        Format::VmdkStream,
    ] {
        let path = dir.path(&format!("ferry-{}", format.name()));
        let options = CreateOptions {
            parent: (format == Format::VhdDiff).then(|| parent.clone()),
            ..CreateOptions::default()
        };
        let size = if format == Format::VhdDiff {
            0
        } else {
            6 << 20
        };
        let mut img = create(&path, format, size, &options).unwrap();
        img.write_at(&pattern(2, 70_000), 4096).unwrap();
        img.write_at(&pattern(3, 5000), 5 << 20).unwrap();
        img.finish().unwrap();
        drop(img);
        out.push(Seed {
            name: leak(format!("ferry-{}", format.name())),
            bytes: std::fs::read(&path).unwrap(),
        });
    }
    out
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Open, read (bounded), map and check; return nothing, panic on nothing.
fn exercise(path: &Path) {
    let mut img = match open(path, OpenOptions::read_only()) {
        Ok(img) => img,
        Err(e) => {
            assert!(
                e.path().is_some() || e.to_string().contains("parent"),
                "error names no file: {e}"
            );
            return;
        }
    };
    let size = img.size();
    let probe = size.min(8 << 20);
    let mut buf = vec![0u8; usize::try_from(probe).unwrap()];
    let _ = img.read_at(&mut buf, 0);
    if size > probe {
        let mut tail = vec![0u8; 4096.min(usize::try_from(size).unwrap_or(4096))];
        let at = size - tail.len() as u64;
        let _ = img.read_at(&mut tail, at);
    }
    let _ = img.map(0, probe);
    let _ = img.allocated_bytes();
    let _ = img.check();
}

fn mutated(seed: &Seed, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut bytes = seed.bytes.clone();
    for &(at, value) in flips {
        // Aim most flips at the metadata in the first and last 64 KiB.
        let len = bytes.len();
        let at = if at % 2 == 0 {
            (at / 2) % len.min(65_536)
        } else {
            len - 1 - (at / 2) % len.min(65_536)
        };
        bytes[at] = value;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        which in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in prop::option::weighted(0.2, any::<usize>()),
    ) {
        thread_local! {
            static STATE: (GoldenDir, Vec<Seed>) = {
                let dir = GoldenDir::new("mutate");
                let seeds = seeds(&dir);
                (dir, seeds)
            };
        }
        STATE.with(|(dir, seeds)| {
            let seed = &seeds[which.index(seeds.len())];
            let path: PathBuf = dir.path(&format!("m-{}", seed.name));
            std::fs::write(&path, mutated(seed, &flips, cut)).unwrap();
            exercise(&path);
        });
    }
}

#[test]
fn unmutated_seeds_open_cleanly() {
    let dir = GoldenDir::new("mutate-clean");
    for seed in seeds(&dir) {
        let path = dir.path(&format!("c-{}", seed.name));
        std::fs::write(&path, &seed.bytes).unwrap();
        let mut img =
            open(&path, OpenOptions::read_only()).unwrap_or_else(|e| panic!("{}: {e}", seed.name));
        let problems = img.check().unwrap();
        assert!(
            problems.iter().all(|p| !p.damage),
            "{}: {problems:?}",
            seed.name
        );
    }
}
