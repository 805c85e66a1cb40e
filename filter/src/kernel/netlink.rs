//! A minimal generic-netlink client: just enough to resolve a family by name
//! and send it one command, waiting for its reply and its acknowledgement.
//!
//! Layouts (all host byte order, every item padded to 4 bytes):
//! - `struct nlmsghdr` (include/uapi/linux/netlink.h): length u32, type u16,
//!   flags u16, sequence u32, port id u32: [`NLMSG_HDRLEN`] bytes;
//! - `struct genlmsghdr` (include/uapi/linux/genetlink.h): command u8,
//!   version u8, reserved u16: [`GENL_HDRLEN`] bytes;
//! - `struct nlattr`: length u16 (header included, padding excluded), type
//!   u16 (bit 15 marks a nested attribute), then the payload.
//!
//! An error or acknowledgement is an `NLMSG_ERROR` message whose payload
//! starts with a negative errno (0 for an acknowledgement).
//!
//! Building and parsing are pure functions over byte slices, tested without
//! a kernel; [`Socket`] is the one place that makes system calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `sizeof(struct nlmsghdr)`.
pub const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct genlmsghdr)`.
pub const GENL_HDRLEN: usize = 4;
/// `sizeof(struct nlattr)`.
pub const NLA_HDRLEN: usize = 4;
/// Netlink items are padded to this many bytes (`NLMSG_ALIGNTO`, `NLA_ALIGNTO`).
pub const ALIGN: usize = 4;

/// `NLMSG_ERROR`: an error, or with errno 0 an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multipart dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`: ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLA_F_NESTED`: the attribute holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// Attribute type bits (`NLA_TYPE_MASK`: without the nested and byte-order flags).
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// `GENL_ID_CTRL`: the generic netlink controller, which resolves families.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// Controller protocol version we speak.
pub const CTRL_VERSION: u8 = 2;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (NUL-terminated string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Largest answer we read in one `recv` (the kernel's replies here are tiny).
const RECV_BUFFER: usize = 32 << 10;
/// How long to wait for the kernel's answer before giving up.
const RECV_TIMEOUT_SECS: libc::time_t = 10;

fn align(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// Attributes of a request, appended in order.
#[derive(Debug, Default, Clone)]
pub struct Attrs {
    bytes: Vec<u8>,
}

impl Attrs {
    /// No attributes yet.
    pub fn new() -> Self {
        Attrs::default()
    }

    fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        // Payloads here are a few bytes or a nested list of a few items: far
        // below u16::MAX, which `nested` and `string` enforce at the source.
        let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.bytes.resize(align(self.bytes.len()), 0);
        self
    }

    /// A u32 attribute.
    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A u64 attribute.
    pub fn u64(&mut self, kind: u16, value: u64) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute. Refuses strings holding NUL or
    /// longer than 1 KiB.
    pub fn string(&mut self, kind: u16, value: &str) -> io::Result<&mut Self> {
        if value.contains('\0') || value.len() > 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "netlink string attribute holds NUL or is too long",
            ));
        }
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        Ok(self.put(kind, &payload))
    }

    /// A nested attribute holding `inner`.
    pub fn nested(&mut self, kind: u16, inner: &Attrs) -> io::Result<&mut Self> {
        if inner.bytes.len() + NLA_HDRLEN > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nested netlink attribute too long",
            ));
        }
        Ok(self.put(kind | NLA_F_NESTED, &inner.bytes))
    }

    /// The encoded attributes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Encodes one generic netlink request: headers, then `attrs`.
pub fn encode_request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &Attrs) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.bytes.len();
    let mut out = Vec::with_capacity(len);
    // Requests are a few hundred bytes at most (see `Attrs`).
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len32.to_ne_bytes());
    out.extend_from_slice(&family.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0, the kernel fills it in
    out.extend_from_slice(&[cmd, version, 0, 0]);
    out.extend_from_slice(&attrs.bytes);
    out
}

/// One message of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A generic netlink message: its command and its attributes' bytes.
    Reply {
        /// Sequence number it answers.
        seq: u32,
        /// Generic netlink command.
        cmd: u8,
        /// The attributes (parse with [`parse_attrs`]).
        attrs: Vec<u8>,
    },
    /// An acknowledgement (errno 0) or an error (a positive errno).
    Ack {
        /// Sequence number it answers.
        seq: u32,
        /// 0 for success, else the errno.
        errno: i32,
    },
    /// End of a dump.
    Done {
        /// Sequence number it answers.
        seq: u32,
    },
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink answer: {what}"),
    )
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram from the kernel into its messages.
pub fn parse_messages(mut bytes: &[u8]) -> io::Result<Vec<Message>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = read_u32(bytes, 0).ok_or_else(|| malformed("short header"))?;
        let len = usize::try_from(len).map_err(|_| malformed("length"))?;
        if len < NLMSG_HDRLEN || len > bytes.len() {
            return Err(malformed("message length out of bounds"));
        }
        let kind = read_u16(bytes, 4).ok_or_else(|| malformed("type"))?;
        let seq = read_u32(bytes, 8).ok_or_else(|| malformed("sequence"))?;
        let body = &bytes[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                let raw = read_u32(body, 0).ok_or_else(|| malformed("short error"))?;
                // The kernel sends -errno; an acknowledgement is 0.
                let errno = i32::from_ne_bytes(raw.to_ne_bytes());
                Message::Ack {
                    seq,
                    errno: errno.checked_neg().ok_or_else(|| malformed("errno"))?,
                }
            }
            NLMSG_DONE => Message::Done { seq },
            _ => {
                let cmd = *body.first().ok_or_else(|| malformed("short genl header"))?;
                let attrs = body
                    .get(GENL_HDRLEN..)
                    .ok_or_else(|| malformed("short genl header"))?;
                Message::Reply {
                    seq,
                    cmd,
                    attrs: attrs.to_vec(),
                }
            }
        });
        bytes = bytes.get(align(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Splits attributes into `(type without flags, payload)`. Refuses lengths
/// that run past the buffer.
pub fn parse_attrs(mut bytes: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while bytes.len() >= NLA_HDRLEN {
        let len = usize::from(read_u16(bytes, 0).ok_or_else(|| malformed("attr"))?);
        let kind = read_u16(bytes, 2).ok_or_else(|| malformed("attr"))? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > bytes.len() {
            return Err(malformed("attribute length out of bounds"));
        }
        out.push((kind, &bytes[NLA_HDRLEN..len]));
        bytes = bytes.get(align(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// A u32 attribute's value.
pub fn attr_u32(payload: &[u8]) -> io::Result<u32> {
    read_u32(payload, 0).ok_or_else(|| malformed("u32 attribute"))
}

/// A u16 attribute's value.
pub fn attr_u16(payload: &[u8]) -> io::Result<u16> {
    read_u16(payload, 0).ok_or_else(|| malformed("u16 attribute"))
}

/// A generic netlink socket bound to the kernel.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a `NETLINK_GENERIC` socket with a receive timeout.
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval for the length given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                size_of_u32::<libc::timeval>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = sa_family(libc::AF_NETLINK);
        // SAFETY: `addr` is a valid sockaddr_nl for the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                size_of_u32::<libc::sockaddr_nl>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 1 })
    }

    /// Resolves a generic netlink family's id by name.
    pub fn family(&mut self, name: &str) -> io::Result<u16> {
        let mut attrs = Attrs::new();
        attrs.string(CTRL_ATTR_FAMILY_NAME, name)?;
        let replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, &attrs)?;
        for (_, reply) in replies {
            for (kind, payload) in parse_attrs(&reply)? {
                if kind == CTRL_ATTR_FAMILY_ID {
                    return attr_u16(payload);
                }
            }
        }
        Err(malformed("no family id in the controller's answer"))
    }

    /// Sends one command and returns the attributes of every reply message,
    /// once the kernel has acknowledged it. A refusal is the kernel's errno.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> io::Result<Vec<(u8, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = encode_request(family, cmd, version, seq, attrs);
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = sa_family(libc::AF_NETLINK);
        // SAFETY: `message` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                std::ptr::addr_of!(kernel).cast(),
                size_of_u32::<libc::sockaddr_nl>(),
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buffer = vec![0u8; RECV_BUFFER];
        loop {
            // SAFETY: `buffer` is valid for writes of its length.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
            for message in parse_messages(&buffer[..got])? {
                match message {
                    Message::Reply { seq: s, cmd, attrs } if s == seq => replies.push((cmd, attrs)),
                    Message::Ack { seq: s, errno } if s == seq => {
                        return if errno == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        };
                    }
                    Message::Done { seq: s } if s == seq => return Ok(replies),
                    // Answers to an earlier request that timed out.
                    _ => {}
                }
            }
        }
    }
}

fn size_of_u32<T>() -> libc::socklen_t {
    // The structures passed are a few dozen bytes.
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn sa_family(family: libc::c_int) -> libc::sa_family_t {
    // AF_NETLINK is 16.
    libc::sa_family_t::try_from(family).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_is_the_kernels() {
        let mut attrs = Attrs::new();
        attrs.u32(1, 7).u64(2, 0x0102_0304_0506_0708);
        let bytes = encode_request(0x1234, 5, 1, 9, &attrs);
        // nlmsghdr: length, type (family), flags, seq, port id.
        assert_eq!(bytes.len(), 16 + 4 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 0x1234);
        assert_eq!(u16::from_ne_bytes(bytes[6..8].try_into().unwrap()), 0x5);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 9);
        assert_eq!(&bytes[12..16], &[0, 0, 0, 0]);
        // genlmsghdr: cmd, version, reserved.
        assert_eq!(&bytes[16..20], &[5, 1, 0, 0]);
        // nlattr u32: length 8, type 1, value.
        assert_eq!(u16::from_ne_bytes(bytes[20..22].try_into().unwrap()), 8);
        assert_eq!(u16::from_ne_bytes(bytes[22..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 7);
        // nlattr u64: length 12, type 2.
        assert_eq!(u16::from_ne_bytes(bytes[28..30].try_into().unwrap()), 12);
        assert_eq!(
            u64::from_ne_bytes(bytes[32..40].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let mut attrs = Attrs::new();
        attrs.string(2, "nbd").unwrap();
        // length 4 + 4 ("nbd\0"), no padding needed.
        assert_eq!(attrs.as_bytes(), &[8, 0, 2, 0, b'n', b'b', b'd', 0]);
        let mut attrs = Attrs::new();
        attrs.string(2, "nbd0").unwrap();
        // length 9 (header + "nbd0\0"), padded to 12.
        assert_eq!(attrs.as_bytes().len(), 12);
        assert_eq!(attrs.as_bytes()[0], 9);
        assert!(Attrs::new().string(2, "a\0b").is_err());
    }

    #[test]
    fn nested_attributes_carry_the_flag_and_parse_back() {
        let mut item = Attrs::new();
        item.u32(1, 42);
        let mut list = Attrs::new();
        list.nested(1, &item).unwrap();
        let mut top = Attrs::new();
        top.nested(7, &list).unwrap();
        let bytes = top.as_bytes();
        assert_eq!(
            u16::from_ne_bytes(bytes[2..4].try_into().unwrap()),
            7 | NLA_F_NESTED
        );
        let outer = parse_attrs(bytes).unwrap();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, 7);
        let middle = parse_attrs(outer[0].1).unwrap();
        let inner = parse_attrs(middle[0].1).unwrap();
        assert_eq!(inner, vec![(1, &42u32.to_ne_bytes()[..])]);
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = u32::try_from(16 + body.len()).unwrap();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(body);
        out.resize(align(out.len()), 0);
        out
    }

    #[test]
    fn answers_parse_into_replies_and_acks() {
        let mut reply_body = vec![1, 1, 0, 0];
        let mut attrs = Attrs::new();
        attrs.u32(1, 3);
        reply_body.extend_from_slice(attrs.as_bytes());
        let mut datagram = message(0x20, 5, &reply_body);
        let mut err = (-16i32).to_ne_bytes().to_vec(); // -EBUSY
        err.extend_from_slice(&[0; 16]); // the request's header echoed back
        datagram.extend(message(NLMSG_ERROR, 5, &err));
        datagram.extend(message(NLMSG_ERROR, 6, &0i32.to_ne_bytes()));
        let messages = parse_messages(&datagram).unwrap();
        assert_eq!(
            messages,
            vec![
                Message::Reply {
                    seq: 5,
                    cmd: 1,
                    attrs: attrs.as_bytes().to_vec()
                },
                Message::Ack { seq: 5, errno: 16 },
                Message::Ack { seq: 6, errno: 0 },
            ]
        );
    }

    #[test]
    fn truncated_or_lying_answers_are_errors_not_panics() {
        let good = message(NLMSG_ERROR, 1, &0i32.to_ne_bytes());
        for cut in 1..good.len() {
            assert!(parse_messages(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = good.clone();
        lying[0] = 200; // length past the end
        assert!(parse_messages(&lying).is_err());
        let mut short = good;
        short[0] = 4; // shorter than a header
        assert!(parse_messages(&short).is_err());
        assert!(parse_attrs(&[200, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert!(attr_u32(&[1, 2]).is_err());
        // A reply without its generic netlink header.
        assert!(parse_messages(&message(0x20, 1, &[])).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_messages(&bytes);
            let _ = parse_attrs(&bytes);
        }
    }
}
