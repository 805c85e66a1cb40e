//! Rig tier: reprotect and failback into the original VMDK/VHD images.
//!
//! The "failed-over disk" is a raw file behind `ferry filter`, shipped by
//! `ferry sidecar` to a `ferry target` that adopted the primary's stale
//! image (`ferry reprotect --image`). qemu-img judges the images: `check`
//! for their metadata, `compare` for their content against copies of the
//! source taken at each point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{expect_code, ferry, qemu_img, run, wait_until, FilterProcess, Scratch, Site};

const DISK: &str = "data";
const SIZE: u64 = 64 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    expect_code(out, 0, what);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `qemu-img check` of an image, which must pass.
fn assert_checks(image: &Path, qemu_format: &str, what: &str) {
    let out = qemu_img(["check", "-f", qemu_format, s(image)]);
    assert!(
        out.status.success(),
        "{what}: qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of a raw copy with an image, which must be equal.
fn assert_same(raw: &Path, image: &Path, qemu_format: &str, what: &str) {
    let out = qemu_img(["compare", "-f", "raw", "-F", qemu_format, s(raw), s(image)]);
    assert!(
        out.status.success(),
        "{what}: {} differs from {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        sent < SIZE / 5 && equal > SIZE / 4,
        "the seeded resync sent {sent} bytes and found {equal} equal (disk {SIZE}, {differing} differ): {sd}"
    );
    assert_same(&rig.source, &rig.image, "vmdk", "after the delta start");
    assert_checks(&rig.image, "vmdk", "after the delta start");

    // Rounds with points; the target is killed while it applies.
    let mut rounds = Vec::new();
    for (i, name) in ["r1", "r2", "r3"].iter().enumerate() {
        rounds.push((name.to_string(), rig.round(name, i as u64 + 1)));
        if i >= 1 {
            rig.site.target.kill9();
            rig.site.target.restart();
            rig.site.wait_listening();
        }
    }
    // One more crash, and the sidecar goes away: the restarted target must
    // apply every change set it acknowledged on its own.
    std::thread::sleep(Duration::from_millis(200));
    rig.site.target.kill9();
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
    let m = json_of(
        &ferry([
            "failback",
            "web01",
            "--data",
            s(&rig.site.data),
            "--point",
            "r1",
            "--json",
        ]),
        "ferry failback",
    );
    assert_eq!(m["state"], "failed-over", "{m}");
    assert_eq!(m["in_place"], true, "{m}");
    assert_eq!(
        Path::new(m["disks"][0]["file"].as_str().unwrap()),
        rig.image.canonicalize().unwrap()
    );
    let (_, (_, at_r1)) = &rounds[0];
    assert_same(at_r1, &rig.image, "vmdk", "failed back at r1");
    assert_checks(&rig.image, "vmdk", "failed back at r1");
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
    assert_same(at_r1, &rig.image, "vmdk", "committed at r1");
}
