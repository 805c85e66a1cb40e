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

use crate::batch::{BatchLimits, Batcher, ReadAt};
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
    loop {
        match ship_one(
            consumer,
            batcher,
            backing,
            &mut out,
            options.limits,
            &mut stats,
        ) {
            Ok(true) => {}
            Ok(false) => return Ok(stats),
            Err(e) => {
                batcher.rewind(consumer);
                return Err(e);
            }
        }
    }
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

/// One set: Ok(false) when there was nothing to ship.
fn ship_one(
    consumer: &mut Consumer,
    batcher: &mut Batcher,
    backing: &dyn ReadAt,
    out: &mut Outbound<'_>,
    limits: BatchLimits,
    stats: &mut DrainStats,
) -> Result<bool> {
    let (key, transport, stamp, level) = (
        out.key,
        &mut *out.transport,
        &mut *out.stamp,
        out.zstd_level,
    );
    let Some(mut p) = batcher.next_change_set(consumer, backing, limits)? else {
        return Ok(false);
    };
    let (first_seq, last_seq) = (p.header.first_seq, p.header.last_seq);
    let mut skipped = 0;
    if p.header.kind == ChangeKind::Resync && !p.data.is_empty() {
        let hashes = exchange::hashes_of(&p, exchange::BLOCK_SIZE);
        if let Some(differs) = transport.hash_diff(hashes)? {
            skipped = exchange::keep_differing(&mut p, exchange::BLOCK_SIZE, &differs);
        }
    }
    stamp.stamp(&mut p.header, p.state_changes)?;
    let kind = p.header.kind;
    let consistent_from = p.header.consistent_from;
    let tags = u64_of(p.header.tags.len());
    let cs = pack_change_set(&p.data, level, key, p.header)
        .map_err(|e| Error::protocol(format!("seal change set [{first_seq}, {last_seq}]"), e))?;
    let sealed = u64_of(cs.payload.len());
    let ack = transport.send(cs)?;
    if ack.last_seq < last_seq {
        if ack.last_seq >= first_seq {
            // The target already holds a prefix of this set (an earlier
            // ack was lost and the set was rebuilt larger): resume after
            // what it holds. The next build commits the records it holds
            // and sends the rest.
            batcher.acked(ack.last_seq);
            batcher.rewind(consumer);
            return Ok(true);
        }
        return Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "change set [{first_seq}, {last_seq}] acknowledged only up to seq {}",
                ack.last_seq
            ),
        ));
    }
    consumer
        .commit(p.commit_to)
        .map_err(|e| Error::ring(format!("commit the ring up to index {}", p.commit_to), e))?;
    batcher.acked(last_seq);
    stats.change_sets += 1;
    if kind == ChangeKind::Resync {
        stats.resync_sets += 1;
        stats.resync_raw_bytes += u64_of(p.data.len());
    }
    stats.last_consistent_from = consistent_from;
    stats.exchange_skipped_bytes += skipped;
    stats.records += p.records;
    stats.raw_bytes += u64_of(p.data.len());
    stats.sealed_bytes += sealed;
    stats.tags += tags;
    stats.dropped_tags += p.dropped_tags;
    stats.zero_bytes += p.zero_bytes;
    stats.last_seq = last_seq;
    Ok(true)
}
