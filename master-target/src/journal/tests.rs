use super::*;

use ferry_protocol::message::{ChunkInfo, Extent, ExtentOp, Message};
use ferry_protocol::payload::{pack_change_set, Key};
use proptest::prelude::*;

use crate::testutil::{copy_dir, TempDir};

const DISK: &str = "disk0";

/// A change set with one Write extent of `n` bytes (raw chunk) and an opaque
/// "sealed" payload of `n + TAG_LEN` bytes.
fn mk(epoch: u64, kind: ChangeKind, first: u64, last: u64, prev: u64, n: u32) -> ChangeSet {
    let (extents, chunks) = if n == 0 {
        (Vec::new(), Vec::new())
    } else {
        (
            vec![Extent {
                seq: first,
                offset: first * 4096,
                length: u64::from(n),
                op: ExtentOp::Write,
            }],
            vec![ChunkInfo {
                raw_len: n,
                stored_len: n,
                compressed: false,
            }],
        )
    };
    let len = usize::try_from(n).unwrap() + TAG_LEN;
    let payload = (0..len)
        .map(|i| u8::try_from((i as u64 + first * 31 + epoch) % 251).unwrap())
        .collect();
    ChangeSet {
        header: ChangeSetHeader {
            host: "host1".into(),
            disk: DISK.into(),
            epoch,
            kind,
            first_seq: first,
            last_seq: last,
            prev_end_seq: prev,
            nonce_stream: 1,
            nonce_counter: first,
            key_salt: [0; 16],
            consistent_from: if kind == ChangeKind::WriteOrder {
                first
            } else {
                0
            },
            tags: Vec::new(),
            extents,
            chunks,
        },
        payload,
    }
}

/// Write-order set `[first, last]` after `prev` in epoch 1.
fn wo(first: u64, last: u64, prev: u64) -> ChangeSet {
    mk(1, ChangeKind::WriteOrder, first, last, prev, 40)
}

fn enc(cs: &ChangeSet) -> Vec<u8> {
    encode_change_set(cs).unwrap()
}

fn all(j: &Journal) -> Vec<ChangeSet> {
    j.iter_from(0).collect::<Result<Vec<_>>>().unwrap()
}

fn seg_path(root: &Path, segno: u64) -> PathBuf {
    root.join(DISK).join(JOURNAL_DIR).join(seg_name(segno))
}

fn small() -> JournalOptions {
    JournalOptions { segment_size: 600 }
}

/// Three-set journal `[1,1] [2,3] [4,4]`, returning the sets.
fn three(root: &Path) -> (Journal, Vec<ChangeSet>) {
    let (mut j, _) = Journal::open(root, DISK).unwrap();
    let sets = vec![wo(1, 1, 0), wo(2, 3, 1), wo(4, 4, 3)];
    for cs in &sets {
        j.append(cs).unwrap();
    }
    (j, sets)
}

#[test]
fn encoding_matches_protocol_message() {
    let cs = wo(5, 9, 4);
    let m = Message::ChangeSet(cs.clone()).encode().unwrap();
    assert_eq!(enc(&cs), m);
    assert_eq!(decode_change_set(&m).unwrap(), cs);
}

#[test]
fn append_reopen_round_trip() {
    let td = TempDir::new("roundtrip");
    let (mut j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.last_seq, None);
    assert_eq!(rec.change_sets, 0);
    let key = Key::from_bytes([7u8; 32]);
    let mut sets = Vec::new();
    let mut prev = 0;
    for i in 1..=5u64 {
        let data: Vec<u8> = (0..5000u32).map(|x| u8::try_from(x % 7).unwrap()).collect();
        let h = ChangeSetHeader {
            chunks: Vec::new(),
            ..mk(1, ChangeKind::WriteOrder, i * 10, i * 10 + 2, prev, 0).header
        };
        let h = ChangeSetHeader {
            extents: vec![Extent {
                seq: i * 10,
                offset: 0,
                length: 5000,
                op: ExtentOp::Write,
            }],
            ..h
        };
        let h = ChangeSetHeader {
            nonce_stream: 1,
            nonce_counter: i,
            key_salt: [0; 16],
            ..h
        };
        let cs = pack_change_set(&data, 1, &key, h).unwrap();
        let a = j.append(&cs).unwrap();
        assert_eq!(a.last_seq, i * 10 + 2);
        prev = i * 10 + 2;
        sets.push(cs);
    }
    assert_eq!(all(&j), sets);
    drop(j);
    let (j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.last_seq, Some(52));
    assert_eq!(rec.epoch, Some(1));
    assert_eq!(rec.change_sets, 5);
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(rec.torn_tail, None);
    let got = all(&j);
    assert_eq!(got, sets);
    for (g, s) in got.iter().zip(&sets) {
        assert_eq!(enc(g), enc(s));
    }
}

#[test]
fn duplicate_rejected_and_not_written() {
    let td = TempDir::new("dup");
    let (mut j, sets) = three(td.path());
    let len = fs::metadata(seg_path(td.path(), 0)).unwrap().len();
    for cs in [&sets[0], &sets[1], &sets[2], &wo(4, 6, 3), &wo(3, 5, 2)] {
        let e = j.append(cs).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Duplicate, "{e}");
        assert_eq!(e.expected_seq(), Some(4));
        assert_eq!(e.received_seq(), Some(cs.header.first_seq));
    }
    assert_eq!(fs::metadata(seg_path(td.path(), 0)).unwrap().len(), len);
    drop(j);
    let (j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.change_sets, 3);
    assert_eq!(all(&j), sets);
}

#[test]
fn gap_detected_with_expected_and_received() {
    let td = TempDir::new("gap");
    let (mut j, sets) = three(td.path());
    let len = fs::metadata(seg_path(td.path(), 0)).unwrap().len();
    let e = j.append(&wo(7, 8, 6)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Gap);
    assert_eq!(e.expected_seq(), Some(4));
    assert_eq!(e.received_seq(), Some(6));
    // Starts after the end but claims an earlier predecessor: also a gap.
    let e = j.append(&wo(5, 5, 2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Gap);
    assert_eq!(fs::metadata(seg_path(td.path(), 0)).unwrap().len(), len);
    // The right continuation still works.
    j.append(&wo(5, 5, 4)).unwrap();
    drop(j);
    let (j, _) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(all(&j).len(), sets.len() + 1);
}

#[test]
fn epoch_rules() {
    let td = TempDir::new("epoch");
    let (mut j, _) = three(td.path());
    // New epoch must declare the replica inconsistent.
    let e = j
        .append(&mk(2, ChangeKind::WriteOrder, 10, 12, 4, 8))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // New epoch must move the sequence forward.
    let e = j
        .append(&mk(2, ChangeKind::Resync, 3, 12, 0, 8))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // A Resync of a higher epoch starts a new chain: prev need not match.
    j.append(&mk(2, ChangeKind::Resync, 10, 12, 0, 8)).unwrap();
    assert_eq!(j.epoch(), Some(2));
    // Lower epoch now refused.
    let e = j.append(&wo(13, 13, 12)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Chain continues in epoch 2.
    j.append(&mk(2, ChangeKind::WriteOrder, 13, 14, 12, 3))
        .unwrap();
    drop(j);
    let (j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.last_seq, Some(14));
    assert_eq!(rec.epoch, Some(2));
    assert_eq!(all(&j).len(), 5);
}

#[test]
fn invalid_disk_and_foreign_change_set() {
    let td = TempDir::new("names");
    for bad in ["", ".", "..", "a/b", "x\0y", &"n".repeat(256)] {
        let e = Journal::open(td.path(), bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
    }
    let (mut j, _) = Journal::open(td.path(), DISK).unwrap();
    let mut cs = wo(1, 1, 0);
    cs.header.disk = "other".into();
    assert_eq!(j.append(&cs).unwrap_err().kind(), ErrorKind::InvalidInput);
    let mut cs = wo(1, 1, 0);
    cs.payload.pop();
    assert_eq!(j.append(&cs).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(j.last_seq(), None);
}

#[test]
fn segment_roll_over() {
    let td = TempDir::new("roll");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    let mut sets = Vec::new();
    let mut rolls = 0;
    for i in 1..=20u64 {
        let cs = wo(i, i, i - 1);
        let a = j.append(&cs).unwrap();
        if a.rolled {
            rolls += 1;
            assert_eq!(a.offset, SEG_HEADER_LEN);
        }
        assert!(a.offset + a.bytes <= 600 || a.offset == SEG_HEADER_LEN);
        sets.push(cs);
    }
    assert!(rolls >= 5, "{rolls}");
    assert_eq!(j.segment_count(), rolls + 1);
    drop(j);
    let (j, rec) = Journal::open_with(td.path(), DISK, small()).unwrap();
    assert_eq!(rec.segments, u64::try_from(rolls + 1).unwrap());
    assert_eq!(rec.change_sets, 20);
    assert_eq!(all(&j), sets);
    // A record larger than the limit still goes in (a segment of its own).
    drop(j);
    let (mut j, _) =
        Journal::open_with(td.path(), DISK, JournalOptions { segment_size: 1 }).unwrap();
    let a = j
        .append(&mk(1, ChangeKind::WriteOrder, 21, 21, 20, 2000))
        .unwrap();
    assert!(a.rolled);
    let b = j
        .append(&mk(1, ChangeKind::WriteOrder, 22, 22, 21, 2000))
        .unwrap();
    assert!(b.rolled);
    assert_eq!(b.segment, a.segment + 1);
}

#[test]
fn torn_tail_every_offset_and_garbage() {
    let td = TempDir::new("torn");
    let (mut j, sets) = three(td.path());
    let last = wo(5, 6, 4);
    let a = j.append(&last).unwrap();
    drop(j);
    let seg = seg_path(td.path(), 0);
    let full = fs::read(&seg).unwrap();
    let start = usize::try_from(a.offset).unwrap();
    assert_eq!(full.len(), start + usize::try_from(a.bytes).unwrap());
    // Every cut strictly inside the last record, plus garbage and zero fill.
    let mut cases: Vec<Vec<u8>> = (start + 1..full.len())
        .map(|cut| full[..cut].to_vec())
        .collect();
    let mut g = full[..start].to_vec();
    g.extend_from_slice(b"garbage that is not a record at all");
    cases.push(g);
    let mut g = full[..start + 20].to_vec();
    g.extend(std::iter::repeat_n(0u8, 300));
    cases.push(g);
    let mut g = full[..start].to_vec();
    g.extend_from_slice(&REC_MAGIC.to_le_bytes());
    g.extend_from_slice(&u32::MAX.to_le_bytes());
    cases.push(g);
    for bytes in cases {
        let t2 = TempDir::new("torn-case");
        copy_dir(td.path(), t2.path());
        fs::write(seg_path(t2.path(), 0), &bytes).unwrap();
        let (mut j, rec) = Journal::open(t2.path(), DISK).unwrap();
        assert_eq!(
            rec.truncated_bytes,
            u64::try_from(bytes.len() - start).unwrap()
        );
        assert_eq!(rec.torn_tail, Some((seg_path(t2.path(), 0), a.offset)));
        assert_eq!(rec.last_seq, Some(4));
        assert_eq!(all(&j), sets);
        assert_eq!(
            fs::metadata(seg_path(t2.path(), 0)).unwrap().len(),
            a.offset
        );
        // Appends continue (the lost un-acked set is re-sent).
        j.append(&last).unwrap();
        drop(j);
        let (j, rec) = Journal::open(t2.path(), DISK).unwrap();
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(rec.change_sets, 4);
        assert_eq!(all(&j).last(), Some(&last));
    }
}

#[test]
fn corruption_in_the_middle_is_reported() {
    let td = TempDir::new("mid");
    let (j, _) = three(td.path());
    let offs: Vec<u64> = j.segments[0].records.iter().map(|r| r.offset).collect();
    let lens: Vec<u64> = j.segments[0]
        .records
        .iter()
        .map(|r| REC_HEADER_LEN + u64::from(r.body_len))
        .collect();
    drop(j);
    let seg = seg_path(td.path(), 0);
    let full = fs::read(&seg).unwrap();
    // Every byte of the first two records (each followed by valid data).
    for rec in 0..2 {
        for k in 0..lens[rec] {
            let pos = usize::try_from(offs[rec] + k).unwrap();
            let mut b = full.clone();
            b[pos] ^= 0x40;
            fs::write(&seg, &b).unwrap();
            let e = Journal::open(td.path(), DISK).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "record {rec} byte {k}: {e}");
            assert_eq!(e.path(), Some(seg.as_path()));
            assert_eq!(e.offset(), Some(offs[rec]), "record {rec} byte {k}: {e}");
        }
    }
    // Nothing was cut.
    fs::write(&seg, &full).unwrap();
    let (j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.change_sets, 3);
    // A defect found while reading after open is an error too.
    let mut b = full.clone();
    let pos = usize::try_from(offs[1] + 20).unwrap();
    b[pos] ^= 1;
    fs::write(&seg, &b).unwrap();
    let r: Vec<_> = j.iter_from(0).collect();
    assert_eq!(r.len(), 2);
    assert!(r[0].is_ok());
    assert_eq!(r[1].as_ref().unwrap_err().kind(), ErrorKind::Corrupt);
}

#[test]
fn corrupt_record_in_non_last_segment() {
    let td = TempDir::new("midseg");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    for i in 1..=12u64 {
        j.append(&wo(i, i, i - 1)).unwrap();
    }
    assert!(j.segment_count() >= 3);
    // Flip the last byte of segment 0: its last record, yet not the tail.
    let seg = seg_path(td.path(), 0);
    let mut b = fs::read(&seg).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    let last_off = j.segments[0].records.last().unwrap().offset;
    drop(j);
    fs::write(&seg, &b).unwrap();
    let e = Journal::open_with(td.path(), DISK, small()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.path(), Some(seg.as_path()));
    assert_eq!(e.offset(), Some(last_off));
}

#[test]
fn bad_segment_header_is_corrupt() {
    let td = TempDir::new("hdr");
    let (j, _) = three(td.path());
    drop(j);
    let seg = seg_path(td.path(), 0);
    let full = fs::read(&seg).unwrap();
    for pos in [0usize, 8, 16, 24, 28, 32, 48, 300, 508] {
        let mut b = full.clone();
        b[pos] ^= 0x10;
        fs::write(&seg, &b).unwrap();
        let e = Journal::open(td.path(), DISK).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "byte {pos}: {e}");
        assert_eq!(e.path(), Some(seg.as_path()));
        assert!(e.offset().is_some());
    }
    // A header cut short.
    fs::write(&seg, &full[..100]).unwrap();
    let e = Journal::open(td.path(), DISK).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // A valid header of another disk.
    let other = encode_seg_header(&SegHeader {
        segno: 0,
        prev: None,
        disk: "other".into(),
    })
    .unwrap();
    fs::write(&seg, &other).unwrap();
    let e = Journal::open(td.path(), DISK).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
}

#[test]
fn missing_middle_segment_is_corrupt() {
    let td = TempDir::new("missing");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    for i in 1..=12u64 {
        j.append(&wo(i, i, i - 1)).unwrap();
    }
    assert!(j.segment_count() >= 3);
    drop(j);
    fs::remove_file(seg_path(td.path(), 1)).unwrap();
    let e = Journal::open_with(td.path(), DISK, small()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.path(), Some(seg_path(td.path(), 1).as_path()));
}

#[test]
fn swapped_segment_is_corrupt() {
    let td = TempDir::new("swap");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    for i in 1..=12u64 {
        j.append(&wo(i, i, i - 1)).unwrap();
    }
    drop(j);
    // Segment 1 replaced by a copy of segment 0 (header segno mismatch).
    fs::copy(seg_path(td.path(), 0), seg_path(td.path(), 1)).unwrap();
    let e = Journal::open_with(td.path(), DISK, small()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
}

#[test]
fn leftover_temp_files_removed() {
    let td = TempDir::new("tmp");
    let (j, sets) = three(td.path());
    drop(j);
    let t = td
        .path()
        .join(DISK)
        .join(JOURNAL_DIR)
        .join(format!("{}{TMP_EXT}", seg_name(1)));
    fs::write(&t, b"partial header").unwrap();
    fs::write(td.path().join(DISK).join(APPLIED_TMP), b"x").unwrap();
    let (j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.removed_temp_files.len(), 2);
    assert!(!t.exists());
    assert_eq!(all(&j), sets);
}

#[test]
fn applied_watermark_survives_reopen() {
    let td = TempDir::new("applied");
    let (mut j, _) = three(td.path());
    assert_eq!(j.applied(), None);
    assert_eq!(
        j.set_applied(5).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    j.set_applied(3).unwrap();
    j.set_applied(3).unwrap();
    assert_eq!(
        j.set_applied(1).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    drop(j);
    let (mut j, rec) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(rec.applied, Some(3));
    assert_eq!(j.applied(), Some(3));
    j.set_applied(4).unwrap();
    drop(j);
    let (j, _) = Journal::open(td.path(), DISK).unwrap();
    assert_eq!(j.applied(), Some(4));
    drop(j);
    // A damaged watermark file is reported.
    let p = td.path().join(DISK).join(APPLIED_FILE);
    let mut b = fs::read(&p).unwrap();
    b[APPLIED_OFF_SEQ] ^= 1;
    fs::write(&p, &b).unwrap();
    let e = Journal::open(td.path(), DISK).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.path(), Some(p.as_path()));
    // A watermark beyond the journal means durable data vanished.
    write_applied(&td.path().join(DISK), 99).unwrap();
    assert_eq!(
        Journal::open(td.path(), DISK).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn iter_from_positions() {
    let td = TempDir::new("iter");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    // Sets [10,12] [13,13] [14,20] ... across segments.
    let mut sets = Vec::new();
    let mut prev = 9;
    for i in 0..15u64 {
        let first = prev + 1;
        let last = first + i % 3;
        let cs = wo(first, last, prev);
        j.append(&cs).unwrap();
        sets.push(cs);
        prev = last;
    }
    assert!(j.segment_count() > 2);
    for seq in 0..=prev + 2 {
        let want: Vec<_> = sets
            .iter()
            .filter(|c| c.header.last_seq >= seq)
            .cloned()
            .collect();
        let got: Vec<_> = j.iter_from(seq).collect::<Result<_>>().unwrap();
        assert_eq!(got, want, "from {seq}");
    }
}

#[test]
fn truncate_before_keeps_active_and_unapplied() {
    let td = TempDir::new("prune");
    let (mut j, _) = Journal::open_with(td.path(), DISK, small()).unwrap();
    let mut sets = Vec::new();
    for i in 1..=20u64 {
        let cs = wo(i, i, i - 1);
        j.append(&cs).unwrap();
        sets.push(cs);
    }
    let nseg = j.segment_count();
    // Nothing applied: nothing dropped.
    assert_eq!(j.truncate_before(100).unwrap(), Pruned::default());
    j.set_applied(7).unwrap();
    let p = j.truncate_before(100).unwrap();
    assert!(p.segments > 0);
    // Everything still held covers every unapplied set.
    let held: Vec<_> = all(&j);
    assert!(held.first().unwrap().header.first_seq <= 8);
    assert_eq!(held.last(), sets.last());
    assert!(held.iter().all(|c| sets.contains(c)));
    assert_eq!(j.change_sets(), u64::try_from(held.len()).unwrap());
    // Everything applied, prune everything possible: active segment stays.
    j.set_applied(20).unwrap();
    j.truncate_before(u64::MAX).unwrap();
    assert_eq!(j.segment_count(), 1);
    assert!(j.segment_count() < nseg);
    let active = *j.segment_numbers().last().unwrap();
    assert!(seg_path(td.path(), active).exists());
    drop(j);
    // Reopen of a pruned journal: chain state comes from the first header.
    let (mut j, rec) = Journal::open_with(td.path(), DISK, small()).unwrap();
    assert_eq!(rec.last_seq, Some(20));
    assert_eq!(rec.applied, Some(20));
    assert_eq!(
        j.append(&wo(20, 20, 19)).unwrap_err().kind(),
        ErrorKind::Duplicate
    );
    // Roll until the active segment is fresh, prune all: the empty active
    // segment alone still knows the chain.
    let mut i = 21;
    loop {
        let a = j.append(&wo(i, i, i - 1)).unwrap();
        i += 1;
        if a.rolled {
            break;
        }
    }
    j.set_applied(i - 1).unwrap();
    j.truncate_before(u64::MAX).unwrap();
    drop(j);
    let (mut j, rec) = Journal::open_with(td.path(), DISK, small()).unwrap();
    assert_eq!(rec.last_seq, Some(i - 1));
    j.append(&wo(i, i, i - 1)).unwrap();
    assert_eq!(
        j.append(&wo(i + 2, i + 2, i + 1)).unwrap_err().kind(),
        ErrorKind::Gap
    );
}

// ---- property test: crashes at random points ----

#[derive(Debug, Clone)]
enum Op {
    /// Valid next write-order set of `span` seqs, `n` payload bytes.
    Next { span: u64, n: u32 },
    /// Replay an already-sent set (index modulo the number sent).
    Replay(usize),
    /// Skip `skip + 1` seqs.
    Gap { skip: u64 },
    /// Resync set opening a new epoch, starting `skip` after the end.
    NewEpoch { skip: u64, prev: u64 },
}

#[derive(Debug, Clone)]
enum Torn {
    /// Crash between appends: the files as they are.
    None,
    /// Crash during the next append: its record written up to a fraction
    /// (per mille, 1000 = the complete record) of its bytes.
    Prefix(u32),
    /// Crash during the next append: garbage where its record would be.
    Garbage(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..4, 0u32..80).prop_map(|(span, n)| Op::Next { span, n }),
        2 => any::<usize>().prop_map(Op::Replay),
        1 => (0u64..5).prop_map(|skip| Op::Gap { skip }),
        1 => (0u64..5, any::<u64>()).prop_map(|(skip, prev)| Op::NewEpoch { skip, prev }),
    ]
}

fn torn() -> impl Strategy<Value = Torn> {
    prop_oneof![
        Just(Torn::None),
        (0u32..=1000).prop_map(Torn::Prefix),
        Just(Torn::Prefix(1000)),
        proptest::collection::vec(any::<u8>(), 1..200).prop_map(Torn::Garbage),
    ]
}

struct Model {
    last: u64,
    epoch: u64,
    sent: Vec<ChangeSet>,
}

impl Model {
    fn next(&self, span: u64, n: u32) -> ChangeSet {
        let first = self.last + 1;
        mk(
            self.epoch,
            ChangeKind::WriteOrder,
            first,
            first + span - 1,
            self.last,
            n,
        )
    }
}

fn run_crash_case(ops: Vec<Op>, crash_at: usize, torn: Torn, seg_size: u64) {
    let td = TempDir::new("prop");
    let opts = JournalOptions {
        segment_size: seg_size,
    };
    let (mut j, _) = Journal::open_with(td.path(), DISK, opts).unwrap();
    let first = wo(1, 1, 0);
    j.append(&first).unwrap();
    let mut model = Model {
        last: 1,
        epoch: 1,
        sent: vec![first.clone()],
    };
    let mut acked = vec![enc(&first)];
    for op in ops.iter().take(crash_at) {
        let (cs, want) = match *op {
            Op::Next { span, n } => (model.next(span, n), None),
            Op::Replay(i) => {
                // A replay within the current epoch is a duplicate; one
                // from an earlier epoch is refused as stale.
                let cs = model.sent[i % model.sent.len()].clone();
                let want = if cs.header.epoch < model.epoch {
                    ErrorKind::InvalidInput
                } else {
                    ErrorKind::Duplicate
                };
                (cs, Some(want))
            }
            Op::Gap { skip } => {
                let prev = model.last + 1 + skip;
                (
                    mk(
                        model.epoch,
                        ChangeKind::WriteOrder,
                        prev + 1,
                        prev + 1,
                        prev,
                        5,
                    ),
                    Some(ErrorKind::Gap),
                )
            }
            Op::NewEpoch { skip, prev } => {
                let first = model.last + 1 + skip;
                (
                    mk(
                        model.epoch + 1,
                        ChangeKind::Resync,
                        first,
                        first,
                        prev % first,
                        9,
                    ),
                    None,
                )
            }
        };
        match j.append(&cs) {
            Ok(a) => {
                assert_eq!(want, None, "{op:?} succeeded");
                assert_eq!(a.last_seq, cs.header.last_seq);
                model.last = cs.header.last_seq;
                model.epoch = cs.header.epoch;
                acked.push(enc(&cs));
                model.sent.push(cs);
            }
            Err(e) => {
                assert_eq!(Some(e.kind()), want, "{op:?}: {e}");
                if e.kind() == ErrorKind::Duplicate || e.kind() == ErrorKind::Gap {
                    assert_eq!(e.expected_seq(), Some(model.last));
                }
            }
        }
    }

    // The crash.
    let crashed = TempDir::new("prop-crash");
    let mut expected = acked.clone();
    let mut cut = 0u64;
    match &torn {
        Torn::None => copy_dir(td.path(), crashed.path()),
        Torn::Prefix(_) | Torn::Garbage(_) => {
            // Perform the in-flight append for real (it may roll), then
            // keep only part of its record, as a crash before the sync may.
            let inflight = model.next(2, 33);
            let a = j.append(&inflight).unwrap();
            copy_dir(td.path(), crashed.path());
            let seg = seg_path(crashed.path(), a.segment);
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            match &torn {
                Torn::Prefix(pm) => {
                    let keep = a.bytes * u64::from(*pm) / 1000;
                    f.set_len(a.offset + keep).unwrap();
                    if keep == a.bytes {
                        // Complete on disk though never acked: it is durable
                        // and may appear (a re-send is then a Duplicate).
                        expected.push(enc(&inflight));
                    } else {
                        cut = keep;
                    }
                }
                Torn::Garbage(g) => {
                    f.set_len(a.offset).unwrap();
                    f.write_all_at(g, a.offset).unwrap();
                    cut = u64::try_from(g.len()).unwrap();
                }
                Torn::None => unreachable!(),
            }
        }
    }
    drop(j);

    let (mut j2, rec) = Journal::open_with(crashed.path(), DISK, opts).unwrap();
    assert_eq!(rec.truncated_bytes, cut);
    let got: Vec<Vec<u8>> = j2.iter_from(0).map(|r| enc(&r.unwrap())).collect();
    assert_eq!(got, expected);
    assert_eq!(rec.change_sets, u64::try_from(expected.len()).unwrap());
    // The sender re-sends the in-flight set: Duplicate if it survived,
    // appended otherwise; either way the journal continues.
    let again = model.next(2, 33);
    match j2.append(&again) {
        Ok(_) => assert_eq!(expected.len(), acked.len()),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Duplicate);
            assert_eq!(expected.len(), acked.len() + 1);
        }
    }
    let more = mk(
        model.epoch,
        ChangeKind::WriteOrder,
        model.last + 3,
        model.last + 3,
        model.last + 2,
        7,
    );
    j2.append(&more).unwrap();
    drop(j2);
    let (j3, rec) = Journal::open_with(crashed.path(), DISK, opts).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(rec.last_seq, Some(model.last + 3));
    assert_eq!(all(&j3).last(), Some(&more));
}

proptest! {
    // 64 cases by default; PROPTEST_CASES overrides (e.g. 2000 for a soak).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    /// Every set whose append returned Ok before the crash is present after
    /// reopen, in order, byte-identical; nothing else is, except the single
    /// in-flight set when (and only when) its record reached the disk
    /// completely.
    #[test]
    fn crash_at_any_point_keeps_exactly_the_acked(
        ops in proptest::collection::vec(op(), 0..30),
        crash in any::<proptest::sample::Index>(),
        torn in torn(),
        seg_size in 200u64..2000,
    ) {
        let crash_at = crash.index(ops.len() + 1);
        run_crash_case(ops, crash_at, torn, seg_size);
    }
}
