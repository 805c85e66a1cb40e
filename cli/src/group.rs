//! `ferry group point`: a group-consistent point across hosts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use ferry_api::types::{Group, GroupHosts, GroupPoint, GroupPointRequest};
use ferry_filter::group::{group_point, MemberAddr, MemberState, RoundResult};

/// Exit code: the round aborted, no member took the tag.
pub const EXIT_ABORTED: u8 = 1;
/// Exit code: a member could not be reached; nothing was held.
pub const EXIT_NOT_STARTED: u8 = 2;
/// Exit code: some members took the tag and others did not (or may not
/// have): not a group point; use a new name for the next round.
pub const EXIT_PARTIAL: u8 = 3;

/// `ferry group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Take one recovery point across several hosts: every member's writes
    /// are held at one instant (at most --timeout-ms), then each takes the
    /// tag. Exit 0: taken; 1: aborted (a member did not answer in time or
    /// refused; everyone released); 2: a member could not be reached; 3:
    /// partial (use a new name for the next round).
    #[command(
        after_help = "Example (two hosts' filters, by their state directories):\n  \
        ferry group point nightly --member /var/lib/ferry/web01 --member /var/lib/ferry/db01"
    )]
    Point(PointArgs),
    /// Create a replication group on the server (admin).
    #[command(
        after_help = "Example:\n  ferry group create shop --host web01 --host db01 --interval 15m"
    )]
    Create(GroupCreateArgs),
    /// Add hosts to a group.
    Add(GroupAddArgs),
    /// Every group.
    List(crate::server::ListArgs),
    /// One group.
    Show(crate::server::ShowArgs),
    /// Take a group point now through the server's coordinator (the
    /// members' group ports). Exit codes as for `point`.
    #[command(after_help = "Example:\n  ferry group take shop --name before-release")]
    Take(GroupTakeArgs),
    /// A group's rounds, newest first.
    Points(crate::server::ShowArgs),
}

/// `ferry group create`.
#[derive(Debug, Args)]
pub struct GroupCreateArgs {
    /// The group's name.
    name: String,
    /// A member host (repeat; order is the order rounds reach them).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Take a group point this often (30s, 15m, 1h; default: only on
    /// request).
    #[arg(long, value_parser = crate::server::parse_secs)]
    interval: Option<u64>,
    /// Take an app-consistent group point this often (every member
    /// freezes its file systems first: `ferry filter --app-mount`).
    #[arg(long, value_parser = crate::server::parse_secs)]
    app_interval: Option<u64>,
    /// Longest time members' writes stay held in a round, ms.
    #[arg(long, default_value_t = ferry_filter::control::DEFAULT_HOLD_MS)]
    timeout_ms: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: crate::server::Conn,
}

/// `ferry group add`.
#[derive(Debug, Args)]
pub struct GroupAddArgs {
    /// The group.
    name: String,
    /// Hosts to add.
    #[arg(required = true)]
    hosts: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: crate::server::Conn,
}

/// `ferry group take`.
#[derive(Debug, Args)]
pub struct GroupTakeArgs {
    /// The group.
    group: String,
    /// The point's name (default GROUP-MILLISECONDS).
    #[arg(long)]
    name: Option<String>,
    /// App-consistent: every member runs its pre script and freezes its
    /// file systems (`ferry filter --app-mount/--app-pre/--app-post`) first.
    #[arg(long)]
    app: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: crate::server::Conn,
}

/// `ferry group point NAME --member STATE ...`.
#[derive(Debug, Args)]
pub struct PointArgs {
    /// The point's name (the same tag on every member).
    name: String,
    /// A member filter's state directory (its control socket); repeat.
    #[arg(long = "member", required = true)]
    members: Vec<PathBuf>,
    /// Longest time the members' writes stay held, ms.
    #[arg(long, default_value_t = ferry_filter::control::DEFAULT_HOLD_MS)]
    timeout_ms: u64,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// Run `ferry group ...`.
pub fn run(cmd: &GroupCommand) -> Result<ExitCode> {
    match cmd {
        GroupCommand::Point(args) => local_point(args),
        GroupCommand::Create(a) => {
            let g = Group {
                name: a.name.clone(),
                hosts: a.hosts.clone(),
                interval_secs: a.interval,
                timeout_ms: a.timeout_ms,
                app_interval_secs: a.app_interval,
            };
            let g: Group = a.conn.client()?.post("/v1/groups", &g)?;
            print_groups(&[g], a.json)
        }
        GroupCommand::Add(a) => {
            let g: Group = a.conn.client()?.post(
                &format!("/v1/groups/{}/hosts", a.name),
                &GroupHosts {
                    hosts: a.hosts.clone(),
                },
            )?;
            print_groups(&[g], a.json)
        }
        GroupCommand::List(a) => {
            let list: Vec<Group> = a.conn.client()?.get("/v1/groups")?;
            print_groups(&list, a.json)
        }
        GroupCommand::Show(a) => {
            let g: Group = a.conn.client()?.get(&format!("/v1/groups/{}", a.name))?;
            print_groups(&[g], a.json)
        }
        GroupCommand::Take(a) => {
            let p: GroupPoint = a.conn.client()?.post(
                &format!("/v1/groups/{}/points", a.group),
                &GroupPointRequest {
                    name: a.name.clone(),
                    app: a.app,
                },
            )?;
            print_group_points(std::slice::from_ref(&p), a.json)?;
            Ok(match p.result.as_str() {
                "taken" => ExitCode::SUCCESS,
                "aborted" => ExitCode::from(EXIT_ABORTED),
                "partial" => ExitCode::from(EXIT_PARTIAL),
                _ => ExitCode::from(EXIT_NOT_STARTED),
            })
        }
        GroupCommand::Points(a) => {
            let list: Vec<GroupPoint> = a
                .conn
                .client()?
                .get(&format!("/v1/groups/{}/points", a.name))?;
            print_group_points(&list, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_groups(list: &[Group], json: bool) -> Result<ExitCode> {
    if json {
        let v = if list.len() == 1 {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for g in list {
            println!(
                "group {}: {} (every {}, app every {}, hold at most {} ms)",
                g.name,
                if g.hosts.is_empty() {
                    "no hosts".to_owned()
                } else {
                    g.hosts.join(", ")
                },
                g.interval_secs.map_or("-".to_owned(), |s| format!("{s} s")),
                g.app_interval_secs
                    .map_or("-".to_owned(), |s| format!("{s} s")),
                g.timeout_ms
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_group_points(list: &[GroupPoint], json: bool) -> Result<()> {
    if json {
        let v = if list.len() == 1 {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for p in list {
        let error = p
            .members
            .get("error")
            .and_then(|e| e.as_str())
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        println!(
            "{:>5}  {}  {}  {}{}{}",
            p.id,
            crate::server::utc(p.at),
            p.name,
            p.result,
            p.elapsed_us
                .map(|us| format!(", {us} us"))
                .unwrap_or_default(),
            error
        );
    }
    Ok(())
}

fn local_point(args: &PointArgs) -> Result<ExitCode> {
    let timeout =
        Duration::from_millis(args.timeout_ms.clamp(1, ferry_filter::control::MAX_HOLD_MS));
    let members: Vec<MemberAddr> = args
        .members
        .iter()
        .cloned()
        .map(MemberAddr::Local)
        .collect();
    let outcome = match group_point(&args.name, &members, timeout, None) {
        Ok(o) => o,
        Err(e) if args.json => {
            // Nothing was held: say so in the form scripts read.
            let v = serde_json::json!({"name": args.name, "result": "not-started", "error": e.to_string()});
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::from(EXIT_NOT_STARTED));
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        for m in &outcome.members {
            let what = match (m.state, m.tag_seq) {
                (MemberState::Committed, Some(seq)) => format!("tag at seq {seq}"),
                (MemberState::Committed, None) => "tag taken".to_owned(),
                (MemberState::Unknown, _) => {
                    "told to commit, no answer: may hold the tag".to_owned()
                }
                (MemberState::Released, _) => "released without a tag".to_owned(),
            };
            let held = m
                .held_us
                .map(|us| format!(", writes held {us} us"))
                .unwrap_or_default();
            let error = m
                .error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            println!("{}: {what}{held}{error}", m.member);
        }
        println!(
            "group point {}: {:?} ({} us)",
            outcome.name, outcome.result, outcome.elapsed_us
        );
    }
    Ok(match outcome.result {
        RoundResult::Taken => ExitCode::SUCCESS,
        RoundResult::Aborted => ExitCode::from(EXIT_ABORTED),
        RoundResult::Partial => ExitCode::from(EXIT_PARTIAL),
    })
}
