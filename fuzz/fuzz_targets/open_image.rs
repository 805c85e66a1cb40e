//! Any bytes as an image file: detect the format, open, read, map, check.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferry-fuzz-open-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut img) = ferry_vhd::open(&path, ferry_vhd::OpenOptions::read_only()) {
        let probe = img.size().min(1 << 20);
        let mut buf = vec![0u8; usize::try_from(probe).unwrap_or(0)];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.map(0, probe);
        let _ = img.allocated_bytes();
        let _ = img.check();
    }
    let _ = std::fs::remove_file(&path);
});
