//! Mutual TLS 1.3 between sidecar (client) and target (server).
//!
//! Both sides use `rustls` with the `ring` provider, TLS 1.3 only (the
//! `tls12` feature is not even compiled in), and trust exactly one anchor:
//! `ca.crt` of the credentials directory made by
//! [`credentials::init`](crate::credentials::init). The target requires a
//! client certificate issued by that CA; after the handshake it checks with
//! [`peer_host_matches`] that the host named in the sidecar's Hello is the one
//! the certificate was issued to, so a host can only ship under its own name.
//!
//! ```no_run
//! # fn main() -> ferry_protocol::Result<()> {
//! use std::path::Path;
//! use std::time::Duration;
//! use ferry_protocol::tls;
//! let dir = Path::new("/etc/ferry/creds");
//! // Target.
//! let server = tls::server_config(dir, "target")?;
//! let listener = std::net::TcpListener::bind(("0.0.0.0", tls::DEFAULT_PORT))?;
//! let (tcp, _) = listener.accept()?;
//! let stream = tls::accept(tcp, server)?;
//! assert!(tls::peer_host_matches(&stream.conn, "web01"));
//! // Sidecar.
//! let client = tls::client_config(dir, "web01")?;
//! let stream = tls::connect("dr.example.com:9443", client, Duration::from_secs(10))?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{StreamOwned, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};

use crate::credentials::{self, CA_CERT};
use crate::error::{Error, ErrorKind, Result};

/// The target's default TCP port.
pub const DEFAULT_PORT: u16 = 9443;

/// A sidecar's TLS stream to the target.
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;
/// The target's TLS stream from one sidecar.
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;

/// The only protocol version offered or accepted.
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn tls_err(context: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tls, context)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates of a PEM file (at least one).
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::from(e).within(&format!("read certificate {}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::new(
                ErrorKind::Credentials,
                format!("{}: bad PEM: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::new(
            ErrorKind::Credentials,
            format!("{}: no certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file that only its owner may read.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let mut bytes = credentials::read_secret(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::Credentials,
            format!("{}: not a PEM private key: {e}", path.display()),
        )
    });
    bytes.fill(0);
    key
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    roots_of(load_certs(ca)?, &ca.display().to_string())
}

/// A root store of `certs` (`what` names them in errors).
fn roots_of(certs: Vec<CertificateDer<'static>>, what: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| tls_err(format!("{what}: not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The sidecar's configuration for host `host`: trusts only `DIR/ca.crt`,
/// presents `DIR/HOST.crt` with `DIR/HOST.key`, TLS 1.3 only.
pub fn client_config(dir: &Path, host: &str) -> Result<Arc<ClientConfig>> {
    credentials::validate_host(host)?;
    client_config_from(
        &dir.join(CA_CERT),
        &credentials::cert_path(dir, host),
        &credentials::key_path(dir, host),
    )
}

/// [`client_config`] from explicit file paths.
pub(crate) fn client_config_from(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>> {
    let roots = roots(ca)?;
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| tls_err(format!("TLS 1.3 client setup: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| {
            tls_err(format!(
                "client certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(cfg))
}

/// The target's configuration: presents `DIR/TARGET.crt` with
/// `DIR/TARGET.key`, requires a client certificate issued by `DIR/ca.crt`,
/// TLS 1.3 only.
pub fn server_config(dir: &Path, target: &str) -> Result<Arc<ServerConfig>> {
    credentials::validate_target(target)?;
    let ca = dir.join(CA_CERT);
    let (cert, key) = (
        credentials::cert_path(dir, target),
        credentials::key_path(dir, target),
    );
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider.clone())
        .build()
        .map_err(|e| tls_err(format!("client verifier from {}: {e}", ca.display())))?;
    let chain = load_certs(&cert)?;
    let key_der = load_key(&key)?;
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| tls_err(format!("TLS 1.3 server setup: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            tls_err(format!(
                "server certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(cfg))
}

/// The control-plane API server's configuration: presents `DIR/NAME.crt`
/// with `DIR/NAME.key`, asks no client certificate (API clients carry
/// bearer tokens), TLS 1.3 only.
pub fn api_server_config(dir: &Path, name: &str) -> Result<Arc<ServerConfig>> {
    let (cert, key) = (
        credentials::cert_path(dir, name),
        credentials::key_path(dir, name),
    );
    let chain = load_certs(&cert)?;
    let key_der = load_key(&key)?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| tls_err(format!("TLS 1.3 server setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            tls_err(format!(
                "server certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(cfg))
}

/// An API client's configuration: trusts only the CA certificates in
/// `ca_pem`, presents no certificate, TLS 1.3 only.
pub fn api_client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>> {
    let certs = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::new(
                ErrorKind::Credentials,
                format!("CA certificate: bad PEM: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::new(
            ErrorKind::Credentials,
            "CA certificate: no certificate in the PEM",
        ));
    }
    let roots = roots_of(certs, "CA certificate")?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| tls_err(format!("TLS 1.3 client setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client configuration that accepts any server certificate. Its one use
/// is fetching a server's CA certificate before trusting it: the caller
/// must compare what it got with a fingerprint it already holds (a
/// registration token's) and then reconnect with [`api_client_config`].
/// Nothing secret may travel over such a connection.
pub fn unverified_client_config() -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| tls_err(format!("TLS 1.3 client setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// See [`unverified_client_config`]: checks the handshake signatures (so
/// the peer holds the key of the certificate it sent) but not the chain.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether the verified client certificate of `conn` was issued to `host`
/// (a DNS subject alternative name; matching ignores ASCII case, as DNS
/// does). False before the handshake, without a client certificate, or for
/// a `host` that is not a DNS name.
pub fn peer_host_matches(conn: &ServerConnection, host: &str) -> bool {
    let Some(ee) = conn.peer_certificates().and_then(|c| c.first()) else {
        return false;
    };
    let Ok(name) = DnsName::try_from(host) else {
        return false;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&ServerName::DnsName(name))
        .is_ok()
}

/// Splits `host:port`, `[v6]:port`, `host`, `v6` or `[v6]` into host and
/// port ([`DEFAULT_PORT`] when none is given).
pub fn split_host_port(addr: &str) -> Result<(&str, u16)> {
    let bad = |why: &str| Error::new(ErrorKind::Malformed, format!("address {addr:?}: {why}"));
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("port must be 1..=65535"))
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in brackets"));
        }
        match after {
            "" => (host, DEFAULT_PORT),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, port(p)?),
                None => return Err(bad("expected ':' after ']'")),
            },
        }
    } else {
        match addr.matches(':').count() {
            0 => (addr, DEFAULT_PORT),
            1 => {
                let (h, p) = addr.split_once(':').ok_or_else(|| bad("no port"))?;
                (h, port(p)?)
            }
            _ if addr.parse::<std::net::Ipv6Addr>().is_ok() => (addr, DEFAULT_PORT),
            _ => {
                return Err(bad(
                    "an IPv6 address with a port needs brackets: [addr]:port",
                ))
            }
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    Ok((host, port))
}

/// The name the sidecar checks the target's certificate against, from an
/// address as given to [`connect`] (`host:port`, `[v6]:port`, `host`): an IP
/// address becomes [`ServerName::IpAddress`], anything else a DNS name.
pub fn server_name_for(addr_or_name: &str) -> Result<ServerName<'static>> {
    let (host, _) = split_host_port(addr_or_name)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    DnsName::try_from(host.to_owned())
        .map(ServerName::DnsName)
        .map_err(|_| {
            Error::new(
                ErrorKind::Malformed,
                format!("{host:?} is neither an IP address nor a DNS name"),
            )
        })
}

/// Turns an error from driving the handshake into the crate's error.
fn handshake_err(peer: &str, e: io::Error) -> Error {
    let what = format!("TLS handshake with {peer}");
    match e.kind() {
        io::ErrorKind::InvalidData => tls_err(format!("{what}: {e}")),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::new(ErrorKind::Io, format!("{what}: timed out"))
        }
        io::ErrorKind::UnexpectedEof => Error::new(
            ErrorKind::Tls,
            format!("{what}: connection closed during the handshake (certificate refused?)"),
        ),
        _ => Error::from(e).within(&what),
    }
}

/// Connects to the target at `addr` (`host:port`, `[v6]:port` or `host` for
/// [`DEFAULT_PORT`]) and completes the TLS handshake before returning.
/// `timeout` bounds the TCP connect (per resolved address) and every read and
/// write, handshake included; it stays set as the socket's read and write
/// timeout (change it with `stream.sock.set_read_timeout`). `TCP_NODELAY` is
/// set.
///
/// With TLS 1.3 the client finishes its handshake before the server has
/// judged the client certificate: a refused certificate shows as an error on
/// the first read (the target's Welcome), not here.
pub fn connect(addr: &str, cfg: Arc<ClientConfig>, timeout: Duration) -> Result<ClientStream> {
    connect_as(addr, server_name_for(addr)?, cfg, timeout)
}

/// [`connect`], checking the server's certificate for `name` instead of
/// the address's host (a host's group port is reached by address but its
/// certificate names the host).
pub fn connect_as(
    addr: &str,
    name: ServerName<'static>,
    cfg: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<ClientStream> {
    if timeout.is_zero() {
        return Err(Error::new(ErrorKind::Malformed, "connect timeout of zero"));
    }
    let (host, port) = split_host_port(addr)?;
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::from(e).within(&format!("resolve {addr}")))?;
    let mut last = None;
    let mut tcp = None;
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some((sa, e)),
        }
    }
    let tcp = match (tcp, last) {
        (Some(t), _) => t,
        (None, Some((sa, e))) => {
            return Err(Error::from(e).within(&format!("connect to {addr} ({sa})")))
        }
        (None, None) => {
            return Err(Error::new(
                ErrorKind::Io,
                format!("resolve {addr}: no address"),
            ))
        }
    };
    let setup = |e: io::Error| Error::from(e).within(&format!("socket options for {addr}"));
    tcp.set_nodelay(true).map_err(setup)?;
    tcp.set_read_timeout(Some(timeout)).map_err(setup)?;
    tcp.set_write_timeout(Some(timeout)).map_err(setup)?;
    let conn = ClientConnection::new(cfg, name)
        .map_err(|e| tls_err(format!("TLS client for {addr}: {e}")))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| handshake_err(addr, e))?;
    }
    Ok(stream)
}

/// Completes the server side of the TLS handshake on an accepted socket.
/// Sets `TCP_NODELAY`; read and write timeouts are left as the caller set
/// them on `tcp` (set them first, or a silent client holds this call).
/// Afterwards check the client with [`peer_host_matches`].
pub fn accept(tcp: TcpStream, cfg: Arc<ServerConfig>) -> Result<ServerStream> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "an unknown peer".to_owned());
    tcp.set_nodelay(true)
        .map_err(|e| Error::from(e).within(&format!("socket options for {peer}")))?;
    let conn = ServerConnection::new(cfg).map_err(|e| tls_err(format!("TLS server: {e}")))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| handshake_err(&peer, e))?;
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;

    use super::*;
    use crate::credentials::testutil::{hosts, TempDir};
    use crate::credentials::{init, DEFAULT_TARGET};

    const T: Duration = Duration::from_secs(10);

    fn creds(tmp: &TempDir, names: &[&str]) -> PathBuf {
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(names), DEFAULT_TARGET, false).unwrap();
        dir
    }

    /// Runs one server handshake on a loopback listener while `client` runs
    /// in this thread; returns the server's outcome (and for a success,
    /// whether the peer is `web01`/`web02`) and the client's.
    fn handshake<C, R>(server: Arc<ServerConfig>, client: C) -> (Result<(bool, bool)>, R)
    where
        C: FnOnce(String) -> R,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let th = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(T)).unwrap();
            tcp.set_write_timeout(Some(T)).unwrap();
            let mut s = accept(tcp, server)?;
            let who = (
                peer_host_matches(&s.conn, "web01"),
                peer_host_matches(&s.conn, "web02"),
            );
            // Echo one message so the client sees the connection working
            // (or the refusal) on its first read.
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
            s.flush()?;
            Ok(who)
        });
        let c = client(addr);
        (th.join().unwrap(), c)
    }

    fn ping(addr: &str, cfg: Arc<ClientConfig>) -> Result<()> {
        let mut s = connect(addr, cfg, T)?;
        s.write_all(b"hello")?;
        s.flush()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        assert_eq!(&buf, b"hello");
        Ok(())
    }

    #[test]
    fn loopback_handshake_and_host_check() {
        let tmp = TempDir::new("tls-ok");
        let dir = creds(&tmp, &["web01"]);
        let server = server_config(&dir, DEFAULT_TARGET).unwrap();
        let client = client_config(&dir, "web01").unwrap();
        let (srv, cli) = handshake(server, |addr| ping(&addr, client));
        cli.unwrap();
        assert_eq!(srv.unwrap(), (true, false));
    }

    #[test]
    fn negotiates_tls13_by_localhost_name() {
        let tmp = TempDir::new("tls-13");
        let dir = creds(&tmp, &["web01"]);
        let server = server_config(&dir, DEFAULT_TARGET).unwrap();
        let client = client_config(&dir, "web01").unwrap();
        let (srv, cli) = handshake(server, |addr| {
            let port = addr.rsplit_once(':').unwrap().1.to_owned();
            let mut s = connect(&format!("localhost:{port}"), client, T)?;
            let v = s.conn.protocol_version();
            s.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            Ok::<_, Error>(v)
        });
        assert_eq!(cli.unwrap(), Some(rustls::ProtocolVersion::TLSv1_3));
        srv.unwrap();
    }

    #[test]
    fn second_host_added_later_is_trusted() {
        let tmp = TempDir::new("tls-add");
        let dir = creds(&tmp, &["web01"]);
        init(&dir, &hosts(&["web02"]), DEFAULT_TARGET, false).unwrap();
        let server = server_config(&dir, DEFAULT_TARGET).unwrap();
        let client = client_config(&dir, "web02").unwrap();
        let (srv, cli) = handshake(server, |addr| ping(&addr, client));
        cli.unwrap();
        assert_eq!(srv.unwrap(), (false, true));
    }

    #[test]
    fn client_of_another_ca_is_refused() {
        let tmp = TempDir::new("tls-otherca");
        let dir = creds(&tmp, &["web01"]);
        let tmp2 = TempDir::new("tls-otherca2");
        let other = creds(&tmp2, &["web01"]);
        let server = server_config(&dir, DEFAULT_TARGET).unwrap();
        // Trusts the real target, but presents a certificate of another CA.
        let client = client_config_from(
            &dir.join(CA_CERT),
            &other.join("web01.crt"),
            &other.join("web01.key"),
        )
        .unwrap();
        let (srv, cli) = handshake(server, |addr| ping(&addr, client));
        let e = srv.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
        assert!(cli.is_err());
    }

    #[test]
    fn client_without_certificate_is_refused() {
        let tmp = TempDir::new("tls-nocert");
        let dir = creds(&tmp, &["web01"]);
        let server = server_config(&dir, DEFAULT_TARGET).unwrap();
        let client = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .unwrap()
                .with_root_certificates(roots(&dir.join(CA_CERT)).unwrap())
                .with_no_client_auth(),
        );
        let (srv, cli) = handshake(server, |addr| ping(&addr, client));
        let e = srv.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
        assert!(cli.is_err());
    }

    #[test]
    fn client_refuses_a_target_of_another_ca() {
        let tmp = TempDir::new("tls-othertarget");
        let dir = creds(&tmp, &["web01"]);
        let tmp2 = TempDir::new("tls-othertarget2");
        let other = creds(&tmp2, &["web01"]);
        let server = server_config(&other, DEFAULT_TARGET).unwrap();
        let client = client_config(&dir, "web01").unwrap();
        let (srv, cli) = handshake(server, |addr| ping(&addr, client));
        let e = cli.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
        assert!(srv.is_err());
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let tmp = TempDir::new("tls-bad");
        let dir = creds(&tmp, &["web01"]);
        // Missing host.
        assert_eq!(
            client_config(&dir, "web09").unwrap_err().kind(),
            ErrorKind::Io
        );
        assert!(client_config(&dir, "../web01").is_err());
        // Bad PEM.
        std::fs::write(dir.join("web01.crt"), b"not pem").unwrap();
        let e = client_config(&dir, "web01").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Credentials, "{e}");
        // Key readable by others.
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("target.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = server_config(&dir, DEFAULT_TARGET).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        server_config(&dir, DEFAULT_TARGET).unwrap();
        // A key that does not belong to the certificate.
        std::fs::copy(dir.join("web01.key"), &key).unwrap();
        let e = server_config(&dir, DEFAULT_TARGET).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
        // Garbage key.
        std::fs::write(
            &key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(server_config(&dir, DEFAULT_TARGET).is_err());
        // Empty CA file.
        std::fs::write(dir.join(CA_CERT), b"").unwrap();
        let e = server_config(&dir, DEFAULT_TARGET).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Credentials, "{e}");
    }

    #[test]
    fn addresses_and_server_names() {
        assert_eq!(
            split_host_port("127.0.0.1:9443").unwrap(),
            ("127.0.0.1", 9443)
        );
        assert_eq!(
            split_host_port("dr.example.com").unwrap(),
            ("dr.example.com", DEFAULT_PORT)
        );
        assert_eq!(split_host_port("[::1]:7000").unwrap(), ("::1", 7000));
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1", DEFAULT_PORT));
        assert_eq!(
            split_host_port("fe80::1").unwrap(),
            ("fe80::1", DEFAULT_PORT)
        );
        for bad in [
            "", ":9443", "h:0", "h:x", "h:70000", "[::1", "[x]:1", "[::1]x", "a:b:c",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            server_name_for("127.0.0.1:9443").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name_for("[::1]:9443").unwrap(),
            ServerName::IpAddress(_)
        ));
        match server_name_for("dr.example.com:9443").unwrap() {
            ServerName::DnsName(n) => assert_eq!(n.as_ref(), "dr.example.com"),
            other => panic!("{other:?}"),
        }
        assert!(server_name_for("bad name:1").is_err());
        let cfg = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        );
        assert!(connect("127.0.0.1:1", cfg, Duration::ZERO).is_err());
    }
}
