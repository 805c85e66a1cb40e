//! Frames: the unit on the wire between sidecar and target.
//!
//! Every message travels in one frame: a fixed 16-byte header followed by
//! `payload_len` bytes of payload. All integers are little-endian.
//!
//! ```text
//!  offset  size  field
//!  ------  ----  -------------------------------------------------------
//!       0     4  magic        b"FRY1"                  (MAGIC_OFFSET)
//!       4     2  version      u16, currently 1         (VERSION_OFFSET)
//!       6     2  kind         u16 message type         (KIND_OFFSET)
//!       8     4  payload_len  u32 bytes after header   (LEN_OFFSET)
//!      12     4  header_crc   crc32c of bytes 0..12    (CRC_OFFSET)
//!      16     …  payload      payload_len bytes
//!
//!   0      4      6      8             12            16
//!   +------+------+------+-------------+-------------+---------...
//!   | FRY1 | ver  | kind | payload_len | crc32c 0..12| payload
//!   +------+------+------+-------------+-------------+---------...
//! ```
//!
//! The header checksum guards the length before anything is allocated by it;
//! the payload itself is protected by TLS on the link and, for change sets,
//! by AES-256-GCM end to end. Decoders check, in this order: magic, version,
//! checksum, and `payload_len <= max` (the caller's limit, by default
//! [`MAX_FRAME`]); only then do they read the payload, and they never
//! allocate more than the bytes actually received.

use std::io::{Read, Write};

use crate::error::{Error, ErrorKind, Result};

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FRY1";
/// The frame format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Offset of the 4-byte magic.
pub const MAGIC_OFFSET: usize = 0;
/// Offset of the u16 version.
pub const VERSION_OFFSET: usize = 4;
/// Offset of the u16 message kind.
pub const KIND_OFFSET: usize = 6;
/// Offset of the u32 payload length.
pub const LEN_OFFSET: usize = 8;
/// Offset of the u32 crc32c over bytes `0..CRC_OFFSET`.
pub const CRC_OFFSET: usize = 12;
/// Default maximum payload size: 64 MiB. Both sides enforce a maximum.
pub const MAX_FRAME: usize = 64 << 20;

/// Initial buffer reservation when reading a payload from a stream (the
/// sidecar's default change-set size, so a set is read without regrowing;
/// a lying length costs at most this much up front); beyond it the buffer
/// grows only as bytes actually arrive.
const READ_RESERVE: usize = 16 << 20;

/// One decoded frame: the message kind and its payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type (see `message::kind`).
    pub kind: u16,
    /// The payload, exactly `payload_len` bytes.
    pub payload: Vec<u8>,
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub kind: u16,
    /// Number of payload bytes following the header.
    pub payload_len: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Encode a header for `kind` and `payload_len`.
pub fn encode_header(kind: u16, payload_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(&MAGIC);
    h[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&VERSION.to_le_bytes());
    h[KIND_OFFSET..KIND_OFFSET + 2].copy_from_slice(&kind.to_le_bytes());
    h[LEN_OFFSET..LEN_OFFSET + 4].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c(&h[..CRC_OFFSET]);
    h[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check a complete 16-byte header against `max` payload bytes.
pub fn decode_header(h: &[u8; HEADER_LEN], max: usize) -> Result<FrameHeader> {
    if h[MAGIC_OFFSET..MAGIC_OFFSET + 4] != MAGIC {
        return Err(Error::new(
            ErrorKind::BadMagic,
            format!("frame magic {:02x?}", &h[..4]),
        ));
    }
    let version = le_u16(h, VERSION_OFFSET);
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!("frame version {version}, this build speaks {VERSION}"),
        ));
    }
    let want = le_u32(h, CRC_OFFSET);
    let got = crc32c::crc32c(&h[..CRC_OFFSET]);
    if want != got {
        return Err(Error::malformed(format!(
            "frame header crc32c {want:#010x}, computed {got:#010x}"
        )));
    }
    let payload_len = le_u32(h, LEN_OFFSET);
    let len = usize::try_from(payload_len).unwrap_or(usize::MAX);
    if len > max {
        return Err(Error::too_large(format!(
            "frame payload {len} bytes, limit {max}"
        )));
    }
    Ok(FrameHeader {
        kind: le_u16(h, KIND_OFFSET),
        payload_len,
    })
}

fn checked_len(len: usize, max: usize) -> Result<u32> {
    if len > max {
        return Err(Error::too_large(format!(
            "frame payload {len} bytes, limit {max}"
        )));
    }
    u32::try_from(len)
        .map_err(|_| Error::too_large(format!("frame payload {len} bytes exceeds u32")))
}

/// Encode a whole frame (header and payload) into a new buffer, refusing
/// payloads larger than `max`.
pub fn encode_frame(kind: u16, payload: &[u8], max: usize) -> Result<Vec<u8>> {
    let len = checked_len(payload.len(), max)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(kind, len));
    out.extend_from_slice(payload);
    Ok(out)
}

/// Write one frame, refusing payloads larger than [`MAX_FRAME`].
pub fn write_frame(w: &mut impl Write, kind: u16, payload: &[u8]) -> Result<()> {
    write_frame_max(w, kind, payload, MAX_FRAME)
}

/// Write one frame, refusing payloads larger than `max`.
pub fn write_frame_max(w: &mut impl Write, kind: u16, payload: &[u8], max: usize) -> Result<()> {
    let len = checked_len(payload.len(), max)?;
    w.write_all(&encode_header(kind, len))?;
    w.write_all(payload)?;
    Ok(())
}

/// Read one frame whose payload is at most `max` bytes.
///
/// The header is fully validated before the payload is read; the payload
/// buffer grows only with bytes actually received, so a lying length costs
/// nothing. A stream ending inside a frame gives [`ErrorKind::Truncated`];
/// one ending before its first byte gives [`ErrorKind::Closed`].
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Frame> {
    let mut h = [0u8; HEADER_LEN];
    // The first byte apart: an end of stream before it is a close between
    // frames ([`ErrorKind::Closed`]), not a truncated frame.
    loop {
        match r.read(&mut h[..1]) {
            Ok(0) => return Err(Error::new(ErrorKind::Closed, "peer closed the connection")),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!("peer closed the connection: {e}"),
                ))
            }
            Err(e) => return Err(Error::from(e).within("frame header")),
        }
    }
    r.read_exact(&mut h[1..])
        .map_err(|e| Error::from(e).within("frame header"))?;
    let hdr = decode_header(&h, max)?;
    let len = usize::try_from(hdr.payload_len).unwrap_or(usize::MAX);
    let mut payload = Vec::with_capacity(len.min(READ_RESERVE));
    r.take(u64::from(hdr.payload_len))
        .read_to_end(&mut payload)
        .map_err(|e| Error::from(e).within("frame payload"))?;
    if payload.len() != len {
        return Err(Error::truncated(format!(
            "frame payload: got {} of {len} bytes",
            payload.len()
        )));
    }
    Ok(Frame {
        kind: hdr.kind,
        payload,
    })
}

/// Decode one frame from the start of `buf`; returns the frame and the
/// number of bytes it occupied.
///
/// A buffer that is a proper prefix of a valid frame gives
/// [`ErrorKind::Truncated`] (read more and retry); a prefix that cannot start
/// a frame gives [`ErrorKind::BadMagic`] as soon as that is visible.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<(Frame, usize)> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Err(Error::new(
            ErrorKind::BadMagic,
            format!("frame magic {:02x?}", &buf[..seen]),
        ));
    }
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(Error::truncated(format!(
            "frame header: {} of {HEADER_LEN} bytes",
            buf.len()
        )));
    };
    let hdr = decode_header(h, max)?;
    let len = usize::try_from(hdr.payload_len).unwrap_or(usize::MAX);
    let rest = &buf[HEADER_LEN..];
    if rest.len() < len {
        return Err(Error::truncated(format!(
            "frame payload: {} of {len} bytes",
            rest.len()
        )));
    }
    Ok((
        Frame {
            kind: hdr.kind,
            payload: rest[..len].to_vec(),
        },
        HEADER_LEN + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A Heartbeat frame (kind 6) carrying 8 payload bytes 01..08.
    const GOLDEN: [u8; 24] = [
        0x46, 0x52, 0x59, 0x31, // magic "FRY1"
        0x01, 0x00, // version 1 (LE u16)
        0x06, 0x00, // kind 6 = Heartbeat (LE u16)
        0x08, 0x00, 0x00, 0x00, // payload_len 8 (LE u32)
        // crc32c (Castagnoli, reflected, init/xorout 0xffffffff) over the 12
        // bytes above = 0x6dc79287, stored LE:
        0x87, 0x92, 0xc7, 0x6d, //
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // payload
    ];

    #[test]
    fn crc32c_check_value() {
        // The standard CRC-32C check value, to pin the algorithm variant.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn golden_bytes() {
        let payload = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut out = Vec::new();
        write_frame(&mut out, 6, &payload).unwrap();
        assert_eq!(out, GOLDEN);
        assert_eq!(encode_frame(6, &payload, MAX_FRAME).unwrap(), GOLDEN);
        let (f, used) = decode_frame(&GOLDEN, MAX_FRAME).unwrap();
        assert_eq!(used, 24);
        assert_eq!(f.kind, 6);
        assert_eq!(f.payload, payload);
    }

    #[test]
    fn round_trip_stream() {
        let mut out = Vec::new();
        write_frame(&mut out, 3, b"hello").unwrap();
        write_frame(&mut out, 4, b"").unwrap();
        let mut r = Cursor::new(&out);
        let a = read_frame(&mut r, MAX_FRAME).unwrap();
        let b = read_frame(&mut r, MAX_FRAME).unwrap();
        assert_eq!((a.kind, a.payload.as_slice()), (3, &b"hello"[..]));
        assert_eq!((b.kind, b.payload.len()), (4, 0));
        // The end of the stream between frames is a close.
        assert_eq!(
            read_frame(&mut r, MAX_FRAME).unwrap_err().kind(),
            ErrorKind::Closed
        );
        let (a2, n) = decode_frame(&out, MAX_FRAME).unwrap();
        assert_eq!(a2, a);
        let (b2, m) = decode_frame(&out[n..], MAX_FRAME).unwrap();
        assert_eq!(b2, b);
        assert_eq!(n + m, out.len());
    }

    #[test]
    fn every_truncation_is_truncated() {
        for cut in 0..GOLDEN.len() {
            let e = decode_frame(&GOLDEN[..cut], MAX_FRAME).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Truncated, "cut {cut}: {e}");
            let e = read_frame(&mut Cursor::new(&GOLDEN[..cut]), MAX_FRAME).unwrap_err();
            let want = if cut == 0 {
                ErrorKind::Closed
            } else {
                ErrorKind::Truncated
            };
            assert_eq!(e.kind(), want, "cut {cut}: {e}");
        }
    }

    /// A reader that yields a header and then panics if asked for more:
    /// proves the oversize check happens before any payload read.
    struct HeaderOnly(Cursor<Vec<u8>>);
    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            assert!(n > 0 || buf.is_empty(), "payload read attempted");
            Ok(n)
        }
    }

    #[test]
    fn oversize_refused_before_reading() {
        // Claims 4 GiB - 1; a decoder allocating by it would abort the test.
        let h = encode_header(3, u32::MAX);
        let e = read_frame(&mut HeaderOnly(Cursor::new(h.to_vec())), MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        let e = decode_frame(&h, MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        // Caller-given limit.
        let f = encode_frame(1, &[0u8; 100], MAX_FRAME).unwrap();
        assert_eq!(
            decode_frame(&f, 99).unwrap_err().kind(),
            ErrorKind::TooLarge
        );
        assert!(decode_frame(&f, 100).is_ok());
        // Writers refuse too.
        assert_eq!(
            encode_frame(1, &[0u8; 100], 99).unwrap_err().kind(),
            ErrorKind::TooLarge
        );
        let mut sink = Vec::new();
        assert_eq!(
            write_frame_max(&mut sink, 1, &[0u8; 100], 99)
                .unwrap_err()
                .kind(),
            ErrorKind::TooLarge
        );
        assert!(sink.is_empty());
    }

    #[test]
    fn lying_length_allocates_only_what_arrives() {
        // Length 60 MiB (within the limit) but only 10 bytes follow.
        let mut f = encode_header(3, 60 << 20).to_vec();
        f.extend_from_slice(&[0u8; 10]);
        let e = read_frame(&mut Cursor::new(f), MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated);
    }

    #[test]
    fn bad_crc_magic_version() {
        // Flip each header byte in turn: each must be rejected.
        for i in 0..HEADER_LEN {
            let mut f = GOLDEN;
            f[i] ^= 0x01;
            let e = decode_frame(&f, MAX_FRAME).unwrap_err();
            let want = match i {
                0..=3 => ErrorKind::BadMagic,
                4..=5 => ErrorKind::UnsupportedVersion,
                _ => ErrorKind::Malformed,
            };
            assert_eq!(e.kind(), want, "byte {i}: {e}");
            let e = read_frame(&mut Cursor::new(f), MAX_FRAME).unwrap_err();
            assert_eq!(e.kind(), want, "byte {i}: {e}");
        }
        // Version 2 with a valid crc is still unsupported.
        let mut f = GOLDEN;
        f[4] = 2;
        let crc = crc32c::crc32c(&f[..12]);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_frame(&f, MAX_FRAME).unwrap_err().kind(),
            ErrorKind::UnsupportedVersion
        );
        // Garbage start is visible as bad magic even before 16 bytes.
        assert_eq!(
            decode_frame(b"GET /", MAX_FRAME).unwrap_err().kind(),
            ErrorKind::BadMagic
        );
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_frame(&bytes, 1024);
            let _ = read_frame(&mut Cursor::new(&bytes), 1024);
        }

        #[test]
        fn round_trip_any(kind in proptest::num::u16::ANY, payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let f = encode_frame(kind, &payload, MAX_FRAME).unwrap();
            let (d, n) = decode_frame(&f, MAX_FRAME).unwrap();
            proptest::prop_assert_eq!(n, f.len());
            proptest::prop_assert_eq!(d.kind, kind);
            proptest::prop_assert_eq!(d.payload, payload);
        }
    }
}
