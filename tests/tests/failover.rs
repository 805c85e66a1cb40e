//! Rig tier: recovery points, failover, test failover and commit.
//!
//! A disk protected by `ferry filter`, shipped by `ferry sidecar` to
//! `ferry target` on loopback; the tests write through the filter, tag
//! points, keep a copy of the backing file at each point, and check that
//! `ferry failover` / `ferry test-failover` give back exactly those bytes
//! (`qemu-img compare` judges, in every output format).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{
    assert_same_as_raw, dangling_entries, expect_code, json_of, run, start_cross_disk, wait_until,
    FilterProcess, Scratch, Site,
};

const DISK: &str = "data";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// qemu-io writes of a pattern byte (0: zeroes) at (offset KiB, length
/// KiB) places.
fn qemu_io_writes(uri: &str, writes: &[(u64, u64, u8)]) {
    ferry_tests::qemu_io_writes(uri, "K", writes);
}

/// `ferry test-failover cleanup` of web01, which must succeed.
fn cleanup_drill(data: &Path, what: &str) -> serde_json::Value {
    json_of(
        &ferry_tests::ferry([
            "test-failover",
            "cleanup",
            "web01",
            "--data",
            s(data),
            "--json",
        ]),
        what,
    )
}

fn points(data: &Path) -> Vec<serde_json::Value> {
    ferry_tests::points_at(data, "web01")
}

fn wait_point(data: &Path, name: &str) {
    let ok = wait_until(Duration::from_secs(60), || {
        points(data).iter().any(|p| p["name"] == name)
    });
    assert!(ok, "point {name} listed: {:?}", points(data));
}

/// `ferry failover` of `host` at `point` as raw images into `out` (a
/// change of point after the first), returning the manifest.
fn fail_over_raw(
    data: &Path,
    host: &str,
    out: &Path,
    point: &str,
    change: bool,
) -> serde_json::Value {
    let mut args = vec![
        "failover",
        host,
        "--data",
        s(data),
        "--point",
        point,
        "--format",
        "raw",
        "--out",
        s(out),
        "--no-checksum",
        "--json",
    ];
    if change {
        args.push("--change-point");
    }
    json_of(&ferry_tests::ferry(&args), &format!("failover at {point}"))
}

/// The image of `disk` in a manifest.
fn image_of(m: &serde_json::Value, disk: &str) -> PathBuf {
    let d = m["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["disk"] == disk))
        .unwrap_or_else(|| panic!("no disk {disk} in {m}"));
    PathBuf::from(d["file"].as_str().unwrap())
}

/// Filter + sidecar + target around one 64 MiB disk, with `rounds` user
/// points; returns the copies of the backing file at each point.
struct PointRig {
    filter: FilterProcess,
    sidecar: ferry_tests::Daemon,
    site: Site,
    disk: PathBuf,
    copies: Vec<(String, PathBuf)>,
    scratch: Scratch,
}

impl PointRig {
    fn up(tag: &str) -> PointRig {
        let scratch = Scratch::new(tag);
        let site = Site::start(&scratch.path("site"));
        let disk = scratch.path("disk.img");
        expect_code(&run("truncate", ["-s", "64M", s(&disk)]), 0, "truncate");
        let filter = FilterProcess::start(&scratch.path("filter"), &[(DISK, &disk)], &[]);
        let sidecar = site.sidecar(&filter.state, &scratch.path("sidecar.log"), &[]);
        // Points count from the first consistent state on (the replica of a
        // new disk becomes consistent once the sidecar settled).
        let consistent = wait_until(Duration::from_secs(60), || {
            site.disk_status(DISK)
                .is_some_and(|st| st["consistency"]["state"] == "consistent")
        });
        assert!(consistent, "replica consistent:\n{}", sidecar.log_text());
        PointRig {
            filter,
            sidecar,
            site,
            disk,
            copies: Vec::new(),
            scratch,
        }
    }

    /// Write, tag `name`, keep a copy of the backing file as it is at the tag.
    fn round(&mut self, name: &str, writes: &[(u64, u64, u8)]) {
        if !writes.is_empty() {
            qemu_io_writes(&self.filter.uri(DISK), writes);
        }
        let tag = ferry_tests::ferry(["filter", "tag", name, "--state", s(&self.filter.state)]);
        expect_code(&tag, 0, "ferry filter tag");
        let copy = self.scratch.path(&format!("at-{name}.raw"));
        expect_code(
            &run("cp", ["--sparse=always", s(&self.disk), s(&copy)]),
            0,
            "copy the disk at the point",
        );
        self.copies.push((name.to_owned(), copy));
    }

    fn data(&self) -> &Path {
        &self.site.data
    }
}

#[test]
fn every_point_fails_over_to_exactly_the_disk_as_it_was_then() {
    let mut rig = PointRig::up("fo-points");
    // Overlapping writes, zeroing and growth across four points.
    rig.round("p1", &[(0, 512, 1), (4096, 1024, 2), (60_000, 64, 3)]);
    rig.round("p2", &[(256, 512, 4), (4096, 256, 0), (8192, 2048, 5)]);
    rig.round("p3", &[(0, 64, 6), (9000, 100, 7), (30_000, 4096, 8)]);
    rig.round("p4", &[(30_000, 4096, 0), (100, 10, 9)]);
    wait_point(rig.data(), "p4");
    let data = rig.data().to_path_buf();
    let out = rig.scratch.path("dr");

    // A mistyped point is refused before anything stops.
    let typo = ferry_tests::ferry([
        "failover",
        "web01",
        "--data",
        s(&data),
        "--point",
        "p-typo",
        "--format",
        "raw",
        "--out",
        s(&out),
    ]);
    assert_ne!(typo.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("no point named"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );
    assert!(
        !data.join("hosts/web01/failover.json").exists(),
        "replication not stopped"
    );

    // Fail over to the oldest point, then walk the points before commit,
    // one output format each.
    let formats = ["raw", "vhd-dynamic", "vmdk-sparse", "vhd-fixed"];
    for (i, ((name, copy), format)) in rig.copies.iter().zip(formats).enumerate() {
        let mut args = vec![
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            name,
            "--format",
            format,
            "--out",
            s(&out),
            "--json",
        ];
        if i > 0 {
            args.push("--change-point");
        }
        let m = json_of(&ferry_tests::ferry(&args), "ferry failover");
        assert_eq!(m["point"]["name"], name.as_str(), "{m}");
        assert_eq!(m["state"], "failed-over", "{m}");
        let d = &m["disks"][0];
        assert_eq!(d["disk"], DISK, "{m}");
        assert_eq!(d["size"], 64 << 20, "{m}");
        let image = PathBuf::from(d["file"].as_str().unwrap());
        assert_same_as_raw(copy, &image, format, &format!("failover at {name}"));
        // The manifest next to the images says the same, with a checksum
        // of the image file.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["point"]["name"], name.as_str());
        let sum = run("sha256sum", [s(&image)]);
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(
            Some(sum.split_whitespace().next().unwrap()),
            manifest["disks"][0]["sha256"].as_str(),
            "manifest checksum"
        );
    }
    // Replication is stopped for the host: further writes do not reach
    // the target, and the target says why it refuses the sidecar.
    let before = rig.site.disk_status(DISK).unwrap()["received_seq"].clone();
    qemu_io_writes(&rig.filter.uri(DISK), &[(0, 64, 10)]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rig.site.disk_status(DISK).unwrap()["received_seq"], before);

    // Commit at p4 (after one more change of point), and the other points are gone.
    let m = json_of(
        &ferry_tests::ferry([
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "p3",
            "--change-point",
            "--json",
        ]),
        "change point to p3",
    );
    assert_same_as_raw(
        &rig.copies[2].1,
        Path::new(m["disks"][0]["file"].as_str().unwrap()),
        "vhd-fixed",
        "p3",
    );
    let m = json_of(
        &ferry_tests::ferry(["commit", "web01", "--data", s(&data), "--json"]),
        "ferry commit",
    );
    assert_eq!(m["state"], "committed", "{m}");
    // The replica is past p3 (at p4): without history, no point is left
    // but what the manifest records.
    let left: Vec<_> = points(&data).iter().map(|p| p["name"].clone()).collect();
    assert!(
        left.iter().all(|n| n == "p3"),
        "no other point stays: {left:?}"
    );
    assert_eq!(m["point"]["name"], "p3", "{m}");
    let again = ferry_tests::ferry([
        "failover",
        "web01",
        "--data",
        s(&data),
        "--point",
        "p1",
        "--change-point",
    ]);
    assert_ne!(
        again.status.code(),
        Some(0),
        "no change of point after commit"
    );
    drop(rig.sidecar);
}

#[test]
fn a_test_failover_is_writable_while_replication_goes_on_and_cleanup_leaves_no_trace() {
    let mut rig = PointRig::up("fo-test");
    rig.round("t1", &[(0, 1024, 1), (2048, 512, 2)]);
    wait_point(rig.data(), "t1");
    let data = rig.data().to_path_buf();
    let out = rig.scratch.path("drill");
    let t = json_of(
        &ferry_tests::ferry([
            "test-failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "t1",
            "--out",
            s(&out),
            "--json",
        ]),
        "ferry test-failover",
    );
    let image = PathBuf::from(t["images"][0].as_str().unwrap());
    let base = PathBuf::from(t["bases"][0]["file"].as_str().unwrap());
    // qemu's vpc driver does not follow VHD parents: ferry compares.
    let same = ferry_tests::ferry(["image", "compare", s(&rig.copies[0].1), s(&image)]);
    expect_code(&same, 0, "test image at t1 equals the disk at t1");

    // Replication goes on: the target applies new writes meanwhile.
    let applied = rig.site.disk_status(DISK).unwrap()["applied_seq"]
        .as_u64()
        .unwrap();
    rig.round("t2", &[(0, 64, 3)]);
    let advanced = wait_until(Duration::from_secs(60), || {
        rig.site.disk_status(DISK).unwrap()["applied_seq"]
            .as_u64()
            .unwrap()
            > applied
    });
    assert!(
        advanced,
        "applied sequence advances during the test failover"
    );
    wait_point(&data, "t2");

    // The test image is writable and the base is not changed by writing it.
    {
        let mut img = ferry_vhd::open(&image, ferry_vhd::OpenOptions::read_write()).unwrap();
        img.write_at(&vec![77u8; 1 << 20], 0).unwrap();
        img.flush().unwrap();
        let mut back = vec![0u8; 1 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 77),
            "the test image holds what was written"
        );
    }
    assert_same_as_raw(
        &rig.copies[0].1,
        &base,
        "vhd-dynamic",
        "base untouched by writes to the test image",
    );

    // Cleanup removes the images; the points and the replica are as before.
    let before_points = points(&data);
    cleanup_drill(&data, "cleanup");
    assert!(!image.exists() && !base.exists(), "images removed");
    assert_eq!(points(&data), before_points);
    assert!(!data.join("hosts/web01/test-failover.json").exists());
    rig.round("t3", &[(4096, 64, 4)]);
    wait_point(&data, "t3");
    rig.site.wait_replicated(
        &rig.filter.state,
        DISK,
        Duration::from_secs(60),
        &rig.sidecar,
    );
    let compare = ferry_tests::qemu_compare_raw(&rig.disk, &rig.site.replica(DISK), "vhd-dynamic");
    expect_code(&compare, 0, "replica equals the disk after the drill");
}

/// An image loop-mounted for inspection; unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(image: &Path, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        expect_code(
            &run("mount", ["-o", "loop", s(image), s(at)]),
            0,
            "mount the failed-over image",
        );
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("umount", [s(&self.0)]);
    }
}

fn workload_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads")
        .join(name)
}

fn read_id(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// `sqlite_check.py` on the database under `mnt`.
fn sqlite_check(mnt: &Path) -> serde_json::Value {
    let out = run(
        "/usr/bin/python3",
        [
            s(&workload_script("sqlite_check.py")),
            s(&mnt.join("app.db")),
        ],
    );
    expect_code(&out, 0, "sqlite_check.py");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["integrity"], "ok", "{v}");
    assert_eq!(v["bad_rows"], 0, "{v}");
    assert_eq!(v["rows"], v["max_id"], "ids are contiguous: {v}");
    v
}

fn sha256_of(path: &Path) -> String {
    let out = run("sha256sum", [s(path)]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn wait_for_id(ctl: &Path, above: u64) -> u64 {
    let mut id = 0;
    let ok = wait_until(Duration::from_secs(60), || {
        id = std::fs::read_to_string(ctl.join("committed"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        id > above
    });
    assert!(ok, "the workload commits (at {id})");
    id
}

#[test]
fn sqlite_on_ext4_fails_over_at_app_crash_and_past_points_and_drills_while_running() {
    let scratch = Scratch::new("fo-sqlite");
    let site = Site::start(&scratch.path("site"));
    let vol = ferry_tests::Volume::up(&scratch.path("vol"), "ext4", "256M", &[]);
    let sidecar = site.sidecar(&vol.state(), &scratch.path("sidecar.log"), &[]);
    let consistent = wait_until(Duration::from_secs(120), || {
        site.disk_status(DISK)
            .is_some_and(|st| st["consistency"]["state"] == "consistent")
    });
    assert!(consistent, "replica consistent:\n{}", sidecar.log_text());
    let mnt = vol.mnt();
    let state = vol.state();
    let data = site.data.clone();
    let tag = |name: &str, app: bool, extra: &[&str]| {
        let mut args = vec!["filter", "tag", name, "--state", s(&state)];
        if app {
            args.extend(["--app", "--mount", s(&mnt)]);
        }
        args.extend_from_slice(extra);
        expect_code(&ferry_tests::ferry(&args), 0, "ferry filter tag");
    };

    // Files as they are at an early point, then changed.
    std::fs::create_dir_all(mnt.join("early")).unwrap();
    let mut early = Vec::new();
    for i in 0..8u64 {
        let p = mnt.join(format!("early/f{i}"));
        std::fs::write(
            &p,
            ferry_tests::pattern(i + 1, 200_000 + 4096 * usize::try_from(i).unwrap()),
        )
        .unwrap();
        early.push((format!("early/f{i}"), sha256_of(&p)));
    }
    tag("files-early", true, &[]);
    for i in 0..4u64 {
        std::fs::write(
            mnt.join(format!("early/f{i}")),
            ferry_tests::pattern(100 + i, 50_000),
        )
        .unwrap();
    }
    std::fs::remove_file(mnt.join("early/f7")).unwrap();

    // The SQLite workload, with an app point (the workload pauses through
    // the pre script, which records the last committed id) and a crash
    // point taken while it runs.
    let ctl = scratch.path("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let workload = std::process::Command::new("/usr/bin/python3")
        .args([
            s(&workload_script("sqlite_app.py")),
            s(&mnt.join("app.db")),
            s(&ctl),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.path("workload.log")).unwrap())
        .spawn()
        .expect("start the SQLite workload");
    let workload = ferry_tests::ChildGuard(workload);
    wait_for_id(&ctl, 200);
    let c = s(&ctl);
    let pre = format!("touch {c}/pause && while [ ! -f {c}/paused ]; do sleep 0.01; done && cp {c}/paused {c}/frozen-app-1");
    let post = format!("rm -f {c}/pause");
    tag("app-1", true, &["--pre", &pre, "--post", &post]);
    let frozen = read_id(&ctl.join("frozen-app-1"));
    let after_app = wait_for_id(&ctl, frozen + 200);
    let low = read_id(&ctl.join("committed"));
    tag("crash-1", false, &[]);
    let high = read_id(&ctl.join("committed"));
    wait_for_id(&ctl, high + 100);
    wait_point(&data, "crash-1");
    assert!(after_app > frozen);

    // A drill while the workload runs: the target keeps applying, the test
    // image holds a consistent database, cleanup leaves no trace.
    let drill = scratch.path("drill");
    let t = json_of(
        &ferry_tests::ferry([
            "test-failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "app-1",
            "--out",
            s(&drill),
            "--json",
        ]),
        "test failover during the workload",
    );
    let applied = site.disk_status(DISK).unwrap()["applied_seq"]
        .as_u64()
        .unwrap();
    let advanced = wait_until(Duration::from_secs(60), || {
        site.disk_status(DISK).unwrap()["applied_seq"]
            .as_u64()
            .unwrap()
            > applied
    });
    assert!(advanced, "replication goes on during the drill");
    let test_image = PathBuf::from(t["images"][0].as_str().unwrap());
    let as_raw = scratch.path("drill.raw");
    expect_code(
        &ferry_tests::ferry([
            "image",
            "convert",
            "--format",
            "raw",
            s(&test_image),
            s(&as_raw),
        ]),
        0,
        "read the test image",
    );
    {
        let m = Mounted::new(&as_raw, &scratch.path("drill-mnt"));
        let v = sqlite_check(&m.0);
        assert_eq!(
            v["max_id"], frozen,
            "the drill sees the database as frozen at app-1"
        );
    }
    {
        let mut img = ferry_vhd::open(&test_image, ferry_vhd::OpenOptions::read_write()).unwrap();
        img.write_at(&[0x5a; 4096], 0).unwrap();
        img.flush().unwrap();
    }
    let points_before = points(&data);
    cleanup_drill(&data, "drill cleanup");
    assert!(!test_image.exists());
    let kept = points(&data);
    assert!(
        points_before.iter().all(|p| kept.contains(p)),
        "cleanup keeps every point"
    );

    // Stop the workload; fail over at latest-app.
    std::fs::write(ctl.join("stop"), b"").unwrap();
    assert!(wait_until(Duration::from_secs(30), || ctl
        .join("final")
        .exists()));
    drop(workload);
    let out = scratch.path("dr");
    let m = json_of(
        &ferry_tests::ferry([
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "latest-app",
            "--format",
            "raw",
            "--out",
            s(&out),
            "--json",
        ]),
        "failover at latest-app",
    );
    assert_eq!(m["point"]["name"], "app-1", "{m}");
    let image = PathBuf::from(m["disks"][0]["file"].as_str().unwrap());
    {
        let mounted = Mounted::new(&image, &scratch.path("dr-mnt"));
        let v = sqlite_check(&mounted.0);
        assert_eq!(
            v["max_id"], frozen,
            "the app point holds every transaction committed at the freeze"
        );
    }
    // The file system of the app point is clean.
    expect_code(
        &run("e2fsck", ["-fn", s(&image)]),
        0,
        "fsck of the app point",
    );

    // A crash-consistent point: the journal replays at mount, then fsck is
    // clean and SQLite recovers to a committed state in the window.
    let m = json_of(
        &ferry_tests::ferry([
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "crash-1",
            "--change-point",
            "--json",
        ]),
        "change point to crash-1",
    );
    let image = PathBuf::from(m["disks"][0]["file"].as_str().unwrap());
    drop(Mounted::new(&image, &scratch.path("dr-mnt")));
    expect_code(
        &run("e2fsck", ["-fn", s(&image)]),
        0,
        "fsck of the crash point after journal replay",
    );
    {
        let mounted = Mounted::new(&image, &scratch.path("dr-mnt"));
        let v = sqlite_check(&mounted.0);
        let id = v["max_id"].as_u64().unwrap();
        assert!(
            (low..=high).contains(&id),
            "crash point holds a committed prefix: {id} in {low}..={high}"
        );
    }

    // The early point gives the files as they were.
    let m = json_of(
        &ferry_tests::ferry([
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "files-early",
            "--change-point",
            "--json",
        ]),
        "change point to files-early",
    );
    let image = PathBuf::from(m["disks"][0]["file"].as_str().unwrap());
    {
        let mounted = Mounted::new(&image, &scratch.path("dr-mnt"));
        for (name, sum) in &early {
            assert_eq!(
                &sha256_of(&mounted.0.join(name)),
                sum,
                "{name} as it was at files-early"
            );
        }
        assert!(
            !mounted.0.join("app.db").exists(),
            "no database yet at files-early"
        );
    }
    json_of(
        &ferry_tests::ferry(["commit", "web01", "--data", s(&data), "--json"]),
        "commit",
    );
    drop(sidecar);
}

#[test]
fn a_dependency_across_two_disks_holds_at_every_point() {
    let scratch = Scratch::new("fo-two-disks");
    let site = Site::start(&scratch.path("site"));
    let (disk_a, disk_b) = (scratch.path("a.img"), scratch.path("b.img"));
    for d in [&disk_a, &disk_b] {
        expect_code(&run("truncate", ["-s", "64M", s(d)]), 0, "truncate");
    }
    let filter = FilterProcess::start(
        &scratch.path("filter"),
        &[("a", &disk_a), ("b", &disk_b)],
        &[],
    );
    let sidecar = site.sidecar(&filter.state, &scratch.path("sidecar.log"), &[]);
    let consistent = wait_until(Duration::from_secs(60), || {
        ["a", "b"].iter().all(|d| {
            site.disk_status(d)
                .is_some_and(|st| st["consistency"]["state"] == "consistent")
        })
    });
    assert!(
        consistent,
        "both replicas consistent:\n{}",
        sidecar.log_text()
    );
    let (ctl, _workload) = start_cross_disk(&scratch, &filter.uri("a"), &filter.uri("b"));
    // Points while the workload runs, at whatever instant the tags land.
    let mut names = Vec::new();
    let mut i = 0;
    while !ctl.join("done").exists() && i < 40 {
        i += 1;
        let name = format!("dep-{i}");
        expect_code(
            &ferry_tests::ferry(["filter", "tag", &name, "--state", s(&filter.state)]),
            0,
            "tag",
        );
        names.push(name);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(Duration::from_secs(120), || ctl.join("done").exists()),
        "workload done"
    );
    expect_code(
        &ferry_tests::ferry(["filter", "tag", "dep-end", "--state", s(&filter.state)]),
        0,
        "tag",
    );
    names.push("dep-end".into());
    wait_point(&site.data, "dep-end");
    let data = site.data.clone();
    let out = scratch.path("dr");
    let mut last_entries = 0;
    let mut mid_workload = 0;
    for (n, name) in names.iter().enumerate() {
        let m = fail_over_raw(&data, "web01", &out, name, n > 0);
        let file = |disk: &str| std::fs::read(image_of(&m, disk)).unwrap();
        let (dangling, entries) = dangling_entries(&file("a"), &file("b"));
        assert_eq!(
            dangling, 0,
            "at {name}: index entries on A without their record on B"
        );
        assert!(
            entries >= last_entries,
            "points move forward: {entries} after {last_entries}"
        );
        last_entries = entries;
        if 0 < entries && entries < 3000 {
            mid_workload += 1;
        }
    }
    assert_eq!(last_entries, 3000, "the last point holds every entry");
    assert!(
        mid_workload >= 3,
        "{mid_workload} points fell inside the workload"
    );
    drop(sidecar);
}

#[test]
fn retention_drops_history_older_than_the_window_and_keeps_every_point_inside() {
    let scratch = Scratch::new("fo-retention");
    let site = Site::start_with(&scratch.path("site"), &["--history-segment-size", "256K"]);
    let disk = scratch.path("disk.img");
    expect_code(&run("truncate", ["-s", "64M", s(&disk)]), 0, "truncate");
    let policy = scratch.path("policy.toml");
    std::fs::write(
        &policy,
        "retention = \"8s\"\ncrash_consistent_interval = \"1h\"\napp_consistent_interval = \"off\"\n",
    )
    .unwrap();
    let filter = FilterProcess::start(&scratch.path("filter"), &[(DISK, &disk)], &[]);
    let sidecar = site.sidecar(
        &filter.state,
        &scratch.path("sidecar.log"),
        &["--policy", s(&policy)],
    );
    let consistent = wait_until(Duration::from_secs(60), || {
        site.disk_status(DISK)
            .is_some_and(|st| st["consistency"]["state"] == "consistent")
    });
    assert!(consistent, "replica consistent:\n{}", sidecar.log_text());
    let history = || {
        let st = site.disk_status(DISK).unwrap();
        st["undo_bytes"].as_u64().unwrap() + st["journal_bytes"].as_u64().unwrap()
    };
    // A point a second for longer than the window, each writing 1 MiB of
    // incompressible data over the same 8 MiB, so that the history behind
    // every point is real data (the first eight are over zeros).
    let mut copies = Vec::new();
    let mut peak = 0;
    for i in 0..16u64 {
        let off = (i % 8) * 1024;
        let src = scratch.path("random.bin");
        std::fs::write(&src, ferry_tests::pattern(i + 1, 1 << 20)).unwrap();
        let out = run(
            "qemu-io",
            [
                "-f",
                "raw",
                &filter.uri(DISK),
                "-c",
                &format!("write -s {} {off}K 1M", s(&src)),
            ],
        );
        expect_code(&out, 0, "qemu-io write of random data");
        let name = format!("r{i}");
        expect_code(
            &ferry_tests::ferry(["filter", "tag", &name, "--state", s(&filter.state)]),
            0,
            "tag",
        );
        let copy = scratch.path(&format!("at-{name}.raw"));
        expect_code(
            &run("cp", ["--sparse=always", s(&disk), s(&copy)]),
            0,
            "copy",
        );
        copies.push((name, copy));
        peak = peak.max(history());
        std::thread::sleep(Duration::from_millis(700));
    }
    wait_point(&site.data, "r15");
    peak = peak.max(history());
    // Pruning runs every few seconds: the oldest points leave the list.
    let pruned = wait_until(Duration::from_secs(60), || {
        !points(&site.data).iter().any(|p| p["name"] == "r0")
    });
    assert!(
        pruned,
        "r0 pruned: {:?}\n{}",
        points(&site.data),
        site.target.log_text()
    );
    let after = history();
    assert!(
        after < peak,
        "history shrank: {after} bytes after, {peak} at the peak"
    );
    let kept: Vec<String> = points(&site.data)
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with('r'))
        .collect();
    assert!(
        kept.contains(&"r15".to_owned()),
        "points inside the window stay: {kept:?}"
    );
    // Every point still listed materializes exactly; a pruned one is refused.
    let data = site.data.clone();
    let out = scratch.path("dr");
    for (n, name) in kept.iter().enumerate() {
        let copy = &copies.iter().find(|(c, _)| c == name).unwrap().1;
        let m = fail_over_raw(&data, "web01", &out, name, n > 0);
        assert_same_as_raw(copy, &image_of(&m, DISK), "raw", name);
    }
    let gone = ferry_tests::ferry([
        "failover",
        "web01",
        "--data",
        s(&data),
        "--point",
        "r0",
        "--change-point",
    ]);
    assert_ne!(
        gone.status.code(),
        Some(0),
        "a pruned point cannot be chosen"
    );
    drop(sidecar);
}

#[test]
fn a_target_killed_while_applying_keeps_every_point_exact() {
    let mut rig = PointRig::up("fo-kill-target");
    for i in 0..6u64 {
        // 16 MiB of incompressible data a round, overlapping the previous
        // round's, so that the target is busy applying when it dies.
        let src = rig.scratch.path("random.bin");
        std::fs::write(&src, ferry_tests::pattern(1000 + i, 16 << 20)).unwrap();
        let out = run(
            "qemu-io",
            [
                "-f",
                "raw",
                &rig.filter.uri(DISK),
                "-c",
                &format!("write -s {} {}M 16M", s(&src), i * 8),
            ],
        );
        expect_code(&out, 0, "qemu-io write");
        rig.round(&format!("k{i}"), &[]);
        if i % 2 == 1 {
            rig.site.target.kill9();
            rig.site.target.restart();
            rig.site.wait_listening();
        }
    }
    wait_point(rig.data(), "k5");
    let data = rig.data().to_path_buf();
    let out = rig.scratch.path("dr");
    for (n, (name, copy)) in rig.copies.iter().enumerate() {
        let m = fail_over_raw(&data, "web01", &out, name, n > 0);
        assert_same_as_raw(copy, &image_of(&m, DISK), "raw", name);
    }
}

/// A second protected host (web02) at the same site: credentials, a
/// filter with one disk, a sidecar.
fn second_host(
    site: &Site,
    scratch: &Scratch,
    disk: &Path,
) -> (FilterProcess, ferry_tests::Daemon) {
    let creds = ferry_tests::ferry(["credentials", "init", s(&site.creds), "--host", "web02"]);
    expect_code(&creds, 0, "credentials for web02");
    let filter = FilterProcess::start(&scratch.path("filter-web02"), &[("b", disk)], &[]);
    let sidecar = site.sidecar(
        &filter.state,
        &scratch.path("sidecar-web02.log"),
        &["--host", "web02"],
    );
    (filter, sidecar)
}

fn host_consistent(site: &Site, host: &str) -> bool {
    let out = ferry_tests::ferry(["target", "status", "--json", "--data", s(&site.data)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["disks"].as_array().is_some_and(|a| {
        a.iter()
            .any(|d| d["host"] == host && d["consistency"]["state"] == "consistent")
    })
}

fn host_points(data: &Path, host: &str) -> Vec<String> {
    ferry_tests::points_at(data, host)
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn group_points_hold_a_dependency_across_two_hosts() {
    let scratch = Scratch::new("fo-group");
    let site = Site::start(&scratch.path("site"));
    let (disk_a, disk_b) = (scratch.path("a.img"), scratch.path("b.img"));
    for d in [&disk_a, &disk_b] {
        expect_code(&run("truncate", ["-s", "64M", s(d)]), 0, "truncate");
    }
    let web01 = FilterProcess::start(&scratch.path("filter-web01"), &[("a", &disk_a)], &[]);
    let sidecar01 = site.sidecar(&web01.state, &scratch.path("sidecar-web01.log"), &[]);
    let (web02, sidecar02) = second_host(&site, &scratch, &disk_b);
    let consistent = wait_until(Duration::from_secs(60), || {
        host_consistent(&site, "web01") && host_consistent(&site, "web02")
    });
    assert!(
        consistent,
        "both hosts consistent:\n{}\n{}",
        sidecar01.log_text(),
        sidecar02.log_text()
    );
    // The record host first: committing in the order given then tags web02
    // before web01, which without a working hold could cut between a
    // record and its index entry.
    let members = [s(&web02.state).to_owned(), s(&web01.state).to_owned()];
    let group_point = |name: &str| {
        let mut args = vec!["group", "point", name, "--json", "--timeout-ms", "2000"];
        for m in &members {
            args.extend(["--member", m.as_str()]);
        }
        ferry_tests::ferry(&args)
    };
    // Records on web02's disk, then the index entry on web01's disk.
    let (ctl, _workload) = start_cross_disk(&scratch, &web01.uri("a"), &web02.uri("b"));
    let mut names = Vec::new();
    while !ctl.join("done").exists() && names.len() < 30 {
        let name = format!("grp-{}", names.len() + 1);
        let out = group_point(&name);
        let v = json_of(&out, "ferry group point");
        assert_eq!(v["result"], "taken", "{v}");
        names.push(name);
    }
    assert!(
        wait_until(Duration::from_secs(120), || ctl.join("done").exists()),
        "workload done"
    );
    let v = json_of(&group_point("grp-end"), "last group point");
    assert_eq!(v["result"], "taken", "{v}");
    names.push("grp-end".into());
    let listed = wait_until(Duration::from_secs(60), || {
        ["web01", "web02"]
            .iter()
            .all(|h| host_points(&site.data, h).contains(&"grp-end".to_owned()))
    });
    assert!(listed, "group points listed on both hosts");

    // Both hosts at each group point: no index entry on web01 without its
    // record on web02.
    let out = scratch.path("dr");
    let mut mid_workload = 0;
    for (n, name) in names.iter().enumerate() {
        let mut images = Vec::new();
        for host in ["web01", "web02"] {
            let m = fail_over_raw(&site.data, host, &out.join(host), name, n > 0);
            images.push(
                std::fs::read(image_of(&m, if host == "web01" { "a" } else { "b" })).unwrap(),
            );
        }
        let (dangling, entries) = dangling_entries(&images[0], &images[1]);
        assert_eq!(
            dangling, 0,
            "at {name}: an index entry on web01 without its record on web02"
        );
        if 0 < entries && entries < 3000 {
            mid_workload += 1;
        }
    }
    assert!(
        mid_workload >= 2,
        "{mid_workload} group points fell inside the workload"
    );
    drop((sidecar01, sidecar02));
}

#[test]
fn a_member_that_does_not_answer_aborts_the_round_and_releases_the_others() {
    let scratch = Scratch::new("fo-group-abort");
    let disk = scratch.path("a.img");
    expect_code(&run("truncate", ["-s", "16M", s(&disk)]), 0, "truncate");
    let live = FilterProcess::start(&scratch.path("filter"), &[("a", &disk)], &[]);
    // A member that accepts the connection and never answers, listed
    // first, and one that hangs up at once.
    let mute = scratch.path("mute");
    std::fs::create_dir_all(&mute).unwrap();
    let _mute_listener = std::os::unix::net::UnixListener::bind(mute.join("control.sock")).unwrap();
    let gone = scratch.path("gone");
    std::fs::create_dir_all(&gone).unwrap();
    let gone_listener = std::os::unix::net::UnixListener::bind(gone.join("control.sock")).unwrap();
    std::thread::spawn(move || {
        for c in gone_listener.incoming() {
            drop(c);
        }
    });
    for (other, timeout_ms) in [(&mute, 2000u64), (&gone, 5000)] {
        let out = ferry_tests::ferry([
            "group",
            "point",
            "never",
            "--member",
            s(other),
            "--member",
            s(&live.state),
            "--timeout-ms",
            &timeout_ms.to_string(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(1), "the round aborts");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["result"], "aborted", "{v}");
        assert!(
            v["members"][0]["error"].is_string(),
            "the bad member is named: {v}"
        );
        let live_member = &v["members"][1];
        assert_eq!(live_member["state"], "released", "{v}");
        // Released by the coordinator's abort, not by its own deadline.
        let held_us = live_member["held_us"]
            .as_u64()
            .expect("the live member held");
        assert!(
            held_us < timeout_ms * 1000,
            "released before its deadline: {v}"
        );
    }
    // The live member takes writes again, and has no tag of that name.
    qemu_io_writes(&live.uri("a"), &[(0, 64, 7)]);
    let tags = std::fs::read_to_string(live.state.join("tags.jsonl")).unwrap_or_default();
    assert!(!tags.contains("\"never\""), "{tags}");
}

/// One line to and one line from a filter's control socket.
struct ControlLine {
    writer: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl ControlLine {
    fn open(state: &Path) -> ControlLine {
        let stream = std::os::unix::net::UnixStream::connect(state.join("control.sock")).unwrap();
        ControlLine {
            writer: stream.try_clone().unwrap(),
            reader: std::io::BufReader::new(stream),
        }
    }

    fn send(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.writer, "{line}").unwrap();
    }

    fn receive(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

#[test]
fn a_held_member_blocks_writes_until_the_commit_and_records_them_after_its_tag() {
    let scratch = Scratch::new("fo-hold");
    let (disk_a, disk_b) = (scratch.path("a.img"), scratch.path("b.img"));
    for d in [&disk_a, &disk_b] {
        expect_code(&run("truncate", ["-s", "16M", s(d)]), 0, "truncate");
    }
    let hosts = [
        FilterProcess::start(&scratch.path("h1"), &[("a", &disk_a)], &[]),
        FilterProcess::start(&scratch.path("h2"), &[("b", &disk_b)], &[]),
    ];
    let mut lines: Vec<ControlLine> = hosts.iter().map(|h| ControlLine::open(&h.state)).collect();
    for l in &mut lines {
        l.send(r#"{"version":1,"op":"hold","name":"held-1","timeout_ms":10000}"#);
    }
    let held: Vec<u64> = lines
        .iter_mut()
        .map(|l| {
            let v = l.receive();
            v["held"].as_u64().unwrap_or_else(|| panic!("held: {v}"))
        })
        .collect();
    // Writes issued while both are held do not complete.
    let writers: Vec<_> = hosts
        .iter()
        .zip(["a", "b"])
        .map(|(h, disk)| {
            let uri = h.uri(disk);
            std::thread::spawn(move || qemu_io_writes(&uri, &[(0, 4, 9)]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "writes wait while the members are held"
    );
    for l in &mut lines {
        l.send(r#"{"version":1,"op":"commit"}"#);
    }
    let tags: Vec<u64> = lines
        .iter_mut()
        .map(|l| {
            let v = l.receive();
            assert_eq!(v["hold"]["committed"], true, "{v}");
            v["hold"]["tag"]["seq"].as_u64().unwrap()
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for ((h, tag), held) in hosts.iter().zip(&tags).zip(&held) {
        assert_eq!(
            *tag,
            held + 1,
            "the tag comes right after the quiet sequence"
        );
        let status = h.status();
        let seq = status["seq"].as_u64().unwrap();
        assert!(
            seq > *tag,
            "the held write was recorded after the tag: {status}"
        );
    }
}

#[test]
fn a_failover_interrupted_by_a_target_crash_completes_when_run_again() {
    let mut rig = PointRig::up("fo-interrupted");
    // 48 MiB of incompressible data so that materializing takes a moment.
    let src = rig.scratch.path("random.bin");
    std::fs::write(&src, ferry_tests::pattern(77, 48 << 20)).unwrap();
    let out = run(
        "qemu-io",
        [
            "-f",
            "raw",
            &rig.filter.uri(DISK),
            "-c",
            &format!("write -s {} 0 48M", s(&src)),
        ],
    );
    expect_code(&out, 0, "qemu-io write");
    rig.round("before", &[(0, 4096, 3)]);
    rig.round("after", &[(8192, 4096, 4)]);
    wait_point(rig.data(), "after");
    let data = rig.data().to_path_buf();
    let dr = rig.scratch.path("dr");
    let failover = |extra: &[&str]| {
        let mut args = vec![
            "failover",
            "web01",
            "--data",
            s(&data),
            "--point",
            "before",
            "--format",
            "vmdk-sparse",
            "--json",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // Start a failover into another format (a full conversion) and kill
    // the target while it runs, if it still runs.
    let mut child = std::process::Command::new(ferry_tests::ferry_bin())
        .args(failover(&["--out", s(&dr)]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&dr).is_ok_and(|mut d| d.next().is_some())
    });
    rig.site.target.kill9();
    let _ = child.wait();
    rig.site.target.restart();
    rig.site.wait_listening();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.join("hosts/web01/failover.json")).expect("failover state"),
    )
    .unwrap();
    eprintln!("state after the crash: {}", state["state"]);
    let again = if state["state"] == "failing-over" {
        // Interrupted: the same command again finishes the job.
        failover(&["--out", s(&dr)])
    } else {
        // It finished before the kill: a change of point still works.
        failover(&["--change-point"])
    };
    let m = json_of(&ferry_tests::ferry(&again), "failover after the crash");
    assert_eq!(m["state"], "failed-over", "{m}");
    assert_same_as_raw(
        &rig.copies[0].1,
        &image_of(&m, DISK),
        "vmdk-sparse",
        "before",
    );
    let left: Vec<String> = std::fs::read_dir(&dr)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.contains("materializing")),
        "no temporary files left: {left:?}"
    );
}
