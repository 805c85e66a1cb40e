//! Any bytes on the wire: the frame decoder, every message decoder (kinds
//! 0..=10, so one unknown kind on each side of the known ones) and the
//! change-set header decoder must refuse or decode, never panic; whatever
//! decodes must encode back to the same message.
#![no_main]

use ferry_protocol::frame::{decode_frame, encode_frame, MAX_FRAME};
use ferry_protocol::message::{encode_header_aad, ChangeSetHeader, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A whole frame, with a small and the default limit.
    for max in [64, MAX_FRAME] {
        if let Ok((frame, used)) = decode_frame(data, max) {
            assert!(used <= data.len());
            assert_eq!(used, 16 + frame.payload.len());
            let again = encode_frame(frame.kind, &frame.payload, max).expect("re-encode frame");
            assert_eq!(&again[..], &data[..used]);
            let _ = Message::from_frame(&frame);
        }
    }
    // The bytes as the body of every kind.
    for kind in 0..=10u16 {
        if let Ok(m) = Message::decode(kind, data) {
            assert_eq!(m.kind(), kind);
            let body = m.encode().expect("re-encode message");
            assert_eq!(body, data, "encoding is canonical");
        }
    }
    // The bytes as a change-set header (the AEAD associated data).
    if let Ok(h) = ChangeSetHeader::decode(data) {
        let aad = encode_header_aad(&h).expect("re-encode header");
        assert_eq!(aad, data);
    }
});
