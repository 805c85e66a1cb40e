//! Rig tier: the control plane driving real daemons. A server, a target
//! and a host's filter and sidecar on loopback, each registered with a
//! one-time token and configured by the server alone: protection moves
//! through its lifecycle, and test failover, failover and commit run as
//! jobs on the target, each judged by `qemu-img compare` against a copy of
//! the disk taken at the point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::{
    dangling_entries, expect_code, free_port, points_at, run, start_cross_disk, wait_until,
    ControlServer, Daemon, FilterProcess, Scratch,
};
use serde_json::Value;

const DISK: &str = "data";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// More arguments for the rig's daemons.
#[derive(Debug, Default)]
struct Extra {
    server: Vec<String>,
    target: Vec<String>,
    filter: Vec<String>,
    sidecar: Vec<String>,
}

/// Server, registered target and host, the host's filter and sidecar.
struct Rig {
    server: ControlServer,
    target: Daemon,
    site: PathBuf,
    /// web01's filter and sidecar (None for `up_without_host`).
    host: Option<(FilterProcess, Daemon)>,
    disk: PathBuf,
    scratch: Scratch,
}

impl Rig {
    /// Server and registered target only; hosts come with `add_host`.
    fn up_without_host(tag: &str) -> Rig {
        Rig::build(tag, 0, false, &Extra::default())
    }

    /// Everything up and registered; the disk holds `prefill` MiB of data
    /// (the initial copy) and nothing is protected yet.
    fn up(tag: &str, prefill_mib: u64) -> Rig {
        Rig::build(tag, prefill_mib, true, &Extra::default())
    }

    fn build(tag: &str, prefill_mib: u64, with_host: bool, extra: &Extra) -> Rig {
        let scratch = Scratch::new(tag);
        let server_args: Vec<&str> = extra.server.iter().map(String::as_str).collect();
        let server = ControlServer::start_with(&scratch.path(""), &server_args);
        let site = scratch.path("site");
        let addr = format!("127.0.0.1:{}", free_port());
        server.register("target", "site-b", &site, Some(&addr));
        let mut target_args = vec!["target", "--data", s(&site), "--listen", &addr];
        target_args.extend(extra.target.iter().map(String::as_str));
        let target = Daemon::start(&target_args, &scratch.path("target.log"));
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
        let host = with_host.then(|| {
            let filter_dir = scratch.path("filter");
            server.register("host", "web01", &filter_dir.join("state"), None);
            let filter_args: Vec<&str> = extra.filter.iter().map(String::as_str).collect();
            let filter = FilterProcess::start(&filter_dir, &[(DISK, &disk)], &filter_args);
            let mut sidecar_args = vec!["sidecar", "--state", s(&filter.state)];
            sidecar_args.extend(extra.sidecar.iter().map(String::as_str));
            let sidecar = Daemon::start(&sidecar_args, &scratch.path("sidecar.log"));
            (filter, sidecar)
        });
        Rig {
            server,
            target,
            site,
            host,
            disk,
            scratch,
        }
    }

    fn filter(&self) -> &FilterProcess {
        &self.host.as_ref().expect("web01 is up").0
    }

    fn logs(&self) -> String {
        format!(
            "sidecar:\n{}\ntarget:\n{}\nserver:\n{}",
            self.host
                .as_ref()
                .map(|h| h.1.log_text())
                .unwrap_or_default(),
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
        ferry_tests::qemu_io_writes(&self.filter().uri(DISK), "K", writes);
        let tag = ferry_tests::ferry(["filter", "tag", name, "--state", s(&self.filter().state)]);
        expect_code(&tag, 0, "ferry filter tag");
        let copy = self.scratch.path(&format!("at-{name}.raw"));
        expect_code(
            &run("cp", ["--sparse=always", s(&self.disk), s(&copy)]),
            0,
            "copy",
        );
        let listed = wait_until(Duration::from_secs(60), || {
            points_at(&self.site, "web01")
                .iter()
                .any(|p| p["name"] == name)
        });
        assert!(listed, "point {name} reached the target\n{}", self.logs());
        copy
    }

    /// `ferry ARGS --json` through the server, exit 0 expected.
    fn json(&self, args: &[&str]) -> Value {
        self.server.json(args)
    }
}

/// Waits until plan run `id` waits at a manual step.
fn wait_manual(rig: &Rig, id: &str) {
    let waiting = wait_until(Duration::from_secs(60), || {
        let j = rig.json(&["job", "show", id]);
        let lines = j["log"].as_array().cloned().unwrap_or_default();
        // The last "waiting" line is the newest step's.
        lines.last().is_some_and(|l| {
            l["line"]
                .as_str()
                .unwrap_or("")
                .contains("waiting for the operator")
        })
    });
    assert!(
        waiting,
        "plan run {id} waits at a manual step\n{}",
        rig.logs()
    );
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
fn register_protect_sync_then_a_plan_tests_fails_over_and_commit_through_the_server() {
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
    // The points as the target reads them, through the server.
    let listed = rig.json(&["points", "web01"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"p1") && names.contains(&"p2"), "{listed}");

    // A plan: scripts around web01, then a manual step.
    let marks = rig.scratch.path("marks");
    let plan = rig.json(&[
        "plan",
        "create",
        "dr",
        "--step",
        &format!(
            "hosts=web01;pre=echo pre $FERRY_PLAN_MODE >> {0};post=echo post >> {0}",
            s(&marks)
        ),
        "--step",
        "manual=Switch DNS to site B",
    ]);
    assert_eq!(plan["steps"].as_array().map(Vec::len), Some(2));

    // The plan's test at p1 while replication goes on: it stops at the
    // manual step until the operator continues.
    let queued = rig.json(&["plan", "run", "dr", "--test", "--point", "p1", "--no-wait"]);
    let id = queued["id"].to_string();
    wait_manual(&rig, &id);
    assert_eq!(rig.json(&["job", "show", &id])["state"], "running");
    rig.json(&["job", "continue", &id]);
    let out = rig.server.cli(&["job", "wait", &id, "--json"]);
    expect_code(&out, 0, "plan test");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let drill = &run["result"]["steps"][0]["jobs"][0]["result"];
    let base = image_of(drill, "bases");
    assert_same(&p1, &base, "vhd-dynamic");
    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "pre test\npost\n");
    assert_eq!(rig.states(), ["protected"], "a drill changes no state");
    let cleanup = rig.json(&["plan", "run", "dr", "--cleanup", "--no-wait"])["id"].to_string();
    // A manual step waits in cleanup mode too.
    wait_manual(&rig, &cleanup);
    assert!(!base.exists(), "the hosts step ran before the manual step");
    rig.json(&["job", "continue", &cleanup]);
    expect_code(
        &rig.server.cli(&["job", "wait", &cleanup]),
        0,
        "plan cleanup",
    );

    // The plan's failover to p2 as raw images, then commit.
    let queued = rig.json(&[
        "plan",
        "run",
        "dr",
        "--failover",
        "--point",
        "p2",
        "--format",
        "raw",
        "--no-wait",
    ]);
    let id = queued["id"].to_string();
    wait_manual(&rig, &id);
    assert_eq!(
        rig.states(),
        ["failed-over"],
        "failed over before the manual step"
    );
    rig.json(&["job", "continue", &id]);
    let out = rig.server.cli(&["job", "wait", &id, "--json"]);
    expect_code(&out, 0, "plan failover");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &run["result"]["steps"][0]["jobs"][0]["result"];
    assert_eq!(m["point"]["name"], "p2");
    assert_same(&p2, &image_of(m, "disks"), "raw");
    assert_eq!(rig.states(), ["failed-over"]);
    let jobs = rig.json(&["job", "list"]);
    let fo = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "failover")
        .unwrap();
    let job = rig.json(&["job", "show", &fo["id"].to_string()]);
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
    // An output directory outside the target's data directory (and its
    // export roots) is refused by the target: jobs do not write anywhere.
    let elsewhere = rig.scratch.path("elsewhere");
    let out = rig.server.cli(&[
        "failover",
        "web01",
        "--point",
        "latest",
        "--out",
        s(&elsewhere),
    ]);
    expect_code(&out, 1, "failover outside the export roots");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside the data directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!elsewhere.exists());
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
    // With the server away, a sidecar that starts again replicates with
    // the last plan the server gave.
    rig.server.daemon.kill9();
    let sidecar = &mut rig.host.as_mut().unwrap().1;
    sidecar.stop();
    sidecar.restart();
    rig.point("while-away", &[(2048, 256, 9)]);
    rig.server.daemon.restart();
    rig.server.wait_up();
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
    // The target ends the job meanwhile and cannot report it; it restarts
    // too: the result waits on its disk.
    rig.target.stop();
    rig.target.restart();
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

    // A plan run waiting at a manual step survives a restart and goes on
    // where it was: its failover step (a change of point) runs once.
    rig.json(&[
        "plan",
        "create",
        "dr",
        "--step",
        "manual=go",
        "--step",
        "hosts=web01",
    ]);
    let queued = rig.json(&[
        "plan",
        "run",
        "dr",
        "--failover",
        "--point",
        "p1",
        "--format",
        "raw",
        "--no-wait",
    ]);
    let id = queued["id"].to_string();
    wait_manual(&rig, &id);
    rig.server.daemon.kill9();
    rig.server.daemon.restart();
    rig.server.wait_up();
    rig.json(&["job", "continue", &id]);
    let out = rig
        .server
        .cli(&["job", "wait", &id, "--timeout", "2m", "--json"]);
    expect_code(&out, 0, "plan after the restart");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = run["result"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "one failover step: {run}");
    assert_eq!(
        steps[0]["jobs"].as_array().unwrap().len(),
        1,
        "queued once: {run}"
    );
    assert_same(
        &p1,
        &image_of(&steps[0]["jobs"][0]["result"], "disks"),
        "raw",
    );
    let failovers = rig
        .json(&["job", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "failover")
        .count();
    assert_eq!(failovers, 2, "the restart queued nothing twice");
}

/// A second registered host with its own filter (group port on `port`)
/// and sidecar.
fn add_host(rig: &Rig, name: &str, disk_name: &str, port: u16) -> (FilterProcess, Daemon, PathBuf) {
    add_host_with(rig, name, disk_name, port, &[])
}

/// [`add_host`] with more filter arguments.
fn add_host_with(
    rig: &Rig,
    name: &str,
    disk_name: &str,
    port: u16,
    filter_args: &[&str],
) -> (FilterProcess, Daemon, PathBuf) {
    let disk = rig.scratch.path(&format!("{name}.img"));
    expect_code(&run("truncate", ["-s", "64M", s(&disk)]), 0, "truncate");
    let dir = rig.scratch.path(&format!("filter-{name}"));
    rig.server.register("host", name, &dir.join("state"), None);
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--group-listen", listen.as_str()];
    args.extend_from_slice(filter_args);
    let filter = FilterProcess::start(&dir, &[(disk_name, &disk)], &args);
    let sidecar = Daemon::start(
        &["sidecar", "--state", s(&filter.state)],
        &rig.scratch.path(&format!("sidecar-{name}.log")),
    );
    (filter, sidecar, disk)
}

fn wait_disks_reported(rig: &Rig, host: &str) {
    let ok = wait_until(Duration::from_secs(30), || {
        let out = rig.server.cli(&["host", "show", host, "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|v| v["disks"].as_array().is_some_and(|d| !d.is_empty()))
    });
    assert!(ok, "{host} reported its disks\n{}", rig.logs());
}

#[test]
fn group_points_over_the_network_keep_a_dependency_across_two_hosts() {
    // web01 (disk a, index entries) and web02 (disk b, records): two
    // filters on this machine, each with its own group port.
    let rig = Rig::up_without_host("cp-group");
    let (web01, _sc01, _) = add_host(&rig, "web01", "a", free_port());
    let (web02, _sc02, _) = add_host(&rig, "web02", "b", free_port());
    for h in ["web01", "web02"] {
        wait_disks_reported(&rig, h);
    }
    rig.json(&[
        "policy",
        "create",
        "gold",
        "--app-interval",
        "off",
        "--crash-interval",
        "1h",
    ]);
    for h in ["web01", "web02"] {
        rig.json(&["protect", h, "--policy", "gold", "--target", "site-b"]);
    }
    // The record host first: committing in this order tags web02 before
    // web01, which without a working hold could cut between a record and
    // its index entry.
    let g = rig.json(&[
        "group",
        "create",
        "shop",
        "--host",
        "web02",
        "--host",
        "web01",
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(g["hosts"], serde_json::json!(["web02", "web01"]));
    let protected = wait_until(Duration::from_secs(90), || {
        let out = rig.server.cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|hosts| {
            hosts.len() == 2
                && hosts.iter().all(|h| {
                    h["protections"].as_array().is_some_and(|p| {
                        !p.is_empty() && p.iter().all(|p| p["state"] == "protected")
                    })
                })
        })
    });
    assert!(protected, "both hosts protected\n{}", rig.logs());

    let (ctl, _workload) = start_cross_disk(&rig.scratch, &web01.uri("a"), &web02.uri("b"));
    let mut names = Vec::new();
    while !ctl.join("done").exists() && names.len() < 8 {
        let name = format!("grp-{}", names.len() + 1);
        let v = rig.json(&["group", "take", "shop", "--name", &name]);
        assert_eq!(v["result"], "taken", "{v}");
        names.push(name);
    }
    assert!(
        wait_until(Duration::from_secs(120), || ctl.join("done").exists()),
        "workload done"
    );
    let v = rig.json(&["group", "take", "shop", "--name", "grp-end"]);
    assert_eq!(v["result"], "taken", "{v}");
    names.push("grp-end".into());
    // A round's name is used once, and never a point word or a time.
    for taken in ["grp-1", "latest-x", "2026-11-26 08:00"] {
        expect_code(
            &rig.server.cli(&["group", "take", "shop", "--name", taken]),
            6,
            taken,
        );
    }
    let rounds = rig.json(&["group", "points", "shop"]);
    assert_eq!(rounds.as_array().map(Vec::len), Some(names.len()));
    for host in ["web01", "web02"] {
        let listed = wait_until(Duration::from_secs(60), || {
            points_at(&rig.site, host)
                .iter()
                .any(|p| p["name"] == "grp-end")
        });
        assert!(listed, "grp-end reached the target for {host}");
    }

    // The whole group fails over at each group point (the last one by
    // `latest-group`): no index entry on web01 without its record on web02.
    let mut mid_workload = 0;
    for (n, name) in names.iter().enumerate() {
        let point = if n + 1 == names.len() {
            "latest-group"
        } else {
            name.as_str()
        };
        let out = rig.server.cli(&[
            "failover", "--group", "shop", "--point", point, "--format", "raw", "--json",
        ]);
        expect_code(&out, 0, &format!("group failover at {name}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let manifests: Vec<Value> = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map(|v| v.expect("manifest JSON"))
            .collect();
        let image = |host: &str, disk: &str| {
            let m = manifests
                .iter()
                .find(|m| m["host"] == host)
                .expect("manifest of host");
            assert_eq!(m["point"]["name"], name.as_str());
            let d = m["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["disk"] == disk)
                .unwrap();
            std::fs::read(d["file"].as_str().unwrap()).unwrap()
        };
        let (dangling, entries) = dangling_entries(&image("web01", "a"), &image("web02", "b"));
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
}

#[test]
fn a_group_member_that_does_not_answer_aborts_the_round_and_releases_the_others() {
    let rig = Rig::up_without_host("cp-group-abort");
    let (web01, _sc01, _) = add_host(&rig, "web01", "a", free_port());
    wait_disks_reported(&rig, "web01");
    // mute01: a registered host whose group port completes the TLS
    // handshake with its real certificate, then never answers.
    let mute_dir = rig.scratch.path("mute01");
    let mute_token = rig.server.register("host", "mute01", &mute_dir, None);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = listener.local_addr().unwrap().to_string();
    let cfg = ferry_protocol::tls::server_config(&mute_dir.join("credentials"), "mute01").unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for tcp in listener.incoming().flatten() {
            if let Ok(stream) = ferry_protocol::tls::accept(tcp, cfg.clone()) {
                held.push(stream); // keep it open, say nothing
            }
        }
    });
    let mute = ferry_api::Client::new(
        &rig.server.url,
        &std::fs::read(&rig.server.ca).unwrap(),
        Some(mute_token),
    )
    .unwrap();
    let _: Value = mute
        .post(
            "/v1/heartbeat",
            &serde_json::json!({"component": "filter", "status": {"group_listen": mute_addr}}),
        )
        .unwrap();

    rig.json(&[
        "group",
        "create",
        "pair",
        "--host",
        "mute01",
        "--host",
        "web01",
        "--timeout-ms",
        "2000",
    ]);
    let out = rig
        .server
        .cli(&["group", "take", "pair", "--name", "never", "--json"]);
    expect_code(&out, 1, "the round aborts");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "aborted", "{v}");
    let members = v["members"].as_array().unwrap();
    assert!(
        members[0]["error"].is_string(),
        "the mute member is named: {v}"
    );
    assert_eq!(members[1]["state"], "released", "{v}");
    // Released by the coordinator's abort, before its own deadline.
    let held_us = members[1]["held_us"]
        .as_u64()
        .expect("the live member held");
    assert!(held_us < 2_000_000, "released before its deadline: {v}");
    // web01 takes writes again and has no tag of that name.
    ferry_tests::qemu_io_writes(&web01.uri("a"), "K", &[(0, 64, 7)]);
    let tags = std::fs::read_to_string(web01.state.join("tags.jsonl")).unwrap_or_default();
    assert!(!tags.contains("\"never\""), "{tags}");
    // A member without a group port: the round does not start, nobody held.
    let idle = rig.scratch.path("idle01");
    rig.server.register("host", "idle01", &idle, None);
    rig.json(&[
        "group", "create", "lonely", "--host", "idle01", "--host", "web01",
    ]);
    let out = rig.server.cli(&["group", "take", "lonely", "--json"]);
    expect_code(&out, 2, "not started");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["members"]["error"].as_str().unwrap().contains("idle01"),
        "{v}"
    );
}

/// `ferry alerts --json` (exit 0 or 1).
fn alerts(rig: &Rig) -> Value {
    let out = rig.server.cli(&["alerts", "--json"]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("alerts JSON")
}

/// `GET /metrics` of a daemon (plain HTTP).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn alerts_and_metrics_follow_the_daemons() {
    let ports: Vec<String> = (0..4)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let extra = Extra {
        server: vec![
            "--heartbeat-timeout".into(),
            "15s".into(),
            "--metrics-listen".into(),
            ports[0].clone(),
        ],
        target: vec!["--metrics-listen".into(), ports[1].clone()],
        filter: vec!["--metrics-listen".into(), ports[2].clone()],
        sidecar: vec!["--metrics-listen".into(), ports[3].clone()],
    };
    let mut rig = Rig::build("cp-health", 0, true, &extra);
    wait_disks_reported(&rig, "web01");
    rig.json(&[
        "policy",
        "create",
        "gold",
        "--app-interval",
        "off",
        "--rpo",
        "1h",
    ]);
    rig.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    rig.wait_state("protected", Duration::from_secs(60));
    let quiet = wait_until(Duration::from_secs(30), || {
        alerts(&rig) == serde_json::json!([])
    });
    assert!(quiet, "a healthy host raises nothing: {}", alerts(&rig));
    expect_code(&rig.server.cli(&["alerts"]), 0, "no alerts");

    // Every daemon serves its page.
    let page = scrape(&ports[0]);
    assert!(
        page.contains(r#"ferry_protection_state{host="web01",disk="data",state="protected"} 1"#),
        "{page}"
    );
    assert!(page.contains("ferry_heartbeat_age_seconds"), "{page}");
    let page = scrape(&ports[1]);
    assert!(
        page.contains(r#"ferry_target_consistent{host="web01",disk="data"} 1"#),
        "{page}"
    );
    let page = scrape(&ports[2]);
    assert!(
        page.contains(r#"ferry_filter_tracking_state{disk="data",state="data"} 1"#),
        "{page}"
    );
    let page = scrape(&ports[3]);
    assert!(
        page.contains(r#"ferry_sidecar_connected{disk="data"} 1"#),
        "{page}"
    );

    // The sidecar stops: its heartbeat is lost, a critical alert (exit 1),
    // shown by `ferry status` and counted in the server's metrics.
    rig.host.as_mut().unwrap().1.stop();
    let lost = wait_until(Duration::from_secs(30), || {
        alerts(&rig).as_array().is_some_and(|a| {
            a.iter()
                .any(|a| a["kind"] == "heartbeat-lost" && a["subject"] == "web01/sidecar")
        })
    });
    assert!(lost, "heartbeat-lost raised: {}", alerts(&rig));
    expect_code(&rig.server.cli(&["alerts"]), 1, "a critical alert");
    let out = rig.server.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("heartbeat-lost"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        scrape(&ports[0]).contains(r#"ferry_alerts{kind="heartbeat-lost",severity="critical"} 1"#)
    );
    // Back: the alert clears.
    rig.host.as_mut().unwrap().1.restart();
    let cleared = wait_until(Duration::from_secs(30), || {
        alerts(&rig) == serde_json::json!([])
    });
    assert!(cleared, "the alert clears: {}", alerts(&rig));
}

#[test]
fn an_app_group_point_runs_every_members_scripts_around_its_hold() {
    let rig = Rig::up_without_host("cp-group-app");
    let log = rig.scratch.path("app.log");
    let mut hosts = Vec::new();
    for (name, disk) in [("web01", "a"), ("web02", "b")] {
        let pre = format!("echo pre {name} >> {}", s(&log));
        let post = format!("echo post {name} >> {}", s(&log));
        hosts.push(add_host_with(
            &rig,
            name,
            disk,
            free_port(),
            &["--app-pre", &pre, "--app-post", &post],
        ));
        wait_disks_reported(&rig, name);
    }
    rig.json(&[
        "policy",
        "create",
        "gold",
        "--app-interval",
        "off",
        "--crash-interval",
        "1h",
    ]);
    for h in ["web01", "web02"] {
        rig.json(&["protect", h, "--policy", "gold", "--target", "site-b"]);
    }
    rig.json(&[
        "group", "create", "shop", "--host", "web01", "--host", "web02",
    ]);
    let protected = wait_until(Duration::from_secs(90), || {
        let out = rig.server.cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().is_some_and(|hs| {
            hs.len() == 2
                && hs
                    .iter()
                    .all(|h| h["protections"][0]["state"] == "protected")
        })
    });
    assert!(protected, "both protected\n{}", rig.logs());

    let app = rig.json(&["group", "take", "shop", "--app", "--name", "g-app"]);
    assert_eq!(
        (app["result"].as_str(), app["app"].as_bool()),
        (Some("taken"), Some(true)),
        "{app}"
    );
    let crash = rig.json(&["group", "take", "shop", "--name", "g-crash"]);
    assert_eq!(
        (crash["result"].as_str(), crash["app"].as_bool()),
        (Some("taken"), Some(false)),
        "{crash}"
    );
    // Each member ran its own scripts once, around the app round only.
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        ["post web01", "post web02", "pre web01", "pre web02"]
    );
    // The app round's tags are app-consistent points on both hosts.
    for host in ["web01", "web02"] {
        let listed = wait_until(Duration::from_secs(60), || {
            let a = points_at(&rig.site, host);
            a.iter().any(|p| p["name"] == "g-app" && p["app"] == true)
                && a.iter().any(|p| p["name"] == "g-crash")
        });
        assert!(listed, "g-app is an app point of {host}");
    }
    // latest-group-app picks the app round, latest-group the newest.
    let out = rig.server.cli(&[
        "test-failover",
        "--group",
        "shop",
        "--point",
        "latest-group-app",
        "--json",
    ]);
    expect_code(&out, 0, "test failover at latest-group-app");
    let text = String::from_utf8_lossy(&out.stdout);
    let points: Vec<String> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| {
            v.unwrap()["point"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(points, ["g-app", "g-app"]);
    drop(hosts);
}

/// Through the server: failover and commit at site B, reprotect into a
/// stale VMDK at site A (the failback policy, the other target), failback
/// and commit there, then forward protection to site B again; every
/// protection state on the way, the data at each point.
#[test]
fn reprotect_failback_and_forward_again_through_the_server() {
    let rig = Rig::up("cp-failback", 16);
    wait_disks_reported(&rig, "web01");
    rig.json(&[
        "policy",
        "create",
        "gold",
        "--crash-interval",
        "1h",
        "--app-interval",
        "off",
    ]);
    let gold = rig.json(&["policy", "show", "gold-failback"]);
    assert_eq!(gold["rpo_alert_secs"], 900, "{gold}");
    rig.json(&[
        "policy",
        "set",
        "gold-failback",
        "--crash-interval",
        "1h",
        "--app-interval",
        "off",
    ]);
    rig.json(&["protect", "web01", "--policy", "gold", "--target", "site-b"]);
    rig.wait_state("protected", Duration::from_secs(120));
    let p1 = rig.point("p1", &[(0, 512, 1), (4096, 1024, 2)]);
    rig.json(&["failover", "web01", "--point", "p1", "--format", "raw"]);
    rig.json(&["commit", "web01"]);
    assert_eq!(rig.states(), ["committed"]);

    // Site A: a second target; the machine's original disk, stale (as it
    // was at p1), made a sparse VMDK under the target's data directory.
    let site_a = rig.scratch.path("site-a");
    let addr_a = format!("127.0.0.1:{}", free_port());
    rig.server
        .register("target", "site-a", &site_a, Some(&addr_a));
    let _target_a = Daemon::start(
        &["target", "--data", s(&site_a), "--listen", &addr_a],
        &rig.scratch.path("target-a.log"),
    );
    let vmdk = site_a.join("images/web01-data.vmdk");
    std::fs::create_dir_all(vmdk.parent().unwrap()).unwrap();
    let made = ferry_tests::qemu_img(["convert", "-f", "raw", "-O", "vmdk", s(&p1), s(&vmdk)]);
    expect_code(&made, 0, "qemu-img convert");
    // An image outside the data directory and export roots is refused by
    // the target; the host stays committed.
    let outside = rig.scratch.path("elsewhere.vmdk");
    std::fs::copy(&vmdk, &outside).unwrap();
    let image_flag = |p: &Path| format!("{DISK}={}", s(p));
    let refused = rig.server.cli(&[
        "reprotect",
        "web01",
        "--target",
        "site-a",
        "--image",
        &image_flag(&outside),
    ]);
    assert!(
        !refused.status.success(),
        "an image outside the roots was adopted"
    );
    assert_eq!(
        rig.states(),
        ["committed"],
        "a failed reprotect changes nothing"
    );

    // Reprotect: web01 (running where it failed over) ships back into the VMDK.
    let r = rig.json(&[
        "reprotect",
        "web01",
        "--target",
        "site-a",
        "--image",
        &image_flag(&vmdk),
    ]);
    assert_eq!(r["disks"][0]["adopted"], true, "{r}");
    assert_eq!(rig.states(), ["reprotecting"]);
    let p = rig.json(&["status", "web01"]);
    assert_eq!(p[0]["protections"][0]["target"], "site-a", "{p}");
    assert_eq!(p[0]["protections"][0]["policy"], "gold-failback", "{p}");
    ferry_tests::qemu_io_writes(&rig.filter().uri(DISK), "K", &[(1024, 256, 7)]);
    let synced = wait_until(Duration::from_secs(120), || {
        ferry_tests::points_at(&site_a, "web01").iter().any(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("ferry-consistent"))
        })
    });
    assert!(
        synced,
        "the replica at site A became consistent\n{}",
        rig.logs()
    );
    let tag = ferry_tests::ferry(["filter", "tag", "p2", "--state", s(&rig.filter().state)]);
    expect_code(&tag, 0, "tag p2");
    let p2 = rig.scratch.path("at-p2.raw");
    expect_code(
        &run("cp", ["--sparse=always", s(&rig.disk), s(&p2)]),
        0,
        "copy",
    );
    let listed = wait_until(Duration::from_secs(60), || {
        ferry_tests::points_at(&site_a, "web01")
            .iter()
            .any(|p| p["name"] == "p2")
    });
    assert!(listed, "p2 reached site A\n{}", rig.logs());

    // Failback at p2 into the VMDK, commit there.
    let m = rig.json(&["failback", "web01", "--point", "p2"]);
    assert_eq!(m["in_place"], true, "{m}");
    assert_eq!(rig.states(), ["failed-back"]);
    let same = ferry_tests::qemu_img(["compare", "-f", "raw", "-F", "vmdk", s(&p2), s(&vmdk)]);
    assert!(
        same.status.success(),
        "the VMDK is the disk at p2: {}",
        String::from_utf8_lossy(&same.stdout)
    );
    expect_code(
        &ferry_tests::qemu_img(["check", "-f", "vmdk", s(&vmdk)]),
        0,
        "qemu-img check",
    );
    rig.json(&["commit", "web01"]);
    assert_eq!(rig.states(), ["failed-back"]);

    // Forward again: site B compares its replica and takes the delta.
    rig.json(&["reprotect", "web01"]);
    let p = rig.json(&["status", "web01"]);
    assert_eq!(p[0]["protections"][0]["target"], "site-b", "{p}");
    assert_eq!(p[0]["protections"][0]["policy"], "gold", "{p}");
    rig.wait_state("protected", Duration::from_secs(120));
    let p3 = rig.point("p3", &[(2048, 128, 9)]);
    let drill = rig.json(&["test-failover", "web01", "--point", "p3"]);
    assert_same(&p3, &image_of(&drill, "bases"), "vhd-dynamic");
}
