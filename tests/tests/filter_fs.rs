//! Rig tier: real file systems (ext4, xfs) on a volume protected by
//! `ferry filter`, through nbdfuse and a loop device: a workload with fsync
//! and app-consistent tags (fsfreeze), then fsck must be clean and every
//! record's payload checksum must hold.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use ferry_tests::{expect_code, ferry, pattern, run, ChildGuard, Scratch, Volume};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Files with fsync, directories, renames, deletes; returns (path, content) kept.
fn workload(root: &Path, round: u64) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = root.join(format!("round-{round}"));
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    let mut kept = Vec::new();
    for i in 0..24u64 {
        let path = dir.join(if i % 3 == 0 {
            format!("a/b/f{i}")
        } else {
            format!("f{i}")
        });
        let data = pattern(
            round * 100 + i,
            usize::try_from((i % 5 + 1) * 300_000 + i * 17).unwrap(),
        );
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        if i % 2 == 0 {
            f.sync_all().unwrap();
        }
        kept.push((path, data));
    }
    // Rename a few, delete a few.
    for i in [1u64, 4, 7] {
        let from = dir.join(format!("f{i}"));
        let to = dir.join(format!("renamed-{i}"));
        std::fs::rename(&from, &to).unwrap();
        for k in kept.iter_mut().filter(|k| k.0 == from) {
            k.0 = to.clone();
        }
    }
    for i in [2u64, 5] {
        let path = dir.join(format!("f{i}"));
        std::fs::remove_file(&path).unwrap();
        kept.retain(|k| k.0 != path);
    }
    kept
}

fn exercise(fs: &str, fsck: &[&str]) {
    let scratch = Scratch::new(&format!("fs-{fs}"));
    let volume = Volume::up(&scratch.path("vol"), fs, "512M", &[]);
    // The stand-in sidecar keeps the ring drained (tags need data state) and
    // verifies every payload checksum it reads.
    let drain = Command::new(ferry_tests::ferry_bin())
        .args(["filter", "drain", "--follow", "--state", s(&volume.state())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut drain = ChildGuard(drain);
    let mut kept = workload(&volume.mnt(), 1);
    let state = volume.state();
    let mnt = volume.mnt();
    let tag = ferry([
        "filter",
        "tag",
        "app-1",
        "--state",
        s(&state),
        "--app",
        "--mount",
        s(&mnt),
        "--pre",
        "sync",
        "--post",
        "true",
    ]);
    expect_code(&tag, 0, "app-consistent tag");
    kept.extend(workload(&volume.mnt(), 2));
    // A second freeze straight through fsfreeze, then a crash-consistent tag.
    expect_code(&run("fsfreeze", ["-f", s(&mnt)]), 0, "fsfreeze -f");
    expect_code(&run("fsfreeze", ["-u", s(&mnt)]), 0, "fsfreeze -u");
    expect_code(
        &ferry(["filter", "tag", "crash-1", "--state", s(&state)]),
        0,
        "crash-consistent tag",
    );
    for (path, data) in &kept {
        assert!(
            std::fs::read(path).unwrap() == *data,
            "{} reads back",
            path.display()
        );
    }
    let status = ferry(["filter", "status", "--json", "--state", s(&state)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["disks"][0]["counters"]["io_errors"], 0);
    volume.unmount();
    let device = volume.loop_device();
    let mut args: Vec<&str> = fsck.to_vec();
    args.push(&device);
    let out = run(args[0], &args[1..]);
    expect_code(&out, 0, &format!("{fs} check"));
    // The consumer saw only intact payloads.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(libc::pid_t::try_from(drain.0.id()).unwrap(), libc::SIGTERM) };
    let out = drain.0.wait_with_output_ref();
    assert!(out.contains("0 bad checksums"), "{out}");
}

/// `wait_with_output` for a guarded child (stderr only).
trait WaitStderr {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitStderr for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = self.wait();
        err
    }
}

#[test]
fn ext4_survives_fsync_and_fsfreeze_with_clean_fsck() {
    exercise("ext4", &["e2fsck", "-fn"]);
}

#[test]
fn xfs_survives_fsync_and_fsfreeze_with_clean_fsck() {
    exercise("xfs", &["xfs_repair", "-n"]);
}
