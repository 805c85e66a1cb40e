//! The group coordinator: rounds of group-consistent points across a
//! group's hosts, run by the server over their group ports (see
//! `ferry_filter::group` for the round and `ferry_filter::grouplink` for
//! the port), on request or on the group's schedule, each recorded.
//!
//! The server's certificate (`ferry-server`, issued with client use) is the
//! coordinator's identity; every member's certificate must name the member.
//! One round per group at a time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::types::{Group, GroupPoint};
use ferry_filter::group::{group_round, MemberAddr, RoundResult};
use serde_json::json;

use crate::db::{now, Store};
use crate::error::{Error, ErrorKind, Result};

/// Rounds of groups, one at a time per group.
#[derive(Debug)]
pub struct Coordinator {
    tls: Arc<rustls::ClientConfig>,
    busy: Mutex<HashSet<String>>,
}

impl Coordinator {
    /// A coordinator presenting the server's certificate from `credentials`.
    pub fn new(credentials: &std::path::Path, cert_name: &str) -> Result<Coordinator> {
        let tls = ferry_protocol::tls::client_config(credentials, cert_name)?;
        Ok(Coordinator {
            tls,
            busy: Mutex::new(HashSet::new()),
        })
    }

    /// Takes a group point of `group` now (named `name`, or
    /// `GROUP-MILLISECONDS`) and records the round, whatever its result.
    pub fn take(
        &self,
        store: &Store,
        group: &str,
        name: Option<String>,
        app: bool,
    ) -> Result<GroupPoint> {
        let g = store.group(group)?;
        if g.hosts.is_empty() {
            return Err(Error::new(
                ErrorKind::Conflict,
                "group point",
                format!("group {group} has no hosts"),
            ));
        }
        let name = name.unwrap_or_else(|| default_name(group));
        check_point_name(&name)?;
        let _turn = self.turn(group)?;
        if store
            .group_points(group, 100_000)?
            .iter()
            .any(|p| p.name == name)
        {
            // The targets take the newest tag of a name: a second round of
            // one name could mix rounds across hosts.
            return Err(Error::new(
                ErrorKind::Conflict,
                "group point",
                format!("group {group} had a round named {name:?}: every round needs a new name"),
            ));
        }
        let point = match members(store, &g) {
            Err(why) => not_started(&g, &name, app, &why),
            Ok(addrs) => {
                let timeout = Duration::from_millis(
                    g.timeout_ms.clamp(1, ferry_filter::control::MAX_HOLD_MS),
                );
                match group_round(&name, &addrs, timeout, app, Some(&self.tls)) {
                    Ok(o) => GroupPoint {
                        id: 0,
                        app,
                        group: g.name.clone(),
                        name: name.clone(),
                        result: match o.result {
                            RoundResult::Taken => "taken",
                            RoundResult::Aborted => "aborted",
                            RoundResult::Partial => "partial",
                        }
                        .to_owned(),
                        at: now(),
                        elapsed_us: Some(o.elapsed_us),
                        members: serde_json::to_value(&o.members).unwrap_or_default(),
                    },
                    Err(e) => not_started(&g, &name, app, &e.to_string()),
                }
            }
        };
        tracing::info!(group, name = %point.name, result = %point.result, "group round");
        store.add_group_point(&point)
    }

    /// Marks `group` busy until the guard drops; a second round meanwhile
    /// is a conflict.
    fn turn(&self, group: &str) -> Result<Turn<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(group.to_owned()) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "group point",
                format!("a round of {group} is running"),
            ));
        }
        Ok(Turn {
            coordinator: self,
            group: group.to_owned(),
        })
    }
}

struct Turn<'a> {
    coordinator: &'a Coordinator,
    group: String,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .coordinator
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.group);
    }
}

/// A point name a target will read as that name: not empty, no line
/// breaks, not one of the point words (`latest...`) and not shaped like a
/// time (`2026-11-26 08:00`), which a failover would read as such.
fn check_point_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::Invalid,
            "group point",
            format!("point name {name:?}: {why}"),
        ))
    };
    if name.is_empty() || name.len() > 128 || name.contains(['\n', '\r', '\0']) {
        return bad("1 to 128 characters without line breaks");
    }
    if name.starts_with("latest") {
        return bad("names starting with \"latest\" are point words");
    }
    let b = name.as_bytes();
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' {
        return bad("a name shaped like a date would be read as a time");
    }
    Ok(())
}

/// The hosts whose tag a taken round holds (its members as recorded, not
/// the group as it is now).
pub fn members_of(point: &GroupPoint) -> Vec<String> {
    point
        .members
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["state"] == "committed")
                .filter_map(|m| m["member"].as_str())
                .map(|m| m.split('@').next().unwrap_or(m).to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `GROUP-MILLISECONDS`: unique per group as rounds are one at a time.
fn default_name(group: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{group}-{ms}")
}

/// Every member's group port, or why a round cannot start.
fn members(store: &Store, g: &Group) -> std::result::Result<Vec<MemberAddr>, String> {
    g.hosts
        .iter()
        .map(|host| match store.group_addr(host) {
            Ok(Some(addr)) => Ok(MemberAddr::Remote {
                host: host.clone(),
                addr,
            }),
            Ok(None) => Err(format!("{host}: its filter has not reported a group port")),
            Err(e) => Err(format!("{host}: {e}")),
        })
        .collect()
}

fn not_started(g: &Group, name: &str, app: bool, why: &str) -> GroupPoint {
    GroupPoint {
        id: 0,
        app,
        group: g.name.clone(),
        name: name.to_owned(),
        result: "not-started".to_owned(),
        at: now(),
        elapsed_us: None,
        members: json!({ "error": why }),
    }
}

/// The group point a failover of `group` at `point` means: the newest
/// taken one for `latest-group`, else the taken one named `point`.
pub fn resolve(store: &Store, group: &str, point: &str) -> Result<GroupPoint> {
    let rounds = store.group_points(group, 10_000)?;
    let found = match point {
        "latest-group" => rounds.into_iter().find(|p| p.result == "taken"),
        "latest-group-app" => rounds.into_iter().find(|p| p.result == "taken" && p.app),
        name => rounds
            .into_iter()
            .find(|p| p.name == name && p.result == "taken"),
    };
    found.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            "resolve group point",
            format!("group {group} has no taken group point {point:?}"),
        )
    })
}

/// Takes the due rounds of scheduled groups (the scheduler calls this every
/// second).
pub fn take_due(coordinator: &Coordinator, store: &Store) {
    let groups = match store.groups() {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "reading groups failed");
            return;
        }
    };
    for g in groups {
        let rounds = store.group_points(&g.name, 10_000).unwrap_or_default();
        for (app, interval) in [(true, g.app_interval_secs), (false, g.interval_secs)] {
            let Some(interval) = interval else { continue };
            // An app round counts as a crash-consistent one too.
            let last = rounds.iter().find(|p| p.app || !app).map_or(0, |p| p.at);
            if now().saturating_sub(last) >= i64::try_from(interval).unwrap_or(i64::MAX) {
                if let Err(e) = coordinator.take(store, &g.name, None, app) {
                    tracing::warn!(group = %g.name, app, error = %e, "scheduled group round not taken");
                }
                break;
            }
        }
    }
}
