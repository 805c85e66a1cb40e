//! End-to-end tests: a real ring (Producer on a temp file), a backing
//! device, and master-target's Journal + Replica as the receiver.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_master_target::applier::{apply_pending, Replica};
use ferry_master_target::journal::Journal;
use ferry_protocol::message::{ChangeKind, ChangeSet};
use ferry_protocol::payload::Key;
use ferry_ring::ring::{payload_checksum, Consumer, Geometry, NewRecord, Producer, RecordKind};
use ferry_vhd::Format;

use crate::*;

static NEXT: AtomicU64 = AtomicU64::new(0);

pub(crate) fn unique() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ferry-sidecar-{tag}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const DISK: &str = "disk0";
const SIZE: u64 = 4 << 20;

fn key() -> Key {
    Key::from_bytes([9u8; 32])
}

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The receiver: master-target's journal, appended in process.
struct LoopbackTransport {
    journal: Journal,
}

impl Transport for LoopbackTransport {
    fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
        match self.journal.append(&cs) {
            Ok(a) => Ok(Ack {
                last_seq: a.last_seq,
            }),
            Err(e) if e.kind() == ferry_master_target::ErrorKind::Duplicate => Ok(Ack {
                last_seq: self.journal.last_seq().unwrap_or(0),
            }),
            Err(e) => Err(Error::with_source(
                ErrorKind::Rejected,
                "journal append",
                e.to_string(),
            )),
        }
    }
}

/// Fails the `fail_at`-th send (1-based): before delivering it (link down)
/// or after the target made it durable (ack lost).
struct FailingTransport {
    inner: LoopbackTransport,
    fail_at: usize,
    sent: usize,
    after_append: bool,
}

impl Transport for FailingTransport {
    fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
        self.sent += 1;
        if self.sent == self.fail_at {
            if self.after_append {
                self.inner.send(cs)?;
            }
            return Err(Error::new(ErrorKind::Transport, "link down"));
        }
        self.inner.send(cs)
    }
}

/// A pipelining loopback: up to `window` sets in flight, answered in order;
/// the link drops at the `fail_at`-th receive of an answer (after the
/// target made that set and everything sent before durable).
struct PipelinedLoopback {
    inner: LoopbackTransport,
    window: usize,
    answers: std::collections::VecDeque<Result<Ack>>,
    max_in_flight: usize,
    received: usize,
    fail_at: Option<usize>,
}

impl Transport for PipelinedLoopback {
    fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
        self.inner.send(cs)
    }
    fn window(&self) -> usize {
        self.window
    }
    fn send_async(&mut self, cs: ChangeSet) -> Result<()> {
        let answer = self.inner.send(cs);
        self.answers.push_back(answer);
        self.max_in_flight = self.max_in_flight.max(self.answers.len());
        Ok(())
    }
    fn recv_ack(&mut self) -> Result<Ack> {
        self.received += 1;
        if self.fail_at == Some(self.received) {
            self.answers.clear();
            return Err(Error::new(ErrorKind::Transport, "link down"));
        }
        self.answers
            .pop_front()
            .unwrap_or_else(|| Err(Error::new(ErrorKind::Transport, "no answer")))
    }
}

struct Rig {
    dir: TempDir,
    producer: Producer,
    consumer: Consumer,
    model: Vec<u8>,
    seq: u64,
    published: u64,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = TempDir::new(tag);
        let ring = dir.path().join("disk0.ring");
        let geometry = Geometry {
            slots: 1024,
            payload_bytes: 16 << 20,
        };
        let producer = Producer::create(&ring, geometry, DISK, SIZE).unwrap();
        let consumer = Consumer::open(&ring).unwrap();
        Rig {
            dir,
            producer,
            consumer,
            model: vec![0u8; usize::try_from(SIZE).unwrap()],
            seq: 0,
            published: 0,
        }
    }

    fn publish(&mut self, rec: NewRecord) {
        self.producer.publish(rec).unwrap();
        self.published += 1;
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn range(offset: u64, len: usize) -> std::ops::Range<usize> {
        let o = usize::try_from(offset).unwrap();
        o..o + len
    }

    /// A data-state write; `bad_checksum` publishes a wrong checksum.
    fn write(&mut self, offset: u64, data: &[u8], bad_checksum: bool) {
        let seq = self.next_seq();
        let mut slot = self.producer.reserve(data.len()).expect("payload room");
        slot.as_mut_slice().copy_from_slice(data);
        let mut rec = NewRecord::new(seq, RecordKind::Write);
        rec.offset = offset;
        rec.length = u64::try_from(data.len()).unwrap();
        rec.checksum = payload_checksum(data) ^ u32::from(bad_checksum);
        rec.payload = Some(slot);
        self.publish(rec);
        self.model[Self::range(offset, data.len())].copy_from_slice(data);
    }

    /// A metadata-state write (no payload); the data goes to the model
    /// (and so to the backing device written from it).
    fn meta_write(&mut self, offset: u64, data: &[u8]) {
        let seq = self.next_seq();
        let mut rec = NewRecord::new(seq, RecordKind::Write);
        rec.offset = offset;
        rec.length = u64::try_from(data.len()).unwrap();
        rec.checksum = payload_checksum(data);
        self.publish(rec);
        self.model[Self::range(offset, data.len())].copy_from_slice(data);
    }

    fn zero(&mut self, kind: RecordKind, offset: u64, len: usize) {
        let seq = self.next_seq();
        let mut rec = NewRecord::new(seq, kind);
        rec.offset = offset;
        rec.length = u64::try_from(len).unwrap();
        self.publish(rec);
        self.model[Self::range(offset, len)].fill(0);
    }

    fn simple(&mut self, kind: RecordKind, aux: u64) -> u64 {
        let seq = self.next_seq();
        let mut rec = NewRecord::new(seq, kind);
        rec.aux = aux;
        self.publish(rec);
        seq
    }

    fn random_writes(&mut self, rng: &mut Rng, n: usize) {
        for _ in 0..n {
            let len = usize::try_from(512 * (1 + rng.below(64))).unwrap();
            let offset = 512 * rng.below((SIZE - 65536) / 512);
            let fill = u8::try_from(rng.below(255) + 1).unwrap();
            let data: Vec<u8> = (0..len)
                .map(|i| fill ^ u8::try_from(i % 251).unwrap_or(0))
                .collect();
            self.write(offset, &data, false);
        }
    }

    fn backing_file(&self) -> std::fs::File {
        let p = self.dir.path().join("backing.img");
        std::fs::write(&p, &self.model).unwrap();
        std::fs::File::open(&p).unwrap()
    }

    /// `drain_once` with the test key and default limits.
    fn drain(
        &mut self,
        batcher: &mut Batcher,
        backing: &dyn ReadAt,
        transport: &mut dyn Transport,
    ) -> Result<DrainStats> {
        self.drain_with(batcher, backing, transport, BatchLimits::default())
    }

    /// `drain_once` with the test key, a counting stamp and these options.
    fn drain_with(
        &mut self,
        batcher: &mut Batcher,
        backing: &dyn ReadAt,
        transport: &mut dyn Transport,
        options: impl Into<ShipOptions>,
    ) -> Result<DrainStats> {
        drain_once(
            &mut self.consumer,
            batcher,
            backing,
            &key(),
            transport,
            &mut CountingStamp::default(),
            options,
        )
    }

    fn target(&self) -> (LoopbackTransport, Replica) {
        let (journal, _) = Journal::open(&self.dir.path().join("target"), DISK).unwrap();
        let replica =
            Replica::open_or_create(&self.dir.path().join("r.vhd"), Format::VhdDynamic, SIZE)
                .unwrap();
        (LoopbackTransport { journal }, replica)
    }
}

fn journal_sets(j: &Journal) -> Vec<ChangeSet> {
    j.iter_from(0).map(|r| r.unwrap()).collect()
}

/// Sequences strictly chained: each set's prev_end_seq is the previous
/// set's last_seq, no overlaps.
fn assert_chained(sets: &[ChangeSet]) {
    let mut prev = 0;
    for cs in sets {
        assert_eq!(cs.header.prev_end_seq, prev, "{:?}", cs.header);
        assert!(cs.header.first_seq > prev);
        prev = cs.header.last_seq;
    }
}

fn assert_replica_eq(replica: &mut Replica, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    replica.read_at(&mut got, 0).unwrap();
    assert!(got == model, "replica differs from the model");
}

fn limits(max_bytes: usize, max_records: usize) -> BatchLimits {
    BatchLimits {
        max_bytes,
        max_records,
    }
}

#[test]
fn end_to_end_writes_trims_zeroes_and_a_tag() {
    let mut rig = Rig::new("e2e");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    rig.random_writes(&mut rng, 60);
    rig.zero(RecordKind::Trim, 8192, 65536);
    rig.simple(RecordKind::Flush, 0);
    rig.random_writes(&mut rng, 20);
    rig.zero(RecordKind::WriteZeroes, 1 << 20, 100_000);
    let tag_seq = rig.simple(RecordKind::Tag, 0);
    // The filter's tag id is the tag's seq.
    std::fs::write(
        rig.dir.path().join("tags.jsonl"),
        format!("{{\"seq\":{tag_seq},\"name\":\"nightly\",\"app\":true,\"time_ns\":1}}\n"),
    )
    .unwrap();
    // Another tag whose id has no name line: the default name.
    rig.simple(RecordKind::Tag, 999);
    rig.random_writes(&mut rng, 30);

    let backing = rig.backing_file();
    let (mut transport, mut replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0).with_state_dir(rig.dir.path());
    let stats = rig
        .drain_with(
            &mut batcher,
            &backing,
            &mut transport,
            limits(256 << 10, 16),
        )
        .unwrap();
    assert!(stats.change_sets > 3, "{stats:?}");
    assert_eq!(stats.records, rig.published);
    assert_eq!(rig.consumer.committed(), rig.published);
    assert_eq!(rig.consumer.committed(), rig.consumer.published());

    let sets = journal_sets(&transport.journal);
    assert_chained(&sets);
    assert!(sets.iter().all(|c| c.header.kind == ChangeKind::WriteOrder));
    let tags: Vec<_> = sets.iter().flat_map(|c| c.header.tags.clone()).collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    // The tag record with aux 0 has no name line: default name.
    assert_eq!(tags[0].seq, tag_seq);
    assert_eq!(tags[0].name, "tag-0");
    assert_eq!(tags[1].name, "tag-999");
    // A tag ends its set.
    for cs in &sets {
        if let Some(t) = cs.header.tags.first() {
            assert_eq!(t.seq, cs.header.last_seq);
        }
    }
    assert_eq!(transport.journal.last_seq(), Some(rig.seq));

    apply_pending(&mut transport.journal, &mut replica, &key()).unwrap();
    assert_replica_eq(&mut replica, &rig.model);

    // Nothing more to ship.
    let again = rig.drain(&mut batcher, &backing, &mut transport).unwrap();
    assert_eq!(again, DrainStats::default());
}

#[test]
fn tag_names_come_from_the_state_dir() {
    let mut rig = Rig::new("tagname");
    rig.write(0, &[5u8; 4096], false);
    let seq = rig.next_seq();
    let mut rec = NewRecord::new(seq, RecordKind::Tag);
    rec.aux = seq;
    rig.publish(rec);
    std::fs::write(
        rig.dir.path().join("tags.jsonl"),
        format!("{{\"seq\":{seq},\"name\":\"before-upgrade\",\"app\":true,\"time_ns\":1}}\n"),
    )
    .unwrap();
    let (mut transport, _replica) = rig.target();
    // Names are loaded lazily on a miss (the filter writes them after the record).
    let mut batcher = Batcher::new("host", DISK, 1, 0).with_state_dir(rig.dir.path());
    let backing = rig.model.clone();
    rig.drain(&mut batcher, &backing, &mut transport).unwrap();
    let sets = journal_sets(&transport.journal);
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].header.tags[0].name, "before-upgrade");
    assert!(sets[0].header.tags[0].app);
}

#[test]
fn metadata_state_writes_ship_as_resync_from_the_backing_device() {
    let mut rig = Rig::new("meta");
    let mut rng = Rng(42);
    rig.random_writes(&mut rng, 10);
    // Metadata state: records only; the data is on the backing device.
    for i in 0..8u64 {
        let data = vec![u8::try_from(0x40 + i).unwrap(); 8192];
        rig.meta_write(i * 300_000, &data);
    }
    rig.simple(RecordKind::StateChange, 1);
    rig.random_writes(&mut rng, 5);
    let backing = rig.backing_file();
    let (mut transport, mut replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let stats = rig.drain(&mut batcher, &backing, &mut transport).unwrap();
    assert_eq!(rig.consumer.committed(), rig.published);
    let sets = journal_sets(&transport.journal);
    assert_chained(&sets);
    let kinds: Vec<_> = sets.iter().map(|c| c.header.kind).collect();
    // The kind change ends a set; the state change ends one too.
    assert_eq!(
        kinds,
        [
            ChangeKind::WriteOrder,
            ChangeKind::Resync,
            ChangeKind::WriteOrder
        ]
    );
    assert_eq!(stats.resync_sets, 1);
    assert_eq!(sets[1].header.extents.len(), 8);
    apply_pending(&mut transport.journal, &mut replica, &key()).unwrap();
    assert_replica_eq(&mut replica, &rig.model);
}

fn transport_failure(after_append: bool) {
    let mut rig = Rig::new(if after_append { "lostack" } else { "linkdown" });
    let mut rng = Rng(7 + u64::from(after_append));
    rig.random_writes(&mut rng, 40);
    rig.simple(RecordKind::Tag, 0);
    rig.random_writes(&mut rng, 40);
    let backing = rig.backing_file();
    let (inner, mut replica) = rig.target();
    let mut failing = FailingTransport {
        inner,
        fail_at: 3,
        sent: 0,
        after_append,
    };
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let err = rig
        .drain_with(&mut batcher, &backing, &mut failing, limits(1 << 30, 10))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    // Two sets of 10 records acknowledged: exactly those committed.
    assert_eq!(rig.consumer.committed(), 20);
    assert_eq!(rig.consumer.cursor(), 20);
    let durable = failing.inner.journal.last_seq();
    assert_eq!(durable, Some(if after_append { 30 } else { 20 }));

    // More writes arrive; the next drain uses larger sets, but the set that
    // was in flight is built again with its boundaries (a fresh nonce
    // seals it): a target that holds it answers it as a duplicate.
    rig.random_writes(&mut rng, 15);
    let backing = rig.backing_file();
    let mut transport = failing.inner;
    rig.drain_with(&mut batcher, &backing, &mut transport, limits(1 << 30, 50))
        .unwrap();
    assert_eq!(rig.consumer.committed(), rig.published);
    let sets = journal_sets(&transport.journal);
    assert_chained(&sets);
    assert_eq!(sets[2].header.first_seq, 21);
    assert_eq!(sets[2].header.last_seq, 30);
    assert!(
        sets[3].header.last_seq - sets[3].header.first_seq >= 10,
        "larger sets follow"
    );
    assert_eq!(transport.journal.last_seq(), Some(rig.seq));
    apply_pending(&mut transport.journal, &mut replica, &key()).unwrap();
    assert_replica_eq(&mut replica, &rig.model);
}

#[test]
fn transport_failure_link_down_then_resume() {
    transport_failure(false);
}

#[test]
fn transport_failure_ack_lost_then_duplicate_acked() {
    transport_failure(true);
}

#[test]
fn resume_point_skips_what_the_target_holds() {
    // The target holds seq 1..=5 (its ack reached it, not the ring).
    let mut rig = Rig::new("resume");
    let mut rng = Rng(99);
    rig.random_writes(&mut rng, 12);
    let backing = rig.model.clone();
    let (mut transport, _replica) = rig.target();
    let mut first = Batcher::new("host", DISK, 1, 0);
    let p = first
        .next_change_set(&mut rig.consumer, &backing, limits(1 << 30, 5))
        .unwrap()
        .unwrap();
    let cs =
        ferry_protocol::payload::pack_change_set(&p.data, ZSTD_LEVEL, &key(), p.header).unwrap();
    transport.send(cs).unwrap();
    rig.consumer.rewind();
    // A new sidecar resumes after seq 5.
    let mut batcher = Batcher::new("host", DISK, 1, 5);
    rig.drain(&mut batcher, &backing, &mut transport).unwrap();
    assert_eq!(rig.consumer.committed(), rig.published);
    let sets = journal_sets(&transport.journal);
    assert_chained(&sets);
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[1].header.first_seq, 6);
}

#[test]
fn corrupt_payload_is_never_shipped() {
    let mut rig = Rig::new("corrupt");
    rig.write(0, &[1u8; 4096], false);
    rig.write(4096, &[2u8; 4096], false);
    rig.write(8192, &[3u8; 4096], true);
    rig.write(12288, &[4u8; 4096], false);
    let backing = rig.model.clone();
    let (mut transport, _replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let err = rig
        .drain(&mut batcher, &backing, &mut transport)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(rig.consumer.committed(), 0);
    assert_eq!(rig.consumer.cursor(), 0);
    assert_eq!(transport.journal.last_seq(), None);
    // Still refused on retry.
    let err = rig
        .drain(&mut batcher, &backing, &mut transport)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(rig.consumer.committed(), 0);
}

#[test]
fn out_of_range_record_is_an_error_not_a_panic() {
    let mut rig = Rig::new("range");
    let seq = rig.next_seq();
    let mut rec = NewRecord::new(seq, RecordKind::Trim);
    rec.offset = u64::MAX - 10;
    rec.length = 100;
    rig.publish(rec);
    let (mut transport, _replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let backing: Vec<u8> = Vec::new();
    let err = rig
        .drain(&mut batcher, &backing, &mut transport)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(rig.consumer.committed(), 0);
}

#[test]
fn byte_limit_holds_a_write_back_for_the_next_set() {
    let mut rig = Rig::new("bytes");
    for i in 0..6u8 {
        rig.write(u64::from(i) * 65536, &[i + 1; 40960], false);
    }
    let backing = rig.model.clone();
    let (mut transport, mut replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let stats = rig
        .drain_with(&mut batcher, &backing, &mut transport, limits(100_000, 100))
        .unwrap();
    // 2 writes of 40 KiB fit in 100 000 bytes, a third does not.
    assert_eq!(stats.change_sets, 3);
    let sets = journal_sets(&transport.journal);
    assert!(sets.iter().all(|c| c.header.extents.len() == 2));
    apply_pending(&mut transport.journal, &mut replica, &key()).unwrap();
    assert_replica_eq(&mut replica, &rig.model);
}

#[test]
fn pipelined_sets_commit_in_order_and_survive_a_dropped_link() {
    let mut rig = Rig::new("pipelined");
    let mut rng = Rng(0x5eed);
    rig.random_writes(&mut rng, 120);
    let backing = rig.backing_file();
    let (inner, mut replica) = rig.target();
    let mut t = PipelinedLoopback {
        inner,
        window: 4,
        answers: Default::default(),
        max_in_flight: 0,
        received: 0,
        fail_at: Some(5),
    };
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let err = rig
        .drain_with(&mut batcher, &backing, &mut t, limits(1 << 30, 10))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert_eq!(t.max_in_flight, 4, "the window was used");
    // Four answers were received: exactly four sets committed, although
    // the target holds more (their answers were lost with the link).
    assert_eq!(rig.consumer.committed(), 40);
    assert!(t.inner.journal.last_seq().unwrap() > 40);
    // Again, on a new link: the sets in flight are built again with their
    // boundaries and the target answers those it holds as duplicates.
    t.fail_at = None;
    t.received = 0;
    let stats = rig
        .drain_with(&mut batcher, &backing, &mut t, limits(1 << 30, 10))
        .unwrap();
    assert!(stats.change_sets > 0);
    assert_eq!(rig.consumer.committed(), rig.published);
    let sets = journal_sets(&t.inner.journal);
    assert_chained(&sets);
    assert!(sets
        .iter()
        .all(|c| c.header.last_seq - c.header.first_seq < 10));
    assert_eq!(t.inner.journal.last_seq(), Some(rig.seq));
    apply_pending(&mut t.inner.journal, &mut replica, &key()).unwrap();
    assert_replica_eq(&mut replica, &rig.model);
}

#[test]
fn a_drain_returns_after_its_time_limit() {
    let mut rig = Rig::new("maxtime");
    let mut rng = Rng(31);
    rig.random_writes(&mut rng, 50);
    let backing = rig.backing_file();
    let (mut transport, _replica) = rig.target();
    let mut batcher = Batcher::new("host", DISK, 1, 0);
    let options = ShipOptions {
        limits: limits(1 << 30, 10),
        zstd_level: ZSTD_LEVEL,
        max_time: Some(std::time::Duration::ZERO),
    };
    let stats = rig
        .drain_with(&mut batcher, &backing, &mut transport, options)
        .unwrap();
    // One set, then back to the caller (to report the lag), the rest waits.
    assert_eq!(stats.change_sets, 1);
    assert_eq!(rig.consumer.committed(), 10);
    rig.drain(&mut batcher, &backing, &mut transport).unwrap();
    assert_eq!(rig.consumer.committed(), rig.published);
    assert_chained(&journal_sets(&transport.journal));
}
