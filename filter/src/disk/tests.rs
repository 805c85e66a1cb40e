//! Disks over temporary files, their rings read with the sidecar's
//! consumer: initial copy, resync claims, clearing after the commit, bits
//! set again while a claim is outstanding, reopen.

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU64;

use ferry_ring::ring::{Consumer, Record};

use super::*;
use crate::config::Listen;

const MIB: u64 = 1 << 20;

fn r(offset: u64, len: u64) -> Range {
    Range::new(offset, len)
}

/// A state directory, ring directory and backing file, removed on drop.
pub(crate) struct Rig {
    pub(crate) dir: PathBuf,
    pub(crate) config: FilterConfig,
}

impl Rig {
    /// A backing file of `size` bytes holding nonzero data at `regions`
    /// (holes elsewhere).
    pub(crate) fn new(name: &str, size: u64, regions: &[Range]) -> Rig {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferry-disk-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rings")).unwrap();
        let backing = dir.join("disk.img");
        let file = File::create(&backing).unwrap();
        file.set_len(size).unwrap();
        for region in regions {
            let data = vec![0xa5u8; usize::try_from(region.len).unwrap()];
            file.write_all_at(&data, region.offset).unwrap();
        }
        file.sync_all().unwrap();
        let mut config = FilterConfig::new(
            vec![DiskConfig {
                name: "d".into(),
                path: backing,
            }],
            vec![Listen::Unix(dir.join("nbd.sock"))],
            dir.join("state"),
        );
        config.set_ring_size(MIB);
        Rig { dir, config }
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub(crate) fn open_with(&self, sequencer: Arc<Sequencer>) -> Disk {
        Disk::open(
            &self.config.disks[0],
            &self.config,
            &self.state(),
            &self.dir.join("rings"),
            sequencer,
            Uring::start().unwrap(),
        )
        .unwrap()
    }

    fn open(&self) -> Disk {
        self.open_with(Sequencer::new(1, u64::MAX))
    }

    fn consumer(&self) -> Consumer {
        Consumer::open(&self.dir.join("rings").join("d.ring")).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every record the consumer has not seen yet, with the commit point after them.
pub(crate) fn drain(consumer: &mut Consumer) -> (Vec<Record>, u64) {
    let mut records = Vec::new();
    let mut end = consumer.committed();
    while let Some(view) = consumer.next().unwrap() {
        assert!(view.payload.is_none() || view.record.kind == RecordKind::Write);
        records.push(view.record);
        end = view.index + 1;
    }
    (records, end)
}

/// The ranges of payload-less Write records (claims), checking their shape.
fn claims(records: &[Record]) -> Vec<Range> {
    records
        .iter()
        .map(|rec| {
            assert_eq!(rec.kind, RecordKind::Write, "{rec:?}");
            assert_eq!(rec.payload_pos, ferry_ring::ring::NO_PAYLOAD, "{rec:?}");
            assert!(rec.length > 0 && rec.length <= CLAIM_MAX, "{rec:?}");
            r(rec.offset, rec.length)
        })
        .collect()
}

fn split_all(ranges: &[Range]) -> Vec<Range> {
    ranges.iter().flat_map(|&x| split(x, CLAIM_MAX)).collect()
}

fn dirty_bits(disk: &Disk) -> Vec<Range> {
    disk.meta().file.dirty_ranges()
}

#[test]
fn helpers_subtract_split_round() {
    assert_eq!(
        subtract(
            &[r(0, 100), r(200, 100)],
            &[r(10, 10), r(50, 180), r(290, 50)]
        ),
        vec![r(0, 10), r(20, 30), r(230, 60)]
    );
    assert_eq!(subtract(&[r(0, 100)], &[]), vec![r(0, 100)]);
    assert!(subtract(&[r(10, 10)], &[r(0, 100)]).is_empty());
    assert_eq!(
        split(r(1, 10), 4).collect::<Vec<_>>(),
        vec![r(1, 4), r(5, 4), r(9, 2)]
    );
    assert_eq!(round_out(r(4097, 10), 4096), r(4096, 4096));
    assert_eq!(round_out(r(4096, 4097), 4096), r(4096, 8192));
    assert_eq!(intersect(r(0, 10), r(5, 10)), Some(r(5, 5)));
    assert_eq!(intersect(r(0, 10), r(10, 10)), None);
}

#[test]
fn new_disk_claims_its_allocated_regions_and_clears_them_after_the_commit() {
    let data = [r(4 * MIB, MIB), r(20 * MIB, 9 * MIB)];
    let rig = Rig::new("initial", 64 * MIB, &data);
    let disk = rig.open();
    let allocated = allocated_ranges(&disk.file, disk.size, false);
    // ext4, xfs and tmpfs report exactly the written blocks; elsewhere the
    // claims must still follow what the file system reports.
    for region in data {
        assert_eq!(subtract(&[region], &allocated), vec![], "{allocated:?}");
    }
    if allocated != data {
        eprintln!("file system reports allocation {allocated:?} for {data:?}");
    }
    let all: u64 = allocated.iter().map(|x| x.len).sum();
    assert_eq!(dirty_bits(&disk), allocated);
    let mut consumer = rig.consumer();
    assert!(
        drain(&mut consumer).0.is_empty(),
        "nothing before housekeeping"
    );

    disk.housekeep();
    let (records, end) = drain(&mut consumer);
    let claimed = claims(&records);
    assert_eq!(claimed, split_all(&allocated));
    if allocated == data {
        assert_eq!(
            claimed,
            [
                r(4 * MIB, MIB),
                r(20 * MIB, 4 * MIB),
                r(24 * MIB, 4 * MIB),
                r(28 * MIB, MIB)
            ]
        );
    }
    assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
    let status = disk.status();
    assert_eq!((status.dirty_bytes, status.claimed_bytes), (all, all));
    assert_eq!(status.counters.resync_records, claimed.len() as u64);
    assert_eq!(status.counters.metadata_records, 0);
    assert!(disk.unfit_for_tag().unwrap().contains("resync records"));

    // Not claimed twice; nothing clears before the commit.
    disk.housekeep();
    assert!(drain(&mut consumer).0.is_empty());
    assert_eq!(disk.status().dirty_bytes, all);

    // The sidecar commits: the bits go.
    consumer.commit(end).unwrap();
    assert_eq!(disk.status().dirty_bytes, all, "housekeeping learns it");
    disk.housekeep();
    let status = disk.status();
    assert_eq!((status.dirty_bytes, status.claimed_bytes), (0, 0));
    assert_eq!(status.tracking, "data");
    assert!(disk.unfit_for_tag().is_none());
    assert!(drain(&mut consumer).0.is_empty());
    // Durable: a clean close and reopen finds nothing dirty.
    drop(consumer);
    disk.close().unwrap();
    let disk = rig.open();
    assert_eq!(disk.status().dirty_bytes, 0);
    disk.housekeep();
    assert!(drain(&mut rig.consumer()).0.is_empty());

    // resync-all marks the whole disk (holes too), and it is claimed.
    let whole = [Range::new(0, disk.size)];
    assert_eq!(disk.resync_all().unwrap(), disk.size);
    assert_eq!(disk.status().dirty_bytes, disk.size);
    disk.housekeep();
    let mut consumer = rig.consumer();
    let (records, end) = drain(&mut consumer);
    assert_eq!(claims(&records), split_all(&whole));
    consumer.commit(end).unwrap();
    disk.housekeep();
    assert_eq!(disk.status().dirty_bytes, 0);
}

#[test]
fn claims_respect_the_per_pass_limits_and_leave_half_the_ring() {
    // 300 MiB allocated: more than one pass may claim.
    let rig = Rig::new("limits", 400 * MIB, &[r(0, 300 * MIB)]);
    let disk = rig.open();
    let mut consumer = rig.consumer();
    disk.housekeep();
    let (first, end) = drain(&mut consumer);
    let first = claims(&first);
    assert_eq!(
        first.len(),
        CLAIMS_PER_PASS.min(usize::try_from(CLAIM_BYTES_PER_PASS / CLAIM_MAX).unwrap())
    );
    assert_eq!(first[0], r(0, CLAIM_MAX));
    disk.housekeep();
    let (second, _) = drain(&mut consumer);
    let second = claims(&second);
    assert_eq!(second[0].offset, first.last().unwrap().end());
    let claimed: u64 = first.iter().chain(&second).map(|x| x.len).sum();
    assert_eq!(claimed, 300 * MIB);
    // Only the first pass is committed: its bits go, the second's stay.
    consumer.commit(end).unwrap();
    disk.housekeep();
    assert_eq!(dirty_bits(&disk), vec![merge_ranges(second.clone())[0]]);
    assert_eq!(
        disk.status().claimed_bytes,
        300 * MIB - CLAIM_BYTES_PER_PASS
    );

    // A ring more than half full takes no claims.
    let rig = Rig::new("room", 64 * MIB, &[r(0, 64 * MIB)]);
    let disk = rig.open();
    // Half the slots in use (flush records: no payload needed).
    for _ in 0..512 {
        disk.flush().unwrap();
    }
    disk.housekeep();
    let mut consumer = rig.consumer();
    let (records, end) = drain(&mut consumer);
    assert_eq!(records.len(), 512, "flushes only: {}", records.len());
    assert!(records.iter().all(|x| x.kind == RecordKind::Flush));
    consumer.commit(end).unwrap();
    disk.housekeep();
    let (records, _) = drain(&mut consumer);
    assert_eq!(
        claims(&records).len(),
        16,
        "room again: 64 MiB in 4 MiB claims"
    );
}

#[test]
fn bits_set_again_after_the_claim_stay_dirty_and_are_claimed_again() {
    let rig = Rig::new("redirty", 16 * MIB, &[r(0, 8 * MIB)]);
    let disk = rig.open();
    let mut consumer = rig.consumer();
    disk.housekeep();
    let (records, end) = drain(&mut consumer);
    assert_eq!(claims(&records), vec![r(0, 4 * MIB), r(4 * MIB, 4 * MIB)]);
    // A bitmap-state write inside the first claim (the sidecar may have
    // read the region before it landed), one across both claims, one
    // outside any claim.
    disk.to_bitmap(r(MIB + 100, 5000)).unwrap();
    disk.to_bitmap(r(4 * MIB - 4096, 8192)).unwrap();
    disk.to_bitmap(r(12 * MIB, 4096)).unwrap();
    assert_eq!(
        disk.meta().redirtied.len(),
        3,
        "the part outside is not noted"
    );
    consumer.commit(end).unwrap();
    // The kept bits are exactly the rewritten granules (rounded out), plus
    // the one outside the claims.
    disk.housekeep();
    let kept = dirty_bits(&disk);
    let again = vec![r(MIB, 8192), r(4 * MIB - 4096, 8192), r(12 * MIB, 4096)];
    assert_eq!(kept, again);
    // The same pass claimed them again (they were set after the claims).
    let (records, end) = drain(&mut consumer);
    assert_eq!(claims(&records), again);
    assert_eq!(disk.status().claimed_bytes, 5 * 4096);
    assert!(disk.meta().redirtied.is_empty());
    consumer.commit(end).unwrap();
    disk.housekeep();
    assert_eq!(disk.status().dirty_bytes, 0);
    assert!(drain(&mut consumer).0.is_empty());
}

#[test]
fn writes_with_payload_during_a_claim_do_not_keep_bits() {
    let rig = Rig::new("payload", 16 * MIB, &[r(0, 4 * MIB)]);
    let disk = rig.open();
    let mut consumer = rig.consumer();
    disk.housekeep();
    // Data state: the write's record carries its payload, ordered after
    // the claim; nothing is set in the bitmap.
    let mut data = disk.write_buffer(4096);
    data.as_mut_slice().fill(7);
    disk.write(MIB, data, false).unwrap();
    let (records, end) = drain(&mut consumer);
    assert_eq!(records.len(), 2);
    assert_eq!(claims(&records[..1]), vec![r(0, 4 * MIB)]);
    assert!(records[1].seq > records[0].seq);
    assert_ne!(records[1].payload_pos, ferry_ring::ring::NO_PAYLOAD);
    consumer.commit(end).unwrap();
    disk.housekeep();
    assert_eq!(disk.status().dirty_bytes, 0);
}

#[test]
fn reopen_does_not_mark_again_and_uncommitted_claims_stay_dirty() {
    let rig = Rig::new("reopen", 32 * MIB, &[r(MIB, 2 * MIB), r(10 * MIB, MIB)]);
    let disk = rig.open();
    let allocated = dirty_bits(&disk);
    let all: u64 = allocated.iter().map(|x| x.len).sum();
    assert!(all >= 3 * MIB);
    // Claimed, never committed, clean stop: still dirty after reopen, and
    // claimed again.
    disk.housekeep();
    assert_eq!(disk.status().claimed_bytes, all);
    disk.close().unwrap();
    let disk = rig.open();
    assert_eq!(dirty_bits(&disk), allocated);
    disk.housekeep();
    let mut consumer = rig.consumer();
    let (records, end) = drain(&mut consumer);
    assert_eq!(claims(&records), split_all(&allocated));
    consumer.commit(end).unwrap();
    disk.housekeep();
    drop(consumer);
    disk.close().unwrap();
    // An existing tracking file is not marked again, even though the
    // backing file still holds the data.
    let disk = rig.open();
    assert_eq!(disk.status().dirty_bytes, 0);
    disk.housekeep();
    assert!(drain(&mut rig.consumer()).0.is_empty());
    drop(disk);
    // Unclean stop (the disk dropped without close): no re-marking either.
    let disk = rig.open();
    assert_eq!(disk.status().dirty_bytes, 0);
}

#[test]
fn a_first_start_interrupted_while_marking_starts_over() {
    let rig = Rig::new("interrupted", 16 * MIB, &[r(0, MIB)]);
    let dir = rig.state().join("disks").join("d");
    std::fs::create_dir_all(&dir).unwrap();
    // What a crash between creating and renaming leaves.
    std::fs::write(dir.join("meta.new"), b"half made").unwrap();
    let disk = rig.open();
    assert_eq!(disk.status().dirty_bytes, MIB);
    assert!(!dir.join("meta.new").exists());
}

#[test]
fn no_initial_copy_marks_nothing() {
    let mut rig = Rig::new("nocopy", 16 * MIB, &[r(0, 4 * MIB)]);
    rig.config.initial_copy = false;
    let disk = rig.open();
    assert_eq!(disk.status().dirty_bytes, 0);
    disk.housekeep();
    assert!(drain(&mut rig.consumer()).0.is_empty());
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// A write through the data path (record with payload).
    Write {
        offset: u64,
        len: u64,
        value: u8,
    },
    /// A write tracked only in the bitmap (bitmap state).
    BitmapWrite {
        offset: u64,
        len: u64,
        value: u8,
    },
    Housekeep,
    /// The sidecar takes up to n records (re-reading claimed ranges now).
    Take(usize),
    /// The sidecar commits what it took (durable at the target).
    Commit,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let range = (0u64..2048, 1u64..24).prop_map(|(o, l)| (o * 512, l * 512));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((offset, len), value)| Op::Write {
            offset,
            len,
            value
        }),
        (range, any::<u8>()).prop_map(|((offset, len), value)| Op::BitmapWrite {
            offset,
            len,
            value
        }),
        Just(Op::Housekeep),
        (1usize..8).prop_map(Op::Take),
        Just(Op::Commit),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Whatever the interleaving of writes (data and bitmap), claims,
    /// sidecar reads and commits, once everything drained the target holds
    /// the disk's content: clearing bits never loses a change.
    #[test]
    fn the_target_converges_to_the_disk(ops in proptest::collection::vec(op(), 1..60)) {
        let size = 1u64 << 20;
        let rig = Rig::new("model", size, &[r(64 << 10, 64 << 10), r(512 << 10, 8192)]);
        let disk = rig.open();
        let device = File::options().read(true).write(true).open(&rig.config.disks[0].path).unwrap();
        let mut consumer = rig.consumer();
        let mut target = vec![0u8; usize::try_from(size).unwrap()];
        let mut taken = consumer.committed();
        let apply = |consumer: &mut Consumer, target: &mut [u8], n: usize, taken: &mut u64| {
            for _ in 0..n {
                let Some(view) = consumer.next().unwrap() else { break };
                let rec = view.record;
                let at = usize::try_from(rec.offset).unwrap();
                let len = usize::try_from(rec.length).unwrap();
                if rec.kind == RecordKind::Write {
                    match view.payload {
                        Some(p) => target[at..at + len].copy_from_slice(p),
                        None => device.read_exact_at(&mut target[at..at + len], rec.offset).unwrap(),
                    }
                }
                *taken = view.index + 1;
            }
        };
        for op in &ops {
            match *op {
                Op::Write { offset, len, value } => {
                    let len = len.min(size - offset);
                    let mut data = disk.write_buffer(usize::try_from(len).unwrap());
                    data.as_mut_slice().fill(value);
                    disk.write(offset, data, false).unwrap();
                }
                Op::BitmapWrite { offset, len, value } => {
                    let len = len.min(size - offset);
                    let ticket = disk.gate.begin(Some(r(offset, len)));
                    device.write_all_at(&vec![value; usize::try_from(len).unwrap()], offset).unwrap();
                    disk.to_bitmap(r(offset, len)).unwrap();
                    disk.gate.finish(ticket);
                }
                Op::Housekeep => disk.housekeep(),
                Op::Take(n) => apply(&mut consumer, &mut target, n, &mut taken),
                Op::Commit => consumer.commit(taken).unwrap(),
            }
        }
        // Drain: the sidecar keeps up until nothing is left.
        for _ in 0..100 {
            disk.housekeep();
            apply(&mut consumer, &mut target, usize::MAX, &mut taken);
            consumer.commit(taken).unwrap();
            disk.housekeep();
            if disk.status().dirty_bytes == 0 && consumer.published() == taken {
                break;
            }
        }
        let status = disk.status();
        proptest::prop_assert_eq!((status.dirty_bytes, status.claimed_bytes), (0, 0));
        let mut content = vec![0u8; target.len()];
        device.read_exact_at(&mut content, 0).unwrap();
        let first_difference = content.iter().zip(&target).position(|(a, b)| a != b);
        proptest::prop_assert_eq!(first_difference, None);
    }
}
