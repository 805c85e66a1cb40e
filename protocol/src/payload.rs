//! Change-set payloads: chunking, zstd compression, AES-256-GCM sealing.
//!
//! The raw data of a change set (the Write extents' bytes, in extent order)
//! is split into chunks of [`CHUNK_SIZE`] (1 MiB; the last may be shorter).
//! Each chunk is compressed as an independent zstd frame, in parallel; a
//! chunk whose frame is not below 97 % of its raw size is stored raw. The
//! stored chunks are concatenated and the whole concatenation is sealed once
//! with AES-256-GCM under the disk's key:
//!
//! * nonce (12 bytes) = stream id (u32, big-endian) ‖ counter (u64,
//!   big-endian). Nonces come from a counter, never at random; the caller
//!   must never use one (stream, counter) pair twice under one key.
//! * associated data = the change-set header's exact encoding
//!   ([`encode_header_aad`]), which includes the chunk table, so host, disk,
//!   epoch, sequences, extents and chunking are all authenticated.
//! * the 16-byte tag is appended: sealed length = Σ stored_len + 16.
//!
//! Opening verifies the tag before any decompression, and each chunk is
//! decompressed into a buffer of exactly its `raw_len` (≤ 1 MiB): a frame
//! that would produce more, or less, is a [`ErrorKind::Compression`] error.

use std::io::Read;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::error::{Error, ErrorKind, Result};
use crate::message::{
    encode_header_aad, ChangeSet, ChangeSetHeader, ChunkInfo, CHUNK_SIZE, KEY_SALT_LEN, MAX_CHUNKS,
    TAG_LEN,
};

/// Length of an AES-256 key in bytes.
pub const KEY_LEN: usize = 32;

/// A stored chunk is kept compressed only if it is below this share (in
/// percent) of its raw size.
pub const STORE_RAW_PERCENT: usize = 97;

/// Largest raw payload of one change set: [`MAX_CHUNKS`] × [`CHUNK_SIZE`].
pub const MAX_RAW: usize = MAX_CHUNKS * CHUNK_SIZE;

/// HKDF info of [`Key::for_salt`].
pub const SET_KEY_INFO: &[u8] = b"ferry change-set key v1";

/// A per-disk AES-256 key. Not `Clone`/`Copy`; overwritten with zeros when
/// dropped; `Debug` does not show it.
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }

    /// Load a key from a file holding exactly 32 bytes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ctx =
            |e: std::io::Error| Error::from(e).within(&format!("key file {}", path.display()));
        let mut f = std::fs::File::open(path).map_err(ctx)?;
        let len = f.metadata().map_err(ctx)?.len();
        if len != KEY_LEN as u64 {
            return Err(Error::malformed(format!(
                "key file {}: {len} bytes, want {KEY_LEN}",
                path.display()
            )));
        }
        let mut k = Key([0u8; KEY_LEN]);
        f.read_exact(&mut k.0).map_err(ctx)?;
        let mut extra = [0u8; 1];
        if f.read(&mut extra).map_err(ctx)? != 0 {
            return Err(Error::malformed(format!(
                "key file {}: longer than {KEY_LEN} bytes",
                path.display()
            )));
        }
        Ok(k)
    }

    /// The key a change set is sealed under: HKDF-SHA256 of this (the
    /// disk's) key with the set's `key_salt`, a random value each sender
    /// session picks. Nonces are unique within a session; the salt makes
    /// sessions independent, so a sender whose counters were reset (a state
    /// directory restored from a backup) never reuses a (key, nonce) pair.
    pub fn for_salt(&self, salt: &[u8; KEY_SALT_LEN]) -> Key {
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                KEY_LEN
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(&self.0);
        let mut out = [0u8; KEY_LEN];
        let filled = prk
            .expand(&[SET_KEY_INFO], Len)
            .and_then(|okm| okm.fill(&mut out));
        // Cannot fail: the output length is fixed and far below HKDF's limit.
        debug_assert!(filled.is_ok());
        Key(out)
    }

    fn aead(&self) -> Result<LessSafeKey> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| Error::new(ErrorKind::Crypto, "AES-256-GCM key setup"))
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keep the zeroing from being optimised away as a dead store.
        std::hint::black_box(&mut self.0);
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// The two halves of a 96-bit GCM nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceParts {
    /// Stream id (distinguishes senders/streams sharing a key).
    pub stream: u32,
    /// Counter within the stream; never reused.
    pub counter: u64,
}

impl NonceParts {
    /// The nonce a change set's header names (its `nonce_stream` and
    /// `nonce_counter`, authenticated as part of the associated data).
    pub fn of(header: &ChangeSetHeader) -> NonceParts {
        NonceParts {
            stream: header.nonce_stream,
            counter: header.nonce_counter,
        }
    }

    /// The 12 nonce bytes: stream (BE) ‖ counter (BE).
    pub fn to_bytes(self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.stream.to_be_bytes());
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        n
    }
}

fn crypto(what: &str) -> Error {
    Error::new(ErrorKind::Crypto, what)
}

fn compression(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Compression, what)
}

/// Seal `buf` in place (ciphertext with the 16-byte tag appended).
pub fn seal(key: &Key, nonce: NonceParts, aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    key.aead()?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce.to_bytes()),
            Aad::from(aad),
            buf,
        )
        .map_err(|_| crypto("AES-256-GCM seal"))
}

/// Open `buf` (ciphertext ‖ tag) in place; on success `buf` holds the
/// plaintext. Wrong key, nonce or AAD, or any altered byte, is a
/// [`ErrorKind::Crypto`] error.
pub fn open(key: &Key, nonce: NonceParts, aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
    if buf.len() < TAG_LEN {
        return Err(Error::truncated(format!(
            "sealed payload {} bytes, shorter than the tag",
            buf.len()
        )));
    }
    let n = key
        .aead()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce.to_bytes()),
            Aad::from(aad),
            buf,
        )
        .map_err(|_| crypto("AES-256-GCM open: authentication failed"))?
        .len();
    buf.truncate(n);
    Ok(())
}

/// Threads [`pack`] uses: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Compress one group of chunks; `Some(frame)` where compression pays.
fn compress_group(group: &[&[u8]], level: i32) -> Result<Vec<Option<Vec<u8>>>> {
    let mut c = zstd::bulk::Compressor::new(level)
        .map_err(|e| compression(format!("zstd level {level}: {e}")))?;
    let mut buf = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK_SIZE));
    let mut out = Vec::with_capacity(group.len());
    for chunk in group {
        buf.clear();
        c.compress_to_buffer(chunk, &mut buf)
            .map_err(|e| compression(format!("zstd compress: {e}")))?;
        if buf.len() * 100 < chunk.len() * STORE_RAW_PERCENT {
            out.push(Some(buf.clone()));
        } else {
            out.push(None);
        }
    }
    Ok(out)
}

/// Split `data` into chunks, compress them as independent zstd frames on up
/// to `threads` threads, and concatenate. Returns the chunk table and the
/// stored bytes, with [`TAG_LEN`] spare capacity for sealing in place.
pub fn compress_chunks(
    data: &[u8],
    level: i32,
    threads: usize,
) -> Result<(Vec<ChunkInfo>, Vec<u8>)> {
    if data.len() > MAX_RAW {
        return Err(Error::too_large(format!(
            "change set payload {} bytes, max {MAX_RAW}",
            data.len()
        )));
    }
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
    let threads = threads.clamp(1, chunks.len().max(1));
    let frames: Vec<Option<Vec<u8>>> = if threads == 1 {
        compress_group(&chunks, level)?
    } else {
        let per = chunks.len().div_ceil(threads);
        let groups: Vec<Result<Vec<Option<Vec<u8>>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .chunks(per)
                .map(|g| s.spawn(move || compress_group(g, level)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(compression("compression worker panicked")))
                })
                .collect()
        });
        let mut all = Vec::with_capacity(chunks.len());
        for g in groups {
            all.extend(g?);
        }
        all
    };
    let stored: usize = chunks
        .iter()
        .zip(&frames)
        .map(|(c, f)| f.as_ref().map_or(c.len(), Vec::len))
        .sum();
    let mut out = Vec::with_capacity(stored + TAG_LEN);
    let mut infos = Vec::with_capacity(chunks.len());
    for (chunk, frame) in chunks.iter().zip(&frames) {
        let bytes: &[u8] = frame.as_deref().unwrap_or(chunk);
        out.extend_from_slice(bytes);
        infos.push(ChunkInfo {
            raw_len: u32::try_from(chunk.len()).map_err(|_| compression("chunk length"))?,
            stored_len: u32::try_from(bytes.len()).map_err(|_| compression("chunk length"))?,
            compressed: frame.is_some(),
        });
    }
    Ok((infos, out))
}

/// Compress and seal `data` with a caller-given associated data. Prefer
/// [`pack_change_set`], which authenticates the header including the chunk
/// table this function returns.
pub fn pack(
    data: &[u8],
    level: i32,
    key: &Key,
    nonce: NonceParts,
    aad: &[u8],
) -> Result<(Vec<ChunkInfo>, Vec<u8>)> {
    let (chunks, mut buf) = compress_chunks(data, level, default_threads())?;
    seal(key, nonce, aad, &mut buf)?;
    Ok((chunks, buf))
}

/// Build a sealed change set: compress `data` (the Write extents' bytes),
/// fill `header.chunks`, and seal with the header's encoding as AAD under
/// the nonce the header names ([`NonceParts::of`]) and the key
/// [`Key::for_salt`] derives with the header's salt. The caller guarantees
/// that nonce was never used under that salt for other data.
pub fn pack_change_set(
    data: &[u8],
    level: i32,
    key: &Key,
    mut header: ChangeSetHeader,
) -> Result<ChangeSet> {
    let (chunks, mut buf) = compress_chunks(data, level, default_threads())?;
    header.chunks = chunks;
    let aad = encode_header_aad(&header)?;
    seal(
        &key.for_salt(&header.key_salt),
        NonceParts::of(&header),
        &aad,
        &mut buf,
    )?;
    Ok(ChangeSet {
        header,
        payload: buf,
    })
}

fn check_chunks(chunks: &[ChunkInfo], sealed_len: usize) -> Result<()> {
    if chunks.len() > MAX_CHUNKS {
        return Err(Error::too_large(format!(
            "{} chunks, max {MAX_CHUNKS}",
            chunks.len()
        )));
    }
    let mut stored = 0usize;
    for (i, c) in chunks.iter().enumerate() {
        let raw = usize::try_from(c.raw_len).unwrap_or(usize::MAX);
        let st = usize::try_from(c.stored_len).unwrap_or(usize::MAX);
        if raw == 0 || raw > CHUNK_SIZE {
            return Err(Error::too_large(format!(
                "chunk {i} raw_len {raw}, must be 1..={CHUNK_SIZE}"
            )));
        }
        if (c.compressed && st > raw) || (!c.compressed && st != raw) {
            return Err(Error::malformed(format!(
                "chunk {i}: stored {st} of raw {raw}"
            )));
        }
        stored += st; // ≤ MAX_CHUNKS × CHUNK_SIZE, cannot overflow
    }
    if sealed_len != stored + TAG_LEN {
        return Err(Error::malformed(format!(
            "sealed payload {sealed_len} bytes, chunks say {} + {TAG_LEN}",
            stored
        )));
    }
    Ok(())
}

/// Verify and open `sealed`, then decompress its chunks. The chunk table is
/// checked against the sealed length before anything is allocated; each
/// chunk decompresses into exactly `raw_len` bytes or the call fails.
pub fn unpack(
    sealed: &[u8],
    chunks: &[ChunkInfo],
    key: &Key,
    nonce: NonceParts,
    aad: &[u8],
) -> Result<Vec<u8>> {
    check_chunks(chunks, sealed.len())?;
    let mut plain = sealed.to_vec();
    open(key, nonce, aad, &mut plain)?;
    let mut d = zstd::bulk::Decompressor::new()
        .map_err(|e| compression(format!("zstd decompressor: {e}")))?;
    let mut out: Vec<u8> = Vec::new();
    let mut at = 0usize;
    for (i, c) in chunks.iter().enumerate() {
        let raw = usize::try_from(c.raw_len).unwrap_or(usize::MAX);
        let st = usize::try_from(c.stored_len).unwrap_or(usize::MAX);
        let src = &plain[at..at + st];
        at += st;
        if !c.compressed {
            out.extend_from_slice(src);
            continue;
        }
        let start = out.len();
        out.resize(start + raw, 0);
        let n = d
            .decompress_to_buffer(src, &mut out[start..])
            .map_err(|e| compression(format!("chunk {i}: zstd: {e}")))?;
        if n != raw {
            return Err(compression(format!(
                "chunk {i}: decompressed to {n} bytes, header says {raw}"
            )));
        }
    }
    Ok(out)
}

/// Open and decompress a change set's payload, authenticating its header
/// (the nonce is the one the header names).
pub fn unpack_change_set(cs: &ChangeSet, key: &Key) -> Result<Vec<u8>> {
    let aad = encode_header_aad(&cs.header)?;
    unpack(
        &cs.payload,
        &cs.header.chunks,
        &key.for_salt(&cs.header.key_salt),
        NonceParts::of(&cs.header),
        &aad,
    )
}

/// The hash the checksum exchange compares blocks by: SHA-256 (`ring`,
/// hardware accelerated where the CPU has SHA extensions) cut to
/// [`HASH_LEN`](crate::message::HASH_LEN) bytes, 128 bits, so that two
/// different blocks agreeing by chance is not a practical concern.
pub fn block_hash(data: &[u8]) -> [u8; crate::message::HASH_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; crate::message::HASH_LEN];
    out.copy_from_slice(&d.as_ref()[..crate::message::HASH_LEN]);
    out
}

/// Authenticate a change set's payload (chunk table, AAD, tag) under `key`
/// without decompressing it: the target checks every set this way before
/// it journals it, so a wrong key or a forged set is refused at the door.
pub fn verify_change_set(cs: &ChangeSet, key: &Key) -> Result<()> {
    check_chunks(&cs.header.chunks, cs.payload.len())?;
    let aad = encode_header_aad(&cs.header)?;
    let mut buf = cs.payload.clone();
    open(
        &key.for_salt(&cs.header.key_salt),
        NonceParts::of(&cs.header),
        &aad,
        &mut buf,
    )
}

#[cfg(test)]
mod tests;
