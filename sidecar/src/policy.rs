//! The replication policy of a standalone sidecar (`ferry sidecar --policy
//! FILE`), a TOML file:
//!
//! ```toml
//! crash_consistent_interval = "5m"   # default 5m; at least 1s
//! app_consistent_interval = "1h"     # default 1h; "off" disables
//! app_mounts = ["/srv"]              # file systems frozen for app points
//! app_pre = "sync"                   # optional scripts around the freeze
//! app_post = "true"
//! retention = "24h"                  # default 24h, at least 1s (pruning at the target)
//! compression_level = 1              # zstd; negative = fast modes
//! bandwidth = "50M"                  # bytes per second, 0 = unlimited
//! ```
//!
//! Points are requested of the filter on schedule; it refuses while a disk
//! is not in the data state, and the target only records tags at which the
//! replica is consistent, so a point is never minted from inconsistent data.
//!
//! The retention travels to the target in the Hello of every connection
//! ([`Policy::hello_retention_secs`]); the target records it per host. A
//! sidecar without a policy file sends 0, and the target keeps its own
//! default (`ferry target --retention`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// Shortest crash-consistent interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Interval of crash-consistent points.
    pub crash_interval: Duration,
    /// Interval of app-consistent points (None: off).
    pub app_interval: Option<Duration>,
    /// File systems frozen for app-consistent points.
    pub app_mounts: Vec<PathBuf>,
    /// Script run before freezing.
    pub app_pre: Option<String>,
    /// Script run after thawing.
    pub app_post: Option<String>,
    /// How long points are kept at the target (at least 1 s; sent in the
    /// Hello, see [`Policy::hello_retention_secs`]).
    pub retention: Duration,
    /// zstd level.
    pub compression_level: i32,
    /// Bytes per second on the wire (0: unlimited).
    pub bandwidth: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            crash_interval: Duration::from_secs(5 * 60),
            app_interval: Some(Duration::from_secs(60 * 60)),
            app_mounts: Vec::new(),
            app_pre: None,
            app_post: None,
            retention: Duration::from_secs(24 * 60 * 60),
            compression_level: crate::ship::ZSTD_LEVEL,
            bandwidth: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    crash_consistent_interval: Option<String>,
    app_consistent_interval: Option<String>,
    #[serde(default)]
    app_mounts: Vec<PathBuf>,
    app_pre: Option<String>,
    app_post: Option<String>,
    retention: Option<String>,
    compression_level: Option<i32>,
    bandwidth: Option<String>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Io, format!("policy: {}", what.into()))
}

/// `30s`, `5m`, `1h`, `2d` (a number alone is seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// `50M`, `1G`, `4096` (K/M/G/T, powers of 1024).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

impl Policy {
    /// Parse TOML text.
    pub fn parse(text: &str) -> Result<Policy> {
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut p = Policy::default();
        if let Some(s) = raw.crash_consistent_interval {
            let d = parse_duration(&s)
                .ok_or_else(|| bad(format!("crash_consistent_interval {s:?}")))?;
            if d < MIN_INTERVAL {
                return Err(bad("crash_consistent_interval below 1s"));
            }
            p.crash_interval = d;
        }
        if let Some(s) = raw.app_consistent_interval {
            p.app_interval = if s.trim() == "off" {
                None
            } else {
                let d = parse_duration(&s)
                    .ok_or_else(|| bad(format!("app_consistent_interval {s:?}")))?;
                if d < MIN_INTERVAL {
                    return Err(bad("app_consistent_interval below 1s"));
                }
                Some(d)
            };
        }
        p.app_mounts = raw.app_mounts;
        p.app_pre = raw.app_pre;
        p.app_post = raw.app_post;
        if let Some(s) = raw.retention {
            p.retention = parse_duration(&s).ok_or_else(|| bad(format!("retention {s:?}")))?;
            // 0 on the wire means "the target's default": refuse it here
            // rather than let it silently mean something else.
            if p.retention < MIN_INTERVAL {
                return Err(bad("retention below 1s"));
            }
        }
        if let Some(l) = raw.compression_level {
            if !(-7..=19).contains(&l) {
                return Err(bad(format!("compression_level {l} (-7..=19)")));
            }
            p.compression_level = l;
        }
        if let Some(s) = raw.bandwidth {
            p.bandwidth = parse_bytes(&s).ok_or_else(|| bad(format!("bandwidth {s:?}")))?;
        }
        Ok(p)
    }

    /// The `retention_secs` of the Hello for `policy`: its retention in
    /// whole seconds, or 0 (the target's default) without a policy file.
    pub fn hello_retention_secs(policy: Option<&Policy>) -> u64 {
        policy.map_or(0, |p| p.retention.as_secs())
    }

    /// Read and parse a policy file.
    pub fn from_file(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(ErrorKind::Io, format!("read policy {}", path.display()), e)
        })?;
        Policy::parse(&text)
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.context())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
        let p = Policy::parse(
            r#"
            crash_consistent_interval = "1s"
            app_consistent_interval = "15m"
            app_mounts = ["/srv", "/var/lib/db"]
            app_pre = "sync"
            retention = "2d"
            compression_level = -3
            bandwidth = "50M"
            "#,
        )
        .unwrap();
        assert_eq!(p.crash_interval, Duration::from_secs(1));
        assert_eq!(p.app_interval, Some(Duration::from_secs(900)));
        assert_eq!(p.app_mounts.len(), 2);
        assert_eq!(p.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(p.compression_level, -3);
        assert_eq!(p.bandwidth, 50 << 20);
        assert_eq!(
            Policy::parse("app_consistent_interval = \"off\"")
                .unwrap()
                .app_interval,
            None
        );
    }

    #[test]
    fn refusals() {
        for text in [
            "crash_consistent_interval = \"0s\"",
            "crash_consistent_interval = \"5 parsecs\"",
            "compression_level = 40",
            "bandwidth = \"lots\"",
            "unknown_key = 1",
            "retention = \"0s\"",
            "retention = \"0\"",
            "retention = \"1w\"",
        ] {
            assert!(Policy::parse(text).is_err(), "{text}");
        }
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    }

    #[test]
    fn retention_for_the_hello() {
        // No policy file: 0, the target decides.
        assert_eq!(Policy::hello_retention_secs(None), 0);
        // A policy file without `retention`: its default, 24 h.
        let p = Policy::parse("").unwrap();
        assert_eq!(Policy::hello_retention_secs(Some(&p)), 86_400);
        let p = Policy::parse("retention = \"3d\"").unwrap();
        assert_eq!(Policy::hello_retention_secs(Some(&p)), 3 * 86_400);
        let p = Policy::parse("retention = \"1s\"").unwrap();
        assert_eq!(Policy::hello_retention_secs(Some(&p)), 1);
    }
}
