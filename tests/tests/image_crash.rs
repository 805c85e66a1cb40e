//! Rig tier: kill -9 a process in the middle of growing an image, then check
//! that the image opens, every record whose flush returned reads back, the
//! record in flight holds old or new data sector by sector (the crash
//! window), nothing else changed, and qemu-img agrees.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ferry_tests::crash_writer::{data, offset, RECORD, RECORDS, SIZE};
use ferry_tests::{expect_code, ferry, write_half_full_raw, ChildGuard, Scratch};
use ferry_vhd::{open, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run the writer until it has reported `kill_after` flushed records, kill
/// it with SIGKILL, and return the last record it reported.
fn write_then_kill(
    format: &str,
    image: &Path,
    parent: Option<&Path>,
    kill_after: u64,
) -> Option<u64> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_image-writer"));
    cmd.args([format, s(image)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(p) = parent {
        cmd.arg(p);
    }
    let mut child = ChildGuard(cmd.spawn().expect("spawn image-writer"));
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut last = None;
    for line in lines.by_ref() {
        let line = line.expect("read writer output");
        assert_ne!(line, "done", "writer finished before it was killed");
        last = Some(line.parse::<u64>().expect("record number"));
        if last == Some(kill_after) {
            break;
        }
    }
    child.0.kill().expect("SIGKILL the writer");
    child.0.wait().expect("reap the writer");
    // Records flushed between our read and the kill still count.
    for line in lines.map_while(Result::ok) {
        if let Ok(n) = line.parse() {
            last = Some(n);
        }
    }
    last
}

/// Check the crashed image against the base content plus records 0..=last;
/// return the content ferry reads (for qemu-img to compare against).
fn verify(image: &Path, base: &[u8], last: Option<u64>) -> Vec<u8> {
    let mut img = open(image, OpenOptions::read_only()).expect("crashed image opens");
    let mut got = vec![0u8; usize::try_from(SIZE).unwrap()];
    img.read_at(&mut got, 0).expect("crashed image reads");
    let mut expected = base.to_vec();
    let flushed = last.map_or(0, |l| l + 1);
    for i in 0..flushed {
        let at = usize::try_from(offset(i)).unwrap();
        expected[at..at + RECORD].copy_from_slice(&data(i));
    }
    // The record in flight: each sector old or new.
    if flushed < RECORDS {
        let at = usize::try_from(offset(flushed)).unwrap();
        let new = data(flushed);
        for (k, sector) in got[at..at + RECORD].chunks(512).enumerate() {
            let old = &expected[at + k * 512..at + (k + 1) * 512];
            let new = &new[k * 512..(k + 1) * 512];
            assert!(
                sector == old || sector == new,
                "in-flight record {flushed}, sector {k}: neither old nor new"
            );
        }
        expected[at..at + RECORD].copy_from_slice(&got[at..at + RECORD]);
    }
    if let Some(pos) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "{}: byte {pos} differs after the crash (last flushed record {last:?})",
            image.display()
        );
    }
    got
}

fn crash_round(format: &str, kill_after: u64) {
    let dir = Scratch::new(&format!("crash-{format}-{kill_after}"));
    let image = dir.path("disk.img");
    let mut base = vec![0u8; usize::try_from(SIZE).unwrap()];
    let parent = (format == "vhd-diff").then(|| {
        let raw = dir.path("base.raw");
        write_half_full_raw(&raw, SIZE, 7);
        base = std::fs::read(&raw).unwrap();
        let parent = dir.path("base.vhd");
        expect_code(
            &ferry([
                "image",
                "convert",
                "--format",
                "vhd-dynamic",
                s(&raw),
                s(&parent),
            ]),
            0,
            "base",
        );
        parent
    });
    let last = write_then_kill(format, &image, parent.as_deref(), kill_after);
    assert!(last >= Some(kill_after), "writer reported {last:?}");
    let content = verify(&image, &base, last);
    // check --repair puts back whatever the crash left (a lost VHD footer).
    expect_code(
        &ferry(["image", "check", "--repair", s(&image)]),
        0,
        "check --repair after the crash",
    );
    expect_code(
        &ferry(["image", "check", s(&image)]),
        0,
        "check after the repair",
    );
    verify(&image, &base, last);
    if format != "vhd-diff" {
        let raw = dir.path("expected.raw");
        std::fs::write(&raw, &content).unwrap();
        let out = ferry_tests::qemu_compare_raw(&raw, &image, format);
        expect_code(&out, 0, "qemu-img agrees with ferry after the crash");
    }
}

#[test]
fn kill_9_while_growing_a_dynamic_vhd() {
    for kill_after in [0, 5, 37] {
        crash_round("vhd-dynamic", kill_after);
    }
}

#[test]
fn kill_9_while_growing_a_differencing_vhd() {
    for kill_after in [0, 11, 29] {
        crash_round("vhd-diff", kill_after);
    }
}

#[test]
fn kill_9_while_growing_a_sparse_vmdk() {
    for kill_after in [0, 3, 41] {
        crash_round("vmdk-sparse", kill_after);
    }
}
