//! The replication policy each host's sidecar announced, kept per host.
//!
//! A sidecar sends its policy's retention window in every Hello
//! (`Hello::retention_secs`, 0 when it has no policy file). The target
//! records a non-zero one here, so that whatever prunes recovery points
//! knows how long this host wants them kept:
//!
//! ```text
//! DATA/hosts/HOST/policy.json   {"retention_secs": 172800, "updated_ns": ...}
//! ```
//!
//! [`record`] replaces the file atomically (temporary file, fsync, rename,
//! fsync of the directory) and only when the retention changed, so the
//! many connections of one host (one per disk) do not rewrite it on every
//! reconnect; `updated_ns` is when the value last changed. [`retention`]
//! reads it back, falling back to the target's default
//! (`ferry target --retention`) when nothing, or 0, is recorded.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::site::HOSTS_DIR;

/// File name of the per-host policy, in `DATA/hosts/HOST/`.
pub const HOST_POLICY_FILE: &str = "policy.json";

/// Temporary name [`record`] writes before renaming.
const HOST_POLICY_TMP: &str = "policy.json.tmp";

/// Serializes [`record`] within the process: the connections of one host
/// share the temporary file name (the data directory's lock keeps other
/// processes out).
static RECORD_LOCK: Mutex<()> = Mutex::new(());

/// What a host's sidecar announced, as stored in [`HOST_POLICY_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPolicy {
    /// How long the host's recovery points are kept, seconds; 0 = the
    /// target's default.
    pub retention_secs: u64,
    /// When the value last changed (UNIX time, nanoseconds, target clock).
    pub updated_ns: u64,
}

/// `DATA/hosts/HOST/policy.json`.
pub fn path(data: &Path, host: &str) -> PathBuf {
    data.join(HOSTS_DIR).join(host).join(HOST_POLICY_FILE)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The recorded policy of `host`: `None` if there is none; an error if the
/// file is unreadable or damaged, or the host name is invalid.
pub fn read(data: &Path, host: &str) -> Result<Option<HostPolicy>> {
    crate::journal::validate_disk_name(host)?;
    let p = path(data, host);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read host policy", &p, e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::new(ErrorKind::Corrupt, "read host policy", e.to_string()).at_path(&p))
}

/// Record `retention` (whole seconds; under 1 s counts as 0, the default)
/// as the policy of `host` in the data directory `data`. Nothing is
/// written when the recorded retention is already that; otherwise the file
/// is replaced atomically and durably. The host's directory is created if
/// missing.
pub fn record(data: &Path, host: &str, retention: Duration) -> Result<()> {
    crate::journal::validate_disk_name(host)?;
    let retention_secs = retention.as_secs();
    let _guard = RECORD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A damaged file is replaced like a changed one.
    if let Ok(Some(old)) = read(data, host) {
        if old.retention_secs == retention_secs {
            return Ok(());
        }
    }
    let dir = data.join(HOSTS_DIR).join(host);
    fs::create_dir_all(&dir).map_err(|e| Error::io("create host directory", &dir, e))?;
    let policy = HostPolicy {
        retention_secs,
        updated_ns: now_ns(),
    };
    let mut text = serde_json::to_vec_pretty(&policy).map_err(|e| {
        Error::new(ErrorKind::InvalidInput, "record host policy", e.to_string()).at_path(&dir)
    })?;
    text.push(b'\n');
    let tmp = dir.join(HOST_POLICY_TMP);
    {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io("create host policy", &tmp, e))?;
        f.write_all(&text)
            .map_err(|e| Error::io("write host policy", &tmp, e))?;
        f.sync_all()
            .map_err(|e| Error::io("sync host policy", &tmp, e))?;
    }
    let dst = dir.join(HOST_POLICY_FILE);
    if let Err(e) = fs::rename(&tmp, &dst) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("replace host policy", &dst, e));
    }
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync host directory", &dir, e))
}

/// The retention window of `host`: the recorded one, else `default` (no
/// file, a recorded 0, or a file that cannot be read, which is logged).
pub fn retention(data: &Path, host: &str, default: Duration) -> Duration {
    match read(data, host) {
        Ok(Some(p)) if p.retention_secs != 0 => Duration::from_secs(p.retention_secs),
        Ok(_) => default,
        Err(e) => {
            tracing::warn!(host, error = %e, "host policy unreadable: default retention");
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn record_then_retention() {
        let t = TempDir::new("hostpolicy-rec");
        let data = t.path();
        // Nothing recorded (not even the hosts directory): the default.
        assert_eq!(retention(data, "web01", DAY), DAY);
        assert_eq!(read(data, "web01").unwrap(), None);
        record(data, "web01", 3 * DAY).unwrap();
        assert_eq!(retention(data, "web01", DAY), 3 * DAY);
        let p = read(data, "web01").unwrap().unwrap();
        assert_eq!(p.retention_secs, 3 * 86_400);
        assert!(p.updated_ns > 0);
        // At DATA/hosts/HOST/policy.json, as JSON, no temporary file left.
        let file = data.join("hosts").join("web01").join("policy.json");
        assert_eq!(file, path(data, "web01"));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!(v["retention_secs"], 259_200);
        assert!(!file.with_file_name(HOST_POLICY_TMP).exists());
        // Other hosts are unaffected.
        assert_eq!(retention(data, "web02", DAY), DAY);
        // Sub-second parts are dropped.
        record(data, "web02", Duration::from_millis(90_500)).unwrap();
        assert_eq!(retention(data, "web02", DAY), Duration::from_secs(90));
        assert_eq!(retention(data, "web01", DAY), 3 * DAY);
    }

    #[test]
    fn unchanged_is_not_rewritten_changed_is() {
        let t = TempDir::new("hostpolicy-skip");
        let data = t.path();
        let dir = data.join(HOSTS_DIR).join("h");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join(HOST_POLICY_FILE);
        fs::write(&file, r#"{"retention_secs": 7200, "updated_ns": 1}"#).unwrap();
        // Same value: the file is left alone (updated_ns stays 1).
        record(data, "h", Duration::from_secs(7200)).unwrap();
        assert_eq!(
            read(data, "h").unwrap(),
            Some(HostPolicy {
                retention_secs: 7200,
                updated_ns: 1
            })
        );
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            r#"{"retention_secs": 7200, "updated_ns": 1}"#
        );
        // A new value replaces it.
        record(data, "h", Duration::from_secs(3600)).unwrap();
        let p = read(data, "h").unwrap().unwrap();
        assert_eq!(p.retention_secs, 3600);
        assert!(p.updated_ns > 1);
        assert_eq!(retention(data, "h", DAY), Duration::from_secs(3600));
    }

    #[test]
    fn zero_damaged_and_bad_names_mean_default() {
        let t = TempDir::new("hostpolicy-def");
        let data = t.path();
        let dir = data.join(HOSTS_DIR).join("h");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join(HOST_POLICY_FILE);
        // A recorded 0 is the default.
        fs::write(&file, r#"{"retention_secs": 0, "updated_ns": 5}"#).unwrap();
        assert_eq!(retention(data, "h", DAY), DAY);
        record(data, "h", Duration::ZERO).unwrap();
        assert_eq!(retention(data, "h", DAY), DAY);
        // A damaged file: the default, an error from read, and record
        // replaces it.
        fs::write(&file, b"{\"retention_secs\": ").unwrap();
        assert_eq!(retention(data, "h", DAY), DAY);
        assert_eq!(read(data, "h").unwrap_err().kind(), ErrorKind::Corrupt);
        record(data, "h", 2 * DAY).unwrap();
        assert_eq!(retention(data, "h", DAY), 2 * DAY);
        // Host names are path components: checked like disk names.
        for bad in ["", "..", "a/b"] {
            assert_eq!(
                record(data, bad, DAY).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad:?}"
            );
            assert_eq!(retention(data, bad, DAY), DAY);
        }
        assert!(!data.join(HOST_POLICY_FILE).exists());
    }

    /// A sidecar connection over memory: the frames it sends, then EOF.
    struct Wire {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl std::io::Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_server_records_what_the_hello_says() {
        use crate::server::{serve_connection, Ended, RefusalLog, ServerContext};
        use crate::site::{Site, SiteOptions};
        use ferry_protocol::frame::MAX_FRAME;
        use ferry_protocol::message::{reject, DiskHello, Hello, Message, PROTOCOL_VERSION};
        use ferry_protocol::payload::Key;
        use std::sync::Arc;

        let t = TempDir::new("hostpolicy-server");
        let site = Arc::new(
            Site::new(
                t.path(),
                SiteOptions::default(),
                Box::new(|_, _| Err("no keys in this test".into())),
            )
            .unwrap(),
        );
        let ctx = ServerContext {
            site: Arc::clone(&site),
            target_name: "target".into(),
            keys: Box::new(|host, _| {
                if host == "web01" {
                    Ok(Key::from_bytes([7; 32]))
                } else {
                    Err("no data key".into())
                }
            }),
            max_frame: MAX_FRAME,
            refusals: RefusalLog::default(),
        };
        let hello = |protocol, host: &str, retention_secs| {
            let m = Message::Hello(Hello {
                protocol,
                host: host.into(),
                disks: vec![DiskHello {
                    name: "sda".into(),
                    size: 1 << 20,
                    ring_generation: 1,
                }],
                retention_secs,
            });
            let mut w = Wire {
                input: std::io::Cursor::new(m.to_frame_bytes(MAX_FRAME).unwrap()),
                output: Vec::new(),
            };
            let ended = serve_connection(&ctx, &mut w, "test", |_, _| true);
            (
                ended,
                Message::read_from(&mut &w.output[..], MAX_FRAME).unwrap(),
            )
        };
        let data = site.dir();
        // A Hello without retention records nothing.
        let (ended, answer) = hello(PROTOCOL_VERSION, "web01", 0);
        assert_eq!(ended, Ended::Closed);
        assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
        assert_eq!(read(data, "web01").unwrap(), None);
        // One with a retention: recorded, and used over the default.
        let (ended, _) = hello(PROTOCOL_VERSION, "web01", 2 * 86_400);
        assert_eq!(ended, Ended::Closed);
        assert_eq!(retention(data, "web01", DAY), 2 * DAY);
        // A later Hello without one keeps it.
        hello(PROTOCOL_VERSION, "web01", 0);
        assert_eq!(retention(data, "web01", DAY), 2 * DAY);
        // Refused Hellos record nothing: unknown host, old protocol.
        let (ended, answer) = hello(PROTOCOL_VERSION, "web02", 3600);
        assert!(matches!(ended, Ended::Refused(ref r) if r.code == reject::UNKNOWN_HOST));
        assert!(matches!(answer, Message::Reject(_)), "{answer:?}");
        assert!(!path(data, "web02").exists());
        let (ended, _) = hello(PROTOCOL_VERSION - 1, "web01", 3600);
        assert!(matches!(ended, Ended::Refused(ref r) if r.code == reject::BAD_VERSION));
        assert_eq!(retention(data, "web01", DAY), 2 * DAY);
        site.shutdown();
    }

    #[test]
    fn concurrent_records_leave_one_whole_file() {
        let t = TempDir::new("hostpolicy-conc");
        let data = t.path().to_path_buf();
        let threads: Vec<_> = (1..=8u64)
            .map(|i| {
                let data = data.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        record(&data, "h", Duration::from_secs(i * 60)).unwrap();
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let p = read(&data, "h").unwrap().unwrap();
        assert!((60..=480).contains(&p.retention_secs) && p.retention_secs.is_multiple_of(60));
        assert!(!data
            .join(HOSTS_DIR)
            .join("h")
            .join(HOST_POLICY_TMP)
            .exists());
    }
}
