use super::*;

use ferry_protocol::message::{ChangeKind, ChangeSetHeader, Extent};
use ferry_protocol::payload::pack_change_set;
use proptest::prelude::*;

use crate::journal::Journal;

use crate::testutil::{copy_dir, TempDir};

const DISK: &str = "disk0";
const SIZE: u64 = 8 << 20;

fn key() -> Key {
    Key::from_bytes([7u8; 32])
}

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Half compressible runs, half noise.
        let compressible = self.next() & 1 == 0;
        let fill = self.next().to_le_bytes()[0];
        (0..n)
            .map(|i| {
                if compressible && (i / 512) & 1 == 0 {
                    fill
                } else {
                    self.next().to_le_bytes()[0]
                }
            })
            .collect()
    }
}

/// One planned extent: op, offset, length.
type Plan = Vec<(ExtentOp, u64, u64)>;

fn random_plan(rng: &mut Rng, size: u64) -> Plan {
    let n = 1 + rng.below(6);
    (0..n)
        .map(|_| {
            let op = match rng.below(4) {
                0 | 1 => ExtentOp::Write,
                2 => ExtentOp::Zero,
                _ => ExtentOp::Trim,
            };
            let max = if op == ExtentOp::Write {
                256 << 10
            } else {
                3 << 20
            };
            let len = 1 + rng.below(max);
            let len = len.min(size);
            let off = rng.below(size - len + 1);
            (op, off, len)
        })
        .collect()
}

/// The model disk and the chain state of the generated journal.
struct Gen {
    model: Vec<u8>,
    next_seq: u64,
    prev: u64,
    rng: Rng,
}

impl Gen {
    fn new(seed: u64, size: u64) -> Self {
        Gen {
            model: vec![0u8; usize::try_from(size).unwrap()],
            next_seq: 1,
            prev: 0,
            rng: Rng::new(seed),
        }
    }

    /// Seal a change set for `plan` (consecutive seqs), apply it to the
    /// model when `to_model`, and return it with its Write data length and
    /// zero length.
    fn change_set(&mut self, plan: &Plan, key: &Key, to_model: bool) -> (ChangeSet, u64, u64) {
        let first = self.next_seq;
        let mut extents = Vec::new();
        let mut data = Vec::new();
        let (mut w, mut z) = (0u64, 0u64);
        for (i, &(op, offset, length)) in plan.iter().enumerate() {
            extents.push(Extent {
                seq: first + u64_of(i),
                offset,
                length,
                op,
            });
            let range = usize::try_from(offset).unwrap()..usize::try_from(offset + length).unwrap();
            if op == ExtentOp::Write {
                let bytes = self.rng.bytes(usize::try_from(length).unwrap());
                if to_model && range.end <= self.model.len() {
                    self.model[range].copy_from_slice(&bytes);
                }
                data.extend_from_slice(&bytes);
                w += length;
            } else {
                if to_model && range.end <= self.model.len() {
                    self.model[range].fill(0);
                }
                z += length;
            }
        }
        let last = first + u64_of(plan.len().max(1)) - 1;
        let header = ChangeSetHeader {
            host: "host1".into(),
            disk: DISK.into(),
            epoch: 1,
            kind: ChangeKind::WriteOrder,
            first_seq: first,
            last_seq: last,
            prev_end_seq: self.prev,
            nonce_stream: 7,
            nonce_counter: first,
            key_salt: [0; 16],
            consistent_from: first,
            tags: Vec::new(),
            extents,
            chunks: Vec::new(),
        };
        let cs = pack_change_set(&data, 1, key, header).unwrap();
        self.prev = last;
        self.next_seq = last + 1;
        (cs, w, z)
    }

    /// Generate, append and model `n` random change sets; returns the
    /// expected (write bytes, zero bytes).
    fn append_random(&mut self, j: &mut Journal, n: usize, size: u64) -> (u64, u64) {
        let (mut w, mut z) = (0, 0);
        for _ in 0..n {
            let plan = random_plan(&mut self.rng, size);
            let (cs, cw, cz) = self.change_set(&plan, &key(), true);
            j.append(&cs).unwrap();
            w += cw;
            z += cz;
        }
        (w, z)
    }
}

fn content(r: &mut Replica) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(r.size()).unwrap()];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_same(r: &mut Replica, model: &[u8]) {
    let got = content(r);
    assert_eq!(got.len(), model.len());
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("replica differs from the model at byte {i}");
    }
}

fn open_journal(root: &Path) -> Journal {
    Journal::open(root, DISK).unwrap().0
}

#[test]
fn model_vhd_dynamic() {
    let t = TempDir::new("model");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(1, SIZE);
    let (w, z) = g.append_random(&mut j, 24, SIZE);
    let path = t.path().join("replica.vhd");
    let mut r = Replica::open_or_create(&path, Format::VhdDynamic, SIZE).unwrap();
    let stats = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(stats.change_sets, 24);
    assert_eq!(stats.bytes_written, w);
    assert_eq!(stats.zero_bytes, z);
    assert_eq!(stats.last_applied, j.last_seq());
    assert_eq!(j.applied(), j.last_seq());
    assert_same(&mut r, &g.model);
    assert_eq!(r.image_mut().check().unwrap(), Vec::new());
    drop(r);
    // Durable across reopen of both the image and the journal.
    let mut r = Replica::open_or_create(&path, Format::VhdDynamic, SIZE).unwrap();
    assert_same(&mut r, &g.model);
    let mut j = open_journal(&t.path().join("j"));
    let again = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(again.change_sets, 0);
    assert_eq!(again.last_applied, stats.last_applied);
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok()
    {
        let raw = t.path().join("model.raw");
        fs::write(&raw, &g.model).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vpc"])
            .arg(&raw)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img compare: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn trimmed_range_reads_zeros_and_unallocated_runs_stay_unallocated() {
    let t = TempDir::new("trim");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(2, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    let plan = vec![(ExtentOp::Write, 4096, 3 << 20)];
    j.append(&g.change_set(&plan, &key(), true).0).unwrap();
    apply_pending(&mut j, &mut r, &key()).unwrap();
    let alloc = r.allocated_bytes().unwrap();
    // Trim across written data; zero a never-written range (last 2 MiB block).
    let plan = vec![
        (ExtentOp::Trim, 0, 2 << 20),
        (ExtentOp::Zero, SIZE - (2 << 20), 2 << 20),
    ];
    j.append(&g.change_set(&plan, &key(), true).0).unwrap();
    let s = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s.zero_bytes, 4 << 20);
    assert_same(&mut r, &g.model);
    let mut buf = vec![1u8; 2 << 20];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Zeroing the unallocated block did not allocate it.
    assert_eq!(r.allocated_bytes().unwrap(), alloc);
}

#[test]
fn incremental_applies_only_new_sets() {
    let t = TempDir::new("incr");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(3, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    g.append_random(&mut j, 5, SIZE);
    let s1 = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s1.change_sets, 5);
    assert_same(&mut r, &g.model);
    let (w, z) = g.append_random(&mut j, 7, SIZE);
    let s2 = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s2.change_sets, 7);
    assert_eq!((s2.bytes_written, s2.zero_bytes), (w, z));
    assert_eq!(s2.last_applied, j.last_seq());
    assert!(s2.last_applied > s1.last_applied);
    assert_same(&mut r, &g.model);
    let s3 = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(
        s3,
        ApplyStats {
            last_applied: s2.last_applied,
            ..ApplyStats::default()
        }
    );
}

#[test]
fn crash_between_flush_and_watermark_replays_to_the_same_content() {
    let t = TempDir::new("crash");
    let jdir = t.path().join("j");
    let mut j = open_journal(&jdir);
    let mut g = Gen::new(4, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    g.append_random(&mut j, 6, SIZE);
    apply_pending(&mut j, &mut r, &key()).unwrap();
    let w = j.applied();
    g.append_random(&mut j, 8, SIZE);
    // The journal as it is durable before the next watermark moves.
    drop(j);
    let snap = t.path().join("j-snap");
    copy_dir(&jdir, &snap);
    let mut j = open_journal(&jdir);
    let s = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s.change_sets, 8);
    assert_same(&mut r, &g.model);
    // "Crash": the image holds all 14 sets, the watermark says 6.
    let mut old = open_journal(&snap);
    assert_eq!(old.applied(), w);
    let s = apply_pending(&mut old, &mut r, &key()).unwrap();
    assert_eq!(s.change_sets, 8);
    assert_eq!(old.applied(), j.applied());
    assert_same(&mut r, &g.model);
}

#[test]
fn crash_mid_change_set_replays_to_the_same_content() {
    let t = TempDir::new("crash-mid");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(5, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    g.append_random(&mut j, 4, SIZE);
    apply_pending(&mut j, &mut r, &key()).unwrap();
    // Next sets overlap each other heavily.
    let plans = [
        vec![
            (ExtentOp::Write, 0, 300_000),
            (ExtentOp::Zero, 100_000, 50_000),
            (ExtentOp::Write, 120_000, 10_000),
            (ExtentOp::Trim, 2 << 20, 1 << 20),
        ],
        vec![(ExtentOp::Write, 50_000, 100_000)],
    ];
    let mut sets = Vec::new();
    for p in &plans {
        let (cs, ..) = g.change_set(p, &key(), true);
        j.append(&cs).unwrap();
        sets.push(cs);
    }
    // Simulate a crash after the first 3 extents of the first new set.
    let data = unpack_change_set(&sets[0], &key()).unwrap();
    let mut partial = sets[0].clone();
    partial.header.extents.truncate(3);
    let zeros = vec![0u8; ZERO_CHUNK];
    apply_one(&partial, &data, &mut r, &zeros, &mut ApplyStats::default()).unwrap();
    r.flush().unwrap();
    let s = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s.change_sets, 2);
    assert_same(&mut r, &g.model);
}

#[test]
fn wrong_key_is_crypto_and_changes_nothing() {
    let t = TempDir::new("key");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(6, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    g.append_random(&mut j, 3, SIZE);
    apply_pending(&mut j, &mut r, &key()).unwrap();
    let before = content(&mut r);
    let alloc = r.allocated_bytes().unwrap();
    let w = j.applied();
    g.append_random(&mut j, 3, SIZE);
    let wrong = Key::from_bytes([8u8; 32]);
    let e = apply_pending(&mut j, &mut r, &wrong).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::Crypto, "{e}");
    assert_eq!(j.applied(), w);
    assert_eq!(r.allocated_bytes().unwrap(), alloc);
    assert!(content(&mut r) == before);
    // The right key still applies them.
    let s = apply_pending(&mut j, &mut r, &key()).unwrap();
    assert_eq!(s.change_sets, 3);
    assert_same(&mut r, &g.model);
}

#[test]
fn extent_beyond_the_replica_is_an_error_and_writes_nothing() {
    let t = TempDir::new("bounds");
    let mut j = open_journal(&t.path().join("j"));
    let mut g = Gen::new(7, SIZE);
    let mut r = Replica::open_or_create(&t.path().join("r.vhd"), Format::VhdDynamic, SIZE).unwrap();
    g.append_random(&mut j, 2, SIZE);
    apply_pending(&mut j, &mut r, &key()).unwrap();
    let before = content(&mut r);
    let alloc = r.allocated_bytes().unwrap();
    let w = j.applied();
    // A valid write first, then one crossing the end: nothing may land.
    let plan = vec![
        (ExtentOp::Write, 0, 4096),
        (ExtentOp::Write, SIZE - 100, 200),
    ];
    j.append(&g.change_set(&plan, &key(), false).0).unwrap();
    let e = apply_pending(&mut j, &mut r, &key()).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::InvalidChangeSet, "{e}");
    assert_eq!(j.applied(), w);
    assert_eq!(r.allocated_bytes().unwrap(), alloc);
    assert!(content(&mut r) == before);

    // Far beyond (near u64::MAX) and a Zero extent beyond: errors, no panic.
    let t2 = TempDir::new("bounds2");
    let mut j = open_journal(t2.path());
    let mut g = Gen::new(8, SIZE);
    let plan = vec![(ExtentOp::Zero, u64::MAX - 10, 5)];
    j.append(&g.change_set(&plan, &key(), false).0).unwrap();
    let e = apply_pending(&mut j, &mut r, &key()).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::InvalidChangeSet, "{e}");
    assert_eq!(j.applied(), None);
}

#[test]
fn write_length_mismatch_is_rejected_by_validate() {
    let mut g = Gen::new(9, SIZE);
    let plan = vec![(ExtentOp::Write, 0, 1000), (ExtentOp::Zero, 0, 10)];
    let (cs, ..) = g.change_set(&plan, &key(), false);
    assert!(validate(&cs, 1000, SIZE).is_ok());
    for n in [0, 999, 1001] {
        let e = validate(&cs, n, SIZE).unwrap_err();
        assert_eq!(e.kind(), ApplyErrorKind::InvalidChangeSet);
    }
    // apply_one on a short payload errors instead of panicking.
    let t = TempDir::new("short");
    let mut r = Replica::open_or_create(&t.path().join("r.raw"), Format::Raw, SIZE).unwrap();
    let zeros = vec![0u8; ZERO_CHUNK];
    let e = apply_one(&cs, &[0u8; 10], &mut r, &zeros, &mut ApplyStats::default()).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::InvalidChangeSet);
}

#[test]
fn open_or_create_formats_and_mismatches() {
    let t = TempDir::new("open");
    // vhd-fixed needs a whole-MiB size: the library's error surfaces.
    let p = t.path().join("odd.vhd");
    let e = Replica::open_or_create(&p, Format::VhdFixed, (1 << 20) + 512).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::Image, "{e}");
    assert!(!p.exists());
    // Not a replica format.
    let e =
        Replica::open_or_create(&t.path().join("x.vmdk"), Format::VmdkSparse, SIZE).unwrap_err();
    assert_eq!(e.kind(), ApplyErrorKind::Replica);
    for (name, f) in [
        ("a.vhd", Format::VhdDynamic),
        ("b.vhd", Format::VhdFixed),
        ("c.raw", Format::Raw),
    ] {
        let p = t.path().join(name);
        let r = Replica::open_or_create(&p, f, SIZE).unwrap();
        assert_eq!((r.format(), r.size()), (f, SIZE));
        drop(r);
        let r = Replica::open_or_create(&p, f, SIZE).unwrap();
        assert_eq!(r.format(), f);
        drop(r);
        let e = Replica::open_or_create(&p, f, SIZE * 2).unwrap_err();
        assert_eq!(e.kind(), ApplyErrorKind::Replica, "{e}");
    }
    let e = Replica::open_or_create(&t.path().join("a.vhd"), Format::VhdFixed, SIZE).unwrap_err();
    assert!(
        matches!(e.kind(), ApplyErrorKind::Replica | ApplyErrorKind::Image),
        "{e}"
    );
    // No temp files left behind.
    assert!(fs::read_dir(t.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".creating")));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_match_the_model(
        seed in any::<u64>(),
        first in 1usize..8,
        second in 0usize..8,
        fmt in 0usize..3,
    ) {
        let size: u64 = 4 << 20;
        let format = [Format::VhdDynamic, Format::VhdFixed, Format::Raw][fmt];
        let t = TempDir::new("prop");
        let mut j = open_journal(&t.path().join("j"));
        let mut g = Gen::new(seed, size);
        let mut r = Replica::open_or_create(&t.path().join("r.img"), format, size).unwrap();
        g.append_random(&mut j, first, size);
        let s = apply_pending(&mut j, &mut r, &key()).unwrap();
        prop_assert_eq!(s.change_sets, u64_of(first));
        prop_assert!(content(&mut r) == g.model);
        let (w, z) = g.append_random(&mut j, second, size);
        let s = apply_pending(&mut j, &mut r, &key()).unwrap();
        prop_assert_eq!(s.change_sets, u64_of(second));
        prop_assert_eq!((s.bytes_written, s.zero_bytes), (w, z));
        prop_assert_eq!(j.applied(), j.last_seq());
        prop_assert!(content(&mut r) == g.model);
    }
}
