//! Any bytes on a control-plane connection: reading requests one after the
//! other (keep-alive, pipelining) and reading a response must refuse or
//! decode, never panic, never loop; whatever decodes must write back into
//! bytes that read to the same request.
#![no_main]

use std::io::{BufReader, Cursor};

use ferry_api::http::{read_request, read_response, write_request, Request};
use libfuzzer_sys::fuzz_target;

/// A tiny buffer so heads and bodies straddle `fill_buf` chunks at every
/// offset, exercising the "never consume past the message" logic.
const CAPACITY: usize = 7;

fuzz_target!(|data: &[u8]| {
    let mut r = BufReader::with_capacity(CAPACITY, Cursor::new(data));
    // Each request read consumes at least one byte, so this ends.
    while let Ok(Some(req)) = read_request(&mut r) {
        check_rewrite(&req);
    }
    let mut r = BufReader::with_capacity(CAPACITY, Cursor::new(data));
    let _ = read_response(&mut r);
});

/// A decoded request, written back and read again, is unchanged apart from
/// the framing headers the writer owns.
fn check_rewrite(req: &Request) {
    let mut wire = Vec::new();
    if write_request(&mut wire, req, "fuzz.example").is_err() {
        // Refusals are allowed (for example a `host` header value the reader
        // accepted but the writer sends itself); crashes are not.
        return;
    }
    let again = read_request(&mut Cursor::new(&wire))
        .expect("a written request reads back")
        .expect("a written request is not empty");
    assert_eq!(again.method, req.method);
    assert_eq!(again.path, req.path);
    assert_eq!(again.query, req.query);
    assert_eq!(again.body, req.body);
}
