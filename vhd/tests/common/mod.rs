//! Helpers for the golden and mutation tests: scratch directories and the
//! gzipped golden images under `tests/golden/`.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A scratch directory removed when dropped.
pub struct GoldenDir(PathBuf);

impl GoldenDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferry-golden-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        GoldenDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for GoldenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unpack `tests/golden/NAME.gz` (and a flat VMDK's `-flat` extent beside
/// it) into `dir`; return the unpacked image's path.
pub fn golden(dir: &GoldenDir, name: &str) -> PathBuf {
    let out = dir.path(name);
    unpack(name, &out);
    if let Some(stem) = name.strip_suffix(".vmdk") {
        let extent = format!("{stem}-flat.vmdk");
        if golden_path(&extent).exists() {
            unpack(&extent, &dir.path(&extent));
        }
    }
    out
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.gz"))
}

fn unpack(name: &str, out: &Path) {
    let gz = std::fs::File::open(golden_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    std::fs::write(out, bytes).unwrap();
}
