//! Group rounds over the network (TCP, default port [`DEFAULT_PORT`]): a
//! coordinator on another machine (the control-plane server) holds this
//! host's writes for a group-consistent point.
//!
//! The link is mutual TLS 1.3 with the host's own credentials: this side
//! presents `HOST.crt` (issued by the server's CA with both server and
//! client use), accepts only clients whose certificate chains to `ca.crt`
//! and names the coordinator ([`COORDINATOR`], the server's certificate
//! name), and serves nothing but `hold` with its verdict: the same
//! per-connection round as the local control socket ([`crate::control`]),
//! so the hold's own deadline, abort on silence and abort on hang-up apply
//! unchanged. Everything else is refused with an error line.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConnection, StreamOwned};

use crate::control::{self, Allowed, ControlStream, Handler};
use crate::error::{Error, Result};

/// The default group port.
pub const DEFAULT_PORT: u16 = 20004;
/// The certificate name a coordinator must present.
pub const COORDINATOR: &str = "ferry-server";
/// Most coordinator connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Bound on the TLS handshake and on silence before the first request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to serve group rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLinkConfig {
    /// Address to listen on (`HOST:PORT`).
    pub listen: String,
    /// The host's credentials directory (`ca.crt`, `HOST.crt`, `HOST.key`).
    pub credentials: PathBuf,
    /// The host's name (its certificate's).
    pub host: String,
    /// The certificate name a coordinator must present.
    pub coordinator: String,
}

impl ControlStream for StreamOwned<ServerConnection, TcpStream> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_write_timeout(d)
    }
}

/// Binds the group port and serves it on a thread named `group-link`
/// until `stop`; returns the bound address.
pub fn spawn(
    cfg: &GroupLinkConfig,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
) -> Result<SocketAddr> {
    let tls = ferry_protocol::tls::server_config(&cfg.credentials, &cfg.host)
        .map_err(|e| Error::config(format!("group link credentials: {e}")))?;
    let listener = TcpListener::bind(&cfg.listen)
        .map_err(|e| Error::io(e, &format!("bind the group port {}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(e, "group port address"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(e, "group port"))?;
    let coordinator = cfg.coordinator.clone();
    std::thread::Builder::new()
        .name("group-link".into())
        .spawn(move || accept_loop(&listener, &tls, &coordinator, &handler, &stop))
        .map_err(|e| Error::io(e, "start the group link thread"))?;
    tracing::info!(%addr, "group link listening");
    Ok(addr)
}

fn accept_loop(
    listener: &TcpListener,
    tls: &Arc<rustls::ServerConfig>,
    coordinator: &str,
    handler: &Arc<dyn Handler>,
    stop: &Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "group link: too many connections, refused");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (tls, handler, stop, active) = (
                    Arc::clone(tls),
                    Arc::clone(handler),
                    Arc::clone(stop),
                    Arc::clone(&active),
                );
                let coordinator = coordinator.to_owned();
                let spawned =
                    std::thread::Builder::new()
                        .name("group-conn".into())
                        .spawn(move || {
                            serve(tcp, peer, &tls, &coordinator, handler.as_ref(), &stop);
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a group connection thread");
                }
            }
            // Short: the members of a round should all start holding within
            // a few ms of the coordinator's request.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "group link accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: &Arc<rustls::ServerConfig>,
    coordinator: &str,
    handler: &dyn Handler,
    stop: &AtomicBool,
) {
    if tcp.set_nonblocking(false).is_err()
        || tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).is_err()
        || tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut stream = match ferry_protocol::tls::accept(tcp, Arc::clone(tls)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "group link: TLS handshake failed");
            return;
        }
    };
    if !ferry_protocol::tls::peer_host_matches(&stream.conn, coordinator) {
        tracing::warn!(%peer, "group link: the client is not the coordinator {coordinator}: refused");
        return;
    }
    let _ = stream.sock.set_write_timeout(None);
    control::serve_lines(&mut stream, handler, stop, Allowed::HoldOnly);
}
