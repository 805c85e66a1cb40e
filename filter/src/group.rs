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
//! holds for at most the timeout from its request whatever the coordinator
//! does (its own deadline; a hang-up aborts), so no member stays blocked.
//! The coordinator counts `held` answers only in the first half of the
//! timeout, so that its commit reaches every member before it lets go. A
//! round is a group point only when every member committed; one that
//! committed on some members only (a member failed to write its tag, or
//! its answer was lost) is reported as partial: take the next round under
//! a new name.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use serde::{Deserialize, Serialize};

use crate::control::{ControlStream, HoldOutcome, Response, SOCKET_NAME, VERSION};
use crate::error::{Error, Result};

/// Extra time allowed for a member's final answer after the commit (its
/// tag log is synced).
const FINISH_SLACK: Duration = Duration::from_secs(10);

/// How a member ended a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// It took the tag.
    Committed,
    /// It released without a tag (or never held).
    Released,
    /// It was told to commit but its answer never came: it may hold the tag.
    Unknown,
}

/// One member's part of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberOutcome {
    /// The member (its state directory, or `HOST@ADDR`).
    pub member: String,
    /// How it ended.
    pub state: MemberState,
    /// The quiet sequence it held at.
    pub held_seq: Option<u64>,
    /// The tag's sequence, when it committed.
    pub tag_seq: Option<u64>,
    /// How long its writes were held, µs.
    pub held_us: Option<u64>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundResult {
    /// Every member took the tag: a group-consistent point.
    Taken,
    /// No member took the tag.
    Aborted,
    /// Some members took the tag (or may have) and others did not: not a
    /// group point. Use a new name for the next round; failing over to
    /// this name would mix rounds.
    Partial,
}

/// What a round did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOutcome {
    /// The point's name.
    pub name: String,
    /// How it ended.
    pub result: RoundResult,
    /// Per member, in the order given.
    pub members: Vec<MemberOutcome>,
    /// From the first hold sent to the last answer, µs.
    pub elapsed_us: u64,
}

/// Where a member is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberAddr {
    /// Its control socket, by state directory (a filter on this machine).
    Local(PathBuf),
    /// Its group port over mutual TLS ([`crate::grouplink`]): host `host`
    /// (whose certificate must name it) at `addr`.
    Remote {
        /// The host's name.
        host: String,
        /// `HOST:PORT` of its group port.
        addr: String,
    },
}

impl std::fmt::Display for MemberAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberAddr::Local(p) => write!(f, "{}", p.display()),
            MemberAddr::Remote { host, addr } => write!(f, "{host}@{addr}"),
        }
    }
}

/// Bound on reaching a remote member (TCP and TLS handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ControlStream for StreamOwned<ClientConnection, TcpStream> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_write_timeout(d)
    }
}

struct Member {
    reader: BufReader<Box<dyn ControlStream + Send>>,
    outcome: MemberOutcome,
}

impl Member {
    fn connect(addr: &MemberAddr, tls: Option<&Arc<ClientConfig>>) -> Result<Member> {
        let stream: Box<dyn ControlStream + Send> = match addr {
            MemberAddr::Local(state) => {
                let path = state.join(SOCKET_NAME);
                Box::new(UnixStream::connect(&path).map_err(|e| {
                    Error::io(e, "connect to a member's control socket").with_path(&path)
                })?)
            }
            MemberAddr::Remote { host, addr } => {
                let tls = tls.ok_or_else(|| {
                    Error::config(format!("member {host} is remote: credentials needed"))
                })?;
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    Error::config(format!("member {host}: not a certificate name: {e}"))
                })?;
                let stream =
                    ferry_protocol::tls::connect_as(addr, name, Arc::clone(tls), CONNECT_TIMEOUT)
                        .map_err(|e| Error::config(format!("reach member {host} at {addr}: {e}")))?;
                Box::new(stream)
            }
        };
        Ok(Member {
            reader: BufReader::new(stream),
            outcome: MemberOutcome {
                member: addr.to_string(),
                state: MemberState::Released,
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
        let writer = self.reader.get_mut();
        let sent = writeln!(writer, "{line}").and_then(|()| writer.flush());
        if let Err(e) = &sent {
            self.outcome.error = Some(format!("send: {e}"));
        }
        sent.is_ok()
    }

    /// The next answer, by `deadline` (one already received counts even
    /// when the deadline has passed).
    fn answer(&mut self, deadline: Instant) -> Option<Response> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
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

/// Waits for every member's `frozen` by `deadline`; false (with the
/// member's error recorded) if one does not say it.
fn all_frozen(conns: &mut [Member], deadline: Instant) -> bool {
    let mut all = true;
    for m in conns.iter_mut() {
        if m.outcome.error.is_some() {
            all = false;
            continue;
        }
        match m.answer(deadline) {
            Some(r) if r.frozen == Some(true) => {}
            Some(_) => {
                m.outcome.error = Some("answered without freezing".into());
                all = false;
            }
            None => all = false,
        }
    }
    all
}

/// Take the group point `name` across the filters whose state directories
/// are `members`, holding their writes for at most `timeout`.
pub fn group_point(
    name: &str,
    members: &[MemberAddr],
    timeout: Duration,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<GroupOutcome> {
    group_round(name, members, timeout, false, tls)
}

/// [`group_point`], app-consistent when `app`: every member runs its pre
/// script and freezes its file systems first (within
/// [`crate::control::APP_PREPARE_MS`]), then holds; thaws and runs its post
/// script after the release.
pub fn group_round(
    name: &str,
    members: &[MemberAddr],
    timeout: Duration,
    app: bool,
    tls: Option<&Arc<ClientConfig>>,
) -> Result<GroupOutcome> {
    if members.is_empty() {
        return Err(Error::control("a group point needs at least one member"));
    }
    // Reach everyone before holding anyone.
    let mut conns = members
        .iter()
        .map(|m| Member::connect(m, tls))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let timeout_ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    for m in &mut conns {
        m.send(
            serde_json::json!({"op": "hold", "name": name, "timeout_ms": timeout_ms, "app": app}),
        );
    }
    // An app round has two phases: every member freezes first (within
    // APP_PREPARE_MS) and says `frozen`; only when all have does anyone
    // hold writes, so a slow pre script never stretches a hold.
    let mut all_held = !app
        || all_frozen(
            &mut conns,
            started + Duration::from_millis(crate::control::APP_PREPARE_MS),
        );
    if app && all_held {
        for m in &mut conns {
            m.send(serde_json::json!({ "op": "proceed" }));
        }
    }
    // Members hold for at most `timeout` from their request (an app
    // member: from `proceed`); the commit must reach every one of them
    // before that, so `held` answers count only in the first half.
    let held_deadline = Instant::now() + timeout / 2;
    if all_held {
        for m in &mut conns {
            if m.outcome.error.is_some() {
                all_held = false;
                continue;
            }
            match m.answer(held_deadline).and_then(|r| r.held) {
                Some(seq) => m.outcome.held_seq = Some(seq),
                None => all_held = false,
            }
        }
    }
    let verdict = if all_held { "commit" } else { "abort" };
    // Everyone gets the verdict: a member that holds late reads `abort` as
    // soon as it is quiet.
    for m in &mut conns {
        m.send(serde_json::json!({ "op": verdict }));
    }
    // A member answers once its tag is durable (an app member has thawed
    // too; its post script runs after the answer).
    let finish = Instant::now() + FINISH_SLACK;
    for m in &mut conns {
        if m.outcome.held_seq.is_none() {
            continue; // released by the abort or by the hang-up below
        }
        match m.answer(finish).and_then(|r| r.hold) {
            Some(HoldOutcome {
                committed: true,
                tag,
                held_us,
                ..
            }) => {
                m.outcome.held_us = Some(held_us);
                m.outcome.tag_seq = tag.map(|t| t.seq);
                m.outcome.state = MemberState::Committed;
            }
            Some(HoldOutcome { held_us, .. }) => {
                m.outcome.held_us = Some(held_us);
                if all_held {
                    m.outcome.error = Some("the member's hold expired before the commit".into());
                }
            }
            None if all_held => m.outcome.state = MemberState::Unknown,
            None => {}
        }
    }
    let committed = conns
        .iter()
        .filter(|m| m.outcome.state != MemberState::Released)
        .count();
    let result = match committed {
        0 => RoundResult::Aborted,
        n if n == conns.len()
            && conns
                .iter()
                .all(|m| m.outcome.state == MemberState::Committed) =>
        {
            RoundResult::Taken
        }
        _ => RoundResult::Partial,
    };
    let outcome = GroupOutcome {
        name: name.to_owned(),
        result,
        members: conns.into_iter().map(|m| m.outcome).collect(),
        elapsed_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    };
    if outcome.result != RoundResult::Taken {
        let why: Vec<String> = outcome
            .members
            .iter()
            .filter_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.member)))
            .collect();
        tracing::warn!(name, result = ?outcome.result, reasons = ?why, "group point not taken");
    }
    Ok(outcome)
}
