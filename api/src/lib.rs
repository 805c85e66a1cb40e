//! ferry's control-plane API: the JSON types ([`types`]), a strict
//! HTTP/1.1 codec ([`http`]) and the client of the CLI and the daemons
//! ([`client`]). The server (`ferry-server`) answers it over TLS 1.3; see
//! `docs/ARCHITECTURE.md`, "Control plane".

pub mod client;
pub mod error;
pub mod http;
pub mod metrics;
pub mod types;

pub use client::Client;
pub use error::{Error, ErrorKind, Result};
