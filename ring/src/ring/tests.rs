//! Tests of the ring: format, producer/consumer protocol, crash recovery,
//! model-based property tests, a two-thread run.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;

use super::layout::*;
use super::*;
use crate::error::ErrorKind;

/// A unique ring path under the temp dir, removed on drop.
struct TempRing(PathBuf);

impl TempRing {
    fn new(tag: &str) -> TempRing {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ferry-ring-test-{tag}-{}-{n}", std::process::id());
        TempRing(std::env::temp_dir().join(name))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempRing {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn u(x: usize) -> u64 {
    u64::try_from(x).unwrap()
}

fn geo(slots: u32, pages: u64) -> Geometry {
    Geometry {
        slots,
        payload_bytes: pages * PAYLOAD_ALIGN,
    }
}

/// Deterministic payload bytes for a key.
fn pattern(key: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (key.wrapping_mul(131).wrapping_add(u(i).wrapping_mul(7))).to_le_bytes()[0])
        .collect()
}

/// Reserve, fill with `pattern(seq)`, publish a Write of `len` bytes.
fn write(p: &mut Producer, seq: u64, len: usize) -> Result<u64, PublishError> {
    let mut slot = p.reserve(len).expect("payload space");
    let data = pattern(seq, len);
    slot.as_mut_slice().copy_from_slice(&data);
    let rec = NewRecord {
        offset: seq * 4096,
        length: u(len),
        checksum: payload_checksum(&data),
        payload: Some(slot),
        ..NewRecord::new(seq, RecordKind::Write)
    };
    p.publish(rec)
}

fn meta(p: &mut Producer, seq: u64, kind: RecordKind) -> Result<u64, PublishError> {
    let rec = NewRecord {
        offset: seq,
        length: 512,
        aux: seq + 7,
        ..NewRecord::new(seq, kind)
    };
    p.publish(rec)
}

/// Check a delivered Write made by `write`.
fn check_write(view: &RecordView<'_>) {
    let len = usize::try_from(view.record.length).unwrap();
    assert_eq!(
        view.payload.expect("payload"),
        &pattern(view.record.seq, len)[..]
    );
    view.verify_payload().unwrap();
}

fn expect_corrupt<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}"),
        Ok(v) => panic!("{what}: accepted: {v:?}"),
    }
}

#[test]
fn create_open_round_trip() {
    let t = TempRing::new("roundtrip");
    let mut p = Producer::create(t.path(), geo(64, 16), "vda", 1 << 30).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    assert_eq!(c.disk_name(), "vda");
    assert_eq!(c.disk_size(), 1 << 30);
    assert_eq!(c.geometry(), geo(64, 16));
    assert_eq!(c.generation(), p.generation());
    assert!(c.created_ns() > 0);
    let len = std::fs::metadata(t.path()).unwrap().len();
    assert_eq!(len, geo(64, 16).file_len());
    assert_eq!(p.free_slots(), 64);
    assert_eq!(p.free_payload_bytes(), 16 * 4096);

    assert_eq!(write(&mut p, 10, 5000).unwrap(), 0);
    assert_eq!(meta(&mut p, 11, RecordKind::Flush).unwrap(), 1);
    let mut tag = NewRecord::new(12, RecordKind::Tag);
    tag.aux = 0xdead_beef;
    tag.flags = FLAG_FUA;
    assert_eq!(p.publish(tag).unwrap(), 2);
    let empty = p.reserve(0).unwrap();
    let rec = NewRecord {
        payload: Some(empty),
        checksum: payload_checksum(&[]),
        ..NewRecord::new(13, RecordKind::Write)
    };
    assert_eq!(p.publish(rec).unwrap(), 3);
    assert_eq!(p.published(), 4);
    assert_eq!(p.free_slots(), 60);
    assert_eq!(p.free_payload_bytes(), 14 * 4096);

    let v = c.next().unwrap().unwrap();
    assert_eq!(
        (v.index, v.record.seq, v.record.kind, v.record.offset),
        (0, 10, RecordKind::Write, 40960)
    );
    assert!(v.record.has_payload() && !v.record.fua());
    check_write(&v);
    let v = c.next().unwrap().unwrap();
    assert_eq!(
        (v.index, v.record.kind, v.record.aux, v.record.payload_pos),
        (1, RecordKind::Flush, 18, NO_PAYLOAD)
    );
    assert!(v.payload.is_none());
    let v = c.next().unwrap().unwrap();
    assert_eq!(
        (v.record.kind, v.record.aux),
        (RecordKind::Tag, 0xdead_beef)
    );
    assert!(v.record.fua());
    let v = c.next().unwrap().unwrap();
    assert_eq!(v.payload, Some(&[][..]));
    v.verify_payload().unwrap();
    assert!(c.next().unwrap().is_none());
    let lag = c.lag().unwrap();
    assert_eq!((lag.records, lag.payload_bytes), (4, 5000));
    c.commit(4).unwrap();
    assert_eq!(p.committed(), 4);
    assert_eq!(p.free_slots(), 64);
    assert_eq!(p.free_payload_bytes(), 16 * 4096);
    assert_eq!(c.lag().unwrap(), Lag::default());
}

/// The real home of rings: tmpfs at /dev/shm (skipped where it is absent).
#[test]
fn in_dev_shm() {
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        return;
    }
    let t = TempRing(dir.join(format!("ferry-ring-test-shm-{}", std::process::id())));
    let mut p = Producer::create(t.path(), geo(16, 4), "shm", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    write(&mut p, 1, 10_000).unwrap();
    let v = c.next().unwrap().unwrap();
    check_write(&v);
    let end = v.index + 1;
    c.commit(end).unwrap();
    assert_eq!(p.free_payload_bytes(), 4 * 4096);
}

#[test]
fn record_encode_decode_and_kinds() {
    for k in 1u8..=6 {
        let kind = RecordKind::try_from(k).unwrap();
        assert_eq!(u8::from(kind), k);
    }
    for k in [0u8, 7, 255] {
        assert_eq!(
            RecordKind::try_from(k).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
    let r = Record {
        seq: 1,
        timestamp_ns: 2,
        offset: 3,
        length: 4,
        payload_pos: 8192,
        aux: 5,
        checksum: 6,
        kind: RecordKind::WriteZeroes,
        flags: FLAG_HAS_PAYLOAD | FLAG_FUA,
    };
    let b = r.encode();
    assert_eq!(Record::decode(&b).unwrap(), r);
    // Every single-bit flip is caught.
    for byte in 0..RECORD_SIZE {
        let mut x = b;
        x[byte] ^= 0x10;
        assert!(Record::decode(&x).is_err(), "flip in byte {byte}");
    }
    // Flag and position disagree, even with a valid crc.
    let bad = Record {
        payload_pos: NO_PAYLOAD,
        ..r
    };
    expect_corrupt(
        Record::decode(&bad.encode()),
        "payload flag without position",
    );
    let bad = Record {
        flags: FLAG_FUA,
        ..r
    };
    expect_corrupt(
        Record::decode(&bad.encode()),
        "position without payload flag",
    );
    let mut x = r.encode();
    x[R_FLAGS] = 0x80;
    let crc = crc32c::crc32c(&x[..R_CRC]);
    x[R_CRC..R_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    expect_corrupt(Record::decode(&x), "unknown flag");
    assert!(r.verify_payload(b"abcd").is_err());
}

#[test]
fn header_validation() {
    let t = TempRing::new("header");
    {
        let mut p = Producer::create(t.path(), geo(32, 4), "disk-α", 12345).unwrap();
        write(&mut p, 1, 100).unwrap();
    }
    let good = std::fs::read(t.path()).unwrap();
    Consumer::open(t.path()).unwrap();

    let put32 =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("magic", Box::new(|b| b[0] = b'X')),
        ("version", Box::new(move |b| put32(b, H_VERSION, 2))),
        (
            "header size",
            Box::new(move |b| put32(b, H_HEADER_SIZE, 8192)),
        ),
        (
            "record size",
            Box::new(move |b| put32(b, H_RECORD_SIZE, 128)),
        ),
        (
            "slots not power of two",
            Box::new(move |b| put32(b, H_SLOTS, 33)),
        ),
        ("slots too few", Box::new(move |b| put32(b, H_SLOTS, 8))),
        (
            "slots too many",
            Box::new(move |b| put32(b, H_SLOTS, MAX_SLOTS * 2)),
        ),
        (
            "slots other valid",
            Box::new(move |b| put32(b, H_SLOTS, 256)),
        ),
        (
            "payload unaligned",
            Box::new(move |b| put64(b, H_PAYLOAD_BYTES, 4 * 4096 + 1)),
        ),
        (
            "payload zero",
            Box::new(move |b| put64(b, H_PAYLOAD_BYTES, 0)),
        ),
        (
            "payload huge",
            Box::new(move |b| put64(b, H_PAYLOAD_BYTES, 1 << 50)),
        ),
        (
            "payload other valid",
            Box::new(move |b| put64(b, H_PAYLOAD_BYTES, 8 * 4096)),
        ),
        (
            "slots offset",
            Box::new(move |b| put64(b, H_SLOTS_OFFSET, 0)),
        ),
        (
            "payload offset",
            Box::new(move |b| put64(b, H_PAYLOAD_OFFSET, 4096)),
        ),
        (
            "payload align",
            Box::new(move |b| put32(b, H_PAYLOAD_ALIGN, 512)),
        ),
        ("flags", Box::new(move |b| put32(b, H_FLAGS, 1))),
        ("disk name utf8", Box::new(|b| b[H_DISK_NAME] = 0xff)),
        (
            "disk name after NUL",
            Box::new(|b| b[H_DISK_NAME + 63] = b'x'),
        ),
        ("disk size", Box::new(move |b| put64(b, H_DISK_SIZE, 1))),
        ("generation", Box::new(move |b| put64(b, H_GENERATION, 1))),
        ("created", Box::new(move |b| put64(b, H_CREATED_NS, 1))),
        ("crc", Box::new(|b| b[H_HEADER_CRC] ^= 1)),
    ];
    for (what, edit) in &cases {
        let mut b = good.clone();
        edit(&mut b);
        std::fs::write(t.path(), &b).unwrap();
        expect_corrupt(Consumer::open(t.path()), what);
        expect_corrupt(Producer::reopen(t.path()), what);
        let err = Consumer::open(t.path()).unwrap_err().to_string();
        assert!(
            err.contains(&t.path().display().to_string()),
            "{what}: {err}"
        );
        // With the header crc fixed, the field checks still catch it
        // (disk size, generation and creation time are free-form).
        let crc = crc32c::crc32c(&b[..H_HEADER_CRC]);
        if !["crc", "disk size", "generation", "created"].contains(what) {
            put32(&mut b, H_HEADER_CRC, crc);
            std::fs::write(t.path(), &b).unwrap();
            expect_corrupt(Consumer::open(t.path()), what);
        }
    }
    // Truncated or extended files.
    for len in [
        0,
        10,
        H_STATIC_END - 1,
        HEADER_SIZE,
        good.len() - 4096,
        good.len() - 1,
    ] {
        std::fs::write(t.path(), &good[..len]).unwrap();
        expect_corrupt(Consumer::open(t.path()), &format!("truncated to {len}"));
        expect_corrupt(Producer::reopen(t.path()), &format!("truncated to {len}"));
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    std::fs::write(t.path(), &longer).unwrap();
    expect_corrupt(Consumer::open(t.path()), "extended");
    // Inconsistent counters.
    let mut b = good.clone();
    put64(&mut b, C_COMMITTED, 2);
    std::fs::write(t.path(), &b).unwrap();
    expect_corrupt(Consumer::open(t.path()), "committed beyond published");
    expect_corrupt(Producer::reopen(t.path()), "committed beyond published");
    let mut b = good.clone();
    put64(&mut b, P_PUBLISHED, 40);
    std::fs::write(t.path(), &b).unwrap();
    expect_corrupt(Consumer::open(t.path()), "more published than slots");
    expect_corrupt(Producer::reopen(t.path()), "more published than slots");
    let mut b = good.clone();
    put64(&mut b, P_PAYLOAD_HEAD, 100);
    std::fs::write(t.path(), &b).unwrap();
    expect_corrupt(Producer::reopen(t.path()), "unaligned payload head");
    // Intact again.
    std::fs::write(t.path(), &good).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    assert_eq!(c.disk_name(), "disk-α");
    check_write(&c.next().unwrap().unwrap());
}

#[test]
fn geometry_and_name_validation() {
    let t = TempRing::new("geometry");
    for g in [
        geo(15, 1),
        geo(17, 1),
        geo(8, 1),
        geo(MAX_SLOTS * 2, 1),
        geo(16, 0),
        geo(16, 1 << 30),
    ] {
        let e = Producer::create(t.path(), g, "d", 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{g:?}");
    }
    let e = Producer::create(
        t.path(),
        Geometry {
            slots: 16,
            payload_bytes: 4097,
        },
        "d",
        0,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = Producer::create(t.path(), geo(16, 1), &"x".repeat(65), 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = Producer::create(t.path(), geo(16, 1), "a\0b", 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(!t.path().exists());
    let p = Producer::create(t.path(), geo(16, 1), &"x".repeat(64), 0).unwrap();
    assert_eq!(
        Consumer::open(t.path()).unwrap().disk_name(),
        "x".repeat(64)
    );
    drop(p);
    // No temporary files left behind.
    let dir = std::env::temp_dir();
    let prefix = t.path().file_name().unwrap().to_string_lossy().to_string() + ".tmp";
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.starts_with(&prefix), "left behind: {name}");
    }
}

#[test]
fn generation_and_stale() {
    let t = TempRing::new("stale");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    write(&mut p, 1, 10).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    c.check_generation().unwrap();
    let gen1 = p.generation();
    // A live producer keeps others out, and create refuses to replace its ring.
    assert!(Producer::reopen(t.path()).is_err());
    assert!(Producer::create(t.path(), geo(16, 4), "d", 0).is_err());
    c.check_generation().unwrap();
    drop(p);
    // Reopen keeps the generation: the consumer carries on.
    let mut p = Producer::reopen(t.path()).unwrap();
    assert_eq!(p.generation(), gen1);
    write(&mut p, 2, 10).unwrap();
    c.check_generation().unwrap();
    assert_eq!(c.next().unwrap().unwrap().record.seq, 1);
    assert_eq!(c.next().unwrap().unwrap().record.seq, 2);
    drop(p);
    // Create replaces the ring: new generation, the old consumer is stale
    // but its mapping still works.
    let p = Producer::create(t.path(), geo(32, 4), "d2", 0).unwrap();
    assert_ne!(p.generation(), gen1);
    let e = c.check_generation().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Stale, "{e}");
    assert!(c.next().unwrap().is_none());
    c.commit(2).unwrap();
    let c2 = Consumer::open(t.path()).unwrap();
    assert_eq!(c2.generation(), p.generation());
    assert_eq!(
        (c2.published(), c2.committed(), c2.disk_name()),
        (0, 0, "d2")
    );
    c2.check_generation().unwrap();
    std::fs::remove_file(t.path()).unwrap();
    assert_eq!(c2.check_generation().unwrap_err().kind(), ErrorKind::Stale);
}

#[test]
fn single_consumer_and_commit_bounds() {
    let t = TempRing::new("consumer");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    for seq in 1..=5 {
        meta(&mut p, seq, RecordKind::Trim).unwrap();
    }
    let mut c = Consumer::open(t.path()).unwrap();
    assert!(Consumer::open(t.path()).is_err());
    assert_eq!(c.commit(1).unwrap_err().kind(), ErrorKind::InvalidInput);
    c.next().unwrap().unwrap();
    c.next().unwrap().unwrap();
    c.commit(2).unwrap();
    c.commit(1).unwrap(); // no-op
    assert_eq!(c.committed(), 2);
    c.next().unwrap().unwrap();
    c.rewind();
    assert_eq!(c.cursor(), 2);
    // Records delivered before a rewind may be committed.
    c.commit(3).unwrap();
    assert_eq!(c.cursor(), 3);
    assert_eq!(c.next().unwrap().unwrap().record.seq, 4);
    drop(c);
    // A restarted consumer resumes at committed.
    let mut c = Consumer::open(t.path()).unwrap();
    assert_eq!(c.next().unwrap().unwrap().index, 3);
    assert_eq!(p.consumer_heartbeat().0, std::process::id());
    assert!(p.consumer_heartbeat().1 > 0);
}

#[test]
fn wrap_around_many_times() {
    let t = TempRing::new("wrap");
    let area = 4 * 4096;
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    let mut next_expected = 1u64;
    let mut last_pos = 0;
    let n = 3000u64;
    for seq in 1..=n {
        let len = usize::try_from((seq * 2654435761) % 9000).unwrap() + 1;
        // Make room when needed: drain and commit everything.
        let mut drain = |c: &mut Consumer| {
            while let Some(v) = c.next().unwrap() {
                assert_eq!(v.record.seq, next_expected);
                check_write(&v);
                next_expected += 1;
            }
            c.commit(c.cursor()).unwrap();
        };
        let mut slot = match p.reserve(len) {
            Some(s) => s,
            None => {
                drain(&mut c);
                p.reserve(len).expect("room after commit")
            }
        };
        if p.free_slots() == 0 {
            drain(&mut c);
        }
        assert!(slot.position() >= last_pos);
        last_pos = slot.position();
        let data = pattern(seq, len);
        slot.as_mut_slice().copy_from_slice(&data);
        let rec = NewRecord {
            length: u(len),
            checksum: payload_checksum(&data),
            payload: Some(slot),
            ..NewRecord::new(seq, RecordKind::Write)
        };
        p.publish(rec).unwrap();
        // Drain part of the backlog now and then.
        if seq.is_multiple_of(3) {
            if let Some(v) = c.next().unwrap() {
                assert_eq!(v.record.seq, next_expected);
                check_write(&v);
                next_expected += 1;
                let end = v.index + 1;
                c.commit(end).unwrap();
            }
        }
    }
    while let Some(v) = c.next().unwrap() {
        assert_eq!(v.record.seq, next_expected);
        check_write(&v);
        next_expected += 1;
    }
    c.commit(c.cursor()).unwrap();
    assert_eq!(next_expected, n + 1);
    assert_eq!(p.published(), n);
    assert!(n > 100 * 16, "record indexes wrapped many times");
    assert!(
        last_pos > 100 * area,
        "payload area wrapped many times: {last_pos}"
    );
    assert_eq!(p.free_payload_bytes(), area);
    assert_eq!(p.free_slots(), 16);
}

#[test]
fn skip_to_start_counts_as_used() {
    const K4: u64 = 4096;
    let t = TempRing::new("skip");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    write(&mut p, 1, 4096 * 3).unwrap(); // 0..12K
    c.next().unwrap().unwrap();
    c.commit(1).unwrap();
    write(&mut p, 2, 4096).unwrap(); // 12K..16K
    assert_eq!(p.free_payload_bytes(), 3 * K4);
    let s = p.reserve(8192).unwrap(); // 16K..24K = place 0..8K
    assert_eq!(s.position(), 4 * K4);
    assert_eq!(p.free_payload_bytes(), K4);
    // Cancelled behind a live region: freed when the tail gets there.
    drop(s);
    assert_eq!(p.free_payload_bytes(), K4);
    check_write(&c.next().unwrap().unwrap());
    c.commit(2).unwrap();
    assert_eq!(p.free_payload_bytes(), 4 * K4);
    // head = 24K (place 8K).
    write(&mut p, 3, 4096).unwrap(); // 24K..28K = place 8K..12K
    assert_eq!(p.free_payload_bytes(), 3 * K4);
    // 8K does not fit before the end (place 12K): skip 4K to place 0; the
    // skipped bytes count as used.
    let s = p.reserve(8192).unwrap();
    assert_eq!(s.position(), 8 * K4);
    assert_eq!(p.free_payload_bytes(), 0);
    drop(s);
    check_write(&c.next().unwrap().unwrap());
    c.commit(3).unwrap();
    assert_eq!(p.free_payload_bytes(), 4 * K4);
    // head = 40K (place 8K).
    write(&mut p, 4, 4096).unwrap(); // 40K..44K = place 8K..12K
    assert_eq!(p.free_payload_bytes(), 3 * K4);
    // 12K bytes are free but not contiguous: the skip makes it not fit.
    assert!(p.reserve(3 * 4096).is_none());
    let s = p.reserve(2 * 4096).unwrap();
    assert_eq!(s.position(), 12 * K4);
    assert_eq!(p.free_payload_bytes(), 0);
    drop(s);
    // With nothing live, no skip is charged: the whole area fits anywhere.
    check_write(&c.next().unwrap().unwrap());
    c.commit(4).unwrap();
    let s = p.reserve(4 * 4096).unwrap();
    assert_eq!(s.position() % (4 * K4), 0);
    assert_eq!(p.free_payload_bytes(), 0);
    drop(s);
    assert_eq!(p.free_payload_bytes(), 4 * K4);
}

#[test]
fn reserve_and_slots_full_then_commit() {
    let t = TempRing::new("full");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    assert!(p.reserve(4 * 4096 + 1).is_none());
    assert!(p.reserve(usize::MAX).is_none());
    for seq in 1..=4 {
        write(&mut p, seq, 4000).unwrap();
    }
    assert_eq!(p.free_payload_bytes(), 0);
    assert!(p.reserve(1).is_none());
    // Metadata records still go in.
    for seq in 5..=16 {
        meta(&mut p, seq, RecordKind::Write).unwrap();
    }
    assert_eq!(p.free_slots(), 0);
    let slot = p.reserve(0).unwrap();
    let rec = NewRecord {
        payload: Some(slot),
        ..NewRecord::new(17, RecordKind::Write)
    };
    match p.publish(rec) {
        Err(PublishError::Full(r)) => {
            assert_eq!(r.seq, 17);
            assert!(r.payload.is_some());
            assert!(PublishError::Full(r).to_string().contains("full"));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(p.published(), 16);
    for _ in 0..2 {
        check_write(&c.next().unwrap().unwrap());
    }
    c.commit(2).unwrap();
    assert_eq!(p.free_slots(), 2);
    assert_eq!(p.free_payload_bytes(), 2 * 4096);
    write(&mut p, 17, 8192).unwrap();
    meta(&mut p, 18, RecordKind::Flush).unwrap();
    assert_eq!(p.free_slots(), 0);
    while c.next().unwrap().is_some() {}
    c.commit(18).unwrap();
    assert_eq!((p.free_slots(), p.free_payload_bytes()), (16, 4 * 4096));
}

#[test]
fn out_of_order_publish() {
    let t = TempRing::new("ooo");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    let mut a = p.reserve(5000).unwrap();
    let mut b = p.reserve(3000).unwrap();
    assert!(a.position() < b.position());
    // Fill from other threads: slots are Send and need no producer.
    let (a_data, b_data) = (pattern(2, 5000), pattern(1, 3000));
    std::thread::scope(|s| {
        s.spawn(|| a.as_mut_slice().copy_from_slice(&a_data));
        s.spawn(|| b.as_mut_slice().copy_from_slice(&b_data));
    });
    assert_eq!(a.as_slice(), &a_data[..]);
    let rb = NewRecord {
        length: 3000,
        checksum: payload_checksum(&b_data),
        payload: Some(b),
        ..NewRecord::new(1, RecordKind::Write)
    };
    let ra = NewRecord {
        length: 5000,
        checksum: payload_checksum(&a_data),
        payload: Some(a),
        ..NewRecord::new(2, RecordKind::Write)
    };
    assert_eq!(p.publish(rb).unwrap(), 0);
    assert_eq!(p.publish(ra).unwrap(), 1);
    let v = c.next().unwrap().unwrap();
    assert_eq!(v.record.seq, 1);
    check_write(&v);
    let v = c.next().unwrap().unwrap();
    assert_eq!(v.record.seq, 2);
    check_write(&v);
    assert_eq!(p.free_payload_bytes(), 4096);
    // Committing B (index 0) cannot free space: A, reserved earlier, is
    // still needed and B's bytes lie after it.
    c.commit(1).unwrap();
    assert_eq!(p.free_payload_bytes(), 4096);
    c.commit(2).unwrap();
    assert_eq!(p.free_payload_bytes(), 4 * 4096);
}

#[test]
fn cancelled_reservations_free_space() {
    let t = TempRing::new("cancel");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    let whole = p.reserve(4 * 4096).unwrap();
    assert!(p.reserve(1).is_none());
    drop(whole);
    assert_eq!(p.free_payload_bytes(), 4 * 4096);
    let whole = p.reserve(4 * 4096).unwrap();
    drop(whole);
    // Cancel in the middle: freed when the regions before it are.
    let mut a = p.reserve(4096).unwrap();
    let b = p.reserve(4096).unwrap();
    let mut cc = p.reserve(4096).unwrap();
    a.as_mut_slice().fill(1);
    cc.as_mut_slice().fill(3);
    let b_pos = b.position();
    // Dropped on another thread.
    std::thread::spawn(move || drop(b)).join().unwrap();
    let ra = NewRecord {
        length: 4096,
        checksum: payload_checksum(&[1; 4096]),
        payload: Some(a),
        ..NewRecord::new(1, RecordKind::Write)
    };
    let rc = NewRecord {
        length: 4096,
        checksum: payload_checksum(&[3; 4096]),
        payload: Some(cc),
        ..NewRecord::new(2, RecordKind::Write)
    };
    p.publish(ra).unwrap();
    p.publish(rc).unwrap();
    assert_eq!(p.free_payload_bytes(), 4096);
    let v = c.next().unwrap().unwrap();
    v.verify_payload().unwrap();
    let v = c.next().unwrap().unwrap();
    v.verify_payload().unwrap();
    assert!(v.record.payload_pos > b_pos);
    c.commit(1).unwrap();
    // A and the cancelled B are free now; C is not.
    assert_eq!(p.free_payload_bytes(), 3 * 4096);
    c.commit(2).unwrap();
    assert_eq!(p.free_payload_bytes(), 4 * 4096);
    // A slot that outlives its producer is harmless.
    let late = p.reserve(100).unwrap();
    drop(p);
    drop(late);
}

#[test]
fn invalid_records() {
    let t = TempRing::new("invalid");
    let t2 = TempRing::new("invalid2");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut other = Producer::create(t2.path(), geo(16, 4), "e", 0).unwrap();
    let is_invalid = |r: Result<u64, PublishError>| match r {
        Err(PublishError::Invalid(e)) => assert_eq!(e.kind(), ErrorKind::InvalidInput),
        other => panic!("expected Invalid, got {other:?}"),
    };
    meta(&mut p, 10, RecordKind::Write).unwrap();
    is_invalid(meta(&mut p, 10, RecordKind::Write));
    is_invalid(meta(&mut p, 9, RecordKind::Write));
    let slot = p.reserve(100).unwrap();
    is_invalid(p.publish(NewRecord {
        length: 99,
        payload: Some(slot),
        ..NewRecord::new(11, RecordKind::Write)
    }));
    let slot = other.reserve(100).unwrap();
    is_invalid(p.publish(NewRecord {
        length: 100,
        payload: Some(slot),
        ..NewRecord::new(11, RecordKind::Write)
    }));
    is_invalid(p.publish(NewRecord {
        flags: FLAG_HAS_PAYLOAD,
        ..NewRecord::new(11, RecordKind::Write)
    }));
    is_invalid(p.publish(NewRecord {
        flags: 0x40,
        ..NewRecord::new(11, RecordKind::Write)
    }));
    // The rejected payloads were released.
    assert_eq!(p.free_payload_bytes(), 4 * 4096);
    assert_eq!(other.free_payload_bytes(), 4 * 4096);
    assert_eq!(meta(&mut p, 11, RecordKind::Write).unwrap(), 1);
}

#[test]
fn corrupt_records_are_reported() {
    let t = TempRing::new("badrec");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    write(&mut p, 1, 100).unwrap();
    write(&mut p, 2, 100).unwrap();
    write(&mut p, 3, 100).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path())
        .unwrap();
    let slot_off = |i: u64| u(HEADER_SIZE) + i * u(RECORD_SIZE);
    let read_slot = |i: u64| {
        let mut b = [0u8; RECORD_SIZE];
        file.read_exact_at(&mut b, slot_off(i)).unwrap();
        b
    };
    // Record 1: payload outside the area (with a valid record crc).
    let mut r = Record::decode(&read_slot(1)).unwrap();
    r.payload_pos = 3 * 4096;
    r.length = 8192;
    file.write_all_at(&r.encode(), slot_off(1)).unwrap();
    // Record 2: garbage.
    file.write_all_at(&[0xa5; 64], slot_off(2)).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    check_write(&c.next().unwrap().unwrap());
    let e = c.next().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string()
            .contains(&format!("at offset {}", slot_off(1))),
        "{e}"
    );
    expect_corrupt(c.lag(), "lag over a corrupt record");
    // Producer reopen refuses the corrupt backlog too.
    drop(p);
    expect_corrupt(Producer::reopen(t.path()), "reopen over corrupt records");
    // A non-increasing seq in the ring.
    let mut r0 = Record::decode(&read_slot(0)).unwrap();
    r0.seq = 5;
    file.write_all_at(&r0.encode(), slot_off(0)).unwrap();
    let mut r1 = r0;
    r1.seq = 4;
    r1.payload_pos = NO_PAYLOAD;
    r1.flags = 0;
    file.write_all_at(&r1.encode(), slot_off(1)).unwrap();
    c.rewind();
    c.next().unwrap().unwrap();
    expect_corrupt(c.next().map(|v| v.map(|v| v.index)), "seq going backwards");
    // Hostile counters.
    file.write_all_at(&100u64.to_le_bytes(), u(P_PUBLISHED))
        .unwrap();
    expect_corrupt(c.next().map(|v| v.map(|v| v.index)), "published far ahead");
}

#[test]
fn producer_reopen_after_crash() {
    let t = TempRing::new("reopen");
    let area = 8 * 4096;
    let mut p = Producer::create(t.path(), geo(16, 8), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    for seq in 1..=5 {
        write(&mut p, seq, 3000).unwrap();
    }
    for _ in 0..2 {
        check_write(&c.next().unwrap().unwrap());
    }
    c.commit(2).unwrap();
    let mut pending = p.reserve(4096).unwrap();
    pending.as_mut_slice().fill(9);
    // kill -9: the reservation dies with the process.
    drop(pending);
    drop(p);
    let mut p = Producer::reopen(t.path()).unwrap();
    assert_eq!(
        (p.published(), p.committed(), p.last_seq()),
        (5, 2, Some(5))
    );
    assert_eq!(p.free_slots(), 13);
    assert_eq!(p.free_payload_bytes(), area - 3 * 4096);
    assert!(matches!(
        meta(&mut p, 5, RecordKind::Write),
        Err(PublishError::Invalid(_))
    ));
    write(&mut p, 100, 5000).unwrap();
    // The consumer carried on through the producer's crash.
    let mut seqs = vec![];
    while let Some(v) = c.next().unwrap() {
        check_write(&v);
        seqs.push(v.record.seq);
    }
    assert_eq!(seqs, vec![3, 4, 5, 100]);
    c.commit(6).unwrap();
    assert_eq!((p.free_slots(), p.free_payload_bytes()), (16, area));
    // Reopen of a fully committed ring, and of an empty one.
    drop(p);
    let mut p = Producer::reopen(t.path()).unwrap();
    assert_eq!(
        (p.published(), p.last_seq(), p.free_payload_bytes()),
        (6, Some(100), area)
    );
    drop(p);
    drop(c);
    let t2 = TempRing::new("reopen-empty");
    drop(Producer::create(t2.path(), geo(16, 1), "d", 0).unwrap());
    let mut p = Producer::reopen(t2.path()).unwrap();
    assert_eq!(
        (p.published(), p.last_seq(), p.free_payload_bytes()),
        (0, None, 4096)
    );
    meta(&mut p, 0, RecordKind::Flush).unwrap();
}

#[test]
fn lag_and_wait() {
    let t = TempRing::new("lag");
    let mut p = Producer::create(t.path(), geo(16, 4), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    assert!(!c.wait(Duration::from_millis(5)).unwrap());
    let old = now_ns() - 2_000_000_000;
    let mut slot = p.reserve(700).unwrap();
    slot.as_mut_slice().fill(0);
    let rec = NewRecord {
        timestamp_ns: old,
        length: 700,
        payload: Some(slot),
        ..NewRecord::new(1, RecordKind::Write)
    };
    p.publish(rec).unwrap();
    meta(&mut p, 2, RecordKind::Trim).unwrap();
    let lag = c.lag().unwrap();
    assert_eq!((lag.records, lag.payload_bytes), (2, 700));
    assert!(lag.oldest_age.unwrap() >= Duration::from_secs(2));
    assert!(c.wait(Duration::from_secs(5)).unwrap());
    // A waiting consumer is woken by a publish from another thread.
    while c.next().unwrap().is_some() {}
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        meta(&mut p, 3, RecordKind::Flush).unwrap();
        p
    });
    let start = std::time::Instant::now();
    let mut woke = false;
    while start.elapsed() < Duration::from_secs(10) && !woke {
        woke = c.wait(Duration::from_secs(10)).unwrap();
    }
    assert!(woke);
    assert!(start.elapsed() < Duration::from_secs(5));
    producer.join().unwrap();
}

#[test]
fn two_threads() {
    let t = TempRing::new("threads");
    let n = 20_000u64;
    let area = 16 * 4096;
    let p = Producer::create(t.path(), geo(64, 16), "d", 0).unwrap();
    let mut c = Consumer::open(t.path()).unwrap();
    let len_of = |seq: u64| usize::try_from((seq * 7919) % 9000).unwrap() + 1;
    let producer = std::thread::spawn(move || {
        let mut p = p;
        for seq in 1..=n {
            let len = len_of(seq);
            let mut slot = loop {
                match p.reserve(len) {
                    Some(s) => break s,
                    None => std::thread::yield_now(),
                }
            };
            let data = pattern(seq, len);
            slot.as_mut_slice().copy_from_slice(&data);
            let mut rec = NewRecord {
                length: u(len),
                checksum: payload_checksum(&data),
                payload: Some(slot),
                ..NewRecord::new(seq, RecordKind::Write)
            };
            loop {
                match p.publish(rec) {
                    Ok(_) => break,
                    Err(PublishError::Full(r)) => {
                        rec = *r;
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        p
    });
    let mut expected = 1u64;
    while expected <= n {
        let mut got = 0;
        while let Some(v) = c.next().unwrap() {
            assert_eq!(v.record.seq, expected);
            assert_eq!(v.payload.unwrap().len(), len_of(expected));
            check_write(&v);
            expected += 1;
            got += 1;
            if got % 8 == 0 {
                let end = v.index + 1;
                c.commit(end).unwrap();
            }
        }
        c.commit(c.cursor()).unwrap();
        if expected <= n {
            c.wait(Duration::from_millis(20)).unwrap();
        }
    }
    let mut p = producer.join().unwrap();
    assert_eq!(p.published(), n);
    assert_eq!((p.free_slots(), p.free_payload_bytes()), (64, area));
}

// ---- model-based property test -------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Reserve(usize),
    PublishReserved(usize),
    PublishMeta,
    Cancel(usize),
    Next(u8),
    Commit(u8),
    Rewind,
    ConsumerCrash,
    ProducerCrash,
}

const P_SLOTS: u32 = 16;
const P_AREA: usize = 8 * 4096;

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        Just(0usize),
        1..=4096usize,
        1..=P_AREA,
        P_AREA..=P_AREA + 5000
    ];
    prop_oneof![
        4 => len.prop_map(Op::Reserve),
        4 => any::<usize>().prop_map(Op::PublishReserved),
        1 => Just(Op::PublishMeta),
        1 => any::<usize>().prop_map(Op::Cancel),
        4 => (1u8..8).prop_map(Op::Next),
        2 => any::<u8>().prop_map(Op::Commit),
        1 => Just(Op::Rewind),
        1 => Just(Op::ConsumerCrash),
        1 => Just(Op::ProducerCrash),
    ]
}

/// What the model knows about a published record.
#[derive(Debug, Clone, Copy)]
struct Expected {
    seq: u64,
    /// Payload key and length, if any.
    payload: Option<(u64, usize)>,
}

struct Model {
    path: PathBuf,
    p: Option<Producer>,
    c: Option<Consumer>,
    /// Outstanding reservations with their fill key.
    outstanding: Vec<(PayloadSlot, u64)>,
    published: Vec<Expected>,
    seen: Vec<bool>,
    committed: u64,
    cursor: u64,
    next_seq: u64,
    next_key: u64,
}

impl Model {
    fn publish(
        &mut self,
        rec: NewRecord,
        payload: Option<(u64, usize)>,
    ) -> Result<(), TestCaseError> {
        let seq = rec.seq;
        match self.p.as_mut().unwrap().publish(rec) {
            Ok(index) => {
                prop_assert_eq!(index, u(self.published.len()));
                self.published.push(Expected { seq, payload });
                self.seen.push(false);
                self.next_seq += 1 + seq % 3; // gaps: other disks share the sequence
            }
            Err(PublishError::Full(_)) => {
                prop_assert_eq!(u(self.published.len()) - self.committed, u64::from(P_SLOTS));
            }
            Err(PublishError::Invalid(e)) => prop_assert!(false, "invalid: {}", e),
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let area = u(P_AREA);
        match *op {
            Op::Reserve(len) => {
                let nothing_live = self.outstanding.is_empty()
                    && self.published[usize::try_from(self.committed).unwrap()..]
                        .iter()
                        .all(|e| e.payload.is_none());
                match self.p.as_mut().unwrap().reserve(len) {
                    Some(mut slot) => {
                        prop_assert_eq!(slot.len(), len);
                        prop_assert!(len <= P_AREA);
                        let key = self.next_key;
                        self.next_key += 1;
                        slot.as_mut_slice().copy_from_slice(&pattern(key, len));
                        self.outstanding.push((slot, key));
                    }
                    None => prop_assert!(
                        len > P_AREA || !nothing_live,
                        "reserve({}) failed on an idle ring",
                        len
                    ),
                }
            }
            Op::PublishReserved(k) => {
                if self.outstanding.is_empty() {
                    return Ok(());
                }
                let (slot, key) = self.outstanding.remove(k % self.outstanding.len());
                let len = slot.len();
                let rec = NewRecord {
                    length: u(len),
                    checksum: payload_checksum(&pattern(key, len)),
                    payload: Some(slot),
                    ..NewRecord::new(self.next_seq, RecordKind::Write)
                };
                self.publish(rec, Some((key, len)))?;
            }
            Op::PublishMeta => {
                let rec = NewRecord {
                    length: 4096,
                    ..NewRecord::new(self.next_seq, RecordKind::WriteZeroes)
                };
                self.publish(rec, None)?;
            }
            Op::Cancel(k) => {
                if !self.outstanding.is_empty() {
                    let n = self.outstanding.len();
                    drop(self.outstanding.remove(k % n));
                }
            }
            Op::Next(n) => {
                for _ in 0..n {
                    match self
                        .c
                        .as_mut()
                        .unwrap()
                        .next()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                    {
                        Some(v) => {
                            prop_assert_eq!(v.index, self.cursor);
                            prop_assert!(
                                v.index >= self.committed,
                                "committed record delivered again"
                            );
                            let i = usize::try_from(v.index).unwrap();
                            let exp = self.published[i];
                            prop_assert_eq!(v.record.seq, exp.seq);
                            match exp.payload {
                                Some((key, len)) => {
                                    let got = v.payload.expect("payload");
                                    prop_assert!(
                                        got == &pattern(key, len)[..],
                                        "payload of record {} damaged",
                                        i
                                    );
                                    prop_assert!(v.verify_payload().is_ok());
                                }
                                None => prop_assert!(v.payload.is_none()),
                            }
                            self.seen[i] = true;
                            self.cursor += 1;
                        }
                        None => {
                            prop_assert_eq!(self.cursor, u(self.published.len()));
                            break;
                        }
                    }
                }
            }
            Op::Commit(frac) => {
                let end = self.committed + (self.cursor - self.committed) * u64::from(frac) / 255;
                self.c
                    .as_mut()
                    .unwrap()
                    .commit(end)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.committed = self.committed.max(end);
            }
            Op::Rewind => {
                self.c.as_mut().unwrap().rewind();
                self.cursor = self.committed;
            }
            Op::ConsumerCrash => {
                // The dead consumer's lock goes with it, then a new one opens.
                self.c = None;
                let c =
                    Consumer::open(&self.path).map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.c = Some(c);
                prop_assert_eq!(self.c.as_mut().unwrap().committed(), self.committed);
                self.cursor = self.committed;
            }
            Op::ProducerCrash => {
                // kill -9: the producer and its reservations go (the slots
                // after the producer, to exercise that order too).
                self.p = None;
                self.outstanding.clear();
                let p =
                    Producer::reopen(&self.path).map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.p = Some(p);
                prop_assert_eq!(
                    self.p.as_mut().unwrap().published(),
                    u(self.published.len())
                );
                prop_assert_eq!(
                    self.p.as_mut().unwrap().last_seq(),
                    self.published.last().map(|e| e.seq)
                );
            }
        }
        // Accounting invariants after every step.
        let backlog = u(self.published.len()) - self.committed;
        prop_assert_eq!(
            self.p.as_mut().unwrap().free_slots() + backlog,
            u64::from(P_SLOTS)
        );
        let free = self.p.as_mut().unwrap().free_payload_bytes();
        prop_assert!(free <= area);
        let reserved: u64 = self.outstanding.iter().map(|(s, _)| u(s.len())).sum();
        prop_assert!(
            free + reserved <= area,
            "free {} + reserved {} > area",
            free,
            reserved
        );
        prop_assert_eq!(
            self.c.as_mut().unwrap().published(),
            u(self.published.len())
        );
        Ok(())
    }
}

fn run_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let t = TempRing::new("model");
    let p = Producer::create(
        t.path(),
        geo(P_SLOTS, u(P_AREA) / PAYLOAD_ALIGN),
        "m",
        1 << 20,
    )
    .unwrap();
    let c = Consumer::open(t.path()).unwrap();
    let mut m = Model {
        path: t.path().to_path_buf(),
        p: Some(p),
        c: Some(c),
        outstanding: vec![],
        published: vec![],
        seen: vec![],
        committed: 0,
        cursor: 0,
        next_seq: 1,
        next_key: 0,
    };
    for op in ops {
        m.step(op)?;
    }
    // Drain everything, drop all reservations: nothing lost, nothing leaked.
    m.outstanding.clear();
    m.step(&Op::Next(u8::MAX))?;
    while m.cursor < u(m.published.len()) {
        m.step(&Op::Next(u8::MAX))?;
    }
    m.step(&Op::Commit(255))?;
    prop_assert!(
        m.seen.iter().all(|&s| s),
        "a published record was never delivered"
    );
    prop_assert_eq!(m.p.as_mut().unwrap().free_payload_bytes(), u(P_AREA));
    prop_assert_eq!(m.p.as_mut().unwrap().free_slots(), u64::from(P_SLOTS));
    prop_assert_eq!(m.p.as_mut().unwrap().committed(), u(m.published.len()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn model_interleavings(ops in proptest::collection::vec(op(), 1..250)) {
        run_model(&ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A hostile or damaged ring (header kept intact) never makes the
    /// consumer or a reopening producer panic: it is delivered or Corrupt.
    #[test]
    fn hostile_ring_never_panics(
        edits in proptest::collection::vec((prop_oneof![
            P_PUBLISHED..C_WAITING + 4,
            HEADER_SIZE..HEADER_SIZE + 16 * RECORD_SIZE,
            HEADER_SIZE..HEADER_SIZE + 16 * RECORD_SIZE + 16 * 4096,
        ], any::<u8>()), 0..20),
        forged in proptest::collection::vec((0u64..16, 0usize..6, any::<u64>(), any::<bool>()), 0..4),
        wide in proptest::collection::vec((0usize..4, any::<u64>()), 0..3),
    ) {
        let t = TempRing::new("hostile");
        {
            let mut p = Producer::create(t.path(), geo(16, 16), "h", 0).unwrap();
            for seq in 1..=10 {
                if seq % 2 == 0 {
                    write(&mut p, seq, usize::try_from(seq * 500).unwrap()).unwrap();
                } else {
                    meta(&mut p, seq, RecordKind::Trim).unwrap();
                }
            }
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).open(t.path()).unwrap();
        for (off, byte) in edits {
            file.write_all_at(&[byte], u(off)).unwrap();
        }
        // Records with a valid crc but hostile fields.
        for (slot, field, v, small) in forged {
            let off = u(HEADER_SIZE) + slot * u(RECORD_SIZE);
            let mut bytes = [0u8; RECORD_SIZE];
            file.read_exact_at(&mut bytes, off).unwrap();
            let Ok(mut r) = Record::decode(&bytes) else { continue };
            let v = if small { v % 70_000 } else { v };
            match field {
                0 => r.seq = v,
                1 => r.length = v,
                2 => r.payload_pos = v,
                3 => r.flags ^= FLAG_HAS_PAYLOAD,
                4 => r.timestamp_ns = v,
                _ => r.offset = v,
            }
            file.write_all_at(&r.encode(), off).unwrap();
        }
        let counters = [P_PUBLISHED, P_PAYLOAD_HEAD, C_COMMITTED, HEADER_SIZE + R_PAYLOAD_POS];
        for (which, v) in wide {
            file.write_all_at(&v.to_le_bytes(), u(counters[which])).unwrap();
        }
        let ok_or_corrupt = |e: &crate::Error| -> Result<(), TestCaseError> {
            prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e);
            Ok(())
        };
        match Consumer::open(t.path()) {
            Ok(mut c) => {
                for _ in 0..40 {
                    match c.next() {
                        Ok(Some(v)) => {
                            let _ = v.verify_payload();
                            let end = v.index + 1;
                            c.commit(end).unwrap();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            ok_or_corrupt(&e)?;
                            break;
                        }
                    }
                }
                if let Err(e) = c.lag() {
                    ok_or_corrupt(&e)?;
                }
            }
            Err(e) => ok_or_corrupt(&e)?,
        }
        match Producer::reopen(t.path()) {
            Ok(mut p) => {
                let _ = p.free_payload_bytes();
                let _ = p.free_slots();
                let seq = p.last_seq().map_or(0, |s| s.saturating_add(1));
                if seq < u64::MAX {
                    if let Some(mut s) = p.reserve(3000) {
                        s.as_mut_slice().fill(1);
                        let _ = p.publish(NewRecord { length: 3000, payload: Some(s), ..NewRecord::new(seq, RecordKind::Write) });
                    }
                }
            }
            Err(e) => ok_or_corrupt(&e)?,
        }
    }
}
