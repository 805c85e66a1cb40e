//! The order gate of one disk: overlapping requests reach the backing
//! device, and the ring, in the order they arrived.
//!
//! `begin` hands out tickets in arrival order and waits until no earlier,
//! unfinished request overlaps the new one. A request records itself in the
//! ring (taking its host-wide sequence number there, under the disk's
//! tracking lock) *before* it calls `finish` and before it is acknowledged.
//! So for overlapping writes the one recorded later is the one left on the
//! device, and non-overlapping writes, which were in flight together, are
//! recorded in completion order: the ring is a valid linearization of
//! acknowledged writes, without making a fast write wait for a slow,
//! unrelated one.
//!
//! `wait_prior` lets a FLUSH wait until every request that arrived before it
//! has been recorded; `barrier` stops new tickets and waits until every
//! issued one finished: host-wide tags take their sequence number there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A byte range of the disk: the tracking metadata's own type, so ranges
/// pass between the gate, the activity log and the dirty bitmap unchanged.
pub use ferry_ring::meta::Range;

/// Whether two ranges share a byte.
pub fn overlaps(a: &Range, b: &Range) -> bool {
    a.offset < b.offset + b.len && b.offset < a.offset + a.len
}

/// A request's place in the order.
#[derive(Debug)]
#[must_use = "a ticket must be finished, or the disk stalls"]
pub struct Ticket {
    number: u64,
}

#[derive(Debug, Default)]
struct GateState {
    next_ticket: u64,
    /// Issued, unfinished tickets and the range each covers.
    active: BTreeMap<u64, Option<Range>>,
    barrier: bool,
}

/// Host-wide sequence numbers (one space across all disks of the host).
///
/// Numbers are handed out only below `limit`, which the owner raises after
/// it has durably recorded the new limit (so a restart can start above every
/// number ever used). Reaching the limit waits for the owner instead of
/// risking a number that a crash would hand out again.
#[derive(Debug)]
pub struct Sequencer {
    next: AtomicU64,
    limit: AtomicU64,
}

impl Sequencer {
    /// Hand out numbers from `first`, below `limit`.
    pub fn new(first: u64, limit: u64) -> Arc<Self> {
        Arc::new(Sequencer {
            next: AtomicU64::new(first),
            limit: AtomicU64::new(limit),
        })
    }

    /// The next number (waits while the durable reservation lags behind).
    pub fn next(&self) -> u64 {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        while n >= self.limit.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        n
    }

    /// The number the next call to `next` returns.
    pub fn peek(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Raise the limit (the caller has made `limit` durable).
    pub fn raise_limit(&self, limit: u64) {
        self.limit.fetch_max(limit, Ordering::SeqCst);
    }
}

/// The order gate of one disk.
#[derive(Debug, Default)]
pub struct OrderGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl OrderGate {
    /// An open gate.
    pub fn new() -> Self {
        OrderGate::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().expect("order gate lock")
    }

    /// Take a place in the order; returns once no earlier unfinished request
    /// overlaps `range` (None: no range, e.g. a flush).
    pub fn begin(&self, range: Option<Range>) -> Ticket {
        let mut state = self.lock();
        while state.barrier {
            state = self.changed.wait(state).expect("order gate lock");
        }
        let number = state.next_ticket;
        state.next_ticket += 1;
        state.active.insert(number, range);
        if let Some(range) = range {
            while state
                .active
                .range(..number)
                .any(|(_, r)| r.is_some_and(|r| overlaps(&r, &range)))
            {
                state = self.changed.wait(state).expect("order gate lock");
            }
        }
        Ticket { number }
    }

    /// Wait until every request that arrived before `ticket` has finished.
    pub fn wait_prior(&self, ticket: &Ticket) {
        let mut state = self.lock();
        while state.active.range(..ticket.number).next().is_some() {
            state = self.changed.wait(state).expect("order gate lock");
        }
    }

    /// The request is recorded (or abandoned): later overlapping ones may go.
    pub fn finish(&self, ticket: Ticket) {
        self.lock().active.remove(&ticket.number);
        self.changed.notify_all();
    }

    /// Stop new tickets and wait until every issued ticket has finished.
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

    /// Unfinished tickets (requests in flight).
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
    fn sequence_numbers_are_unique_and_increasing() {
        let seq = Sequencer::new(100, 1000);
        assert_eq!((seq.next(), seq.next(), seq.peek()), (100, 101, 102));
    }

    #[test]
    fn sequence_numbers_wait_for_the_durable_limit() {
        let seq = Sequencer::new(5, 6);
        assert_eq!(seq.next(), 5);
        let s = Arc::clone(&seq);
        let waiter = std::thread::spawn(move || s.next());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "6 is not reserved yet");
        seq.raise_limit(100);
        assert_eq!(waiter.join().unwrap(), 6);
    }

    #[test]
    fn overlapping_request_waits_for_the_earlier_one() {
        let gate = Arc::new(OrderGate::new());
        let log = Arc::new(StdMutex::new(Vec::new()));
        let first = gate.begin(r(0, 4096));
        let (g, l) = (Arc::clone(&gate), Arc::clone(&log));
        let second = std::thread::spawn(move || {
            let t = g.begin(r(2048, 4096));
            l.lock().unwrap().push("second began");
            g.finish(t);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            log.lock().unwrap().is_empty(),
            "second must wait for the overlap"
        );
        log.lock().unwrap().push("first recorded");
        gate.finish(first);
        second.join().unwrap();
        assert_eq!(*log.lock().unwrap(), ["first recorded", "second began"]);
    }

    #[test]
    fn disjoint_requests_finish_in_any_order() {
        let gate = OrderGate::new();
        let first = gate.begin(r(0, 10));
        let second = gate.begin(r(100, 10)); // does not wait
        gate.finish(second); // nor does it wait to finish
        assert_eq!(gate.in_flight(), 1);
        gate.finish(first);
    }

    #[test]
    fn flush_waits_for_everything_before_it_only() {
        let gate = Arc::new(OrderGate::new());
        let write = gate.begin(r(0, 10));
        let flush = gate.begin(None);
        let later = gate.begin(r(50, 10));
        let g = Arc::clone(&gate);
        let waiter = std::thread::spawn(move || {
            g.wait_prior(&flush);
            g.finish(flush);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "the earlier write is unfinished");
        gate.finish(write);
        waiter.join().unwrap(); // `later` did not hold it up
        gate.finish(later);
    }

    #[test]
    fn barrier_waits_for_in_flight_and_blocks_new_tickets() {
        let gate = Arc::new(OrderGate::new());
        let t = gate.begin(r(0, 1));
        let g = Arc::clone(&gate);
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            g.finish(t);
        });
        let barrier = gate.barrier();
        assert_eq!(gate.in_flight(), 0);
        finisher.join().unwrap();
        let g = Arc::clone(&gate);
        let late = std::thread::spawn(move || {
            let t = g.begin(None);
            g.finish(t);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!late.is_finished(), "no tickets behind a barrier");
        drop(barrier);
        late.join().unwrap();
    }

    #[test]
    fn random_concurrent_writes_leave_the_last_recorded_value() {
        // Threads write overlapping ranges of a tiny "disk" and record
        // themselves (taking a sequence number) before finishing. Replaying
        // the records in sequence order must give the disk's final content.
        let gate = Arc::new(OrderGate::new());
        let seq = Sequencer::new(1, u64::MAX);
        let disk = Arc::new(StdMutex::new(vec![0u64; 64]));
        let records = Arc::new(StdMutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let (gate, disk, records, seq) = (&gate, &disk, &records, &seq);
                s.spawn(move || {
                    let mut x = t + 1;
                    for i in 0..300u64 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let off = (x >> 33) % 60;
                        let len = 1 + (x >> 50) % 4;
                        let ticket = gate.begin(r(off, len));
                        let value = t * 1000 + i + 1;
                        {
                            let mut d = disk.lock().unwrap();
                            for c in off..off + len {
                                d[usize::try_from(c).unwrap()] = value;
                            }
                        }
                        std::thread::yield_now();
                        {
                            let mut recs = records.lock().unwrap();
                            recs.push((seq.next(), off, len, value));
                        }
                        gate.finish(ticket);
                    }
                });
            }
        });
        let mut records = records.lock().unwrap().clone();
        records.sort_unstable();
        let mut replay = vec![0u64; 64];
        for &(_, off, len, value) in &records {
            for c in off..off + len {
                replay[usize::try_from(c).unwrap()] = value;
            }
        }
        assert_eq!(*disk.lock().unwrap(), replay);
    }
}
