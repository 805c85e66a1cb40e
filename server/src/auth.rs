//! Tokens: made from 32 random bytes, shown once, stored only as their
//! SHA-256 (a stolen database does not hand out access), and the rules of
//! who may do what.
//!
//! A token is `fy` + a role letter + `_` + 64 hex digits: `fya_` admin,
//! `fyh_` host, `fyt_` target, `fyr_` one-time registration. The prefix
//! only helps a human (and secret scanners) tell them apart; the server
//! trusts nothing but the hash lookup.

use ferry_api::types::Role;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::db::Principal;
use crate::error::{Error, ErrorKind, Result};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// Longest token accepted (anything longer is refused before hashing).
pub const MAX_TOKEN_LEN: usize = 128;

/// The prefix of tokens of `role` (`one_time`: a registration token).
fn prefix(role: Role, one_time: bool) -> &'static str {
    match (role, one_time) {
        (_, true) => "fyr_",
        (Role::Admin, false) => "fya_",
        (Role::Host, false) => "fyh_",
        (Role::Target, false) => "fyt_",
    }
}

/// A new random token for `role`.
pub fn new_token(role: Role, one_time: bool) -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new().fill(&mut bytes).map_err(|_| {
        Error::new(
            ErrorKind::Credentials,
            "new token",
            "system random generator failed",
        )
    })?;
    Ok(format!("{}{}", prefix(role, one_time), hex(&bytes)))
}

/// SHA-256 of a token: what the database keys on.
pub fn token_hash(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// What a request wants to touch, for [`allowed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Server-wide things: lists, policies, tokens, jobs of others.
    Admin,
    /// Host NAME's own records.
    Host(&'a str),
    /// Target NAME's own records.
    Target(&'a str),
}

/// Whether `who` may act on `scope`: the admin on everything, a host or a
/// target on its own records only.
pub fn allowed(who: &Principal, scope: Scope<'_>) -> bool {
    match (who, scope) {
        (Principal::Admin, _) => true,
        (Principal::Host(me), Scope::Host(it)) => me == it,
        (Principal::Target(me), Scope::Target(it)) => me == it,
        _ => false,
    }
}

/// The forbidden error for `who` on `scope`.
pub fn forbidden(who: &Principal, scope: Scope<'_>) -> Error {
    let who = match who {
        Principal::Admin => "admin".to_owned(),
        Principal::Host(h) => format!("host {h}"),
        Principal::Target(t) => format!("target {t}"),
    };
    let what = match scope {
        Scope::Admin => "this (admin only)".to_owned(),
        Scope::Host(h) => format!("host {h}"),
        Scope::Target(t) => format!("target {t}"),
    };
    Error::new(
        ErrorKind::Forbidden,
        "authorize",
        format!("{who} may not touch {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hashed() {
        let a = new_token(Role::Host, false).unwrap();
        let b = new_token(Role::Host, false).unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("fyh_") && a.len() == 4 + 2 * TOKEN_BYTES);
        assert!(new_token(Role::Admin, true).unwrap().starts_with("fyr_"));
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
        assert_eq!(token_hash(&a).len(), 32);
    }

    #[test]
    fn only_the_owner_or_the_admin() {
        let web01 = Principal::Host("web01".into());
        let t = Principal::Target("site-b".into());
        assert!(allowed(&Principal::Admin, Scope::Host("web01")));
        assert!(allowed(&web01, Scope::Host("web01")));
        assert!(!allowed(&web01, Scope::Host("web02")));
        assert!(!allowed(&web01, Scope::Admin));
        assert!(!allowed(&web01, Scope::Target("web01")));
        assert!(allowed(&t, Scope::Target("site-b")));
        assert!(!allowed(&t, Scope::Host("site-b")));
    }
}
