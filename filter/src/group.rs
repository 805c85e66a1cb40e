//! Group-consistent points across hosts: the coordinator's side.
//!
//! ```text
//! coordinator                      each member filter (control socket)
//!   connect to every member          (a member that cannot be reached: no round)
//!   hold NAME, timeout      ->       every disk's gate held: writes in flight
//!                                    finish, new ones wait
//!                           <-       held SEQ
//!   all held by the deadline?
//!     yes: commit           ->       tag NAME on every disk, release
//!     no:  abort / hang up  ->       release, no tag
//!                           <-       outcome
//! ```
//!
//! Every member's writes are held at one instant (after the last `held`
//! and before the first `commit`), so a write that depends on another
//! host's acknowledged write is in a member's point only if that write is
//! in its host's point: the tags are one cut across the group. A member
//! holds for at most the timeout whatever the coordinator does (its own
//! deadline; a hang-up aborts), so no member stays blocked. A round is a
//! group point only when every member committed; a member that missed the
//! commit (its deadline passed) makes it a partial tag, reported as such.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::control::{HoldOutcome, Response, SOCKET_NAME, VERSION};
use crate::error::{Error, Result};

/// Extra time allowed for a member's final answer after the commit (its
/// tag log is synced).
const FINISH_SLACK: Duration = Duration::from_secs(10);

/// One member's part of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberOutcome {
    /// The member (its state directory).
    pub member: PathBuf,
    /// The quiet sequence it held at.
    pub held_seq: Option<u64>,
    /// The tag's sequence, when it committed.
    pub tag_seq: Option<u64>,
    /// How long its writes were held, µs.
    pub held_us: Option<u64>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// What a round did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOutcome {
    /// The point's name.
    pub name: String,
    /// Every member took the tag: a group-consistent point.
    pub committed: bool,
    /// Per member, in the order given.
    pub members: Vec<MemberOutcome>,
    /// From the first hold sent to the last answer, µs.
    pub elapsed_us: u64,
}

struct Member {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    outcome: MemberOutcome,
}

impl Member {
    fn connect(state: &Path) -> Result<Member> {
        let path = state.join(SOCKET_NAME);
        let stream = UnixStream::connect(&path)
            .map_err(|e| Error::io(e, "connect to a member's control socket").with_path(&path))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io(e, "clone socket"))?;
        Ok(Member {
            writer,
            reader: BufReader::new(stream),
            outcome: MemberOutcome {
                member: state.to_path_buf(),
                held_seq: None,
                tag_seq: None,
                held_us: None,
                error: None,
            },
        })
    }

    fn send(&mut self, body: serde_json::Value) -> bool {
        let mut line = body;
        line["version"] = serde_json::json!(VERSION);
        let sent = writeln!(self.writer, "{line}");
        if let Err(e) = &sent {
            self.outcome.error = Some(format!("send: {e}"));
        }
        sent.is_ok()
    }

    /// The next answer, by `deadline`.
    fn answer(&mut self, deadline: Instant) -> Option<Response> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.outcome.error = Some("no answer before the deadline".into());
            return None;
        }
        let _ = self.reader.get_ref().set_read_timeout(Some(left));
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => {
                self.outcome.error = Some("the member hung up".into());
                None
            }
            Ok(_) => match serde_json::from_str::<Response>(&line) {
                Ok(r) if r.ok => Some(r),
                Ok(r) => {
                    self.outcome.error = r.error.or_else(|| Some("refused".into()));
                    None
                }
                Err(e) => {
                    self.outcome.error = Some(format!("malformed answer: {e}"));
                    None
                }
            },
            Err(e) => {
                self.outcome.error = Some(format!("no answer before the deadline ({e})"));
                None
            }
        }
    }
}

/// Take the group point `name` across the filters whose state directories
/// are `members`, holding their writes for at most `timeout`.
pub fn group_point(name: &str, members: &[PathBuf], timeout: Duration) -> Result<GroupOutcome> {
    if members.is_empty() {
        return Err(Error::control("a group point needs at least one member"));
    }
    // Reach everyone before holding anyone.
    let mut conns = members
        .iter()
        .map(|m| Member::connect(m))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let deadline = started + timeout;
    let timeout_ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    for m in &mut conns {
        m.send(serde_json::json!({"op": "hold", "name": name, "timeout_ms": timeout_ms}));
    }
    let mut all_held = true;
    for m in &mut conns {
        if m.outcome.error.is_some() {
            all_held = false;
            continue;
        }
        match m.answer(deadline).and_then(|r| r.held) {
            Some(seq) => m.outcome.held_seq = Some(seq),
            None => all_held = false,
        }
    }
    let verdict = if all_held { "commit" } else { "abort" };
    for m in &mut conns {
        if m.outcome.held_seq.is_some() {
            m.send(serde_json::json!({ "op": verdict }));
        }
    }
    let finish = Instant::now() + FINISH_SLACK;
    for m in &mut conns {
        if m.outcome.held_seq.is_none() {
            // Not held in time: dropping the connection below makes it
            // abort as soon as it holds (or it already failed).
            continue;
        }
        if let Some(HoldOutcome {
            committed,
            tag,
            held_us,
            ..
        }) = m.answer(finish).and_then(|r| r.hold)
        {
            m.outcome.held_us = Some(held_us);
            if committed {
                m.outcome.tag_seq = tag.map(|t| t.seq);
            } else if all_held {
                m.outcome.error = Some("the member's hold expired before the commit".into());
            }
        }
    }
    let committed = conns.iter().all(|m| m.outcome.tag_seq.is_some());
    let outcome = GroupOutcome {
        name: name.to_owned(),
        committed,
        members: conns.into_iter().map(|m| m.outcome).collect(),
        elapsed_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    };
    if !outcome.committed {
        let why: Vec<String> = outcome
            .members
            .iter()
            .filter_map(|m| {
                m.error
                    .as_ref()
                    .map(|e| format!("{}: {e}", m.member.display()))
            })
            .collect();
        tracing::warn!(name, reasons = ?why, "group point not taken");
    }
    Ok(outcome)
}
