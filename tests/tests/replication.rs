//! Rig tier: continuous replication end to end. ext4 with pre-existing data
//! on the loopback rig (backing file -> ferry filter -> nbdfuse -> loop ->
//! ext4), `ferry sidecar` shipping to `ferry target` over mutual TLS on
//! loopback, a workload of fio with verify plus a file tree with recorded
//! checksums; then, with the file system unmounted and the lag at zero,
//! `qemu-img compare` of the backing file against the replica image must
//! say identical. Variants kill -9 the sidecar or the target in the middle
//! of the workload, and cut the link for longer than the ring holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::{
    check_tree, expect_code, run, wait_until, write_tree, Daemon, Scratch, Site, Volume,
};

const DISK: &str = "data";
const SIZE: &str = "512M";
const SYNC_TIMEOUT: Duration = Duration::from_secs(240);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// ext4 made on the backing file before protection, holding a file tree.
fn preexisting_ext4(dir: &Path) -> Vec<(PathBuf, u32)> {
    std::fs::create_dir_all(dir.join("pre")).unwrap();
    let img = dir.join("disk.img");
    expect_code(&run("truncate", ["-s", SIZE, s(&img)]), 0, "truncate");
    expect_code(&run("mkfs.ext4", ["-q", "-F", s(&img)]), 0, "mkfs.ext4");
    let mnt = dir.join("pre");
    expect_code(
        &run("mount", ["-o", "loop", s(&img), s(&mnt)]),
        0,
        "mount -o loop",
    );
    let tree = write_tree(&mnt, "before", 0);
    ferry_tests::umount_retrying(&mnt);
    // Paths relative to the file system root, for checks after remounting.
    tree.into_iter()
        .map(|(p, c)| (p.strip_prefix(&mnt).unwrap().to_path_buf(), c))
        .collect()
}

/// A running fio, killed if the test fails first.
struct Fio(Option<std::process::Child>);

impl Drop for Fio {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// fio with verify in the mounted file system, as a child process.
fn fio(dir: &Path, size: &str, seed: u32) -> Fio {
    let child = Command::new("fio")
        .args([
            "--name=replicate",
            &format!("--directory={}", s(dir)),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            &format!("--size={size}"),
            "--ioengine=psync",
            "--fsync=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--randseed={seed}"),
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio (apt-get install fio)");
    Fio(Some(child))
}

fn finish_fio(mut fio: Fio) {
    let child = fio.0.take().expect("fio running");
    let out = child.wait_with_output().expect("fio");
    assert!(
        out.status.success(),
        "fio failed (verify?):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole rig: site, protected volume with pre-existing ext4, sidecar.
/// Fields drop in order: the sidecar stops first, the scratch directory
/// goes last.
struct Rig {
    sidecar: Daemon,
    site: Site,
    volume: Volume,
    before: Vec<(PathBuf, u32)>,
    _scratch: Scratch,
}

impl Rig {
    fn up(tag: &str) -> Rig {
        Rig::up_with(tag, &[])
    }

    fn up_with(tag: &str, sidecar_args: &[&str]) -> Rig {
        let scratch = Scratch::new(tag);
        let vol_dir = scratch.path("vol");
        let before = preexisting_ext4(&vol_dir);
        let site = Site::start(&scratch.path("site"));
        let volume = Volume::up(&vol_dir, "none", SIZE, &[]);
        let sidecar = site.sidecar(&volume.state(), &scratch.path("sidecar.log"), sidecar_args);
        let mnt = volume.mnt();
        let device = volume.loop_device();
        expect_code(&run("mount", [device.as_str(), s(&mnt)]), 0, "mount");
        check_tree(&mnt, &before);
        Rig {
            _scratch: scratch,
            site,
            volume,
            sidecar,
            before,
        }
    }

    fn wait_replicated(&self) {
        self.site
            .wait_replicated(&self.volume.state(), DISK, SYNC_TIMEOUT, &self.sidecar);
    }

    fn status(&self) -> serde_json::Value {
        self.site.disk_status(DISK).expect("target knows the disk")
    }

    /// Unmount, wait for zero lag, compare the backing file with the replica.
    fn finish_and_compare(&self, tree: &[(PathBuf, u32)]) {
        let mnt = self.volume.mnt();
        check_tree(&mnt, &self.before);
        check_tree(&mnt, tree);
        self.volume.unmount();
        self.wait_replicated();
        let out = ferry_tests::qemu_compare_raw(
            &self.volume.dir.join("disk.img"),
            &self.site.replica(DISK),
            "vhd-dynamic",
        );
        expect_code(&out, 0, "qemu-img compare backing file vs replica");
        // Once the resync (if any) settled, the sidecar's claim reaches the
        // target with the next set (a tag when the disk is idle).
        let consistent = wait_until(Duration::from_secs(60), || {
            self.status()["consistency"]["state"] == "consistent"
        });
        assert!(
            consistent,
            "replica consistent at the end: {}\nsidecar log:\n{}",
            self.status(),
            self.sidecar.log_text()
        );
    }
}

/// The first disk of `ferry sidecar status --json` (Null if unreadable).
fn sidecar_disk(state: &Path) -> serde_json::Value {
    let out = ferry_tests::ferry(["sidecar", "status", "--json", "--state", s(state)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["disks"][0].clone()
}

/// An outage: the target stops, then fio (80 MiB, more than the 16 MiB
/// ring) and a file tree are written and synced. Returns the tree.
fn outage_workload(rig: &mut Rig, seed: u64) -> Vec<(PathBuf, u32)> {
    rig.site.target.stop();
    let mnt = rig.volume.mnt();
    let f = fio(&mnt, "80M", u32::try_from(seed).unwrap());
    let tree = relative(write_tree(&mnt, "during", seed), &mnt);
    finish_fio(f);
    expect_code(&run("sync", [] as [&str; 0]), 0, "sync");
    tree
}

fn relative(tree: Vec<(PathBuf, u32)>, root: &Path) -> Vec<(PathBuf, u32)> {
    tree.into_iter()
        .map(|(p, c)| (p.strip_prefix(root).unwrap().to_path_buf(), c))
        .collect()
}

#[test]
fn ext4_workload_replicates_identically() {
    let rig = Rig::up("repl-basic");
    rig.wait_replicated();
    // The initial copy moved the pre-existing data, not the empty disk.
    let st = rig.status();
    let initial = st["resync_bytes"].as_u64().unwrap();
    assert!(initial > 1 << 20, "initial copy shipped: {st}");
    assert!(
        initial < 256 << 20,
        "initial copy skipped unallocated space: {st}"
    );
    let mnt = rig.volume.mnt();
    let f = fio(&mnt, "48M", 1);
    let tree = relative(write_tree(&mnt, "during", 1), &mnt);
    finish_fio(f);
    rig.finish_and_compare(&tree);
    let st = rig.status();
    assert_eq!(st["epoch"], 1, "{st}");
    // A user tag on the consistent stream becomes a recovery point.
    let state = rig.volume.state();
    let tag = ferry_tests::ferry(["filter", "tag", "user-point", "--state", s(&state)]);
    expect_code(&tag, 0, "ferry filter tag");
    let data = rig.site.data.clone();
    let listed = wait_until(Duration::from_secs(30), || {
        let out = ferry_tests::ferry(["points", "web01", "--data", s(&data), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["name"] == "user-point" && p["app"] == false)
        })
    });
    let out = ferry_tests::ferry(["points", "web01", "--data", s(&data)]);
    assert!(
        listed,
        "the tag is listed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Only if fio outran the shipping and overflowed the 16 MiB ring are
    // regions re-read: a fraction of the disk at most.
    let resync = st["resync_bytes"].as_u64().unwrap() - initial;
    assert!(resync < 128 << 20, "no full resync: {resync} bytes: {st}");
}

/// Which daemon a crash test kills.
#[derive(Clone, Copy)]
enum Victim {
    Sidecar,
    Target,
}

/// kill -9 of `victim` while fio and a file tree are being written, then a
/// restart: identical at the end, the same chain (no new epoch) and no
/// full resync. While the victim was down the ring may have filled (fio
/// outruns the 16 MiB ring): the regions written meanwhile are re-read;
/// never the whole disk.
fn killed_mid_workload(tag: &str, victim: Victim, seed: u64) {
    let mut rig = Rig::up(tag);
    rig.wait_replicated();
    // The target's counters restart with it; the sidecar's kill keeps them.
    let initial = match victim {
        Victim::Sidecar => rig.status()["resync_bytes"].as_u64().unwrap(),
        Victim::Target => 0,
    };
    let mnt = rig.volume.mnt();
    let f = fio(&mnt, "64M", u32::try_from(seed).unwrap());
    // Kill once change sets of the workload are flowing.
    let received0 = rig.status()["received_sets"].as_u64().unwrap();
    wait_until(Duration::from_secs(30), || {
        rig.status()["received_sets"].as_u64().unwrap() > received0 + 2
    });
    match victim {
        Victim::Sidecar => rig.sidecar.kill9(),
        Victim::Target => rig.site.target.kill9(),
    }
    let tree = relative(write_tree(&mnt, "during", seed), &mnt);
    match victim {
        Victim::Sidecar => rig.sidecar.restart(),
        Victim::Target => {
            rig.site.target.restart();
            rig.site.wait_listening();
        }
    }
    finish_fio(f);
    rig.finish_and_compare(&tree);
    let st = rig.status();
    assert_eq!(st["epoch"], 1, "same chain, no new epoch: {st}");
    let resync = st["resync_bytes"].as_u64().unwrap() - initial;
    assert!(resync < 128 << 20, "no full resync: {resync} bytes: {st}");
}

#[test]
fn sidecar_killed_mid_workload_resumes_without_full_resync() {
    killed_mid_workload("repl-kill-sidecar", Victim::Sidecar, 2);
}

#[test]
fn target_killed_mid_workload_resumes_without_full_resync() {
    killed_mid_workload("repl-kill-target", Victim::Target, 3);
}

#[test]
fn link_cut_longer_than_the_ring_is_carried_by_the_spool_in_write_order() {
    let mut rig = Rig::up("repl-spool");
    rig.wait_replicated();
    // Cut: the target goes away while more than the ring (16 MiB) but less
    // than the spool (1 GiB by default) is written.
    let tree = outage_workload(&mut rig, 5);
    let spooled = wait_until(Duration::from_secs(60), || {
        sidecar_disk(&rig.volume.state())["spool_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 16 << 20
    });
    assert!(
        spooled,
        "the sidecar spooled the outage:\n{}",
        rig.sidecar.log_text()
    );
    let filter = ferry_tests::ferry([
        "filter",
        "status",
        "--json",
        "--state",
        s(&rig.volume.state()),
    ]);
    let filter: serde_json::Value = serde_json::from_slice(&filter.stdout).unwrap();
    assert_eq!(
        filter["disks"][0]["tracking"], "data",
        "the ring never overflowed: {filter}"
    );
    rig.site.target.restart();
    rig.site.wait_listening();
    rig.finish_and_compare(&tree);
    let st = rig.status();
    assert_eq!(st["epoch"], 1, "same chain: {st}");
    assert_eq!(st["resync_bytes"], 0, "write order kept, no resync: {st}");
}

#[test]
fn link_cut_longer_than_ring_and_spool_resyncs_only_what_changed() {
    let mut rig = Rig::up_with("repl-link-cut", &["--spool-size", "4M"]);
    rig.wait_replicated();
    // Cut: the target goes away while more than ring and spool is written.
    let tree = outage_workload(&mut rig, 4);
    let filter = ferry_tests::ferry([
        "filter",
        "status",
        "--json",
        "--state",
        s(&rig.volume.state()),
    ]);
    let filter: serde_json::Value = serde_json::from_slice(&filter.stdout).unwrap();
    let disk = &filter["disks"][0];
    assert!(
        disk["tracking"] != "data" || disk["dirty_bytes"].as_u64().unwrap() > 0,
        "the outage overflowed the ring: {disk}"
    );
    // Link back: the regions written during the outage are resynced.
    rig.site.target.restart();
    rig.site.wait_listening();
    rig.finish_and_compare(&tree);
    let st = rig.status();
    let resync = st["resync_bytes"].as_u64().unwrap();
    eprintln!("link cut past ring and spool: resync moved {resync} bytes (sealed)");
    assert!(resync > 0, "a resync happened: {st}");
    // About what changed (fio 80 MiB + the tree ~14 MiB + metadata), far
    // from the 512 MiB disk.
    assert!(resync < 200 << 20, "resync moved {resync} bytes: {st}");
    assert!(st["epoch"].as_u64().unwrap() >= 1);
}

#[test]
fn full_resync_moves_only_blocks_whose_checksums_differ() {
    let rig = Rig::up("repl-exchange");
    let mnt = rig.volume.mnt();
    let tree = relative(write_tree(&mnt, "base", 6), &mnt);
    expect_code(&run("sync", [] as [&str; 0]), 0, "sync");
    rig.wait_replicated();
    // The exchange starts once the replica held a full, consistent copy.
    let consistent = wait_until(Duration::from_secs(60), || {
        rig.status()["consistency"]["state"] == "consistent"
    });
    assert!(consistent, "the initial copy settles: {}", rig.status());
    let before = rig.status()["resync_bytes"].as_u64().unwrap();
    // Everything allocated is marked for resync (as after a lost bitmap);
    // a little changes meanwhile.
    let out = ferry_tests::ferry(["filter", "resync", "--state", s(&rig.volume.state())]);
    expect_code(&out, 0, "ferry filter resync");
    let marked: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("bytes marked");
    let more = relative(write_tree(&mnt, "after", 7), &mnt);
    rig.finish_and_compare(&[tree, more].concat());
    let moved = rig.status()["resync_bytes"].as_u64().unwrap() - before;
    // The sidecar's metrics file is rewritten every second.
    let mut skipped = 0;
    wait_until(Duration::from_secs(10), || {
        skipped = sidecar_disk(&rig.volume.state())["exchange_skipped_bytes"]
            .as_u64()
            .unwrap_or(0);
        skipped > 16 << 20
    });
    eprintln!(
        "checksum exchange: marked {marked} bytes, skipped {skipped}, moved {moved} (sealed)"
    );
    // The whole disk is marked (holes travel as Zero extents, unhashed);
    // of the data, the target held everything written before the resync.
    assert_eq!(marked, 512 << 20, "resync marked the whole disk");
    assert!(
        skipped > 16 << 20,
        "the exchange skipped the data the target held: {skipped} bytes"
    );
    // What moved is what changed: at most the ~11 MiB tree written during
    // the resync (and file-system metadata), not the disk or its data.
    assert!(
        moved < 32 << 20,
        "resync moved {moved} bytes for a {marked}-byte disk"
    );
}

#[test]
fn a_target_that_lost_its_data_gets_a_full_copy_again() {
    let mut rig = Rig::up("repl-target-lost");
    let mnt = rig.volume.mnt();
    let tree = relative(write_tree(&mnt, "base", 8), &mnt);
    expect_code(&run("sync", [] as [&str; 0]), 0, "sync");
    rig.wait_replicated();
    // The recovery site loses everything (a new, empty target).
    rig.site.target.stop();
    std::fs::remove_dir_all(&rig.site.data).unwrap();
    rig.site.target.restart();
    rig.site.wait_listening();
    let more = relative(write_tree(&mnt, "after", 9), &mnt);
    rig.finish_and_compare(&[tree, more].concat());
    let st = rig.status();
    assert!(
        st["resync_bytes"].as_u64().unwrap() > 8 << 20,
        "the sidecar copied the disk again: {st}"
    );
}

/// qemu-io writes of a pattern byte at (offset MiB, length MiB) places.
fn qemu_io_writes(uri: &str, writes: &[(u64, u64, u8)]) {
    ferry_tests::qemu_io_writes(uri, "M", writes);
}

#[test]
fn filter_killed_recovers_through_a_new_epoch() {
    let scratch = Scratch::new("repl-kill-filter");
    let site = Site::start(&scratch.path("site"));
    let disk = scratch.path("disk.img");
    expect_code(&run("truncate", ["-s", "256M", s(&disk)]), 0, "truncate");
    let fdir = scratch.path("filter");
    let mut filter = ferry_tests::FilterProcess::start(&fdir, &[(DISK, &disk)], &[]);
    let sidecar = site.sidecar(&filter.state, &scratch.path("sidecar.log"), &[]);
    qemu_io_writes(&filter.uri(DISK), &[(0, 4, 1), (100, 8, 2), (200, 1, 3)]);
    site.wait_replicated(&filter.state, DISK, SYNC_TIMEOUT, &sidecar);
    let epoch0 = site.disk_status(DISK).unwrap()["epoch"].as_u64().unwrap();
    // Writes, then the filter dies at once: some records may never have
    // left its ring. Its activity log knows where they went.
    qemu_io_writes(&filter.uri(DISK), &[(10, 8, 4), (120, 16, 5), (250, 2, 6)]);
    filter.kill9();
    let filter = ferry_tests::FilterProcess::start(&fdir, &[(DISK, &disk)], &[]);
    qemu_io_writes(&filter.uri(DISK), &[(30, 2, 7)]);
    site.wait_replicated(&filter.state, DISK, SYNC_TIMEOUT, &sidecar);
    let out = ferry_tests::qemu_compare_raw(&disk, &site.replica(DISK), "vhd-dynamic");
    expect_code(&out, 0, "qemu-img compare after a filter crash");
    let consistent = wait_until(Duration::from_secs(60), || {
        site.disk_status(DISK).unwrap()["consistency"]["state"] == "consistent"
    });
    let st = site.disk_status(DISK).unwrap();
    assert!(
        consistent,
        "consistent again after the resync: {st}\n{}",
        sidecar.log_text()
    );
    assert!(
        st["epoch"].as_u64().unwrap() > epoch0,
        "a new epoch opened: {st}"
    );
}

#[test]
fn a_policy_takes_crash_consistent_points_on_schedule() {
    let scratch = Scratch::new("repl-policy");
    let site = Site::start(&scratch.path("site"));
    let disk = scratch.path("disk.img");
    expect_code(&run("truncate", ["-s", "64M", s(&disk)]), 0, "truncate");
    let policy = scratch.path("policy.toml");
    std::fs::write(
        &policy,
        "crash_consistent_interval = \"1s\"\napp_consistent_interval = \"off\"\n",
    )
    .unwrap();
    let filter = ferry_tests::FilterProcess::start(&scratch.path("filter"), &[(DISK, &disk)], &[]);
    let sidecar = site.sidecar(
        &filter.state,
        &scratch.path("sidecar.log"),
        &["--policy", s(&policy)],
    );
    qemu_io_writes(&filter.uri(DISK), &[(0, 2, 1), (10, 1, 2)]);
    let data = site.data.clone();
    let crash_points = || {
        let out = ferry_tests::ferry(["points", "web01", "--data", s(&data), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().map_or(0, |a| {
            a.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("crash-")))
                .count()
        })
    };
    let scheduled = wait_until(Duration::from_secs(60), || crash_points() >= 3);
    assert!(
        scheduled,
        "crash points every second:\n{}",
        sidecar.log_text()
    );
    let metrics = sidecar_disk(&filter.state);
    assert!(
        metrics["last_crash_point_ns"].as_u64().is_some(),
        "{metrics}"
    );
    // The target's status sums them up.
    let st = site.disk_status(DISK).unwrap();
    assert!(st["points"]["count"].as_u64().unwrap() >= 3, "{st}");
    assert!(st["points"]["last_crash_ns"].as_u64().is_some(), "{st}");
    assert_eq!(
        st["points"]["last_app_ns"],
        serde_json::Value::Null,
        "app points are off"
    );
}
