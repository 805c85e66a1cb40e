//! Tests of the tracking file: unit tests on real temporary files, and crash
//! models on a simulated disk that loses unsynced 512-byte sectors at random.

use super::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use proptest::prelude::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A unique temporary path, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> TempPath {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempPath(
            std::env::temp_dir().join(format!("ferry-meta-test-{}-{n}-{name}", std::process::id())),
        )
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn geo(disk_size: u64, granularity: u64, extent_size: u64, al_slots: u32) -> MetaGeometry {
    MetaGeometry {
        disk_size,
        granularity,
        extent_size,
        al_slots,
    }
}

fn r(offset: u64, len: u64) -> Range {
    Range::new(offset, len)
}

/// Does the merged, sorted `ranges` cover every byte of `want`?
fn covers(ranges: &[Range], want: Range) -> bool {
    let mut pos = want.offset;
    while pos < want.end() {
        match ranges.iter().find(|x| x.offset <= pos && pos < x.end()) {
            Some(x) => pos = x.end(),
            None => return false,
        }
    }
    true
}

/// A disk whose unsynced writes are lost, per 512-byte sector, at a crash.
#[derive(Debug, Default)]
struct SimDisk {
    durable: Vec<u8>,
    current: Vec<u8>,
    unsynced: BTreeSet<u64>,
    /// Writes and syncs allowed before the device "dies" (then all fail).
    budget: Option<u32>,
    dead: bool,
    syncs: u64,
}

impl SimDisk {
    fn tick(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(io::Error::other("simulated device is dead"));
        }
        match self.budget {
            Some(0) => {
                self.dead = true;
                Err(io::Error::other("simulated power loss"))
            }
            Some(b) => {
                self.budget = Some(b - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Sim(Arc<Mutex<SimDisk>>);

impl Sim {
    fn disk(&self) -> MutexGuard<'_, SimDisk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create(&self, geometry: MetaGeometry) -> MetaFile {
        let layout = Layout::compute(&geometry).unwrap();
        {
            let mut d = self.disk();
            let n = ix(layout.file_size);
            d.durable = vec![0; n];
            d.current = vec![0; n];
        }
        MetaFile::create_on(Box::new(self.clone()), Path::new("sim"), geometry, layout).unwrap()
    }

    fn open(&self) -> Result<(MetaFile, Recovery)> {
        MetaFile::open_on(Box::new(self.clone()), Path::new("sim"))
    }

    fn set_budget(&self, budget: Option<u32>) {
        self.disk().budget = budget;
    }

    /// Power loss: each unsynced sector (in ascending order) survives iff `keep`.
    fn crash(&self, mut keep: impl FnMut(usize, u64) -> bool) {
        let mut d = self.disk();
        let sectors: Vec<u64> = std::mem::take(&mut d.unsynced).into_iter().collect();
        for (i, s) in sectors.into_iter().enumerate() {
            if keep(i, s) {
                let a = ix(s * SECTOR_SIZE);
                let b = (a + 512).min(d.current.len());
                let src = d.current[a..b].to_vec();
                d.durable[a..b].copy_from_slice(&src);
            }
        }
        d.current = d.durable.clone();
        d.dead = false;
        d.budget = None;
    }

    fn crash_random(&self, seed: u64) {
        let mut x = seed | 1;
        self.crash(|_, _| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x & 1 == 1
        });
    }

    fn durable_image(&self) -> Vec<u8> {
        self.disk().durable.clone()
    }
}

impl Backend for Sim {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.disk();
        let a = ix(offset);
        let b = a
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if b > d.current.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&d.current[a..b]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.disk();
        d.tick()?;
        let a = ix(offset);
        let b = a + buf.len();
        if b > d.current.len() {
            d.current.resize(b, 0);
            d.durable.resize(b, 0);
        }
        d.current[a..b].copy_from_slice(buf);
        if !buf.is_empty() {
            for s in offset / SECTOR_SIZE..=(offset + buf.len() as u64 - 1) / SECTOR_SIZE {
                d.unsynced.insert(s);
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut d = self.disk();
        d.tick()?;
        let sectors: Vec<u64> = std::mem::take(&mut d.unsynced).into_iter().collect();
        for s in sectors {
            let a = ix(s * SECTOR_SIZE);
            let b = (a + 512).min(d.current.len());
            let src = d.current[a..b].to_vec();
            d.durable[a..b].copy_from_slice(&src);
        }
        d.syncs += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.disk().current.len() as u64)
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn assert_corrupt(res: Result<impl fmt::Debug>, path: &Path, what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected corruption, got {v:?}"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
            assert!(
                e.to_string().contains(&path.display().to_string()),
                "{what}: error lacks the path: {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------

#[test]
fn meta_default_granularity() {
    assert_eq!(default_granularity(1), 4096);
    assert_eq!(default_granularity(512 << 30), 4096);
    assert_eq!(default_granularity((512 << 30) + 1), 16384);
    assert_eq!(default_granularity(32 << 40), 16384);
    let g = MetaGeometry::new(1 << 40);
    assert_eq!(
        (g.granularity, g.extent_size, g.al_slots),
        (16384, 4 * MIB, 1024)
    );
    g.validate().unwrap();
    // 32 TiB at 16 KiB granules fits the bitmap limit.
    MetaGeometry::new(32 << 40).validate().unwrap();
}

#[test]
fn meta_geometry_validation() {
    let ok = geo(MIB, 4096, 64 * KIB, 16);
    ok.validate().unwrap();
    let bad = [
        geo(0, 4096, 64 * KIB, 16),
        geo(MAX_DISK_SIZE + 1, 1 << 30, 1 << 30, 16),
        geo(MIB, 4095, 64 * KIB, 16),
        geo(MIB, 256, 64 * KIB, 16),
        geo(MIB, 4096, 3 * KIB, 16),
        geo(MIB, 8192, 4096, 16),
        geo(MIB, 4096, 2 << 30, 16),
        geo(MIB, 4096, 64 * KIB, 0),
        geo(MIB, 4096, 64 * KIB, MAX_AL_SLOTS + 1),
        // A bitmap over 1 GiB.
        geo(1 << 50, 4096, 4 * MIB, 16),
    ];
    for g in bad {
        let e = g.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{g:?}");
        let t = TempPath::new("badgeo");
        let e = MetaFile::create(&t.0, g).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{g:?}");
        assert!(!t.0.exists());
    }
}

#[test]
fn meta_create_refuses_existing_and_second_producer() {
    let t = TempPath::new("exists");
    let m = MetaFile::create(&t.0, geo(MIB, 4096, 64 * KIB, 16)).unwrap();
    assert!(MetaFile::create(&t.0, geo(MIB, 4096, 64 * KIB, 16)).is_err());
    let e = MetaFile::open(&t.0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    // The consumer can still look.
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert!(!snap.clean);
    drop(m);
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(!rec.was_clean);
    assert!(rec.possibly_unshipped.is_empty());
}

// ---------------------------------------------------------------------------
// Activity log
// ---------------------------------------------------------------------------

#[test]
fn meta_first_write_to_cold_extent_syncs_once() {
    let t = TempPath::new("cold");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, 4 * MIB, 8)).unwrap();
    let s0 = m.stats().syncs;
    assert_eq!(m.before_write(r(0, 4096), 1).unwrap(), Coverage::Logged);
    assert_eq!(m.stats().syncs, s0 + 1);
    for seq in 2..50 {
        let off = (seq * 64 * KIB) % (4 * MIB - 8192);
        assert_eq!(m.before_write(r(off, 8192), seq).unwrap(), Coverage::Hot);
    }
    assert_eq!(m.stats().syncs, s0 + 1);
    // Spans extents 0 and 1: only extent 1 is cold.
    assert_eq!(
        m.before_write(r(4 * MIB - 4096, 8192), 50).unwrap(),
        Coverage::Logged
    );
    assert_eq!(m.stats().syncs, s0 + 2);
    let st = m.stats();
    assert_eq!(st.al_misses, 2);
    assert_eq!(st.al_hits, 48 + 1);
    assert_eq!(st.al_writes, 2);
    assert_eq!(m.al_extents(), vec![r(0, 8 * MIB)]);
    // Durable: the consumer sees both extents.
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.al_extents, vec![r(0, 8 * MIB)]);
    assert_eq!(snap.possibly_unshipped, vec![r(0, 8 * MIB)]);
    // Empty writes and writes past the end.
    assert_eq!(m.before_write(r(0, 0), 51).unwrap(), Coverage::Hot);
    let e = m.before_write(r(64 * MIB - 1, 2), 52).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(m.before_write(r(u64::MAX, 2), 52).is_err());
}

#[test]
fn meta_al_full_evicts_released_lru() {
    let t = TempPath::new("evict");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, MIB, 2)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    m.before_write(r(MIB, 4096), 2).unwrap();
    m.before_write(r(0, 4096), 3).unwrap(); // extent 0 is now the most recent
    m.release(3);
    // Sequences at or below the committed one are refused.
    assert_eq!(
        m.before_write(r(0, 1), 3).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let s0 = m.stats().syncs;
    assert_eq!(
        m.before_write(r(2 * MIB, 4096), 4).unwrap(),
        Coverage::Logged
    );
    assert_eq!(m.stats().syncs, s0 + 1, "no dirty bits: one sync");
    assert_eq!(m.stats().evictions, 1);
    // Extent 1 (least recently used) left; extent 0 stays hot and free.
    assert_eq!(m.al_extents(), vec![r(0, MIB), r(2 * MIB, MIB)]);
    assert_eq!(m.before_write(r(100, 100), 5).unwrap(), Coverage::Hot);
    assert_eq!(m.stats().syncs, s0 + 1);
    // Released but not evicted until needed.
    m.release(5);
    assert_eq!(m.al_len(), 2);
    assert_eq!(MetaFile::inspect(&t.0).unwrap().al_extents.len(), 2);
    // trim() evicts everything evictable at once.
    assert_eq!(m.trim().unwrap(), 2);
    assert!(m.al_extents().is_empty());
    assert!(MetaFile::inspect(&t.0)
        .unwrap()
        .possibly_unshipped
        .is_empty());
}

#[test]
fn meta_al_full_nothing_evictable_falls_back_to_durable_bitmap() {
    let t = TempPath::new("fallback");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, MIB, 2)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    m.before_write(r(MIB, 4096), 2).unwrap();
    m.release(1); // extent 0 is evictable, but a 2-extent write needs two slots
    let s0 = m.stats().syncs;
    let w = r(5 * MIB - 100, 5000);
    assert_eq!(m.before_write(w, 3).unwrap(), Coverage::Bitmap);
    assert_eq!(m.stats().syncs, s0 + 1);
    assert_eq!(m.stats().fallbacks, 1);
    assert_eq!(m.al_extents(), vec![r(0, 2 * MIB)]);
    let rounded = r(5 * MIB - 4096, 12288);
    assert_eq!(m.dirty_ranges(), vec![rounded]);
    // Durable without any flush: visible to the consumer, and after a crash.
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.dirty, vec![rounded]);
    drop(m);
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(!rec.was_clean);
    assert_eq!(rec.possibly_unshipped, vec![r(0, 2 * MIB), rounded]);
}

#[test]
fn meta_eviction_flushes_lazy_dirty_bits_first() {
    let t = TempPath::new("lazybits");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, MIB, 1)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    let s0 = m.stats().syncs;
    // Bitmap state inside a hot extent: lazy.
    m.set_dirty(r(8192, 4096)).unwrap();
    assert_eq!(m.stats().syncs, s0);
    assert_eq!(m.dirty_ranges(), vec![r(8192, 4096)]);
    assert!(MetaFile::inspect(&t.0).unwrap().dirty.is_empty());
    m.release(1);
    assert_eq!(m.before_write(r(MIB, 1), 2).unwrap(), Coverage::Logged);
    assert_eq!(m.stats().syncs, s0 + 2, "bitmap sync, then AL sync");
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.dirty, vec![r(8192, 4096)]);
    assert_eq!(snap.al_extents, vec![r(MIB, MIB)]);
    // Outside the AL: durable at once.
    let s1 = m.stats().syncs;
    m.set_dirty(r(10 * MIB, 1)).unwrap();
    assert_eq!(m.stats().syncs, s1 + 1);
    assert_eq!(
        MetaFile::inspect(&t.0).unwrap().dirty,
        vec![r(8192, 4096), r(10 * MIB, 4096)]
    );
    // Setting already durable bits again costs nothing.
    m.set_dirty(r(10 * MIB, 4096)).unwrap();
    assert_eq!(m.stats().syncs, s1 + 1);
}

#[test]
fn meta_clear_dirty_whole_granules_only() {
    let t = TempPath::new("clear");
    let disk = 10 * MIB + 1000; // last granule is partial
    let mut m = MetaFile::create(&t.0, geo(disk, 4096, MIB, 4)).unwrap();
    m.set_dirty(r(0, disk)).unwrap();
    assert_eq!(m.dirty_ranges(), vec![r(0, disk)]);
    // Partial granules at both ends stay.
    m.clear_dirty(r(100, 3 * 4096)).unwrap();
    assert_eq!(m.dirty_ranges(), vec![r(0, 4096), r(12288, disk - 12288)]);
    // The partial last granule clears when the range reaches the end.
    m.clear_dirty(r(10 * MIB, 1000)).unwrap();
    assert_eq!(
        m.dirty_ranges(),
        vec![r(0, 4096), r(12288, 10 * MIB - 12288)]
    );
    m.clear_dirty(r(0, disk)).unwrap();
    assert!(m.dirty_ranges().is_empty());
    assert_eq!(
        m.clear_dirty(r(disk, 1)).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    // Lazy: the consumer still sees the old bits until a flush.
    assert_eq!(MetaFile::inspect(&t.0).unwrap().dirty, vec![r(0, disk)]);
    m.flush().unwrap();
    assert!(MetaFile::inspect(&t.0).unwrap().dirty.is_empty());
    // Many sectors: a whole 10 MiB disk at 512-byte granules spans 6 sectors.
    let t2 = TempPath::new("clear2");
    let mut m2 = MetaFile::create(&t2.0, geo(10 * MIB, 512, 64 * KIB, 4)).unwrap();
    m2.set_dirty(r(1000, 9 * MIB)).unwrap();
    assert_eq!(m2.dirty_ranges(), vec![r(512, 9 * MIB + 512)]);
    m2.clear_dirty(r(4 * MIB + 1, MIB)).unwrap();
    assert_eq!(
        m2.dirty_ranges(),
        vec![r(512, 4 * MIB), r(5 * MIB, 4 * MIB + 1024)]
    );
    drop(m2);
    let (_m2, rec) = MetaFile::open(&t2.0).unwrap();
    // Crash: the clear was never flushed, so the whole set range is back.
    assert_eq!(rec.possibly_unshipped, vec![r(512, 9 * MIB + 512)]);
}

#[test]
fn meta_set_dirty_ranges_marks_all_durably_with_one_sync() {
    let t = TempPath::new("many");
    let disk = 64 * MIB;
    let mut m = MetaFile::create(&t.0, geo(disk, 4096, 4 * MIB, 16)).unwrap();
    let syncs = m.stats().syncs;
    let ranges: Vec<Range> = (0..100).map(|i| r(i * 512 * KIB + 100, 1000)).collect();
    m.set_dirty_ranges(&ranges).unwrap();
    assert_eq!(m.stats().syncs, syncs + 1, "one sync for all of them");
    let want: Vec<Range> = (0..100).map(|i| r(i * 512 * KIB, 4096)).collect();
    assert_eq!(m.dirty_ranges(), want);
    // Durable without a flush.
    assert_eq!(MetaFile::inspect(&t.0).unwrap().dirty, want);
    // Nothing new: no sync.
    m.set_dirty_ranges(&ranges[..3]).unwrap();
    assert_eq!(m.stats().syncs, syncs + 1);
    // One bad range refuses the whole call.
    let before = m.dirty_ranges();
    assert_eq!(
        m.set_dirty_ranges(&[r(60 * MIB, 4096), r(disk, 1)])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(m.dirty_ranges(), before);
}

// ---------------------------------------------------------------------------
// Clean and unclean reopen
// ---------------------------------------------------------------------------

#[test]
fn meta_clean_close_reports_only_dirty_bits() {
    let t = TempPath::new("clean");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, 4 * MIB, 16)).unwrap();
    for (i, seq) in (1..=10).enumerate() {
        m.before_write(r(i as u64 * 5 * MIB, 4096), seq).unwrap();
    }
    m.set_dirty(r(20 * MIB + 10, 100)).unwrap();
    m.release(10);
    m.close_clean().unwrap();
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert!(snap.clean);
    assert!(snap.al_extents.is_empty());
    assert_eq!(snap.possibly_unshipped, vec![r(20 * MIB, 4096)]);
    let (m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(rec.was_clean);
    assert!(rec.al_extents.is_empty());
    assert_eq!(rec.possibly_unshipped, vec![r(20 * MIB, 4096)]);
    assert_eq!(m.dirty_ranges(), vec![r(20 * MIB, 4096)]);
    // Opening marked it unclean, durably.
    assert!(!MetaFile::inspect(&t.0).unwrap().clean);
    drop(m);
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(!rec.was_clean);
    assert_eq!(rec.possibly_unshipped, vec![r(20 * MIB, 4096)]);
}

#[test]
fn meta_clean_close_keeps_unreleased_extents_as_dirty() {
    let t = TempPath::new("unreleased");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, 4 * MIB, 8)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    m.before_write(r(9 * MIB, 4096), 2).unwrap();
    m.release(1);
    m.close_clean().unwrap();
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(rec.was_clean);
    assert_eq!(rec.possibly_unshipped, vec![r(8 * MIB, 4 * MIB)]);
}

#[test]
fn meta_unclean_reopen_reports_al_and_dirty_and_keeps_them() {
    let t = TempPath::new("unclean");
    let disk = 64 * MIB + 12345;
    let mut m = MetaFile::create(&t.0, geo(disk, 4096, 4 * MIB, 8)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    m.before_write(r(4 * MIB - 1, 2), 2).unwrap();
    m.before_write(r(disk - 10, 10), 3).unwrap();
    m.set_dirty(r(30 * MIB, 5)).unwrap(); // outside the AL: durable
    m.set_dirty(r(100, 5)).unwrap(); // inside: lazy, covered by the AL
    m.release(3); // released but still in the AL: still reported
    drop(m); // crash
    let want = vec![
        r(0, 8 * MIB),
        r(30 * MIB, 4096),
        r(64 * MIB, disk - 64 * MIB),
    ];
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.possibly_unshipped, want);
    assert!(!snap.clean);
    let (m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(!rec.was_clean);
    assert_eq!(
        rec.al_extents,
        vec![r(0, 8 * MIB), r(64 * MIB, disk - 64 * MIB)]
    );
    assert_eq!(rec.possibly_unshipped, want);
    assert_eq!(m.dirty_ranges(), want);
    assert!(m.al_extents().is_empty());
    // A second crash right away still reports everything (now as bits).
    drop(m);
    let (mut m, rec) = MetaFile::open(&t.0).unwrap();
    assert_eq!(rec.possibly_unshipped, want);
    assert!(rec.al_extents.is_empty());
    // The caller resyncs and clears; a clean close then reports nothing.
    m.clear_dirty(r(0, disk)).unwrap();
    m.close_clean().unwrap();
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert!(rec.was_clean);
    assert!(rec.possibly_unshipped.is_empty());
}

#[test]
fn meta_inspect_does_not_modify() {
    let t = TempPath::new("inspect");
    let mut m = MetaFile::create(&t.0, geo(64 * MIB, 4096, 4 * MIB, 8)).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    drop(m);
    let before = read_file(&t.0);
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.al_extents, vec![r(0, 4 * MIB)]);
    assert_eq!(read_file(&t.0), before);
}

#[test]
fn meta_inspect_while_producer_writes() {
    let t = TempPath::new("concurrent");
    let mut m = MetaFile::create(&t.0, geo(256 * MIB, 4096, MIB, 4)).unwrap();
    let path = t.0.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop2.load(Ordering::Relaxed) || n < 20 {
            let snap = MetaFile::inspect(&path).unwrap();
            assert!(snap.al_extents.len() <= 4);
            assert_eq!(snap.bad_bitmap_sectors, 0);
            n += 1;
        }
        n
    });
    for seq in 1..=300u64 {
        let off = (seq * 7919 * 4096) % (256 * MIB - 4096);
        let cov = m.before_write(r(off, 4096), seq).unwrap();
        if cov == Coverage::Bitmap {
            m.clear_dirty(r(0, 256 * MIB)).unwrap();
        }
        if seq % 3 == 0 {
            m.set_dirty(r((seq * 4096 * 13) % (255 * MIB), 4096))
                .unwrap();
        }
        m.release(seq.saturating_sub(2));
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() >= 20);
}

// ---------------------------------------------------------------------------
// Hostile files
// ---------------------------------------------------------------------------

fn valid_file(name: &str) -> (TempPath, Vec<u8>, Layout) {
    let t = TempPath::new(name);
    let g = geo(16 * MIB, 4096, MIB, 100);
    let mut m = MetaFile::create(&t.0, g).unwrap();
    m.before_write(r(0, 4096), 1).unwrap();
    m.set_dirty(r(9 * MIB, 4096)).unwrap();
    m.release(1);
    m.close_clean().unwrap();
    let bytes = read_file(&t.0);
    (t, bytes, Layout::compute(&g).unwrap())
}

fn reseal_header(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..HDR_CRC]);
    put_u32(b, HDR_CRC, crc);
}

#[test]
fn meta_hostile_files_are_corrupt_not_panics() {
    let (t, good, layout) = valid_file("hostile");
    let p = &t.0;
    let check = |bytes: &[u8], what: &str| {
        write_file(p, bytes);
        assert_corrupt(MetaFile::open(p).map(|(_, rec)| rec), p, what);
        assert_corrupt(MetaFile::inspect(p), p, what);
    };
    check(&[], "empty");
    check(&good[..100], "shorter than the header");
    check(&good[..ix(layout.file_size) - 1], "shorter than the layout");
    let mut b = good.clone();
    b[0] = b'X';
    check(&b, "bad magic");
    let mut b = good.clone();
    put_u32(&mut b, HDR_VERSION, 99);
    check(&b, "bad version");
    let mut b = good.clone();
    b[HDR_DISK_SIZE] ^= 1;
    check(&b, "header checksum");
    for (off, v) in [
        (HDR_DISK_SIZE, u64::MAX),
        (HDR_DISK_SIZE, 0),
        (HDR_DISK_SIZE, 1 << 50), // would need a huge bitmap
        (HDR_GRANULARITY, 3),
        (HDR_EXTENT_SIZE, 1 << 40),
        (HDR_BITMAP_OFFSET, 1 << 60),
        (HDR_FILE_SIZE, 1 << 62),
        (HDR_AL_COPY_SIZE, 8),
    ] {
        let mut b = good.clone();
        put_u64(&mut b, off, v);
        reseal_header(&mut b);
        check(&b, &format!("absurd field at {off} = {v}"));
    }
    let mut b = good.clone();
    put_u32(&mut b, HDR_AL_SLOTS, u32::MAX);
    reseal_header(&mut b);
    check(&b, "absurd slot count");
    // Both AL copies broken.
    let mut b = good.clone();
    for copy in 0..2 {
        let off = ix(layout.al_copy_offset(copy));
        b[off + AL_GENERATION] ^= 0x40;
    }
    check(&b, "both AL copies bad");
    // An AL copy with a valid checksum but an out-of-range extent or count.
    let mut b = good.clone();
    for copy in 0..2 {
        let off = ix(layout.al_copy_offset(copy));
        let enc = encode_al(
            7 + copy as u64,
            get_u64(&b, HDR_INSTANCE),
            false,
            &[1 << 40],
        );
        b[off..off + enc.len()].copy_from_slice(&enc);
    }
    check(&b, "extent past the disk");
    let mut b = good.clone();
    for copy in 0..2 {
        let off = ix(layout.al_copy_offset(copy));
        put_u32(&mut b, off + AL_COUNT, u32::MAX);
    }
    check(&b, "huge AL count");
    // The original still opens.
    write_file(p, &good);
    let (_m, rec) = MetaFile::open(p).unwrap();
    assert!(rec.was_clean);
}

#[test]
fn meta_bad_bitmap_sector_is_taken_as_all_dirty() {
    let (t, mut b, layout) = valid_file("badsector");
    // 16 MiB at 4 KiB = 4096 granules: sector 0 holds 4032, sector 1 the rest.
    let off = ix(layout.bitmap_offset + SECTOR_SIZE);
    b[off] ^= 0x01;
    write_file(&t.0, &b);
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.bad_bitmap_sectors, 1);
    let tail = r(4032 * 4096, 16 * MIB - 4032 * 4096);
    assert_eq!(snap.dirty, vec![r(9 * MIB, 4096), tail]);
    let (m, rec) = MetaFile::open(&t.0).unwrap();
    assert_eq!(rec.bad_bitmap_sectors, 1);
    assert_eq!(rec.possibly_unshipped, vec![r(9 * MIB, 4096), tail]);
    drop(m);
    // Repaired (rewritten with a valid checksum) by the open.
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.bad_bitmap_sectors, 0);
    assert_eq!(snap.dirty, vec![r(9 * MIB, 4096), tail]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary damage never panics and never allocates absurdly.
    #[test]
    fn meta_prop_mutated_files_never_panic(
        flips in proptest::collection::vec((0usize..30_000, any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..30_000),
    ) {
        let (t, mut b, _) = valid_file("fuzz");
        for (pos, x) in flips {
            let n = b.len();
            b[pos % n] ^= x | 1;
        }
        if let Some(c) = cut {
            b.truncate(c.min(b.len()));
        }
        write_file(&t.0, &b);
        let _ = MetaFile::inspect(&t.0);
        if let Ok((m, rec)) = MetaFile::open(&t.0) {
            let d = m.geometry().disk_size;
            prop_assert!(rec.possibly_unshipped.iter().all(|x| x.end() <= d));
        }
    }
}

// ---------------------------------------------------------------------------
// Torn writes and failures (simulated disk)
// ---------------------------------------------------------------------------

#[test]
fn meta_torn_al_update_keeps_durable_extents() {
    // 200 slots so an AL copy spans several sectors.
    let g = geo(512 * MIB, 4096, MIB, 200);
    for keep_first_half in [true, false] {
        let sim = Sim::default();
        let mut m = sim.create(g);
        for e in 0..100u64 {
            assert_eq!(
                m.before_write(r(e * MIB, 1), e + 1).unwrap(),
                Coverage::Logged
            );
        }
        let durable: Vec<Range> = m.al_extents();
        assert_eq!(durable, vec![r(0, 100 * MIB)]);
        // The next update (101 extents = 856 bytes = 2 sectors) is written but
        // power fails before the sync; only half of it reaches the disk.
        sim.set_budget(Some(1));
        assert!(m.before_write(r(300 * MIB, 1), 200).is_err());
        drop(m);
        sim.crash(|i, _| (i == 0) == keep_first_half);
        let (_m, rec) = sim.open().unwrap();
        assert!(!rec.was_clean);
        assert_eq!(
            rec.possibly_unshipped, durable,
            "keep_first_half={keep_first_half}"
        );
    }
}

#[test]
fn meta_torn_al_on_real_file_falls_back_to_previous_copy() {
    let t = TempPath::new("torn");
    let mut m = MetaFile::create(&t.0, geo(512 * MIB, 4096, MIB, 200)).unwrap();
    for e in 0..100u64 {
        m.before_write(r(e * MIB, 1), e + 1).unwrap();
    }
    m.before_write(r(300 * MIB, 1), 101).unwrap();
    let (gen, copy) = (m.al_generation, m.al_copy);
    drop(m);
    // Tear the newest copy: its second sector is zeroed.
    let layout = Layout::compute(&geo(512 * MIB, 4096, MIB, 200)).unwrap();
    let mut b = read_file(&t.0);
    let off = ix(layout.al_copy_offset(copy) + SECTOR_SIZE);
    b[off..off + 512].fill(0);
    write_file(&t.0, &b);
    let snap = MetaFile::inspect(&t.0).unwrap();
    assert_eq!(snap.generation, gen - 1);
    assert_eq!(snap.al_extents, vec![r(0, 100 * MIB)]);
    let (_m, rec) = MetaFile::open(&t.0).unwrap();
    assert_eq!(rec.possibly_unshipped, vec![r(0, 100 * MIB)]);
}

#[test]
fn meta_failed_sync_poisons_the_handle() {
    let sim = Sim::default();
    let mut m = sim.create(geo(64 * MIB, 4096, MIB, 4));
    sim.set_budget(Some(1)); // the AL write passes, its sync fails
    assert_eq!(
        m.before_write(r(0, 1), 1).unwrap_err().kind(),
        ErrorKind::Io
    );
    sim.set_budget(None);
    sim.disk().dead = false;
    assert!(m.before_write(r(0, 1), 2).is_err());
    assert!(m.set_dirty(r(0, 1)).is_err());
    assert!(m.flush().is_err());
    assert!(m.close_clean().is_err());
    let (_m, rec) = sim.open().unwrap();
    assert!(!rec.was_clean);
}

#[test]
fn meta_crash_during_open_fold_keeps_everything() {
    let sim = Sim::default();
    let g = geo(64 * MIB, 4096, MIB, 8);
    let mut m = sim.create(g);
    for e in 0..5u64 {
        m.before_write(r(e * 3 * MIB, 1), e + 1).unwrap();
    }
    m.set_dirty(r(40 * MIB, 1)).unwrap();
    drop(m);
    let want = vec![
        r(0, MIB),
        r(3 * MIB, MIB),
        r(6 * MIB, MIB),
        r(9 * MIB, MIB),
        r(12 * MIB, MIB),
        r(40 * MIB, 4096),
    ];
    sim.crash(|_, _| false);
    for budget in 0..4 {
        sim.set_budget(Some(budget));
        let res = sim.open();
        sim.crash_random(budget.into());
        if let Ok((_, rec)) = res {
            assert_eq!(rec.possibly_unshipped, want);
        }
        let (m, rec) = sim.open().unwrap();
        assert_eq!(rec.possibly_unshipped, want, "budget {budget}");
        drop(m);
        sim.crash(|_, _| false);
    }
    let _ = sim.durable_image();
}

// ---------------------------------------------------------------------------
// Crash model (property test)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Commit(u8),
    SetDirty(u64, u64),
    ClearDirty(u64, u64),
    Flush,
    Trim,
    Crash,
    CleanClose,
}

#[derive(Debug, Clone)]
struct Step {
    op: Op,
    /// Power fails after this many writes/syncs during the step; then the
    /// disk keeps a random subset (seeded) of the unsynced sectors.
    fault: Option<u8>,
    seed: u64,
}

fn sim_geo() -> MetaGeometry {
    geo(40 * MIB + 5000, 4096, MIB, 4)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let span = || (0u64..40 * MIB + 5000, 1u64..3 * MIB);
    prop_oneof![
        8 => span().prop_map(|(o, l)| Op::Write(o, l)),
        2 => (0u64..40 * MIB, 1u64..64 * KIB).prop_map(|(o, l)| Op::Write(o, l)),
        4 => any::<u8>().prop_map(Op::Commit),
        1 => span().prop_map(|(o, l)| Op::SetDirty(o, l)),
        3 => (0u64..40 * MIB, 1u64..64 * KIB).prop_map(|(o, l)| Op::SetDirty(o, l)),
        2 => span().prop_map(|(o, l)| Op::ClearDirty(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Trim),
        2 => Just(Op::Crash),
        1 => Just(Op::CleanClose),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        op_strategy(),
        prop_oneof![6 => Just(None), 1 => (0u8..4).prop_map(Some)],
        any::<u64>(),
    )
        .prop_map(|(op, fault, seed)| Step { op, fault, seed })
}

struct Model {
    geo: MetaGeometry,
    n_granules: u64,
    /// Acknowledged writes (seq, range) not yet committed.
    acked: Vec<(u64, Range)>,
    next_seq: u64,
    committed: u64,
    /// Granules set dirty and not cleared (what the caller must resync).
    dirty: Vec<bool>,
    /// Writes acknowledged through the bitmap fallback, not yet committed:
    /// `clear_dirty` keeps their granules.
    fallbacks: Vec<(u64, Range)>,
    /// Granules a report may legitimately include (dirty, plus anything
    /// touched, attempted or cleared since the last open).
    maybe: Vec<bool>,
}

impl Model {
    fn new(geo: MetaGeometry) -> Model {
        let n = geo.disk_size.div_ceil(geo.granularity);
        Model {
            geo,
            n_granules: n,
            acked: Vec::new(),
            fallbacks: Vec::new(),
            next_seq: 1,
            committed: 0,
            dirty: vec![false; ix(n)],
            maybe: vec![false; ix(n)],
        }
    }

    fn clip(&self, o: u64, l: u64) -> Range {
        let o = o % self.geo.disk_size;
        r(o, l.min(self.geo.disk_size - o))
    }

    fn out(&self, x: Range) -> std::ops::Range<usize> {
        let g = self.geo.granularity;
        ix(x.offset / g)..ix(x.end().div_ceil(g))
    }

    fn inside(&self, x: Range) -> std::ops::Range<usize> {
        let g = self.geo.granularity;
        let hi = if x.end() == self.geo.disk_size {
            self.n_granules
        } else {
            x.end() / g
        };
        ix(x.offset.div_ceil(g))..ix(hi.max(x.offset.div_ceil(g)))
    }

    fn mark(v: &mut [bool], rg: std::ops::Range<usize>, value: bool) {
        v[rg].iter_mut().for_each(|b| *b = value);
    }

    fn touch_extents(&mut self, x: Range) {
        let e = self.geo.extent_size;
        let whole = r(
            x.offset / e * e,
            (x.end().div_ceil(e) * e).min(self.geo.disk_size) - x.offset / e * e,
        );
        let rg = self.out(whole);
        Self::mark(&mut self.maybe, rg, true);
    }

    fn ranges(&self, v: &[bool]) -> Vec<Range> {
        let g = self.geo.granularity;
        let mut out: Vec<Range> = Vec::new();
        for (i, _) in v.iter().enumerate().filter(|(_, b)| **b) {
            let start = i as u64 * g;
            let end = (start + g).min(self.geo.disk_size);
            out.push(r(start, end - start));
        }
        merge_ranges(out)
    }

    fn required(&self) -> Vec<Range> {
        let mut v: Vec<Range> = self.acked.iter().map(|(_, x)| *x).collect();
        v.extend(self.ranges(&self.dirty));
        v
    }

    fn check_covered(&self, have: &[Range], what: &str) -> Result<(), TestCaseError> {
        for want in self.required() {
            prop_assert!(
                covers(have, want),
                "{what}: {want:?} not covered by {have:?}"
            );
        }
        Ok(())
    }

    /// After a successful open: check the report, then adopt it as dirty.
    fn reopened(&mut self, rec: &Recovery, expect_unclean: bool) -> Result<(), TestCaseError> {
        prop_assert_eq!(rec.bad_bitmap_sectors, 0);
        if expect_unclean {
            prop_assert!(!rec.was_clean);
        }
        self.check_covered(&rec.possibly_unshipped, "after crash")?;
        for x in &rec.possibly_unshipped {
            prop_assert!(x.end() <= self.geo.disk_size);
            let rg = self.out(*x);
            prop_assert!(
                self.maybe[rg.clone()]
                    .iter()
                    .zip(&self.dirty[rg.clone()])
                    .all(|(m, d)| *m || *d),
                "report {:?} includes regions never touched",
                x
            );
            Self::mark(&mut self.dirty, rg, true);
        }
        self.acked.clear();
        self.fallbacks.clear();
        self.maybe = self.dirty.clone();
        Ok(())
    }
}

fn crash_and_reopen(
    sim: &Sim,
    m: &mut Model,
    seed: u64,
    reopen_fault: Option<u8>,
    expect_unclean: bool,
) -> Result<MetaFile, TestCaseError> {
    sim.crash_random(seed);
    if let Some(b) = reopen_fault {
        sim.set_budget(Some(u32::from(b)));
        let res = sim.open();
        sim.set_budget(None);
        if let Ok((f, rec)) = res {
            m.reopened(&rec, expect_unclean)?;
            return Ok(f);
        }
        sim.crash_random(seed.rotate_left(17));
    }
    let (f, rec) = sim
        .open()
        .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
    m.reopened(&rec, expect_unclean)?;
    Ok(f)
}

fn run_model(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let g = sim_geo();
    let sim = Sim::default();
    let mut mf = Some(sim.create(g));
    let mut m = Model::new(g);
    for step in steps {
        let mut f = mf.take().expect("a handle between steps");
        if let (Some(b), false) = (step.fault, matches!(step.op, Op::Crash)) {
            sim.set_budget(Some(u32::from(b)));
        }
        let failed: bool = match step.op {
            Op::Write(o, l) => {
                let x = m.clip(o, l);
                let seq = m.next_seq;
                m.next_seq += 1;
                m.touch_extents(x);
                let rg = m.out(x);
                Model::mark(&mut m.maybe, rg.clone(), true);
                match f.before_write(x, seq) {
                    Ok(cov) => {
                        m.acked.push((seq, x));
                        if cov == Coverage::Bitmap {
                            Model::mark(&mut m.dirty, rg, true);
                            m.fallbacks.push((seq, x));
                        }
                        false
                    }
                    Err(_) => true,
                }
            }
            Op::Commit(frac) => {
                let top = m.next_seq - 1;
                let c = m.committed + (top - m.committed) * u64::from(frac) / 255;
                f.release(c);
                m.committed = c;
                m.acked.retain(|(s, _)| *s > c);
                m.fallbacks.retain(|(s, _)| *s > c);
                false
            }
            Op::SetDirty(o, l) => {
                let x = m.clip(o, l);
                let rg = m.out(x);
                Model::mark(&mut m.maybe, rg.clone(), true);
                match f.set_dirty(x) {
                    Ok(()) => {
                        Model::mark(&mut m.dirty, rg, true);
                        false
                    }
                    Err(_) => true,
                }
            }
            Op::ClearDirty(o, l) => {
                let x = m.clip(o, l);
                f.clear_dirty(x)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let rg = m.inside(x);
                Model::mark(&mut m.maybe, rg.clone(), true);
                let mut keep = vec![false; m.dirty.len()];
                for (_, w) in &m.fallbacks {
                    let wr = m.out(*w);
                    Model::mark(&mut keep, wr, true);
                }
                for g in rg {
                    if !keep[g] {
                        m.dirty[g] = false;
                    }
                }
                false
            }
            Op::Flush => f.flush().is_err(),
            Op::Trim => f.trim().is_err(),
            Op::Crash => {
                drop(f);
                mf = Some(crash_and_reopen(&sim, &mut m, step.seed, step.fault, true)?);
                continue;
            }
            Op::CleanClose => {
                // The caller flushed everything: all records committed.
                let top = m.next_seq - 1;
                f.release(top);
                m.committed = top;
                m.acked.clear();
                m.fallbacks.clear();
                match f.close_clean() {
                    Ok(()) => {
                        sim.set_budget(None);
                        let (f, rec) =
                            sim.open().map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert!(rec.was_clean);
                        prop_assert_eq!(&rec.possibly_unshipped, &m.ranges(&m.dirty));
                        m.reopened(&rec, false)?;
                        mf = Some(f);
                    }
                    Err(_) => {
                        mf = Some(crash_and_reopen(&sim, &mut m, step.seed, None, false)?);
                    }
                }
                continue;
            }
        };
        sim.set_budget(None);
        if failed {
            prop_assert!(step.fault.is_some(), "{:?} failed without a fault", step.op);
            drop(f);
            mf = Some(crash_and_reopen(&sim, &mut m, step.seed, None, true)?);
        } else {
            m.check_covered(&f.possibly_unshipped(), "in memory")?;
            mf = Some(f);
        }
    }
    // Final crash: nothing acknowledged may be lost.
    drop(mf.take());
    let _f = crash_and_reopen(&sim, &mut m, 0x9e37_79b9, None, true)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn meta_prop_crash_model(steps in proptest::collection::vec(step_strategy(), 1..60)) {
        run_model(steps)?;
    }
}
