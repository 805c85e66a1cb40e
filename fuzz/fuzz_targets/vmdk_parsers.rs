//! Arbitrary bytes opened as each VMDK kind explicitly (no detection), so
//! the sparse, stream-optimized and descriptor parsers each see every input.
#![no_main]

use ferry_vhd::{open_as, Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferry-fuzz-vmdk-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for format in [Format::VmdkSparse, Format::VmdkStream, Format::VmdkFlat] {
        if let Ok(mut img) = open_as(&path, format, OpenOptions::read_only()) {
            let probe = img.size().min(1 << 20);
            let mut buf = vec![0u8; usize::try_from(probe).unwrap_or(0)];
            let _ = img.read_at(&mut buf, 0);
            let _ = img.map(0, probe);
            let _ = img.check();
        }
    }
    let _ = std::fs::remove_file(&path);
});
