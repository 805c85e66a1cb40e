//! `ferry failover`, `ferry commit`, `ferry test-failover [cleanup]`: the
//! operator's verbs on a target's data directory. They run inside the
//! running `ferry target` (through `DATA/control.sock`); with no target
//! running, in this process on the locked data directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_master_target::control::{self, Request};
use ferry_master_target::daemon;
use ferry_master_target::failover::{Manifest, TestFailover};
use ferry_master_target::site::Site;

/// Run `req` in the target that owns `data`, or here if none runs.
pub(crate) fn run(
    data: &Path,
    credentials: Option<&Path>,
    req: &Request,
) -> Result<serde_json::Value> {
    let mut progress = |m: &str| eprintln!("{m}");
    if let Some(v) = control::call(data, req, &mut progress)? {
        return Ok(v);
    }
    if daemon::is_running(data) {
        bail!(
            "a ferry target runs on {} but its control socket does not answer \
             (see its log; stop it to run this verb without it)",
            data.display()
        );
    }
    if !data.join(ferry_master_target::site::HOSTS_DIR).is_dir() {
        bail!("{} is not a target data directory", data.display());
    }
    let _lock = daemon::lock_data_dir(data)?;
    // The options the target ran with: its appliers run here meanwhile
    // (retention included).
    let (recorded, options) = daemon::recorded_target(data);
    let creds = credentials.map(Path::to_path_buf).or(recorded);
    let site = Site::new(
        data,
        options,
        Box::new(move |host, disk| match &creds {
            Some(c) => {
                ferry_protocol::credentials::data_key(c, host, disk).map_err(|e| e.to_string())
            }
            None => Err("no credentials: pass --credentials DIR".into()),
        }),
    )?;
    let outcome = control::execute(&site, req, &mut progress);
    site.shutdown();
    Ok(outcome?)
}

/// `ferry failover HOST --data DIR --point P --format F --out DIR`.
#[derive(Debug, Args)]
#[command(
    after_help = "Points: latest (apply everything received first), latest-processed, \
latest-app, a point name, or a time (UTC, e.g. \"2026-11-26 08:00:00\": the newest point at \
or before it).\n\nExamples:\n  \
    ferry failover web01 --data ./site-b --point latest --format vhd-dynamic --out ./dr/web01\n  \
    ferry failover web01 --data ./site-b --point latest-app --format vmdk-stream --out ./dr/web01\n  \
    ferry failover web01 --data ./site-b --point before-upgrade --change-point\n  \
    ferry commit web01 --data ./site-b"
)]
pub struct FailoverArgs {
    /// The protected host.
    #[arg(required_unless_present = "group")]
    host: Option<String>,
    /// Fail every host of this replication group over at one group point
    /// (--point latest-group or a group point's name), through the server.
    #[arg(long, conflicts_with_all = ["host", "data"])]
    group: Option<String>,
    /// Data directory of the target (without it: through the control-plane
    /// server, as a job on the host's target; --out is then a path there).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// Recovery point.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Image format: raw, vhd-fixed, vhd-dynamic, vmdk-sparse, vmdk-flat, vmdk-stream
    /// (default vhd-dynamic; with --change-point, the failover's).
    #[arg(long)]
    format: Option<String>,
    /// Output directory for the images and manifest.json (with
    /// --change-point, default the failover's).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the images of a failed-over host by images at another point
    /// (before `ferry commit`).
    #[arg(long)]
    change_point: bool,
    /// Skip the SHA-256 of each image in the manifest.
    #[arg(long)]
    no_checksum: bool,
    /// Credentials directory (only when no target runs; default: the one
    /// the target was last started with).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_failover(args: &FailoverArgs) -> Result<ExitCode> {
    if let Some(group) = &args.group {
        let point = if args.point == "latest" {
            "latest-group"
        } else {
            args.point.as_str()
        };
        let body = ferry_api::types::GroupFailoverRequest {
            point: point.to_owned(),
            format: args.format.clone(),
            test: false,
        };
        let results = crate::server::group_job(&args.conn, group, &body, !args.json)?;
        for v in results {
            show_manifest(v, args.json)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let host = args.host.clone().context("give HOST or --group")?;
    let Some(data) = &args.data else {
        let body = ferry_api::types::FailoverJobRequest {
            point: args.point.clone(),
            format: args.format.clone(),
            out: args.out.as_ref().map(|o| o.to_string_lossy().into_owned()),
            change_point: args.change_point,
            checksums: !args.no_checksum,
        };
        let v = crate::server::host_job(&args.conn, &host, "failover", &body, !args.json)?;
        return show_manifest(v, args.json);
    };
    let previous = ferry_master_target::failover::failover_state(data, &host)?;
    let from_previous = |pick: fn(&Manifest) -> Option<String>| {
        if args.change_point {
            previous.as_ref().and_then(pick)
        } else {
            None
        }
    };
    let format = args
        .format
        .clone()
        .or_else(|| from_previous(|m| m.disks.first().map(|d| d.format.clone())))
        .unwrap_or_else(|| "vhd-dynamic".into());
    let out = match args.out.clone().or_else(|| {
        from_previous(|m| Some(m.out.to_string_lossy().into_owned())).map(PathBuf::from)
    }) {
        Some(o) => o,
        None => bail!("--out DIR is required"),
    };
    let out = absolute(&out)?;
    let req = Request::Failover {
        host: host.clone(),
        point: args.point.clone(),
        format,
        out,
        change_point: args.change_point,
        checksums: !args.no_checksum,
    };
    let v = run(data, args.credentials.as_deref(), &req)?;
    show_manifest(v, args.json)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("absolute path of {}", p.display()))
}

/// Print a verb's manifest: JSON as it came, or for people.
pub(crate) fn show_manifest(v: serde_json::Value, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_manifest(&serde_json::from_value(v)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_manifest(m: &Manifest) -> Result<()> {
    println!("host      {}", m.host);
    println!(
        "state     {}",
        serde_json::to_value(m.state)?.as_str().unwrap_or("?")
    );
    println!("point     {}", m.point.describe());
    if let Some(n) = &m.point.note {
        println!("note      {n}");
    }
    for d in &m.disks {
        println!(
            "disk      {}: {} ({}, {} bytes, {} rewound){}",
            d.disk,
            d.file.display(),
            d.format,
            d.size,
            d.rewound_bytes,
            d.sha256
                .as_ref()
                .map(|s| format!(" sha256 {s}"))
                .unwrap_or_default()
        );
    }
    if m.in_place {
        println!("in place  the images are the replicas, rewound to the point");
    } else {
        println!("manifest  {}", m.out.join("manifest.json").display());
    }
    Ok(())
}

/// `ferry commit HOST --data DIR`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ferry commit web01 --data ./site-b")]
pub struct CommitArgs {
    /// The failed-over host.
    host: String,
    /// Data directory of the target (without it: through the server).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// Credentials directory (only when no target runs).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_commit(args: &CommitArgs) -> Result<ExitCode> {
    let Some(data) = &args.data else {
        let v = crate::server::host_job(
            &args.conn,
            &args.host,
            "commit",
            &serde_json::json!({}),
            !args.json,
        )?;
        return show_manifest(v, args.json);
    };
    let req = Request::Commit {
        host: args.host.clone(),
    };
    let v = run(data, args.credentials.as_deref(), &req)?;
    show_manifest(v, args.json)
}

/// `ferry test-failover HOST --data DIR --point P --out DIR`, and
/// `ferry test-failover cleanup HOST --data DIR`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Each disk becomes DISK.vhd, a writable differencing VHD over DISK.base.vhd \
(read-only, the disk at the point). Replication goes on meanwhile.\n\nExamples:\n  \
    ferry test-failover web01 --data ./site-b --point latest-app --out ./drill\n  \
    ferry test-failover cleanup web01 --data ./site-b"
)]
pub struct TestFailoverArgs {
    #[command(subcommand)]
    action: Option<TestFailoverAction>,
    /// The protected host.
    #[arg(required_unless_present = "group")]
    host: Option<String>,
    /// Test every host of this replication group at one group point
    /// (--point latest-group or a group point's name), through the server.
    #[arg(long, conflicts_with_all = ["host", "data"])]
    group: Option<String>,
    /// Data directory of the target (without it: through the server).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Recovery point (as for `ferry failover`; `latest` does not wait for
    /// the backlog).
    #[arg(long, default_value = "latest-processed")]
    point: String,
    /// Output directory (required with --data; through the server, a path
    /// on the target, default DATA/test-failover/HOST).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// Credentials directory (only when no target runs).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TestFailoverAction {
    /// Remove a host's test-failover images; the target is left as it was.
    Cleanup {
        /// The host.
        host: String,
        /// Data directory of the target (without it: through the server).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run_test_failover(args: &TestFailoverArgs) -> Result<ExitCode> {
    let point = if args.point == "latest" {
        "latest-processed".to_owned()
    } else {
        args.point.clone()
    };
    let (data, v, json) = match &args.action {
        Some(TestFailoverAction::Cleanup {
            host,
            data: None,
            json,
        }) => {
            let v = crate::server::host_job(
                &args.conn,
                host,
                "test-failover-cleanup",
                &serde_json::json!({}),
                !json,
            )?;
            (None, v, *json)
        }
        Some(TestFailoverAction::Cleanup {
            host,
            data: Some(data),
            json,
        }) => {
            let req = Request::TestFailoverCleanup { host: host.clone() };
            (
                Some(data.clone()),
                run(data, args.credentials.as_deref(), &req)?,
                *json,
            )
        }
        None if args.group.is_some() => {
            let group = args.group.as_deref().unwrap_or_default();
            let point = if args.point == "latest-processed" {
                "latest-group".to_owned()
            } else {
                point
            };
            let body = ferry_api::types::GroupFailoverRequest {
                point,
                format: None,
                test: true,
            };
            let results = crate::server::group_job(&args.conn, group, &body, !args.json)?;
            for v in results {
                print_test_failover(v, None, false, args.json)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => {
            let Some(host) = &args.host else {
                bail!("HOST is required");
            };
            match &args.data {
                None => {
                    let body = ferry_api::types::TestFailoverJobRequest {
                        point,
                        out: args.out.as_ref().map(|o| o.to_string_lossy().into_owned()),
                    };
                    let v = crate::server::host_job(
                        &args.conn,
                        host,
                        "test-failover",
                        &body,
                        !args.json,
                    )?;
                    (None, v, args.json)
                }
                Some(data) => {
                    let Some(out) = &args.out else {
                        bail!("--out DIR is required with --data");
                    };
                    let req = Request::TestFailover {
                        host: host.clone(),
                        point,
                        out: absolute(out)?,
                    };
                    (
                        Some(data.clone()),
                        run(data, args.credentials.as_deref(), &req)?,
                        args.json,
                    )
                }
            }
        }
    };
    print_test_failover(v, data.as_deref(), args.action.is_some(), json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a test failover's (or its cleanup's) result.
fn print_test_failover(
    v: serde_json::Value,
    data: Option<&Path>,
    cleanup: bool,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let t: TestFailover = serde_json::from_value(v)?;
    if cleanup {
        println!(
            "test failover of {} at {} removed ({} images)",
            t.host,
            t.point.describe(),
            t.images.len()
        );
        return Ok(());
    }
    println!("host      {}", t.host);
    println!("point     {}", t.point.describe());
    for (base, img) in t.bases.iter().zip(&t.images) {
        println!(
            "disk      {}: {} (writable) over {} (read-only)",
            base.disk,
            img.display(),
            base.file.display()
        );
    }
    match data {
        Some(data) => println!(
            "cleanup   ferry test-failover cleanup {} --data {}",
            t.host,
            data.display()
        ),
        None => println!("cleanup   ferry test-failover cleanup {}", t.host),
    }
    Ok(())
}
