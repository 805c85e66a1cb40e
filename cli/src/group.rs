//! `ferry group point`: a group-consistent point across hosts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use ferry_filter::group::group_point;

/// `ferry group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Take one recovery point across several hosts: every member's writes
    /// are held at one instant (at most --timeout-ms), then each takes the
    /// tag; a member that does not answer in time makes the round abort and
    /// releases everyone (exit 1).
    #[command(
        after_help = "Example (two hosts' filters, by their state directories):\n  \
        ferry group point nightly --member /var/lib/ferry/web01 --member /var/lib/ferry/db01"
    )]
    Point(PointArgs),
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
    let GroupCommand::Point(args) = cmd;
    let timeout =
        Duration::from_millis(args.timeout_ms.clamp(1, ferry_filter::control::MAX_HOLD_MS));
    let outcome = group_point(&args.name, &args.members, timeout)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        for m in &outcome.members {
            match (&m.tag_seq, &m.error) {
                (Some(seq), _) => println!(
                    "{}: tag at seq {seq}, writes held {} us",
                    m.member.display(),
                    m.held_us.unwrap_or(0)
                ),
                (None, Some(e)) => println!("{}: {e}", m.member.display()),
                (None, None) => println!("{}: released without a tag", m.member.display()),
            }
        }
        println!(
            "group point {}: {} ({} us)",
            outcome.name,
            if outcome.committed {
                "taken"
            } else {
                "aborted"
            },
            outcome.elapsed_us
        );
    }
    Ok(if outcome.committed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
