//! ferry-protocol: the wire format between sidecar and target.
//!
//! * [`frame`]: 16-byte frame header (`FRY1`, version 1, kind, length,
//!   crc32c of the header), maximum frame size enforced on both sides.
//! * [`message`]: typed messages (Hello, Welcome, ChangeSet, Ack, Reject,
//!   Heartbeat) with explicit little-endian encode/decode and validation.
//! * [`payload`]: change-set payloads: 1 MiB chunks compressed as
//!   independent zstd frames in parallel (stored raw when compression saves
//!   less than 3 %), then sealed with AES-256-GCM under the disk's key, with
//!   a counter nonce and the change-set header as associated data. The target
//!   journals the sealed bytes; only key holders can open them.
//! * [`credentials`]: `ferry credentials init`: a private CA (ECDSA P-256),
//!   the target's server certificate, per-host client certificates and
//!   per-host data keys in one 0700 directory of 0600 files; per-disk data
//!   keys derived from a host's data key with HKDF-SHA256.
//! * [`tls`]: the link is mutual TLS 1.3 only (`rustls` on `ring`, no
//!   aws-lc): the target requires a client certificate from the CA and
//!   checks that the host in the sidecar's Hello is the one in it
//!   ([`tls::peer_host_matches`]); default port [`tls::DEFAULT_PORT`].
//!
//! # Choice of AES-256-GCM implementation
//!
//! `ring` 0.17, chosen by measurement. `cargo run --release -p
//! ferry-protocol --example crypto_bench` on the 2-core build machine (256 MiB
//! per data set, 1 MiB records, one core; MB = MiB; the machine was shared,
//! load average about 1, so multi-thread figures are low):
//!
//! | data | zstd ratio | zstd-1, 1 thread | zstd-1, 2 threads, per core | ring seal | aes-gcm 0.10 seal |
//! |---|---|---|---|---|---|
//! | incompressible | 1.00× | 1244 MB/s | 685 MB/s | 5075 MB/s | 1263 MB/s |
//! | 2:1 | 2.00× | 675 MB/s | 528 MB/s | 5523 MB/s | 1291 MB/s |
//! | zero | 21845× | 3830 MB/s | 7529 MB/s | 7053 MB/s | 1354 MB/s |
//!
//! References in the same run: `openssl speed -evp aes-256-gcm -seconds 3
//! -bytes 1048576` = 4.58 GB/s (4584627 kB/s); `zstd -1 -b1` on the 2:1 file
//! = 561 MB/s compress (573 MB/s with `-B1048576`), 2.5 GB/s decompress.
//! `ring` matches OpenSSL (AES-NI + PCLMULQDQ assembly) at about 4× RustCrypto
//! `aes-gcm`, so sealing costs about a tenth of compression: zstd is the
//! bottleneck, hence parallel independent frames and raw storage of
//! incompressible chunks. `aws-lc-rs` was not measured (its build needs
//! cmake/bindgen-class tooling; the field notes put it at about 3 GB/s).
//! RustCrypto `aes-gcm` is a dev-dependency only, for this comparison.

pub mod credentials;
pub mod error;
pub mod frame;
pub mod message;
pub mod payload;
pub mod tls;

pub use error::{Error, ErrorKind, Result};
