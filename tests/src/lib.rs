//! Shared rig for ferry's end-to-end tests: locating the real binary,
//! scratch directories that clean up after themselves, child processes that
//! are killed even when a test fails, and data patterns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// The `ferry` binary under test: `$FERRY_BIN`, else `target/debug/ferry`.
pub fn ferry_bin() -> PathBuf {
    let path = std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ferry"));
    assert!(
        path.is_file(),
        "ferry binary not found at {} (run `cargo build -p ferry` or set FERRY_BIN)",
        path.display()
    );
    path
}

/// `ferry ARGS...`, run to completion.
pub fn ferry<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(ferry_bin())
        .args(args)
        .output()
        .expect("run ferry")
}

/// `qemu-img ARGS...`, run to completion.
pub fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (apt-get install qemu-utils)")
}

/// Panic with the command's output unless it exited with `code`.
pub fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory, removed when dropped (also when the test panics).
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-rig-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write a raw disk of `size` bytes that is about half data: pseudo-random
/// runs of odd lengths at odd offsets, a few zero-filled but allocated runs,
/// and holes.
pub fn write_half_full_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).expect("create raw");
    file.set_len(size).expect("size raw");
    let mut pos = 0u64;
    let mut i = seed;
    while pos < size {
        i += 1;
        let step = (1 << 20) | ((i * 7919 % 997) * 512);
        let len = usize::try_from((step / 2 + i % 5000).min(size - pos)).expect("len");
        let data = if i.is_multiple_of(7) {
            vec![0u8; len]
        } else {
            pattern(i, len)
        };
        file.write_all_at(&data, pos).expect("write raw");
        pos += step;
    }
}

/// Map a ferry format name to qemu-img's `-f` name.
pub fn qemu_format(ferry_format: &str) -> &'static str {
    match ferry_format {
        "raw" => "raw",
        f if f.starts_with("vhd") => "vpc",
        f if f.starts_with("vmdk") => "vmdk",
        other => panic!("no qemu format for {other}"),
    }
}

/// The crash-test writer's (`image-writer`) record layout, shared with the test.
pub mod crash_writer {
    /// Virtual size of the test image.
    pub const SIZE: u64 = 256 << 20;
    /// Bytes per record.
    pub const RECORD: usize = 64 << 10;
    /// Distance between records: a bit over 1 MiB so records straddle VHD
    /// blocks and VMDK grains at unaligned sector offsets.
    pub const STRIDE: u64 = (1 << 20) + 4096 + 512;
    /// Number of records written before the writer finishes.
    pub const RECORDS: u64 = SIZE / STRIDE - 1;

    /// Offset of record `i` (records never overlap).
    pub fn offset(i: u64) -> u64 {
        i * STRIDE
    }

    /// Content of record `i`.
    pub fn data(i: u64) -> Vec<u8> {
        super::pattern(i + 1, RECORD)
    }
}
