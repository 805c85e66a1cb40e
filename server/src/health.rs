//! Alerts: what the operator should look at, judged from the store's view
//! of hosts, targets and policies at one instant. A pure function of a
//! [`Snapshot`] and the time, so every rule is tested without I/O.
//!
//! | kind | when | severity |
//! |---|---|---|
//! | `rpo-exceeded` | a replicating disk's reported lag is over its policy's RPO threshold | critical |
//! | `no-crash-point` | a protected disk's newest crash-consistent point (at its target) is older than twice the policy's interval (at least [`MIN_POINT_GRACE_SECS`]) | warning |
//! | `no-app-point` | the same for app-consistent points, when the policy takes them | warning |
//! | `resync-required` | a disk's replica is inconsistent until a resync completes | warning |
//! | `heartbeat-lost` | a protected host's filter or sidecar, or a target with protected hosts, silent for [`HEARTBEAT_LOST_SECS`] (or the server's `--heartbeat-timeout`) | critical |
//! | `spool-space-low` | a sidecar's spool over [`SPACE_LOW_PERCENT`] % full | warning |
//! | `journal-space-low` | a target's data file system under 100 - [`SPACE_LOW_PERCENT`] % free | critical |

use std::collections::HashMap;

use ferry_api::types::{
    Alert, Component, Heartbeat, HostInfo, Policy, ProtectionState, TargetInfo,
};

/// A daemon silent this long has lost its heartbeat (daemons beat every 5 s).
pub const HEARTBEAT_LOST_SECS: i64 = 30;
/// Shortest time without a point before an alert (points are periodic:
/// allow a late one).
pub const MIN_POINT_GRACE_SECS: i64 = 120;
/// Space used past this share is "low" (spool full, data file system full).
pub const SPACE_LOW_PERCENT: u64 = 90;

/// What the rules look at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// A daemon silent longer than this has lost its heartbeat (default
    /// [`HEARTBEAT_LOST_SECS`]; `ferry server run --heartbeat-timeout`).
    pub heartbeat_lost_secs: Option<i64>,
    /// Every host with heartbeats and protections.
    pub hosts: Vec<HostInfo>,
    /// Every target with its last heartbeat.
    pub targets: Vec<TargetInfo>,
    /// Every policy.
    pub policies: Vec<Policy>,
}

fn alert(kind: &str, severity: &str, subject: String, message: String) -> Alert {
    Alert {
        kind: kind.to_owned(),
        severity: severity.to_owned(),
        subject,
        message,
    }
}

/// Every alert that holds at `now` (Unix seconds), most severe first.
pub fn alerts(s: &Snapshot, now: i64) -> Vec<Alert> {
    let lost = s.heartbeat_lost_secs.unwrap_or(HEARTBEAT_LOST_SECS);
    let policies: HashMap<&str, &Policy> =
        s.policies.iter().map(|p| (p.name.as_str(), p)).collect();
    let targets: HashMap<&str, &TargetInfo> =
        s.targets.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for h in &s.hosts {
        let active: Vec<_> = h.protections.iter().filter(|p| p.state.ships()).collect();
        if !active.is_empty() {
            heartbeat_alerts(h, now, lost, &mut out);
            spool_alert(h, &mut out);
        }
        for p in active {
            let subject = format!("{}/{}", p.host, p.disk);
            let policy = policies.get(p.policy.as_str());
            if let Some(pol) = policy {
                if p.lag_secs > pol.rpo_alert_secs && p.state != ProtectionState::Enabling {
                    out.push(alert(
                        "rpo-exceeded",
                        "critical",
                        subject.clone(),
                        format!(
                            "lag {} s over the RPO threshold of {} s (policy {})",
                            p.lag_secs, pol.rpo_alert_secs, pol.name
                        ),
                    ));
                }
            }
            if p.state == ProtectionState::ResyncRequired {
                out.push(alert(
                    "resync-required",
                    "warning",
                    subject.clone(),
                    format!(
                        "replica inconsistent until a resync completes ({} bytes to go)",
                        p.resync_bytes
                    ),
                ));
            }
            if p.state == ProtectionState::Protected {
                if let (Some(pol), Some(t)) = (policy, targets.get(p.target.as_str())) {
                    point_alerts(&subject, p.since, pol, t, &p.host, &p.disk, now, &mut out);
                }
            }
        }
    }
    for t in &s.targets {
        let serves: bool = s
            .hosts
            .iter()
            .flat_map(|h| &h.protections)
            .any(|p| p.target == t.name && p.state.ships());
        if !serves {
            continue;
        }
        let subject = format!("target:{}", t.name);
        if let Some(a) = heartbeat_lost(subject.clone(), t.heartbeat.as_ref(), now, lost) {
            out.push(a);
            continue;
        }
        let Some(hb) = &t.heartbeat else { continue };
        let free = hb.status["free_bytes"].as_u64();
        let total = hb.status["total_bytes"].as_u64();
        if let (Some(free), Some(total)) = (free, total) {
            if total > 0 && free.saturating_mul(100) < total.saturating_mul(100 - SPACE_LOW_PERCENT)
            {
                out.push(alert(
                    "journal-space-low",
                    "critical",
                    subject,
                    format!("{free} of {total} bytes free on the target's data file system"),
                ));
            }
        }
    }
    out.sort_by_key(|a| (a.severity != "critical", a.kind.clone(), a.subject.clone()));
    out
}

fn heartbeat_alerts(h: &HostInfo, now: i64, lost: i64, out: &mut Vec<Alert>) {
    for c in [Component::Filter, Component::Sidecar] {
        let last = h.heartbeats.iter().find(|b| b.component == c);
        out.extend(heartbeat_lost(
            format!("{}/{}", h.name, c.as_str()),
            last,
            now,
            lost,
        ));
    }
}

/// `heartbeat-lost` for `subject` if its last heartbeat is older than
/// `lost` seconds or never came.
fn heartbeat_lost(subject: String, last: Option<&Heartbeat>, now: i64, lost: i64) -> Option<Alert> {
    let message = match last {
        Some(b) if now - b.at <= lost => return None,
        Some(b) => format!("no heartbeat for {} s", now - b.at),
        None => "never reported".into(),
    };
    Some(alert("heartbeat-lost", "critical", subject, message))
}

fn spool_alert(h: &HostInfo, out: &mut Vec<Alert>) {
    let Some(sidecar) = h
        .heartbeats
        .iter()
        .find(|b| b.component == Component::Sidecar)
    else {
        return;
    };
    let size = sidecar.status["spool_size"].as_u64().unwrap_or(0);
    let used: u64 = sidecar.status["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["spool_bytes"].as_u64()).sum())
        .unwrap_or(0);
    if size > 0 && used.saturating_mul(100) > size.saturating_mul(SPACE_LOW_PERCENT) {
        out.push(alert(
            "spool-space-low",
            "warning",
            format!("{}/sidecar", h.name),
            format!("spool {used} of {size} bytes used: the target is unreachable or slow"),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn point_alerts(
    subject: &str,
    protected_since: i64,
    pol: &Policy,
    t: &TargetInfo,
    host: &str,
    disk: &str,
    now: i64,
    out: &mut Vec<Alert>,
) {
    let Some(hb) = &t.heartbeat else { return };
    let Some(status) = hb.status["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["host"] == host && d["disk"] == disk))
    else {
        return;
    };
    let secs = |ns: Option<u64>| ns.and_then(|ns| i64::try_from(ns / 1_000_000_000).ok());
    let checks = [
        (
            "no-crash-point",
            "crash-consistent",
            Some(pol.crash_interval_secs),
            secs(status["points"]["last_crash_ns"].as_u64()),
        ),
        (
            "no-app-point",
            "app-consistent",
            pol.app_interval_secs,
            secs(status["points"]["last_app_ns"].as_u64()),
        ),
    ];
    for (kind, what, interval, last) in checks {
        let Some(interval) = interval else { continue };
        let grace = i64::try_from(interval.saturating_mul(2))
            .unwrap_or(i64::MAX)
            .max(MIN_POINT_GRACE_SECS);
        // A newly protected disk gets its grace from the moment it was.
        let reference = last.unwrap_or(0).max(protected_since);
        if now - reference > grace {
            let message = match last {
                Some(l) => format!(
                    "newest {what} point {} s old (policy {}: every {interval} s)",
                    now - l,
                    pol.name
                ),
                None => format!(
                    "no {what} point yet (policy {}: every {interval} s)",
                    pol.name
                ),
            };
            out.push(alert(kind, "warning", subject.to_owned(), message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::types::{Heartbeat, Protection};
    use serde_json::json;

    const NOW: i64 = 1_000_000;

    fn beat(c: Component, age: i64, status: serde_json::Value) -> Heartbeat {
        Heartbeat {
            component: c,
            at: NOW - age,
            status,
        }
    }

    fn snapshot(state: ProtectionState, lag: u64) -> Snapshot {
        let mut policy = Policy::with_defaults("gold");
        policy.rpo_alert_secs = 60;
        policy.crash_interval_secs = 300;
        policy.app_interval_secs = None;
        Snapshot {
            heartbeat_lost_secs: None,
            hosts: vec![HostInfo {
                name: "web01".into(),
                registered_at: 0,
                heartbeats: vec![
                    beat(Component::Filter, 1, json!({})),
                    beat(
                        Component::Sidecar,
                        1,
                        json!({"spool_size": 1000, "disks": [{"spool_bytes": 10}]}),
                    ),
                ],
                disks: vec![],
                protections: vec![Protection {
                    host: "web01".into(),
                    disk: "data".into(),
                    policy: "gold".into(),
                    target: "site-b".into(),
                    state,
                    since: NOW - 10_000,
                    reason: String::new(),
                    lag_secs: lag,
                    resync_bytes: 0,
                }],
            }],
            targets: vec![TargetInfo {
                name: "site-b".into(),
                address: "x:1".into(),
                registered_at: 0,
                heartbeat: Some(beat(
                    Component::Target,
                    2,
                    json!({"free_bytes": 50, "total_bytes": 100, "disks": [
                        {"host": "web01", "disk": "data", "points": {"last_crash_ns": (NOW as u64 - 100) * 1_000_000_000u64}}
                    ]}),
                )),
            }],
            policies: vec![policy],
        }
    }

    fn kinds(s: &Snapshot) -> Vec<String> {
        alerts(s, NOW)
            .into_iter()
            .map(|a| format!("{} {}", a.kind, a.subject))
            .collect()
    }

    #[test]
    fn a_healthy_host_raises_nothing() {
        assert!(kinds(&snapshot(ProtectionState::Protected, 5)).is_empty());
    }

    #[test]
    fn each_rule_fires_on_its_condition() {
        assert_eq!(
            kinds(&snapshot(ProtectionState::Protected, 61)),
            ["rpo-exceeded web01/data"]
        );
        assert_eq!(
            kinds(&snapshot(ProtectionState::ResyncRequired, 0)),
            ["resync-required web01/data"]
        );

        let mut s = snapshot(ProtectionState::Protected, 0);
        s.hosts[0].heartbeats[1].at = NOW - HEARTBEAT_LOST_SECS - 1;
        assert_eq!(kinds(&s), ["heartbeat-lost web01/sidecar"]);
        s.hosts[0].heartbeats.clear();
        assert_eq!(
            kinds(&s),
            [
                "heartbeat-lost web01/filter",
                "heartbeat-lost web01/sidecar"
            ]
        );

        let mut s = snapshot(ProtectionState::Protected, 0);
        s.targets[0].heartbeat.as_mut().unwrap().status["disks"][0]["points"]["last_crash_ns"] =
            json!((NOW as u64 - 601) * 1_000_000_000);
        assert_eq!(kinds(&s), ["no-crash-point web01/data"]);

        let mut s = snapshot(ProtectionState::Protected, 0);
        s.policies[0].app_interval_secs = Some(3600);
        assert_eq!(kinds(&s), ["no-app-point web01/data"]);

        let mut s = snapshot(ProtectionState::Protected, 0);
        s.hosts[0].heartbeats[1].status =
            json!({"spool_size": 1000, "disks": [{"spool_bytes": 950}]});
        assert_eq!(kinds(&s), ["spool-space-low web01/sidecar"]);

        let mut s = snapshot(ProtectionState::Protected, 0);
        s.targets[0].heartbeat.as_mut().unwrap().status["free_bytes"] = json!(5);
        assert_eq!(kinds(&s), ["journal-space-low target:site-b"]);
        s.targets[0].heartbeat = None;
        assert_eq!(kinds(&s), ["heartbeat-lost target:site-b"]);
    }

    #[test]
    fn failed_over_and_new_disks_are_left_alone() {
        let mut s = snapshot(ProtectionState::FailedOver, 10_000);
        s.hosts[0].heartbeats.clear();
        s.targets[0].heartbeat = None;
        assert!(
            kinds(&s).is_empty(),
            "replication stopped: nothing to watch"
        );
        // Just protected: no point yet, still in its grace.
        let mut s = snapshot(ProtectionState::Protected, 0);
        s.hosts[0].protections[0].since = NOW - 30;
        s.targets[0].heartbeat.as_mut().unwrap().status["disks"] = json!([]);
        assert!(kinds(&s).is_empty());
        // An initial sync's lag is no RPO breach yet... once it ships, it is.
        assert!(kinds(&snapshot(ProtectionState::Enabling, 10_000)).is_empty());
        assert_eq!(
            kinds(&snapshot(ProtectionState::InitialSync, 10_000)),
            ["rpo-exceeded web01/data"]
        );
    }

    #[test]
    fn critical_alerts_come_first() {
        let mut s = snapshot(ProtectionState::ResyncRequired, 61);
        s.hosts[0].heartbeats.remove(0);
        let a = alerts(&s, NOW);
        let sev: Vec<_> = a.iter().map(|a| a.severity.as_str()).collect();
        assert_eq!(sev, ["critical", "critical", "warning"]);
    }
}
