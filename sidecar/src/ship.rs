//! Shipping: seal change sets, send them, commit the ring after the
//! target's durable ack (the transactional drain of the design).
//!
//! [`drain_once`] repeats: build a set ([`Batcher::next_change_set`]), stamp
//! it ([`Stamp`]: a fresh nonce, the consistency claim), seal it
//! ([`pack_change_set`]), send it, and only on
//! an [`Ack`] whose `last_seq` covers the set commit the ring up to
//! [`Pending::commit_to`](crate::Pending::commit_to). On any error it
//! rewinds ([`Batcher::rewind`]) and returns the error: sets acknowledged
//! before the error stay committed, nothing after them is. The next call
//! sends the unacknowledged set again with the same boundaries; the target
//! answers a set it already holds as a duplicate with its durable
//! sequence, which acknowledges it.

use ferry_protocol::message::{BlockHashes, ChangeKind, ChangeSet, ChangeSetHeader};
use ferry_protocol::payload::{pack_change_set, Key};
use ferry_ring::ring::Consumer;

use crate::batch::{BatchLimits, Batcher, Pending, ReadAt};
use crate::error::{Error, ErrorKind, Result};
use crate::exchange;

/// Default zstd level for change-set payloads (level 1: the protocol
/// crate's measurements show zstd is the bottleneck, not AES-GCM).
pub const ZSTD_LEVEL: i32 = 1;

/// The target's answer: everything up to `last_seq` is durable there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Last sequence durable at the target.
    pub last_seq: u64,
}

/// Carries sealed change sets to the target.
pub trait Transport {
    /// Send `cs` and wait for the target's answer. `Ok(ack)` only once the
    /// target holds the set (or a later one) durably; a set it already
    /// holds is answered with its durable sequence. An error means the set
    /// may or may not have arrived.
    fn send(&mut self, cs: ChangeSet) -> Result<Ack>;

    /// How many sets may be in flight before the first answer is awaited
    /// (1: `send` only). With more, [`drain_once`] uses
    /// [`Transport::send_async`] and [`Transport::recv_ack`].
    fn window(&self) -> usize {
        1
    }

    /// Send `cs` without waiting; its answer comes, in order, from
    /// [`Transport::recv_ack`]. Only used when `window() > 1`.
    fn send_async(&mut self, _cs: ChangeSet) -> Result<()> {
        Err(Error::new(
            ErrorKind::Transport,
            "this transport does not pipeline",
        ))
    }

    /// The answer to the oldest set sent with `send_async`.
    fn recv_ack(&mut self) -> Result<Ack> {
        Err(Error::new(
            ErrorKind::Transport,
            "this transport does not pipeline",
        ))
    }

    /// The checksum exchange ([`crate::exchange`]): which of these blocks
    /// differ at the target. `None`: not offered (send everything).
    fn hash_diff(&mut self, _hashes: BlockHashes) -> Result<Option<Vec<bool>>> {
        Ok(None)
    }
}

/// What one [`drain_once`] call shipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Change sets acknowledged and committed.
    pub change_sets: u64,
    /// Of those, Resync sets.
    pub resync_sets: u64,
    /// Records committed in those sets.
    pub records: u64,
    /// Raw data bytes shipped.
    pub raw_bytes: u64,
    /// Sealed payload bytes sent.
    pub sealed_bytes: u64,
    /// Tags shipped.
    pub tags: u64,
    /// Tags dropped (in Resync sets).
    pub dropped_tags: u64,
    /// Re-read bytes that were zeros and travelled as Zero extents.
    pub zero_bytes: u64,
    /// Raw bytes of Resync sets.
    pub resync_raw_bytes: u64,
    /// `consistent_from` of the last set acknowledged.
    pub last_consistent_from: u64,
    /// Resync bytes not sent because the target held them already.
    pub exchange_skipped_bytes: u64,
    /// The last sequence acknowledged (0: none in this call).
    pub last_seq: u64,
}

/// Stamps each change set just before it is sealed: a fresh nonce and the
/// consistency claim (`consistent_from`).
pub trait Stamp {
    /// Fill `nonce_stream`, `nonce_counter` and `consistent_from` of a
    /// set about to be sealed (its data is already read). `state_changes`
    /// counts its state-change records ([`Pending::state_changes`](crate::Pending::state_changes)).
    fn stamp(&mut self, header: &mut ChangeSetHeader, state_changes: u64) -> Result<()>;
}

/// Fixed stamps for tests: nonce stream 0 with a counter that only grows,
/// `consistent_from` = the set's first seq for write-order sets.
#[derive(Debug, Default)]
pub struct CountingStamp {
    /// Next counter.
    pub next: u64,
}

impl Stamp for CountingStamp {
    fn stamp(&mut self, header: &mut ChangeSetHeader, _state_changes: u64) -> Result<()> {
        header.nonce_stream = 0;
        header.nonce_counter = self.next;
        self.next += 1;
        header.consistent_from = match header.kind {
            ChangeKind::WriteOrder => header.first_seq,
            ChangeKind::Resync => 0,
        };
        Ok(())
    }
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Ship everything the ring holds beyond the consumer's cursor, one change
/// set at a time, committing each after its durable ack. Returns when the
/// ring is drained (or after `max_time`), or the first error (after
/// rewinding; see the module docs).
pub fn drain_once(
    consumer: &mut Consumer,
    batcher: &mut Batcher,
    backing: &dyn ReadAt,
    key: &Key,
    transport: &mut dyn Transport,
    stamp: &mut dyn Stamp,
    options: impl Into<ShipOptions>,
) -> Result<DrainStats> {
    let options = options.into();
    let mut stats = DrainStats::default();
    let mut out = Outbound {
        key,
        transport,
        stamp,
        zstd_level: options.zstd_level,
    };
    match pipeline(consumer, batcher, backing, &mut out, options, &mut stats) {
        Ok(()) => Ok(stats),
        Err(e) => {
            batcher.rewind(consumer);
            Err(e)
        }
    }
}

/// A set on its way: what to commit and count once it is acknowledged.
#[derive(Debug, Clone, Copy)]
struct Sent {
    first_seq: u64,
    last_seq: u64,
    commit_to: u64,
    kind: ChangeKind,
    consistent_from: u64,
    records: u64,
    raw: u64,
    sealed: u64,
    tags: u64,
    dropped_tags: u64,
    zero: u64,
    skipped: u64,
}

/// What an ack did to the oldest set in flight.
enum Settled {
    /// Committed: the ring moved past it.
    Committed,
    /// The target holds only a prefix of it (a set rebuilt larger after a
    /// lost ack): the caller resumes after what it holds.
    Prefix(u64),
}

/// Build, stamp, seal and send sets, up to the transport's window in
/// flight, committing each in order as its ack arrives.
fn pipeline(
    consumer: &mut Consumer,
    batcher: &mut Batcher,
    backing: &dyn ReadAt,
    out: &mut Outbound<'_>,
    options: ShipOptions,
    stats: &mut DrainStats,
) -> Result<()> {
    let window = out.transport.window().max(1);
    let started = std::time::Instant::now();
    let mut inflight: std::collections::VecDeque<Sent> = std::collections::VecDeque::new();
    // At least one set per call, however short the limit.
    let mut sent = 0u64;
    let time_up = |sent: u64| sent > 0 && options.max_time.is_some_and(|t| started.elapsed() >= t);
    loop {
        while inflight.len() < window && !time_up(sent) {
            sent += 1;
            let Some(p) = batcher.next_change_set(consumer, backing, options.limits)? else {
                break;
            };
            if p.header.kind == ChangeKind::Resync && !p.data.is_empty() {
                // The exchange is a round trip of its own: answers come in
                // order, so settle what is in flight first.
                while let Some(front) = inflight.pop_front() {
                    let ack = out.transport.recv_ack()?;
                    if let Settled::Prefix(_) = settle(ack, front, consumer, batcher, stats)? {
                        return Err(prefix_in_pipeline(front));
                    }
                }
            }
            let (cs, sent) = prepare(p, out)?;
            if window == 1 {
                let ack = out.transport.send(cs)?;
                if let Settled::Prefix(held) = settle(ack, sent, consumer, batcher, stats)? {
                    batcher.acked(held);
                    batcher.rewind(consumer);
                }
                continue;
            }
            out.transport.send_async(cs)?;
            inflight.push_back(sent);
        }
        let Some(front) = inflight.pop_front() else {
            return Ok(());
        };
        let ack = out.transport.recv_ack()?;
        if let Settled::Prefix(held) = settle(ack, front, consumer, batcher, stats)? {
            if !inflight.is_empty() {
                return Err(prefix_in_pipeline(front));
            }
            batcher.acked(held);
            batcher.rewind(consumer);
        }
    }
}

fn prefix_in_pipeline(s: Sent) -> Error {
    Error::new(
        ErrorKind::Rejected,
        format!(
            "change set [{}, {}] acknowledged only in part while others were in flight",
            s.first_seq, s.last_seq
        ),
    )
}

/// The checksum exchange for a resync set, the stamp, and the seal.
fn prepare(mut p: Pending, out: &mut Outbound<'_>) -> Result<(ChangeSet, Sent)> {
    let (first_seq, last_seq) = (p.header.first_seq, p.header.last_seq);
    let mut skipped = 0;
    if p.header.kind == ChangeKind::Resync && !p.data.is_empty() {
        let hashes = exchange::hashes_of(&p, exchange::BLOCK_SIZE);
        if let Some(differs) = out.transport.hash_diff(hashes)? {
            skipped = exchange::keep_differing(&mut p, exchange::BLOCK_SIZE, &differs);
        }
    }
    out.stamp.stamp(&mut p.header, p.state_changes)?;
    tracing::debug!(
        disk = %p.header.disk,
        kind = ?p.header.kind,
        first_seq,
        last_seq,
        extents = p.header.extents.len(),
        data = p.data.len(),
        skipped,
        "change set sealed"
    );
    let Pending {
        header,
        data,
        commit_to,
        records,
        dropped_tags,
        zero_bytes,
        ..
    } = p;
    let (kind, consistent_from, tags) = (
        header.kind,
        header.consistent_from,
        u64_of(header.tags.len()),
    );
    let cs = pack_change_set(&data, out.zstd_level, out.key, header)
        .map_err(|e| Error::protocol(format!("seal change set [{first_seq}, {last_seq}]"), e))?;
    let sent = Sent {
        first_seq,
        last_seq,
        commit_to,
        kind,
        consistent_from,
        records,
        raw: u64_of(data.len()),
        sealed: u64_of(cs.payload.len()),
        tags,
        dropped_tags,
        zero: zero_bytes,
        skipped,
    };
    Ok((cs, sent))
}

/// Apply an ack to the oldest set sent: commit the ring past it and count
/// it, or report that the target holds only a prefix of it.
fn settle(
    ack: Ack,
    s: Sent,
    consumer: &mut Consumer,
    batcher: &mut Batcher,
    stats: &mut DrainStats,
) -> Result<Settled> {
    if ack.last_seq < s.last_seq {
        if ack.last_seq >= s.first_seq {
            return Ok(Settled::Prefix(ack.last_seq));
        }
        return Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "change set [{}, {}] acknowledged only up to seq {}",
                s.first_seq, s.last_seq, ack.last_seq
            ),
        ));
    }
    consumer
        .commit(s.commit_to)
        .map_err(|e| Error::ring(format!("commit the ring up to index {}", s.commit_to), e))?;
    // The target may hold more (sets whose answers were lost): records up
    // to its durable sequence need not travel again.
    batcher.acked(ack.last_seq);
    stats.change_sets += 1;
    if s.kind == ChangeKind::Resync {
        stats.resync_sets += 1;
        stats.resync_raw_bytes += s.raw;
    }
    stats.last_consistent_from = s.consistent_from;
    stats.exchange_skipped_bytes += s.skipped;
    stats.records += s.records;
    stats.raw_bytes += s.raw;
    stats.sealed_bytes += s.sealed;
    stats.tags += s.tags;
    stats.dropped_tags += s.dropped_tags;
    stats.zero_bytes += s.zero;
    stats.last_seq = s.last_seq;
    Ok(Settled::Committed)
}

/// How sets are built and packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipOptions {
    /// When a set ends.
    pub limits: BatchLimits,
    /// zstd level of the payload chunks (negative: zstd's fast modes).
    pub zstd_level: i32,
    /// Return after this long even if the ring still holds records, so the
    /// caller can report the lag and send heartbeats under sustained load
    /// (None: drain until empty).
    pub max_time: Option<std::time::Duration>,
}

impl From<BatchLimits> for ShipOptions {
    fn from(limits: BatchLimits) -> ShipOptions {
        ShipOptions {
            limits,
            zstd_level: ZSTD_LEVEL,
            max_time: None,
        }
    }
}

/// Where built sets go: stamped, sealed under `key`, sent.
struct Outbound<'a> {
    key: &'a Key,
    transport: &'a mut dyn Transport,
    stamp: &'a mut dyn Stamp,
    zstd_level: i32,
}
