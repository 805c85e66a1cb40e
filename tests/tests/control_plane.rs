//! Rig tier: the control plane driving real daemons. A server, a target
//! and a host's filter and sidecar on loopback, each registered with a
//! one-time token and configured by the server alone: protection moves
//! through its lifecycle, and test failover, failover and commit run as
//! jobs on the target, each judged by `qemu-img compare` against a copy of
//! the disk taken at the point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{
    expect_code, free_port, run, wait_until, ControlServer, Daemon, FilterProcess, Scratch,
};
use serde_json::Value;

const DISK: &str = "data";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Server, registered target and host, the host's filter and sidecar.
struct Rig {
    server: ControlServer,
    target: Daemon,
    site: PathBuf,
    filter: FilterProcess,
    sidecar: Daemon,
    disk: PathBuf,
    scratch: Scratch,
}

impl Rig {
    /// Everything up and registered; the disk holds `prefill` MiB of data
    /// (the initial copy) and nothing is protected yet.
    fn up(tag: &str, prefill_mib: u64) -> Rig {
        let scratch = Scratch::new(tag);
        let server = ControlServer::start(&scratch.path(""));
        let site = scratch.path("site");
        let addr = format!("127.0.0.1:{}", free_port());
        server.register("target", "site-b", &site, Some(&addr));
        let target = Daemon::start(
            &["target", "--data", s(&site), "--listen", &addr],
            &scratch.path("target.log"),
        );
        let disk = scratch.path("disk.img");
        expect_code(&run("truncate", ["-s", "64M", s(&disk)]), 0, "truncate");
        if prefill_mib > 0 {
            let count = format!("count={prefill_mib}");
            let of = format!("of={}", s(&disk));
            let args = [
                "if=/dev/urandom",
                of.as_str(),
                "bs=1M",
                count.as_str(),
                "conv=notrunc",
            ];
            expect_code(&run("dd", args), 0, "prefill");
        }
        let filter_dir = scratch.path("filter");
        server.register("host", "web01", &filter_dir.join("state"), None);
        let filter = FilterProcess::start(&filter_dir, &[(DISK, &disk)], &[]);
        let sidecar = Daemon::start(
            &["sidecar", "--state", s(&filter.state)],
            &scratch.path("sidecar.log"),
        );
        Rig {
            server,
            target,
            site,
            filter,
            sidecar,
            disk,
            scratch,
        }
    }

    fn logs(&self) -> String {
        format!(
            "sidecar:\n{}\ntarget:\n{}\nserver:\n{}",
            self.sidecar.log_text(),
            self.target.log_text(),
            self.server.daemon.log_text()
        )
    }

    /// The protection states of web01's disks.
    fn states(&self) -> Vec<String> {
        let out = self.server.cli(&["status", "web01", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v[0]["protections"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| p["state"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every disk is in `state`; returns the states seen on
    /// the way.
    fn wait_state(&self, state: &str, timeout: Duration) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let ok = wait_until(timeout, || {
            let now = self.states();
            if let Some(first) = now.first() {
                if seen.last() != Some(first) {
                    seen.push(first.clone());
                }
            }
            !now.is_empty() && now.iter().all(|s| s == state)
        });
        assert!(ok, "web01 never {state} (seen {seen:?})\n{}", self.logs());
        seen
    }

    /// Writes, tags `name` and keeps a copy of the disk at the tag.
    fn point(&self, name: &str, writes: &[(u64, u64, u8)]) -> PathBuf {
        ferry_tests::qemu_io_writes(&self.filter.uri(DISK), "K", writes);
        let tag = ferry_tests::ferry(["filter", "tag", name, "--state", s(&self.filter.state)]);
        expect_code(&tag, 0, "ferry filter tag");
        let copy = self.scratch.path(&format!("at-{name}.raw"));
        expect_code(
            &run("cp", ["--sparse=always", s(&self.disk), s(&copy)]),
            0,
            "copy",
        );
        let listed = wait_until(Duration::from_secs(60), || {
            let out = ferry_tests::ferry(["points", "web01", "--data", s(&self.site), "--json"]);
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|a| a.iter().any(|p| p["name"] == name))
        });
        assert!(listed, "point {name} reached the target\n{}", self.logs());
        copy
    }

    /// `ferry ARGS --json` through the server, exit 0 expected.
    fn json(&self, args: &[&str]) -> Value {
        self.server.json(args)
    }
}

fn assert_same(raw: &Path, image: &Path, format: &str) {
    let out = ferry_tests::qemu_compare_raw(raw, image, format);
    assert!(
        out.status.success(),
        "{} differs from {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image_of(result: &Value, key: &str) -> PathBuf {
    let d = result[key]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|d| d["disk"] == DISK || d.get("disk").is_none())
        })
        .unwrap_or_else(|| panic!("no disk in {result}"));
    PathBuf::from(d["file"].as_str().or(d.as_str()).expect("file"))
}

#[test]
fn register_protect_sync_drill_fail_over_and_commit_through_the_server() {
    let rig = Rig::up("cp-lifecycle", 24);
    // The filter's heartbeat brings the disk to the server.
    let seen = wait_until(Duration::from_secs(30), || {
        rig.json(&["host", "show", "web01"])["disks"][0]["name"] == DISK
    });
    assert!(seen, "the filter reported its disk\n{}", rig.logs());
    // Unprotected: the sidecar waits, nothing reaches the target.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !rig.site.join("hosts/web01").exists(),
        "nothing shipped before protect"
    );

    // A slow link keeps the initial copy of 24 MiB visible for a while.
    rig.json(&[
        "policy",
        "create",
        "gold",
        "--crash-interval",
        "1h",
        "--app-interval",
        "off",
        "--retention",
        "1h",
        "--bandwidth",
        "3M",
    ]);
    let p = rig.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    assert_eq!(p[0]["state"], "enabling");
    let seen = rig.wait_state("protected", Duration::from_secs(120));
    assert!(
        seen.iter().any(|s| s == "initial-sync"),
        "initial sync seen: {seen:?}"
    );
    let host = rig.json(&["host", "show", "web01"]);
    let components: Vec<_> = host["heartbeats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["component"].clone())
        .collect();
    assert_eq!(components, ["filter", "sidecar"]);
    let targets = rig.json(&["target", "list"]);
    assert!(
        !targets[0]["heartbeat"].is_null(),
        "target heartbeats: {targets}"
    );

    let p1 = rig.point("p1", &[(0, 512, 1), (4096, 1024, 2)]);
    let p2 = rig.point("p2", &[(256, 512, 3), (8192, 2048, 0)]);

    // A drill at p1 while replication goes on.
    let drill = rig.json(&["test-failover", "web01", "--point", "p1"]);
    let base = image_of(&drill, "bases");
    assert_same(&p1, &base, "vhd-dynamic");
    assert_eq!(rig.states(), ["protected"], "a drill changes no state");
    rig.json(&["test-failover", "cleanup", "web01"]);
    assert!(!base.exists(), "drill images removed");

    // Failover to p2 as a raw image, then commit.
    let m = rig.json(&["failover", "web01", "--point", "p2", "--format", "raw"]);
    assert_eq!(m["point"]["name"], "p2");
    assert_same(&p2, &image_of(&m, "disks"), "raw");
    assert_eq!(rig.states(), ["failed-over"]);
    // The sidecar stops shipping once the server says the host failed over.
    let jobs = rig.json(&["job", "list"]);
    let kinds: Vec<_> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["kind"].clone(), j["state"].clone()))
        .collect();
    assert_eq!(
        kinds[0],
        (Value::from("failover"), Value::from("succeeded"))
    );
    let job = rig.json(&["job", "show", &jobs[0]["id"].to_string()]);
    let log: Vec<_> = job["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["line"].as_str())
        .collect();
    assert!(
        log.iter().any(|l| l.contains("stopped")),
        "the target's progress lines are in the job log: {log:?}"
    );
    rig.json(&["commit", "web01"]);
    assert_eq!(rig.states(), ["committed"]);
    // Nothing more is possible but failback.
    let again = rig.server.cli(&["failover", "web01", "--point", "p1"]);
    expect_code(&again, 6, "failover after commit");
    let _ = &rig.target;
}

#[test]
fn a_failed_job_returns_the_disks_where_they_were() {
    let rig = Rig::up("cp-failjob", 0);
    let ok = wait_until(Duration::from_secs(30), || {
        !rig.json(&["host", "show", "web01"])["disks"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert!(ok);
    rig.json(&["policy", "create", "gold", "--app-interval", "off"]);
    rig.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    rig.wait_state("protected", Duration::from_secs(60));
    // A point that does not exist: the job fails on the target, exit 1, the
    // lifecycle goes back to protected and replication continues.
    let out = rig
        .server
        .cli(&["failover", "web01", "--point", "no-such-point"]);
    expect_code(&out, 1, "failover to a missing point");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no point named"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.states(), ["protected"]);
    rig.point("after", &[(0, 64, 7)]);
}

#[test]
fn a_server_restart_in_the_middle_of_a_job_never_leaves_it_stuck() {
    let mut rig = Rig::up("cp-restart", 8);
    let ok = wait_until(Duration::from_secs(30), || {
        !rig.json(&["host", "show", "web01"])["disks"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert!(ok);
    rig.json(&["policy", "create", "gold", "--app-interval", "off"]);
    rig.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    rig.wait_state("protected", Duration::from_secs(60));
    let p1 = rig.point("p1", &[(0, 1024, 4)]);

    // Queue a failover through the API, then kill the server as soon as the
    // target took it (or at once, if it was quicker), and restart it.
    let job = rig.json(&["job", "list"]);
    assert_eq!(job, Value::Array(vec![]));
    let admin = ferry_api::Client::new(
        &rig.server.url,
        &std::fs::read(&rig.server.ca).unwrap(),
        Some(rig.server.admin_token.clone()),
    )
    .unwrap();
    let queued: Value = admin
        .post(
            "/v1/hosts/web01/failover",
            &serde_json::json!({"point": "p1", "format": "raw"}),
        )
        .unwrap();
    let id = queued["id"].as_i64().unwrap();
    wait_until(Duration::from_secs(10), || {
        admin
            .get::<Value>(&format!("/v1/jobs/{id}"))
            .is_ok_and(|j| j["state"] != "queued")
    });
    rig.server.daemon.kill9();
    std::thread::sleep(Duration::from_secs(3));
    rig.server.daemon.restart();
    rig.server.wait_up();
    // The target's result reaches the restarted server.
    let out = rig
        .server
        .cli(&["job", "wait", &id.to_string(), "--timeout", "2m", "--json"]);
    expect_code(&out, 0, "job wait after the restart");
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "succeeded", "{job}\n{}", rig.logs());
    assert_same(&p1, &image_of(&job["result"], "disks"), "raw");
    assert_eq!(rig.states(), ["failed-over"]);
}
