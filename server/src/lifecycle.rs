//! The life of a protected disk: a pure state machine fed by typed events.
//!
//! ```text
//!            report: shipping, inconsistent
//! enabling ------------------------------> initial-sync
//!    |  report: shipping, consistent            | report: consistent
//!    +------------------------------------> protected <------------+
//!                                              |  ^                 |
//!                      report: inconsistent    v  | consistent      |
//!                                        resync-required            |
//!                                              |                    |
//!   failover started (protected or resync-required)                 |
//!                                              v                    |
//!                                      failover-in-progress --------+ failed: back
//!                                              | succeeded             to where it was
//!                                              v
//!                                         failed-over --commit--> committed
//!                                                                 ^ | reprotect
//!                                                  reprotect failed | v
//!                     failed-back <--- failback-in-progress <--- reprotecting
//!                      |  ^  | commit: stays        failback failed: ^
//!                      |  +--+                      back to reprotecting
//!                      | reprotect: forward again (a failed one: back)
//!                      v
//!                   enabling (and on, as a new protection)
//! ```
//!
//! Reports of a sidecar move a disk only while replication runs (enabling,
//! initial-sync, protected, resync-required, reprotecting); once a failover
//! started, the host's sidecar is refused by the target and whatever it
//! still says does not change the record. Every accepted transition returns
//! the new state and a reason; a refused one says why, and the caller
//! answers 409 with it.

use ferry_api::types::ProtectionState as S;

/// What happened to a protected disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The host's sidecar reported the disk.
    Report {
        /// Change sets reach the target.
        shipping: bool,
        /// The replica is consistent.
        consistent: bool,
    },
    /// A failover (or the failover step of a plan) started.
    FailoverStarted,
    /// It finished: the point is exported, replication stopped.
    FailoverSucceeded,
    /// It failed; the target restored replication.
    FailoverFailed,
    /// The failover was committed.
    Committed,
    /// A reprotect was queued: replication back from the recovery site
    /// (from committed), or forward again (from failed-back).
    Reprotect,
    /// The reprotect job failed at its target: nothing changed there.
    ReprotectFailed,
    /// The failback to the original site started.
    FailbackStarted,
    /// It finished.
    FailbackSucceeded,
    /// It failed: back to replicating from the recovery site.
    FailbackFailed,
}

/// An accepted transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The new state (may equal the old one: nothing changed).
    pub to: S,
    /// Why, for the record.
    pub reason: &'static str,
}

/// The state a protected disk is in, with the one it was in before a
/// failover started (where a failed failover returns to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The current state.
    pub state: S,
    /// The state before the running failover (None when none runs).
    pub before_failover: Option<S>,
}

/// Applies `event` to a disk in `record`: the new record and the reason, or
/// why the event is not allowed now.
pub fn apply(record: Record, event: Event) -> Result<(Record, Transition), String> {
    let state = record.state;
    let keep = |reason| Ok((record, Transition { to: state, reason }));
    let go = |to: S, before_failover: Option<S>, reason| {
        Ok((
            Record {
                state: to,
                before_failover,
            },
            Transition { to, reason },
        ))
    };
    match (state, event) {
        (
            S::Enabling,
            Event::Report {
                shipping: false, ..
            },
        ) => keep("not shipping yet"),
        (
            S::Enabling,
            Event::Report {
                consistent: true, ..
            },
        ) => go(S::Protected, None, "shipping, replica consistent"),
        (S::Enabling, Event::Report { .. }) => go(S::InitialSync, None, "initial copy under way"),
        (
            S::InitialSync,
            Event::Report {
                consistent: true, ..
            },
        ) => go(S::Protected, None, "initial copy complete"),
        (
            S::Protected,
            Event::Report {
                consistent: false, ..
            },
        ) => go(
            S::ResyncRequired,
            None,
            "replica inconsistent: resync required",
        ),
        (
            S::ResyncRequired,
            Event::Report {
                consistent: true, ..
            },
        ) => go(S::Protected, None, "resync complete"),
        (S::InitialSync | S::Protected | S::ResyncRequired, Event::Report { .. }) => {
            keep("unchanged")
        }
        (S::Reprotecting, Event::Report { .. }) => keep("replicating back"),
        (
            S::FailoverInProgress
            | S::FailedOver
            | S::Committed
            | S::FailbackInProgress
            | S::FailedBack,
            Event::Report { .. },
        ) => keep("replication stopped: report ignored"),
        (S::Protected | S::ResyncRequired, Event::FailoverStarted) => {
            go(S::FailoverInProgress, Some(state), "failover started")
        }
        (S::FailedOver, Event::FailoverStarted) => go(
            S::FailoverInProgress,
            Some(S::FailedOver),
            "failover to another point started",
        ),
        (S::FailoverInProgress, Event::FailoverSucceeded) => go(S::FailedOver, None, "failed over"),
        (S::FailoverInProgress, Event::FailoverFailed) => go(
            record.before_failover.unwrap_or(S::ResyncRequired),
            None,
            "failover failed: replication restored",
        ),
        (S::FailedOver, Event::Committed) => go(S::Committed, None, "failover committed"),
        (S::Committed, Event::Reprotect) => {
            go(S::Reprotecting, None, "reprotect started: replicating back")
        }
        (S::FailedBack, Event::Reprotect) => go(
            S::Enabling,
            None,
            "forward protection again, from a checksum delta",
        ),
        (S::Reprotecting, Event::ReprotectFailed) => {
            go(S::Committed, None, "reprotect failed: still failed over")
        }
        (S::Enabling, Event::ReprotectFailed) => {
            go(S::FailedBack, None, "reprotect failed: still failed back")
        }
        (S::FailedBack, Event::Committed) => keep("failback committed"),
        (S::Reprotecting, Event::FailbackStarted) => {
            go(S::FailbackInProgress, None, "failback started")
        }
        (S::FailbackInProgress, Event::FailbackSucceeded) => go(S::FailedBack, None, "failed back"),
        (S::FailbackInProgress, Event::FailbackFailed) => {
            go(S::Reprotecting, None, "failback failed: replicating back")
        }
        (from, event) => Err(format!(
            "{} is not possible while the disk is {}",
            event_name(event),
            from.as_str()
        )),
    }
}

/// A readable name of an event.
pub fn event_name(event: Event) -> &'static str {
    match event {
        Event::Report { .. } => "a status report",
        Event::FailoverStarted => "a failover",
        Event::FailoverSucceeded => "finishing a failover",
        Event::FailoverFailed => "failing a failover",
        Event::Committed => "a commit",
        Event::Reprotect => "a reprotect",
        Event::ReprotectFailed => "failing a reprotect",
        Event::FailbackStarted => "a failback",
        Event::FailbackSucceeded => "finishing a failback",
        Event::FailbackFailed => "failing a failback",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn start() -> Record {
        Record {
            state: S::Enabling,
            before_failover: None,
        }
    }

    fn run(events: &[Event]) -> Result<Record, String> {
        events
            .iter()
            .try_fold(start(), |r, e| apply(r, *e).map(|(r, _)| r))
    }

    const SHIP_INCONSISTENT: Event = Event::Report {
        shipping: true,
        consistent: false,
    };
    const SHIP_CONSISTENT: Event = Event::Report {
        shipping: true,
        consistent: true,
    };

    #[test]
    fn the_whole_life() {
        let r = run(&[
            SHIP_INCONSISTENT,
            SHIP_INCONSISTENT,
            SHIP_CONSISTENT,
            SHIP_INCONSISTENT,
            SHIP_CONSISTENT,
            Event::FailoverStarted,
            Event::FailoverSucceeded,
            SHIP_CONSISTENT,
            Event::FailoverStarted,
            Event::FailoverSucceeded,
            Event::Committed,
            Event::Reprotect,
            Event::FailbackStarted,
            Event::FailbackSucceeded,
        ])
        .unwrap();
        assert_eq!(r.state, S::FailedBack);
        // Committed there, then forward again: a new protection's way.
        let (r, _) = apply(r, Event::Committed).unwrap();
        assert_eq!(r.state, S::FailedBack);
        let (r, t) = apply(r, Event::Reprotect).unwrap();
        assert_eq!(r.state, S::Enabling, "{}", t.reason);
        let (r, _) = apply(r, SHIP_CONSISTENT).unwrap();
        assert_eq!(r.state, S::Protected);
    }

    #[test]
    fn a_failed_reprotect_leaves_the_disk_where_it_was() {
        for from in [S::Committed, S::FailedBack] {
            let r = Record {
                state: from,
                before_failover: None,
            };
            let (r, _) = apply(r, Event::Reprotect).unwrap();
            let (r, _) = apply(r, Event::ReprotectFailed).unwrap();
            assert_eq!(r.state, from);
        }
        assert!(apply(start(), Event::Reprotect).is_err());
    }

    #[test]
    fn steps_name_their_states() {
        let (r, t) = apply(start(), SHIP_INCONSISTENT).unwrap();
        assert_eq!(
            (r.state, t.reason),
            (S::InitialSync, "initial copy under way")
        );
        let (r, _) = apply(r, SHIP_CONSISTENT).unwrap();
        assert_eq!(r.state, S::Protected);
        let (r, _) = apply(r, SHIP_INCONSISTENT).unwrap();
        assert_eq!(r.state, S::ResyncRequired);
    }

    #[test]
    fn a_failed_failover_returns_where_it_started() {
        for before in [S::Protected, S::ResyncRequired] {
            let r = Record {
                state: before,
                before_failover: None,
            };
            let (r, _) = apply(r, Event::FailoverStarted).unwrap();
            assert_eq!(r.state, S::FailoverInProgress);
            let (r, _) = apply(r, Event::FailoverFailed).unwrap();
            assert_eq!(r.state, before);
            assert_eq!(r.before_failover, None);
        }
    }

    #[test]
    fn refusals_say_why() {
        let e = apply(start(), Event::FailoverStarted).unwrap_err();
        assert_eq!(e, "a failover is not possible while the disk is enabling");
        let committed = Record {
            state: S::Committed,
            before_failover: None,
        };
        assert!(apply(committed, Event::FailoverStarted).is_err());
        assert!(apply(committed, Event::Committed).is_err());
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (any::<bool>(), any::<bool>()).prop_map(|(shipping, consistent)| Event::Report {
                shipping,
                consistent
            }),
            Just(Event::FailoverStarted),
            Just(Event::FailoverSucceeded),
            Just(Event::FailoverFailed),
            Just(Event::Committed),
            Just(Event::Reprotect),
            Just(Event::ReprotectFailed),
            Just(Event::FailbackStarted),
            Just(Event::FailbackSucceeded),
            Just(Event::FailbackFailed),
        ]
    }

    proptest! {
        /// Whatever arrives in whatever order: a refused event changes
        /// nothing, reports never move a disk out of a failover state, a
        /// disk is never protected without a consistent report since its
        /// last inconsistency, and `before_failover` is set exactly while a
        /// failover runs.
        #[test]
        fn invariants_hold_for_any_event_sequence(events in proptest::collection::vec(any_event(), 0..60)) {
            let mut r = start();
            let mut consistent_since_break = false;
            for e in events {
                match apply(r, e) {
                    Ok((next, t)) => {
                        prop_assert_eq!(next.state, t.to);
                        if let Event::Report { consistent, shipping } = e {
                            let stopped = matches!(r.state, S::FailoverInProgress | S::FailedOver
                                | S::Committed | S::FailbackInProgress | S::FailedBack);
                            if stopped {
                                prop_assert_eq!(next, r);
                            }
                            if r.state == S::Enabling && !shipping {
                                prop_assert_eq!(next.state, S::Enabling);
                            }
                            consistent_since_break = consistent;
                        }
                        if next.state == S::Protected && r.state != S::Protected
                            && r.state != S::FailoverInProgress {
                            prop_assert!(consistent_since_break);
                        }
                        prop_assert_eq!(next.before_failover.is_some(),
                            next.state == S::FailoverInProgress);
                        r = next;
                    }
                    Err(why) => prop_assert!(!why.is_empty()),
                }
            }
        }
    }
}
