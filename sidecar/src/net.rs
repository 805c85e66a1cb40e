//! The sidecar's end of the wire: Hello/Welcome, then change sets answered
//! by acks (see `ferry_master_target::server` for the target's end).

use std::io::{Read, Write};
use std::time::Duration;

use ferry_protocol::message::{
    reject, BlockHashes, ChangeSet, DiskHello, DiskResume, Heartbeat, Hello, Message, Progress,
    PROTOCOL_VERSION,
};

use crate::error::{Error, ErrorKind, Result};
use crate::ship::{Ack, Transport};

/// Bandwidth limiter: a token bucket of one second.
#[derive(Debug, Clone)]
pub struct Throttle {
    rate: u64,
    tokens: f64,
    last: std::time::Instant,
}

impl Throttle {
    /// At most `rate` bytes per second (0: unlimited).
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            tokens: 0.0,
            last: std::time::Instant::now(),
        }
    }

    /// How long to wait before sending `bytes` more (and account for them).
    pub fn delay_for(&mut self, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let now = std::time::Instant::now();
        let rate = self.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// Change sets in flight by default: while the target makes one durable
/// (its fsync), the next ones are already compressed, sealed and on the
/// wire.
pub const DEFAULT_WINDOW: usize = 4;

/// A connection to the target over any byte stream (TLS in the daemon).
#[derive(Debug)]
pub struct NetTransport<S: Read + Write> {
    stream: S,
    max_frame: usize,
    throttle: Throttle,
    exchange: bool,
    window: usize,
}

fn transport_err(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::with_source(ErrorKind::Transport, what.to_owned(), e)
}

impl<S: Read + Write> NetTransport<S> {
    /// Say Hello for `disks` of `host` and read the Welcome: the resume
    /// point of each disk. `retention_secs` is the policy's retention
    /// window (0: the target's default; see
    /// [`crate::policy::Policy::hello_retention_secs`]).
    pub fn handshake(
        mut stream: S,
        host: &str,
        disks: Vec<DiskHello>,
        retention_secs: u64,
        max_frame: usize,
        bandwidth: u64,
    ) -> Result<(NetTransport<S>, Vec<DiskResume>)> {
        let hello = Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            host: host.to_owned(),
            disks,
            retention_secs,
        });
        hello
            .write_to(&mut stream)
            .and_then(|()| stream.flush().map_err(Into::into))
            .map_err(|e| transport_err("send Hello", e))?;
        let mut t = NetTransport {
            stream,
            max_frame,
            throttle: Throttle::new(bandwidth),
            exchange: false,
            window: DEFAULT_WINDOW,
        };
        match t.read()? {
            Message::Welcome(w) => Ok((t, w.resume)),
            other => Err(unexpected(&other, "Welcome")),
        }
    }

    fn read(&mut self) -> Result<Message> {
        let m = Message::read_from(&mut self.stream, self.max_frame)
            .map_err(|e| transport_err("read from the target", e))?;
        if let Message::Reject(r) = &m {
            let kind = match r.code {
                reject::GAP => ErrorKind::Gap,
                // The target failed (I/O, full disk): retry later.
                reject::INTERNAL => ErrorKind::Transport,
                _ => ErrorKind::Rejected,
            };
            return Err(Error::new(
                kind,
                format!("target refused (code {}): {}", r.code, r.message),
            ));
        }
        Ok(m)
    }

    fn write(&mut self, m: &Message) -> Result<()> {
        m.write_to(&mut self.stream)
            .map_err(|e| transport_err("send to the target", e))?;
        self.stream
            .flush()
            .map_err(|e| transport_err("send to the target", e))
    }

    /// Change sets sent before the first answer is awaited (1: one at a
    /// time).
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// Offer the checksum exchange before resync sets (worth it only when
    /// the target's replica holds data).
    pub fn set_exchange(&mut self, on: bool) {
        self.exchange = on;
    }

    /// Report the source side's lag (no answer expected).
    pub fn progress(&mut self, p: Progress) -> Result<()> {
        self.write(&Message::Progress(p))
    }

    /// A heartbeat, answered by one.
    pub fn heartbeat(&mut self) -> Result<()> {
        self.write(&Message::Heartbeat(Heartbeat {
            time_ns: ferry_ring::ring::now_ns(),
        }))?;
        match self.read()? {
            Message::Heartbeat(_) => Ok(()),
            other => Err(unexpected(&other, "Heartbeat")),
        }
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

fn unexpected(m: &Message, want: &str) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!(
            "the target answered with message kind {} where {want} was expected",
            m.kind()
        ),
    )
}

impl<S: Read + Write> Transport for NetTransport<S> {
    fn send(&mut self, cs: ChangeSet) -> Result<Ack> {
        self.send_async(cs)?;
        self.recv_ack()
    }

    fn window(&self) -> usize {
        self.window
    }

    fn send_async(&mut self, cs: ChangeSet) -> Result<()> {
        let bytes = u64::try_from(cs.payload.len()).unwrap_or(u64::MAX);
        let wait = self.throttle.delay_for(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        cs.write_frame_to(&mut self.stream, self.max_frame)
            .map_err(|e| match e.kind() {
                ferry_protocol::ErrorKind::Io => transport_err("send change set", e),
                _ => Error::protocol("encode change set", e),
            })?;
        self.stream
            .flush()
            .map_err(|e| transport_err("send change set", e))
    }

    fn recv_ack(&mut self) -> Result<Ack> {
        loop {
            match self.read()? {
                Message::Ack(a) => {
                    return Ok(Ack {
                        last_seq: a.last_seq,
                    })
                }
                Message::Heartbeat(_) => continue,
                other => return Err(unexpected(&other, "Ack")),
            }
        }
    }

    fn hash_diff(&mut self, hashes: BlockHashes) -> Result<Option<Vec<bool>>> {
        if !self.exchange || hashes.hashes.is_empty() {
            return Ok(None);
        }
        let n = hashes.hashes.len();
        self.write(&Message::BlockHashes(hashes))?;
        loop {
            match self.read()? {
                Message::HashDiff(d) if d.differs.len() == n => return Ok(Some(d.differs)),
                Message::HashDiff(d) => {
                    return Err(Error::new(
                        ErrorKind::Transport,
                        format!("hash answer for {} blocks, asked {n}", d.differs.len()),
                    ))
                }
                Message::Heartbeat(_) => continue,
                other => return Err(unexpected(&other, "HashDiff")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_paces_to_the_rate() {
        let mut t = Throttle::new(1000);
        // A full second's worth up front costs about a second.
        let d = t.delay_for(1000);
        assert!(
            d > Duration::from_millis(900) && d <= Duration::from_secs(1),
            "{d:?}"
        );
        assert_eq!(Throttle::new(0).delay_for(1 << 40), Duration::ZERO);
    }
}
