//! Real-kernel tests: Debian's Linux 6.1 under qemu (TCG), booted by
//! `scripts/rig/kernel-vm.sh` with ferry in a busybox initramfs. The
//! scripts under `scripts/rig/vm-tests/` run inside; their exit status and
//! the VM's disks come back here.
//!
//! - the kernel's own NBD client attached over netlink, ext4, a workload
//!   across kill -9 and clean restarts of the filter, installed with
//!   scripts/install.sh (`kernel-nbd.sh`);
//! - `ferry protect-volume` / `unprotect-volume` under a mounted dm volume
//!   with dm-log-writes below as an independent record of every write:
//!   each recovery point replicated to the target must be the disk as it
//!   was at some instant of that record, in order (`protect-volume.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::logwrites::{self, Log};
use ferry_tests::{ferry, qemu_img, run, Scratch};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// One VM at a time: each takes a core of software emulation.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Boots the VM on `script` with `disks` (NAME=SIZE); the console log is
/// printed when it fails.
fn run_vm(out: &Path, script: &str, disks: &[&str], extra: &[&str]) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--script".into(),
        root.join("scripts/rig/vm-tests")
            .join(script)
            .display()
            .to_string(),
        "--out".into(),
        out.display().to_string(),
        "--timeout".into(),
        "600".into(),
    ];
    for disk in disks {
        args.extend(["--disk".into(), (*disk).to_string()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let status = Command::new(root.join("scripts/rig/kernel-vm.sh"))
        .args(&args)
        .env("FERRY_BIN", ferry_tests::ferry_bin())
        .status()
        .expect("run scripts/rig/kernel-vm.sh (needs qemu-system-x86, busybox-static)");
    if !status.success() {
        let console = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
        panic!("{script} failed in the VM ({status}); console:\n{console}");
    }
}

#[test]
fn kernel_nbd_attach_survives_kill_9_and_restarts_under_a_mounted_ext4() {
    let scratch = Scratch::new("vm-nbd");
    let out = scratch.path("vm");
    let scripts = format!("{}:/src/scripts", repo().join("scripts").display());
    run_vm(
        &out,
        "kernel-nbd.sh",
        &["data=64M"],
        &["--bin", "mkfs.ext4", "--bin", "e2fsck", "--file", &scripts],
    );
    // The disk the filter wrote through holds a clean ext4, read here by
    // the host's own tools.
    let fsck = run(
        "e2fsck",
        ["-fn", &out.join("data.img").display().to_string()],
    );
    assert!(
        fsck.status.success(),
        "e2fsck of the disk: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// The site disk of the VM, mounted on a loop device until dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(image: &Path, dir: PathBuf) -> Mounted {
        std::fs::create_dir_all(&dir).unwrap();
        let out = run(
            "mount",
            [
                "-o",
                "loop",
                &image.display().to_string(),
                &dir.display().to_string(),
            ],
        );
        assert!(out.status.success(), "mount {}: {out:?}", image.display());
        Mounted { dir }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("umount", [&self.dir]);
    }
}

/// The host's points, oldest first: `(name, seq)`.
fn points(data: &Path) -> Vec<(String, u64)> {
    let out = ferry([
        "points",
        "vm01",
        "--data",
        &data.display().to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "ferry points: {out:?}");
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = value
        .as_array()
        .or_else(|| value["points"].as_array())
        .expect("a list of points")
        .clone();
    let mut points: Vec<(String, u64)> = list
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    points.sort_by_key(|p| p.1);
    points
}

/// The disk at point `name`, as raw bytes (a test-failover image read by
/// qemu-img, not by ferry).
fn image_at(data: &Path, name: &str, scratch: &Scratch) -> Vec<u8> {
    let drill = scratch.path(&format!("drill-{name}"));
    let data_arg = data.display().to_string();
    // The VM's credentials, where the site disk is mounted here.
    let creds = data.with_file_name("creds").display().to_string();
    let out = ferry([
        "test-failover",
        "vm01",
        "--data",
        &data_arg,
        "--credentials",
        &creds,
        "--point",
        name,
        "--out",
        &drill.display().to_string(),
    ]);
    assert!(out.status.success(), "test-failover at {name}: {out:?}");
    let raw = scratch.path(&format!("{name}.raw"));
    let out = qemu_img([
        "convert",
        "-O",
        "raw",
        // The read-only base is the disk at the point (qemu's vpc driver
        // does not follow a differencing VHD to its parent).
        &drill.join("data.base.vhd").display().to_string(),
        &raw.display().to_string(),
    ]);
    assert!(out.status.success(), "qemu-img convert at {name}: {out:?}");
    let out = ferry(["test-failover", "cleanup", "vm01", "--data", &data_arg]);
    assert!(out.status.success(), "test-failover cleanup: {out:?}");
    std::fs::read(&raw).unwrap()
}

#[test]
fn protect_volume_slides_under_a_mounted_volume_and_every_point_is_an_instant_of_dm_log_writes() {
    let scratch = Scratch::new("vm-volume");
    let out = scratch.path("vm");
    run_vm(
        &out,
        "protect-volume.sh",
        &["data=64M", "log=256M", "site=512M"],
        &["--bin", "mkfs.ext4", "--bin", "e2fsck", "--bin", "dmsetup"],
    );
    let log = Log::open(&out.join("log.img")).expect("the dm-log-writes record");
    assert!(
        log.ended_cleanly(),
        "the log device was not removed cleanly"
    );
    let zeros = vec![0u8; 64 << 20];
    let disk = std::fs::read(out.join("data.img")).unwrap();
    let all = logwrites::matching_prefixes(&log, &zeros, &disk).unwrap();
    assert!(
        all.contains(&log.entries().len()),
        "replaying the whole record does not give the final disk"
    );
    let cut = log
        .position_of_mark("before-unprotect")
        .expect("the mark before unprotect");

    let site = Mounted::new(&out.join("site.img"), scratch.path("site"));
    let data = site.dir.join("data");
    let points = points(&data);
    assert!(points.len() >= 3, "too few points: {points:?}");
    let mut earliest = 0;
    for (name, _) in &points {
        let image = image_at(&data, name, &scratch);
        let scan = logwrites::scan_prefixes(&log, &zeros, &image).unwrap();
        let matching: Vec<usize> = scan
            .matching
            .iter()
            .copied()
            .filter(|&k| k >= earliest)
            .collect();
        assert!(
            !matching.is_empty(),
            "point {name} is not the disk at any instant of the write record after entry \
             {earliest} (closest: entry {:?}, {:?} sectors differ)",
            scan.closest,
            scan.closest_differing
        );
        earliest = matching[0];
    }
    // The last point was taken with the workload stopped and synced, and
    // nothing wrote before the mark: it is the disk at the mark.
    let (last, _) = points.last().unwrap();
    let image = image_at(&data, last, &scratch);
    let at_last = logwrites::matching_prefixes(&log, &zeros, &image).unwrap();
    assert!(
        at_last.contains(&cut),
        "the last point {last} is not the disk at the mark before unprotect (entry {cut}); it matches {at_last:?}"
    );
}
