//! The API client of the CLI and the daemons: one TLS connection per call
//! (the control plane sees a few calls a minute per daemon, and a fresh
//! connection never trips over a server restart), bearer-token auth, JSON
//! in and out, errors with the server's kind and message.

use std::io::{BufReader, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::http::{self, Method, Request, Response};
use crate::types::ApiError;

/// Default timeout of a call (connect, every read and write).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default port of `ferry server run`.
pub const DEFAULT_PORT: u16 = 7443;

/// A server address parsed from `https://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `HOST:PORT` (brackets kept for IPv6).
    pub addr: String,
    /// The URL as given, without a trailing slash.
    pub url: String,
}

impl ServerUrl {
    /// Parses `https://HOST[:PORT][/]` (no path, no `http://`: the API is
    /// only served over TLS).
    pub fn parse(url: &str) -> Result<ServerUrl> {
        let bad = |why: &str| Error::new(ErrorKind::Url, format!("server URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(bad("only https://HOST[:PORT] is supported"));
        }
        let has_port = if rest.starts_with('[') {
            rest.contains("]:")
        } else {
            rest.contains(':')
        };
        let addr = if has_port {
            rest.to_owned()
        } else {
            format!("{rest}:{DEFAULT_PORT}")
        };
        ferry_protocol::tls::split_host_port(&addr).map_err(|e| bad(&e.to_string()))?;
        Ok(ServerUrl {
            addr,
            url: format!("https://{rest}"),
        })
    }
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    server: ServerUrl,
    tls: Arc<ClientConfig>,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client of the server at `url` that trusts the CA in `ca_pem` and
    /// sends `token` (if any) as its bearer token.
    pub fn new(url: &str, ca_pem: &[u8], token: Option<String>) -> Result<Client> {
        let server = ServerUrl::parse(url)?;
        let tls = ferry_protocol::tls::api_client_config(ca_pem)
            .map_err(|e| Error::new(ErrorKind::Tls, e.to_string()))?;
        Ok(Client {
            server,
            tls,
            token,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// GET `path`, decoded.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        decode(self.call(Method::Get, path, None)?)
    }

    /// POST `body` to `path`, the answer decoded.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = encode(body)?;
        decode(self.call(Method::Post, path, Some(body))?)
    }

    /// PUT `body` to `path`, the answer decoded.
    pub fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let body = encode(body)?;
        decode(self.call(Method::Put, path, Some(body))?)
    }

    /// One call; any status. The caller reads status and body.
    pub fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Response> {
        let mut req = Request::new(method, path);
        if let Some(token) = &self.token {
            req.headers
                .push(("authorization".into(), format!("Bearer {token}")));
        }
        if let Some(body) = body {
            req.headers
                .push(("content-type".into(), "application/json".into()));
            req.body = body;
        }
        req.headers.push(("connection".into(), "close".into()));
        exchange(&self.server, self.tls.clone(), &req, self.timeout)
    }
}

/// Fetches the CA certificate of the server at `url` and checks it against
/// `fingerprint` (`sha256:HEX` of its DER, as a registration token comes
/// with) before anything is trusted. Returns the CA in PEM.
pub fn fetch_pinned_ca(url: &str, fingerprint: &str) -> Result<String> {
    let server = ServerUrl::parse(url)?;
    let tls = ferry_protocol::tls::unverified_client_config()
        .map_err(|e| Error::new(ErrorKind::Tls, e.to_string()))?;
    let mut req = Request::new(Method::Get, "/v1/ca");
    req.headers.push(("connection".into(), "close".into()));
    let resp = exchange(&server, tls, &req, DEFAULT_TIMEOUT)?;
    let resp = check_status(resp)?;
    let pem = String::from_utf8(resp.body)
        .map_err(|_| Error::new(ErrorKind::Decode, "the CA certificate is not text"))?;
    // Exactly one certificate: every certificate in the file would be
    // trusted, and only the first is pinned.
    let count = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).count();
    if count != 1 {
        return Err(Error::new(
            ErrorKind::Tls,
            format!(
                "the server at {url} sent {count} CA certificates, not one: refusing to trust it"
            ),
        ));
    }
    let got = ca_fingerprint(pem.as_bytes())?;
    if !got.eq_ignore_ascii_case(fingerprint.trim()) {
        return Err(Error::new(
            ErrorKind::Tls,
            format!(
                "the server at {url} presents CA {got}, not the expected {fingerprint}: \
                 refusing to trust it"
            ),
        ));
    }
    Ok(pem)
}

/// `sha256:HEX` of the first certificate in `pem`.
pub fn ca_fingerprint(pem: &[u8]) -> Result<String> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem)
        .map_err(|e| Error::new(ErrorKind::Decode, format!("CA certificate: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

fn encode<B: Serialize>(body: &B) -> Result<Vec<u8>> {
    serde_json::to_vec(body)
        .map_err(|e| Error::new(ErrorKind::Decode, format!("encoding the request: {e}")))
}

/// Turns a non-2xx answer into an [`ErrorKind::Api`] error carrying the
/// server's status, kind and message.
fn check_status(resp: Response) -> Result<Response> {
    if (200..300).contains(&resp.status) {
        return Ok(resp);
    }
    let (kind, message) = match serde_json::from_slice::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|v| serde_json::from_value::<ApiError>(v.get("error")?.clone()).ok())
    {
        Some(e) => (e.kind, e.message),
        None => (
            http::reason(resp.status).to_lowercase(),
            String::from_utf8_lossy(&resp.body).trim().to_owned(),
        ),
    };
    Err(Error::api(resp.status, kind, message))
}

fn decode<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let resp = check_status(resp)?;
    let body: &[u8] = if resp.body.is_empty() {
        b"null"
    } else {
        &resp.body
    };
    serde_json::from_slice(body)
        .map_err(|e| Error::new(ErrorKind::Decode, format!("decoding the answer: {e}")))
}

fn exchange(
    server: &ServerUrl,
    tls: Arc<ClientConfig>,
    req: &Request,
    timeout: Duration,
) -> Result<Response> {
    let mut stream = ferry_protocol::tls::connect(&server.addr, tls, timeout).map_err(|e| {
        let kind = match e.kind() {
            ferry_protocol::ErrorKind::Tls | ferry_protocol::ErrorKind::Credentials => {
                ErrorKind::Tls
            }
            _ => ErrorKind::Connect,
        };
        Error::new(kind, format!("{}: {e}", server.url))
    })?;
    let io = |e: std::io::Error| Error::new(ErrorKind::Connect, format!("{}: {e}", server.url));
    let host = server.addr.as_str();
    http::write_request(&mut stream, req, host).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut reader = BufReader::new(stream);
    http::read_response(&mut reader)
        .map_err(|e| Error::new(ErrorKind::Http, format!("{}: {e}", server.url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ServerUrl::parse("https://cp.example:8443/").unwrap();
        assert_eq!(
            (u.addr.as_str(), u.url.as_str()),
            ("cp.example:8443", "https://cp.example:8443")
        );
        let u = ServerUrl::parse("https://10.0.0.1").unwrap();
        assert_eq!(u.addr, "10.0.0.1:7443");
        let u = ServerUrl::parse("https://[::1]:9000").unwrap();
        assert_eq!(u.addr, "[::1]:9000");
        for bad in [
            "http://x",
            "https://",
            "https://x/v1",
            "x:1",
            "https://x:0",
            "https://u@x",
        ] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_answers_carry_kind_and_message() {
        let body =
            br#"{"error":{"kind":"forbidden","message":"host web01 may not touch host web02"}}"#;
        let e = check_status(Response {
            status: 403,
            headers: vec![],
            body: body.to_vec(),
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Api);
        assert_eq!(e.status(), Some(403));
        assert_eq!(e.api_kind(), Some("forbidden"));
        assert!(e.to_string().contains("may not touch"), "{e}");
        let e = check_status(Response {
            status: 502,
            headers: vec![],
            body: b"bad gateway".to_vec(),
        })
        .unwrap_err();
        assert_eq!(e.status(), Some(502));
    }
}
