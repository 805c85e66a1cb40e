//! The tracking state of one disk: data -> metadata -> bitmap and back.
//!
//! Pure state machine fed by typed events, so every transition is testable
//! without I/O. The disk consults [`Tracker::state`] on each write and
//! reports what happened; the housekeeping thread reports ring occupancy.
//!
//! - **Data**: records carry their payload, in write order. Recovery points
//!   are only minted here.
//! - **Metadata**: the payload area is full: records keep offsets only and
//!   the sidecar re-reads the data (write order of contents is lost).
//! - **Bitmap**: record slots are full too: writes only set dirty bits; the
//!   sidecar resyncs those regions.
//!
//! Back to data once the consumer has drained the ring below the low-water
//! marks (half the slots and half the payload area free), so a ring that
//! hovers at the edge does not flap.

use serde::Serialize;

/// The three tracking states of the seed's filter driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Records with payload, in write order.
    Data,
    /// Records without payload.
    Metadata,
    /// Dirty bits only.
    Bitmap,
}

/// Why the state is what it is. Codes go into the ring's state-change records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Reason {
    /// The filter started with an empty ring.
    Started,
    /// A write's payload did not fit in the payload area.
    PayloadFull {
        /// Bytes the write needed.
        needed: u64,
        /// Bytes free at the time.
        free: u64,
    },
    /// No record slot was free.
    RingFull {
        /// Slots in the ring.
        slots: u64,
    },
    /// The consumer drained the ring below the low-water marks.
    Drained,
}

impl Reason {
    /// Code stored in a state-change record's aux field.
    pub fn code(self) -> u32 {
        match self {
            Reason::Started => 0,
            Reason::PayloadFull { .. } => 1,
            Reason::RingFull { .. } => 2,
            Reason::Drained => 3,
        }
    }

    /// One line for humans.
    pub fn describe(self) -> String {
        match self {
            Reason::Started => "started".into(),
            Reason::PayloadFull { needed, free } => {
                format!("payload area full: a write needed {needed} bytes, {free} were free")
            }
            Reason::RingFull { slots } => format!("all {slots} record slots in use"),
            Reason::Drained => "consumer drained the ring".into(),
        }
    }
}

/// What the disk observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A payload reservation failed.
    PayloadFull {
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// Publishing a record failed for want of a slot.
    RingFull {
        /// Slots in the ring.
        slots: u64,
    },
    /// Periodic occupancy report.
    Occupancy {
        /// Free record slots.
        free_slots: u64,
        /// All record slots.
        slots: u64,
        /// Free payload bytes.
        free_payload: u64,
        /// Payload area bytes.
        payload: u64,
    },
}

/// A state change, for logs, status and the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Why.
    pub reason: Reason,
}

/// The tracking state machine of one disk.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: State,
    reason: Reason,
    transitions: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: State::Data,
            reason: Reason::Started,
            transitions: 0,
        }
    }
}

impl Tracker {
    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the current state was entered.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Number of transitions so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Feed an event; returns the transition it caused, if any.
    pub fn on(&mut self, event: Event) -> Option<Transition> {
        let (to, reason) = match (self.state, event) {
            (State::Data, Event::PayloadFull { needed, free }) => {
                (State::Metadata, Reason::PayloadFull { needed, free })
            }
            (State::Data | State::Metadata, Event::RingFull { slots }) => {
                (State::Bitmap, Reason::RingFull { slots })
            }
            (
                State::Metadata | State::Bitmap,
                Event::Occupancy {
                    free_slots,
                    slots,
                    free_payload,
                    payload,
                },
            ) if free_slots * 2 >= slots && free_payload * 2 >= payload => {
                (State::Data, Reason::Drained)
            }
            _ => return None,
        };
        let transition = Transition {
            from: self.state,
            to,
            reason,
        };
        self.state = to;
        self.reason = reason;
        self.transitions += 1;
        Some(transition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: u64 = 1024;
    const PAYLOAD: u64 = 1 << 20;

    fn occupancy(free_slots: u64, free_payload: u64) -> Event {
        Event::Occupancy {
            free_slots,
            slots: SLOTS,
            free_payload,
            payload: PAYLOAD,
        }
    }

    #[test]
    fn overflow_goes_data_metadata_bitmap_and_drains_back() {
        let mut t = Tracker::default();
        assert_eq!(t.state(), State::Data);
        let tr = t
            .on(Event::PayloadFull {
                needed: 4096,
                free: 100,
            })
            .unwrap();
        assert_eq!((tr.from, tr.to), (State::Data, State::Metadata));
        assert_eq!(
            t.on(Event::PayloadFull { needed: 1, free: 0 }),
            None,
            "already there"
        );
        let tr = t.on(Event::RingFull { slots: SLOTS }).unwrap();
        assert_eq!((tr.from, tr.to), (State::Metadata, State::Bitmap));
        assert!(t.reason().describe().contains("1024 record slots"));
        // Not drained enough: stays.
        assert_eq!(t.on(occupancy(SLOTS / 2 - 1, PAYLOAD)), None);
        assert_eq!(t.on(occupancy(SLOTS, PAYLOAD / 2 - 1)), None);
        let tr = t.on(occupancy(SLOTS / 2, PAYLOAD / 2)).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.reason),
            (State::Bitmap, State::Data, Reason::Drained)
        );
        assert_eq!(t.transitions(), 3);
    }

    #[test]
    fn data_state_ignores_occupancy_and_ring_full_skips_metadata() {
        let mut t = Tracker::default();
        assert_eq!(t.on(occupancy(0, 0)), None);
        let tr = t.on(Event::RingFull { slots: SLOTS }).unwrap();
        assert_eq!((tr.from, tr.to), (State::Data, State::Bitmap));
        assert_eq!(
            t.on(Event::PayloadFull { needed: 1, free: 0 }),
            None,
            "bitmap is the floor"
        );
    }

    #[test]
    fn reason_codes_are_distinct() {
        let codes = [
            Reason::Started.code(),
            Reason::PayloadFull { needed: 0, free: 0 }.code(),
            Reason::RingFull { slots: 0 }.code(),
            Reason::Drained.code(),
        ];
        let mut sorted = codes.to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
    }
}
