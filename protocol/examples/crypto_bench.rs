//! Measure zstd level 1 (independent 1 MiB frames) and AES-256-GCM seal
//! throughput on 256 MiB of incompressible, 2:1 and zero data, then run the
//! reference tools (`openssl speed`, `zstd -b1`) for comparison.
//!
//! Run: `cargo run --release -p ferry-protocol --example crypto_bench [MiB]`

use std::process::Command;
use std::time::Instant;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use ferry_protocol::message::CHUNK_SIZE;
use ferry_protocol::payload::{compress_chunks, default_threads, seal, Key, NonceParts};

fn rng_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    // Lossless enough for a report.
    f64::from(u32::try_from(bytes >> 20).unwrap_or(u32::MAX)) / secs
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let n = mib << 20;
    let threads = default_threads();
    println!("ferry-crypto-bench: {mib} MiB per data set, {threads} threads available");
    println!(
        "{:<14} {:>9} {:>14} {:>16} {:>16} {:>16}",
        "data", "ratio", "zstd-1 1thr", "zstd-1 all/core", "ring seal", "aes-gcm seal"
    );
    let rand = rng_bytes(n, 1);
    let half: Vec<u8> = rand.iter().map(|b| 0x40 | (b & 0x0f)).collect();
    let zeros = vec![0u8; n];
    let key = Key::from_bytes([7u8; 32]);
    let rc = Aes256Gcm::new_from_slice(&[7u8; 32]).expect("key");
    for (name, data) in [("incompressible", &rand), ("2:1", &half), ("zero", &zeros)] {
        let t = Instant::now();
        let (chunks, stored) = compress_chunks(data, 1, 1).expect("compress");
        let one = mbps(n, t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = compress_chunks(data, 1, threads).expect("compress");
        let all =
            mbps(n, t.elapsed().as_secs_f64()) / f64::from(u32::try_from(threads).unwrap_or(1));
        let ratio = f64::from(u32::try_from(n >> 10).unwrap_or(1))
            / f64::from(u32::try_from(stored.len() >> 10).unwrap_or(1).max(1));
        drop(chunks);
        // Seal the full data set in 1 MiB records (one core), as a sidecar
        // would seal change sets.
        let mut buf = Vec::with_capacity(CHUNK_SIZE + 16);
        let t = Instant::now();
        for (i, rec) in data.chunks(CHUNK_SIZE).enumerate() {
            buf.clear();
            buf.extend_from_slice(rec);
            let nonce = NonceParts {
                stream: 1,
                counter: u64::try_from(i).unwrap_or(0),
            };
            seal(&key, nonce, b"header", &mut buf).expect("seal");
        }
        let ring_mbps = mbps(n, t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (i, rec) in data.chunks(CHUNK_SIZE).enumerate() {
            buf.clear();
            buf.extend_from_slice(rec);
            let nonce = NonceParts {
                stream: 1,
                counter: u64::try_from(i).unwrap_or(0),
            }
            .to_bytes();
            rc.encrypt_in_place((&nonce).into(), b"header", &mut buf)
                .expect("seal");
        }
        let rc_mbps = mbps(n, t.elapsed().as_secs_f64());
        println!(
            "{name:<14} {ratio:>8.2}x {one:>9.0} MB/s {all:>11.0} MB/s {ring_mbps:>11.0} MB/s {rc_mbps:>11.0} MB/s"
        );
    }
    println!("(MB = MiB; 'all/core' = all-thread throughput divided by {threads} threads)");

    println!("\n== reference: openssl speed -evp aes-256-gcm -seconds 3 -bytes 1048576");
    match Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-gcm",
            "-seconds",
            "3",
            "-bytes",
            "1048576",
        ])
        .output()
    {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout);
            for l in s
                .lines()
                .filter(|l| l.to_lowercase().contains("aes-256-gcm") || l.starts_with("type"))
            {
                println!("{l}");
            }
        }
        Err(e) => println!("skipped: openssl not runnable: {e}"),
    }
    let path = std::env::temp_dir().join(format!("ferry-bench-2to1-{}", std::process::id()));
    if std::fs::write(&path, &half).is_ok() {
        for args in [vec!["-1", "-b1"], vec!["-1", "-b1", "-B1048576"]] {
            println!(
                "\n== reference: zstd {} <{mib} MiB 2:1 file>",
                args.join(" ")
            );
            match Command::new("zstd").args(&args).arg(&path).output() {
                Ok(o) => {
                    let s = String::from_utf8_lossy(&o.stdout);
                    let e = String::from_utf8_lossy(&o.stderr);
                    let all = format!("{s}\n{e}");
                    if let Some(l) = all.split(['\r', '\n']).rfind(|l| l.contains("MB/s")) {
                        println!("{}  (compress, decompress)", l.trim());
                    }
                }
                Err(e) => println!("skipped: zstd not runnable: {e}"),
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
