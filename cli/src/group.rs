//! `ferry group point`: a group-consistent point across hosts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use ferry_filter::group::{group_point, MemberState, RoundResult};

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
    let outcome = match group_point(&args.name, &args.members, timeout) {
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
            println!("{}: {what}{held}{error}", m.member.display());
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
