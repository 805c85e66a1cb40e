//! The order gate of one disk: where a request gets its place in the write
//! order.
//!
//! `begin` hands out tickets in arrival order and, inside the same critical
//! section, the request's host-wide sequence number. A request that
//! overlaps an earlier, still unpublished one waits for it, so overlapping
//! writes reach the backing device in ticket order. `publish` runs the
//! caller's recording step strictly in ticket order. Together: the ring
//! order is a valid linearization of acknowledged writes, and for
//! overlapping writes the one recorded later is the one left on disk.
//!
//! A request is acknowledged only after its ticket published, so a
//! request's ack may wait for an earlier, slower, non-overlapping one (head
//! of line). That keeps every ring prefix a state the disk really passed
//! through, which is what makes every prefix crash-consistent.
//!
//! `barrier` stops new tickets and waits until every issued one published:
//! the host-wide tag takes its sequence number there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Range {
    /// Whether two ranges share a byte.
    pub fn overlaps(&self, other: &Range) -> bool {
        self.offset < other.offset + other.len && other.offset < self.offset + self.len
    }
}

/// A request's place in the order.
#[derive(Debug)]
#[must_use = "a ticket must be published or abandoned, or the disk stalls"]
pub struct Ticket {
    number: u64,
    /// Host-wide sequence number of the request's record.
    pub seq: u64,
}

#[derive(Debug, Default)]
struct GateState {
    next_ticket: u64,
    next_publish: u64,
    /// Issued, unpublished tickets and the range each covers.
    active: BTreeMap<u64, Option<Range>>,
    barrier: bool,
}

/// Host-wide sequence numbers (one space across all disks of the host).
#[derive(Debug)]
pub struct Sequencer(AtomicU64);

impl Sequencer {
    /// Start handing out numbers at `first`.
    pub fn new(first: u64) -> Arc<Self> {
        Arc::new(Sequencer(AtomicU64::new(first)))
    }

    /// The next number.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }

    /// The number the next call to `next` returns.
    pub fn peek(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The order gate of one disk.
#[derive(Debug)]
pub struct OrderGate {
    state: Mutex<GateState>,
    changed: Condvar,
    sequencer: Arc<Sequencer>,
}

impl OrderGate {
    /// A gate drawing sequence numbers from the host's sequencer.
    pub fn new(sequencer: Arc<Sequencer>) -> Self {
        OrderGate {
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
            sequencer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().expect("order gate lock")
    }

    /// Take a place in the order; returns once no earlier unpublished request
    /// overlaps `range` (None: no range, e.g. a flush).
    pub fn begin(&self, range: Option<Range>) -> Ticket {
        let mut state = self.lock();
        while state.barrier {
            state = self.changed.wait(state).expect("order gate lock");
        }
        let number = state.next_ticket;
        state.next_ticket += 1;
        let seq = self.sequencer.next();
        state.active.insert(number, range);
        if let Some(range) = range {
            while state
                .active
                .range(..number)
                .any(|(_, r)| r.is_some_and(|r| r.overlaps(&range)))
            {
                state = self.changed.wait(state).expect("order gate lock");
            }
        }
        Ticket { number, seq }
    }

    /// A ticket with a sequence number chosen by the caller, who holds a
    /// barrier on this gate (host-wide tags take one number for all disks).
    pub fn begin_at(&self, seq: u64) -> Ticket {
        let mut state = self.lock();
        let number = state.next_ticket;
        state.next_ticket += 1;
        state.active.insert(number, None);
        Ticket { number, seq }
    }

    /// Wait until every earlier ticket has published (this one is next).
    pub fn wait_turn(&self, ticket: &Ticket) {
        let mut state = self.lock();
        while state.next_publish != ticket.number {
            state = self.changed.wait(state).expect("order gate lock");
        }
    }

    /// Run `record` in ticket order (holding the gate), then retire the ticket.
    pub fn publish<T>(&self, ticket: Ticket, record: impl FnOnce() -> T) -> T {
        let mut state = self.lock();
        while state.next_publish != ticket.number {
            state = self.changed.wait(state).expect("order gate lock");
        }
        let out = record();
        state.next_publish += 1;
        state.active.remove(&ticket.number);
        drop(state);
        self.changed.notify_all();
        out
    }

    /// Stop new tickets and wait until every issued ticket has published.
    /// Returns a guard that reopens the gate when dropped.
    pub fn barrier(&self) -> Barrier<'_> {
        let mut state = self.lock();
        while state.barrier {
            state = self.changed.wait(state).expect("order gate lock");
        }
        state.barrier = true;
        while !state.active.is_empty() {
            state = self.changed.wait(state).expect("order gate lock");
        }
        Barrier { gate: self }
    }

    /// Unpublished tickets (requests in flight).
    pub fn in_flight(&self) -> usize {
        self.lock().active.len()
    }
}

/// While alive, the gate issues no tickets.
#[derive(Debug)]
pub struct Barrier<'a> {
    gate: &'a OrderGate,
}

impl Drop for Barrier<'_> {
    fn drop(&mut self) {
        self.gate.lock().barrier = false;
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    fn r(offset: u64, len: u64) -> Option<Range> {
        Some(Range { offset, len })
    }

    #[test]
    fn sequence_numbers_follow_ticket_order_across_gates() {
        let seq = Sequencer::new(100);
        let a = OrderGate::new(Arc::clone(&seq));
        let b = OrderGate::new(Arc::clone(&seq));
        let t1 = a.begin(r(0, 10));
        let t2 = b.begin(r(0, 10));
        let t3 = a.begin(r(20, 10));
        assert_eq!((t1.seq, t2.seq, t3.seq), (100, 101, 102));
        a.publish(t1, || ());
        b.publish(t2, || ());
        a.publish(t3, || ());
    }

    #[test]
    fn overlapping_request_waits_for_the_earlier_one() {
        let gate = Arc::new(OrderGate::new(Sequencer::new(0)));
        let log = Arc::new(StdMutex::new(Vec::new()));
        let first = gate.begin(r(0, 4096));
        let (g, l) = (Arc::clone(&gate), Arc::clone(&log));
        let second = std::thread::spawn(move || {
            let t = g.begin(r(2048, 4096));
            l.lock().unwrap().push("second began");
            g.publish(t, || l.lock().unwrap().push("second published"));
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            log.lock().unwrap().is_empty(),
            "second must wait for the overlap"
        );
        gate.publish(first, || log.lock().unwrap().push("first published"));
        second.join().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["first published", "second began", "second published"]
        );
    }

    #[test]
    fn disjoint_requests_proceed_but_publish_in_order() {
        let gate = Arc::new(OrderGate::new(Sequencer::new(0)));
        let first = gate.begin(r(0, 10));
        let second = gate.begin(r(100, 10)); // does not wait
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (g, l) = (Arc::clone(&gate), Arc::clone(&log));
        let h = std::thread::spawn(move || g.publish(second, || l.lock().unwrap().push(2)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            log.lock().unwrap().is_empty(),
            "publish waits for the earlier ticket"
        );
        gate.publish(first, || log.lock().unwrap().push(1));
        h.join().unwrap();
        assert_eq!(*log.lock().unwrap(), [1, 2]);
    }

    #[test]
    fn barrier_waits_for_in_flight_and_blocks_new_tickets() {
        let gate = Arc::new(OrderGate::new(Sequencer::new(0)));
        let t = gate.begin(r(0, 1));
        let g = Arc::clone(&gate);
        let publisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            g.publish(t, || ());
        });
        let barrier = gate.barrier();
        assert_eq!(gate.in_flight(), 0);
        publisher.join().unwrap();
        let g = Arc::clone(&gate);
        let late = std::thread::spawn(move || {
            let t = g.begin(None);
            g.publish(t, || ());
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!late.is_finished(), "no tickets behind a barrier");
        drop(barrier);
        late.join().unwrap();
    }

    #[test]
    fn random_concurrent_writes_leave_the_last_recorded_value() {
        // Many threads write overlapping ranges of a tiny "disk"; the value
        // left in each cell must be the one of the last record covering it.
        let gate = Arc::new(OrderGate::new(Sequencer::new(1)));
        let disk = Arc::new(StdMutex::new(vec![0u64; 64]));
        let records = Arc::new(StdMutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let (gate, disk, records) = (&gate, &disk, &records);
                s.spawn(move || {
                    let mut x = t + 1;
                    for _ in 0..300 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let off = (x >> 33) % 60;
                        let len = 1 + (x >> 50) % 4;
                        let ticket = gate.begin(r(off, len));
                        let seq = ticket.seq;
                        {
                            let mut d = disk.lock().unwrap();
                            for c in off..off + len {
                                d[usize::try_from(c).unwrap()] = seq;
                            }
                        }
                        std::thread::yield_now();
                        gate.publish(ticket, || records.lock().unwrap().push((seq, off, len)));
                    }
                });
            }
        });
        let records = records.lock().unwrap();
        assert!(
            records.windows(2).all(|w| w[0].0 < w[1].0),
            "ring order is sequence order"
        );
        let mut replay = vec![0u64; 64];
        for &(seq, off, len) in records.iter() {
            for c in off..off + len {
                replay[usize::try_from(c).unwrap()] = seq;
            }
        }
        assert_eq!(*disk.lock().unwrap(), replay);
    }
}
