//! Rig tier: reprotect and failback into the original VMDK/VHD images.
//!
//! The "failed-over disk" is a raw file behind `ferry filter`, shipped by
//! `ferry sidecar` to a `ferry target` that adopted the primary's stale
//! image (`ferry reprotect --image`). qemu-img judges the images: `check`
//! for their metadata, `compare` for their content against copies of the
//! source taken at each point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{
    assert_same_as_raw, expect_code, ferry, json_of, qemu_img, run, wait_until, FilterProcess,
    Scratch, Site,
};

const DISK: &str = "data";
const SIZE: u64 = 64 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qemu-img check` of an image, which must pass (qemu cannot check VHD:
/// `ferry image check` does it, which reads the footer, its copy and
/// every BAT entry).
fn assert_checks(image: &Path, qemu_format: &str, what: &str) {
    let out = if qemu_format == "vpc" {
        ferry(["image", "check", s(image)])
    } else {
        qemu_img(["check", "-f", qemu_format, s(image)])
    };
    assert!(
        out.status.success(),
        "{what}: check of {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ferry failback web01 --data DATA --point POINT`, which must succeed:
/// its manifest.
fn failback(data: &Path, point: &str) -> serde_json::Value {
    json_of(
        &ferry([
            "failback",
            "web01",
            "--data",
            s(data),
            "--point",
            point,
            "--json",
        ]),
        "ferry failback",
    )
}

/// The sidecar's figures for the disk (`ferry sidecar status --json`).
fn sidecar_disk(state: &Path) -> serde_json::Value {
    let v = json_of(
        &ferry(["sidecar", "status", "--json", "--state", s(state)]),
        "ferry sidecar status",
    );
    v["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["disk"] == DISK).cloned())
        .unwrap_or_default()
}

/// Pseudo-random writes of a round: (offset KiB, length KiB, byte).
fn round_writes(round: u64) -> Vec<(u64, u64, u8)> {
    (0..24)
        .map(|i| {
            let x = (round * 7919 + i * 104_729) % (SIZE / 1024 - 512);
            (
                x,
                16 + (round * 31 + i * 17) % 240,
                u8::try_from(1 + (round * 24 + i) % 250).unwrap(),
            )
        })
        .collect()
}

/// Bytes of the 64 KiB blocks (the exchange's unit) in which two files
/// differ.
fn differing_bytes(a: &Path, b: &Path) -> u64 {
    let (a, b) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    a.chunks(64 << 10)
        .zip(b.chunks(64 << 10))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.len() as u64)
        .sum()
}

/// The primary's stale image, as the failover left it: `stale_raw`
/// converted to a monolithicSparse VMDK by qemu-img.
fn stale_vmdk(stale_raw: &Path, vmdk: &Path) {
    let out = qemu_img([
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(stale_raw),
        s(vmdk),
    ]);
    expect_code(&out, 0, "qemu-img convert to vmdk");
}

/// A target whose `web01/data` is the adopted `image`, and the failed-over
/// disk `source` behind a filter and a sidecar shipping to it; returns once
/// the seeded resync is applied and the replica is consistent.
struct Reverse {
    site: Site,
    filter: FilterProcess,
    sidecar: ferry_tests::Daemon,
    scratch: Scratch,
    stale: PathBuf,
    source: PathBuf,
    image: PathBuf,
}

impl Reverse {
    fn up(tag: &str, image_of: impl FnOnce(&Path, &Path)) -> Reverse {
        let scratch = Scratch::new(tag);
        // The primary's disk at the failover, and the failed-over disk that
        // went on at the recovery site: the same but for a few MiB.
        let stale = scratch.path("stale.raw");
        ferry_tests::write_half_full_raw(&stale, SIZE, 11);
        let image = scratch.path("primary.img");
        image_of(&stale, &image);
        let source = scratch.path("failed-over.raw");
        expect_code(
            &run("cp", ["--sparse=always", s(&stale), s(&source)]),
            0,
            "cp",
        );
        let site = Site::start(&scratch.path("site-a"));
        let adopted = ferry([
            "reprotect",
            "web01",
            "--data",
            s(&site.data),
            "--image",
            &format!("{DISK}={}", s(&image)),
            "--json",
        ]);
        let r = json_of(&adopted, "ferry reprotect");
        assert_eq!(r["disks"][0]["adopted"], true, "{r}");
        let filter = FilterProcess::start(&scratch.path("filter"), &[(DISK, &source)], &[]);
        // Changes made on the failed-over machine before the reprotect.
        ferry_tests::qemu_io_writes(&filter.uri(DISK), "K", &round_writes(100));
        let sidecar = site.sidecar(&filter.state, &scratch.path("sidecar.log"), &[]);
        let rig = Reverse {
            site,
            filter,
            sidecar,
            scratch,
            stale,
            source,
            image,
        };
        rig.wait_consistent();
        rig
    }

    fn wait_consistent(&self) {
        self.site.wait_replicated(
            &self.filter.state,
            DISK,
            Duration::from_secs(120),
            &self.sidecar,
        );
        let ok = wait_until(Duration::from_secs(60), || {
            self.site
                .disk_status(DISK)
                .is_some_and(|st| st["consistency"]["state"] == "consistent")
                && !sidecar_disk(&self.filter.state)["consistent_since"].is_null()
        });
        assert!(ok, "replica consistent:\n{}", self.sidecar.log_text());
    }

    /// Kill the target with -9, if possible while it has received change
    /// sets it has not applied yet (its applier writing the image).
    fn kill_target_while_applying(&mut self) {
        wait_until(Duration::from_secs(3), || {
            self.site
                .disk_status(DISK)
                .is_some_and(|st| st["apply_backlog_sets"].as_u64().unwrap_or(0) > 0)
        });
        self.site.target.kill9();
    }

    /// Write a round, tag it, keep a copy of the source at the tag; the
    /// tag's sequence.
    fn round(&self, name: &str, round: u64) -> (u64, PathBuf) {
        ferry_tests::qemu_io_writes(&self.filter.uri(DISK), "K", &round_writes(round));
        let tag = json_of(
            &ferry([
                "filter",
                "tag",
                name,
                "--state",
                s(&self.filter.state),
                "--json",
            ]),
            "ferry filter tag",
        );
        let copy = self.scratch.path(&format!("at-{name}.raw"));
        expect_code(
            &run("cp", ["--sparse=always", s(&self.source), s(&copy)]),
            0,
            "cp",
        );
        (tag["seq"].as_u64().expect("tag seq"), copy)
    }
}

#[test]
fn reprotect_into_a_stale_sparse_vmdk_moves_only_the_delta_and_survives_target_crashes() {
    let mut rig = Reverse::up("fb-vmdk", stale_vmdk);
    // The delta start: the whole disk was compared, only what differs went.
    let sd = sidecar_disk(&rig.filter.state);
    let sent = sd["resync_raw_bytes"].as_u64().unwrap_or(u64::MAX);
    let equal = sd["exchange_skipped_bytes"].as_u64().unwrap_or(0);
    let differing = differing_bytes(&rig.stale, &rig.source);
    eprintln!(
        "delta start: {sent} bytes sent, {equal} found equal, {differing} bytes in 64 KiB blocks that differ, disk {SIZE}"
    );
    assert_delta(sent, equal, differing, SIZE, "delta start");
    assert_same_as_raw(&rig.source, &rig.image, "vmdk", "after the delta start");
    assert_checks(&rig.image, "vmdk", "after the delta start");

    // Rounds with points; the target is killed while it applies.
    let mut rounds = Vec::new();
    for (i, name) in ["r1", "r2", "r3"].iter().enumerate() {
        rounds.push((name.to_string(), rig.round(name, i as u64 + 1)));
        if i >= 1 {
            rig.kill_target_while_applying();
            rig.site.target.restart();
            rig.site.wait_listening();
        }
    }
    // One more crash, and the sidecar goes away: the restarted target must
    // apply every change set it acknowledged on its own.
    rig.kill_target_while_applying();
    rig.sidecar.stop();
    let acked = sidecar_disk(&rig.filter.state)["acked_seq"]
        .as_u64()
        .unwrap_or(0);
    rig.site.target.restart();
    rig.site.wait_listening();
    let mut last = serde_json::Value::Null;
    let applied = wait_until(Duration::from_secs(60), || {
        last = rig.site.disk_status(DISK).unwrap_or_default();
        last["applied_seq"] == last["received_seq"] && last["apply_backlog_sets"] == 0
    });
    assert!(
        applied,
        "the restarted target applied its journal: {last}\ntarget log:\n{}",
        rig.site.target.log_text()
    );
    let received = last["received_seq"].as_u64().expect("received");
    assert!(
        received >= acked,
        "acknowledged {acked}, the target holds {received}"
    );
    let points: Vec<String> = ferry_tests::points_at(&rig.site.data, "web01")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    for (name, (seq, _)) in &rounds {
        if *seq <= received {
            assert!(
                points.contains(name),
                "point {name} (seq {seq} <= {received}) listed: {points:?}"
            );
        }
    }
    assert!(points.contains(&"r1".to_owned()), "{points:?}");

    // Fail back at the oldest point: the VMDK is rewound in place.
    let m = failback(&rig.site.data, "r1");
    assert_eq!(m["state"], "failed-over", "{m}");
    assert_eq!(m["in_place"], true, "{m}");
    assert_eq!(
        Path::new(m["disks"][0]["file"].as_str().unwrap()),
        rig.image.canonicalize().unwrap()
    );
    let (_, (_, at_r1)) = &rounds[0];
    assert_same_as_raw(at_r1, &rig.image, "vmdk", "failed back at r1");
    assert_checks(&rig.image, "vmdk", "failed back at r1");
    // A crash before the failback recorded its end: run again (asking for
    // another point), it finishes at the point it chose, over images
    // already (here: wholly) rewound.
    let state_file = rig.site.data.join("hosts/web01/failover.json");
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    st["state"] = "failing-over".into();
    std::fs::write(&state_file, serde_json::to_vec(&st).unwrap()).unwrap();
    let m = failback(&rig.site.data, "r3");
    assert_eq!(
        (m["state"].as_str(), m["point"]["name"].as_str()),
        (Some("failed-over"), Some("r1")),
        "{m}"
    );
    assert_same_as_raw(at_r1, &rig.image, "vmdk", "failed back at r1 again");
    // A second failback is refused; commit finalizes it.
    let again = ferry([
        "failback",
        "web01",
        "--data",
        s(&rig.site.data),
        "--point",
        "r1",
    ]);
    assert!(!again.status.success(), "a second failback was accepted");
    let c = json_of(
        &ferry(["commit", "web01", "--data", s(&rig.site.data), "--json"]),
        "ferry commit",
    );
    assert_eq!(c["state"], "committed", "{c}");
    assert_same_as_raw(at_r1, &rig.image, "vmdk", "committed at r1");
}

/// Bytes the sidecar of the filter at `state` sent as resync data, and
/// found equal at the target (checksum exchange).
fn resync_figures(state: &Path) -> (u64, u64) {
    let sd = sidecar_disk(state);
    (
        sd["resync_raw_bytes"].as_u64().unwrap_or(u64::MAX),
        sd["exchange_skipped_bytes"].as_u64().unwrap_or(0),
    )
}

/// Wait until the sidecar of the filter at `state` reports the replica
/// consistent (after a resync: points taken from now on are points).
fn wait_sidecar_consistent(state: &Path, sidecar: &ferry_tests::Daemon) {
    let ok = wait_until(Duration::from_secs(120), || {
        !sidecar_disk(state)["consistent_since"].is_null()
    });
    assert!(
        ok,
        "the sidecar never reported the replica consistent:\n{}",
        sidecar.log_text()
    );
}

/// Freeze the file system at `mnt`, wait until the replica at `site` is
/// consistent and holds everything, run `check`, thaw (also when `check`
/// panics).
fn frozen<T>(
    mnt: &Path,
    site: &Site,
    state: &Path,
    sidecar: &ferry_tests::Daemon,
    check: impl FnOnce() -> T,
) -> T {
    struct Thaw<'a>(&'a Path);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            let _ = run("fsfreeze", ["-u", s(self.0)]);
        }
    }
    expect_code(&run("sync", Vec::<&str>::new()), 0, "sync");
    expect_code(&run("fsfreeze", ["-f", s(mnt)]), 0, "fsfreeze -f");
    let _thaw = Thaw(mnt);
    // Consistent first: before its resync ends the sidecar may have nothing
    // in flight that the other conditions would see.
    wait_sidecar_consistent(state, sidecar);
    site.wait_replicated(state, DISK, Duration::from_secs(180), sidecar);
    check()
}

/// `image` (qemu format `format`) converted to raw at `raw`.
fn as_raw(image: &Path, format: &str, raw: &Path) -> PathBuf {
    let out = qemu_img(["convert", "-U", "-f", format, "-O", "raw", s(image), s(raw)]);
    expect_code(&out, 0, "qemu-img convert to raw");
    raw.to_path_buf()
}

/// A delta start sent at most what differed (and 2 MiB for the blocks
/// re-read while the machine's own writes to them were still on their
/// way), a small part of the disk, and found the rest equal.
fn assert_delta(sent: u64, equal: u64, differed: u64, disk: u64, what: &str) {
    assert!(
        sent <= differed + (2 << 20) && sent < disk / 10 && equal > disk / 10,
        "{what}: sent {sent} bytes of resync data ({equal} equal) where {differed} differed, disk {disk}"
    );
}

/// A small change: four files of 64-256 KiB under `root/name`, written
/// and synced; returns (path, crc32c).
fn small_tree(root: &Path, name: &str, seed: u64) -> Vec<(PathBuf, u32)> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    (0..4usize)
        .map(|i| {
            let path = dir.join(format!("f{i}"));
            let data = ferry_tests::pattern(seed * 100 + i as u64, (64 << 10) * (1 + i));
            std::fs::write(&path, &data).unwrap();
            (path, crc32c::crc32c(&data))
        })
        .collect()
}

/// The tree's paths relative to `root`.
fn relative(tree: Vec<(PathBuf, u32)>, root: &Path) -> Vec<(PathBuf, u32)> {
    tree.into_iter()
        .map(|(p, c)| (p.strip_prefix(root).expect("under root").to_path_buf(), c))
        .collect()
}

/// Protect a machine whose disk is a sparse VMDK, fail it over, run it at
/// the recovery site through a second filter, reprotect it back into its
/// VMDK, fail back, commit, and protect it forward again; every copy moves
/// only what differs.
#[test]
fn full_round_trip_through_a_vmdk_moves_deltas_only() {
    const VOL: u64 = 128 << 20;
    let scratch = Scratch::new("fb-round");
    let vmdk = scratch.path("web01-data.vmdk");
    let made = qemu_img([
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&vmdk),
        "128M",
    ]);
    expect_code(&made, 0, "qemu-img create vmdk");

    // 1. Protect: the machine runs from its VMDK (qemu-nbd), its writes
    //    pass the filter, the sidecar ships them to site B.
    let site_b = Site::start(&scratch.path("b"));
    let vol_a = ferry_tests::Volume::up_with(
        &scratch.path("a"),
        &["--vmdk", s(&vmdk), "--fs", "ext4"],
        &[],
    );
    let sidecar_a = site_b.sidecar(&vol_a.state(), &scratch.path("sidecar-a.log"), &[]);
    let mut tree = relative(ferry_tests::write_tree(&vol_a.mnt(), "w1", 1), &vol_a.mnt());
    frozen(&vol_a.mnt(), &site_b, &vol_a.state(), &sidecar_a, || ());
    wait_sidecar_consistent(&vol_a.state(), &sidecar_a);
    expect_code(
        &ferry(["filter", "tag", "w1", "--state", s(&vol_a.state())]),
        0,
        "tag w1",
    );
    let ok = wait_until(Duration::from_secs(60), || {
        ferry_tests::points_at(&site_b.data, "web01")
            .iter()
            .any(|p| p["name"] == "w1")
    });
    assert!(ok, "point w1 at site B");

    // 2. Disaster: site A goes away (the machine's VMDK stays as it was).
    drop(sidecar_a);
    drop(vol_a);

    // 3. Failover at B to w1, committed; the machine runs there through a
    //    second filter and changes a little.
    let out_b = scratch.path("b-failover");
    let m = json_of(
        &ferry([
            "failover",
            "web01",
            "--data",
            s(&site_b.data),
            "--point",
            "w1",
            "--format",
            "raw",
            "--out",
            s(&out_b),
            "--json",
        ]),
        "ferry failover",
    );
    let failed_over = PathBuf::from(m["disks"][0]["file"].as_str().expect("image"));
    json_of(
        &ferry(["commit", "web01", "--data", s(&site_b.data), "--json"]),
        "ferry commit at B",
    );
    let vol_b = ferry_tests::Volume::up_with(
        &scratch.path("b-run"),
        &["--disk", s(&failed_over), "--fs", "existing"],
        &[],
    );
    ferry_tests::check_tree(&vol_b.mnt(), &tree);
    tree.extend(relative(small_tree(&vol_b.mnt(), "w2", 2), &vol_b.mnt()));

    // 4. Reprotect: site A's target adopts the VMDK; the running machine's
    //    changes flow back into it, only the delta.
    expect_code(&run("sync", Vec::<&str>::new()), 0, "sync");
    let delta = differing_bytes(
        &as_raw(&vmdk, "vmdk", &scratch.path("vmdk-before.raw")),
        &failed_over,
    );
    let site_a = Site::start_on(&scratch.path("a-site"), &site_b.creds, &[]);
    let r = json_of(
        &ferry([
            "reprotect",
            "web01",
            "--data",
            s(&site_a.data),
            "--image",
            &format!("{DISK}={}", s(&vmdk)),
            "--json",
        ]),
        "ferry reprotect at A",
    );
    assert_eq!(r["disks"][0]["format"], "vmdk-sparse", "{r}");
    let sidecar_b = site_a.sidecar(&vol_b.state(), &scratch.path("sidecar-b.log"), &[]);
    frozen(&vol_b.mnt(), &site_a, &vol_b.state(), &sidecar_b, || {
        assert_same_as_raw(
            &failed_over,
            &vmdk,
            "vmdk",
            "the VMDK holds the running disk",
        );
    });
    assert_checks(&vmdk, "vmdk", "after the reprotect");
    let (sent, equal) = resync_figures(&vol_b.state());
    eprintln!("reprotect: {sent} bytes of resync sent, {equal} equal, {delta} in 64 KiB blocks that differed, volume {VOL}");
    assert_delta(sent, equal, delta, VOL, "reprotect");

    // 5. More work at B, then failback to the latest point and commit.
    tree.extend(relative(small_tree(&vol_b.mnt(), "w3", 3), &vol_b.mnt()));
    vol_b.unmount();
    site_a.wait_replicated(&vol_b.state(), DISK, Duration::from_secs(180), &sidecar_b);
    drop(sidecar_b);
    drop(vol_b);
    let m = failback(&site_a.data, "latest");
    assert_eq!(m["in_place"], true, "{m}");
    json_of(
        &ferry(["commit", "web01", "--data", s(&site_a.data), "--json"]),
        "ferry commit at A",
    );
    assert_checks(&vmdk, "vmdk", "after the failback");
    assert_same_as_raw(
        &failed_over,
        &vmdk,
        "vmdk",
        "the failed-back VMDK is the machine's last disk",
    );
    let a_data = site_a.data.clone();
    drop(site_a);

    // 6. The machine runs from its VMDK again; site B keeps its replica,
    //    and forward protection starts from a delta.
    let delta = differing_bytes(
        &as_raw(&vmdk, "vmdk", &scratch.path("vmdk-after.raw")),
        &as_raw(&site_b.replica(DISK), "vpc", &scratch.path("replica-b.raw")),
    );
    let r = json_of(
        &ferry(["reprotect", "web01", "--data", s(&site_b.data), "--json"]),
        "ferry reprotect at B",
    );
    assert_eq!(r["disks"][0]["adopted"], false, "{r}");
    let vol_a = ferry_tests::Volume::up_with(
        &scratch.path("a"),
        &["--vmdk", s(&vmdk), "--fs", "existing"],
        &[],
    );
    ferry_tests::check_tree(&vol_a.mnt(), &tree);
    // The machine runs from its VMDK now (qemu-nbd holds qemu's write
    // lock): site A must not adopt it again.
    let refused = ferry([
        "reprotect",
        "web01",
        "--data",
        s(&a_data),
        "--image",
        &format!("{DISK}={}", s(&vmdk)),
    ]);
    assert!(!refused.status.success(), "an image in use was adopted");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("qemu's write lock"), "{why}");
    let sidecar_a = site_b.sidecar(&vol_a.state(), &scratch.path("sidecar-a2.log"), &[]);
    frozen(&vol_a.mnt(), &site_b, &vol_a.state(), &sidecar_a, || ());
    let (sent, equal) = resync_figures(&vol_a.state());
    eprintln!("forward again: {sent} bytes of resync sent, {equal} equal, {delta} in 64 KiB blocks that differed, volume {VOL}");
    assert_delta(sent, equal, delta, VOL, "forward protection");
    tree.extend(relative(small_tree(&vol_a.mnt(), "w4", 4), &vol_a.mnt()));
    frozen(&vol_a.mnt(), &site_b, &vol_a.state(), &sidecar_a, || {
        let same = qemu_img([
            "compare",
            "-U",
            "-f",
            "vmdk",
            "-F",
            "vpc",
            s(&vmdk),
            s(&site_b.replica(DISK)),
        ]);
        assert!(
            same.status.success(),
            "site B's replica is the machine's disk again: {}",
            String::from_utf8_lossy(&same.stdout)
        );
    });
    ferry_tests::check_tree(&vol_a.mnt(), &tree);
}

/// The stale primary image in `format` (qemu-img's name and options).
fn stale_image(format: &'static str, options: &'static str) -> impl FnOnce(&Path, &Path) {
    move |stale_raw: &Path, image: &Path| {
        let out = qemu_img([
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            "-o",
            options,
            s(stale_raw),
            s(image),
        ]);
        expect_code(&out, 0, "qemu-img convert");
    }
}

#[test]
fn the_stream_is_written_in_place_into_flat_vmdk_and_fixed_and_dynamic_vhd() {
    for (format, options, ours) in [
        ("vmdk", "subformat=monolithicFlat", "vmdk-flat"),
        ("vpc", "subformat=fixed,force_size=on", "vhd-fixed"),
        ("vpc", "subformat=dynamic,force_size=on", "vhd-dynamic"),
    ] {
        let rig = Reverse::up("fb-format", stale_image(format, options));
        let what = format!("{format} {options}");
        let (sent, equal) = resync_figures(&rig.filter.state);
        let differing = differing_bytes(&rig.stale, &rig.source);
        assert_delta(sent, equal, differing, SIZE, &what);
        let (_, at_r1) = rig.round("r1", 1);
        rig.round("r2", 2);
        rig.wait_consistent();
        assert_same_as_raw(&rig.source, &rig.image, ours, &what);
        assert_checks(&rig.image, format, &what);
        let m = failback(&rig.site.data, "r1");
        assert_eq!(
            m["disks"][0]["file"].as_str(),
            rig.image.canonicalize().unwrap().to_str(),
            "{what}: {m}"
        );
        assert_same_as_raw(
            &at_r1,
            &rig.image,
            ours,
            &format!("{what}: failed back at r1"),
        );
        assert_checks(&rig.image, format, &format!("{what}: failed back"));
    }
}
