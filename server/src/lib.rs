//! ferry's control plane (`ferry server`): one SQLite file of state
//! ([`db`]), the lifecycle of protected disks ([`lifecycle`]), tokens and
//! who may do what ([`auth`]), the API's routes ([`api`]) and the TLS
//! listener with the data directory ([`daemon`]). The wire types and the
//! client are in `ferry-api`.

pub mod api;
pub mod auth;
pub mod daemon;
pub mod db;
pub mod error;
pub mod groups;
pub mod health;
pub mod lifecycle;
pub mod plans;

pub use error::{Error, ErrorKind, Result};
