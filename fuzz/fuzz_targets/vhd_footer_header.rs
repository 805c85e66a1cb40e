//! The VHD footer and dynamic header decoders on arbitrary bytes; whatever
//! decodes must encode back to bytes that decode to the same value.
#![no_main]

use ferry_vhd::vhd::footer::{DynamicHeader, Footer, FOOTER_SIZE, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..FOOTER_SIZE) {
        let bytes: &[u8; FOOTER_SIZE] = bytes.try_into().expect("length checked");
        if let Ok(footer) = Footer::decode(bytes) {
            assert_eq!(Footer::decode(&footer.encode()).expect("re-decode"), footer);
        }
    }
    if let Some(bytes) = data.get(..HEADER_SIZE) {
        let bytes: &[u8; HEADER_SIZE] = bytes.try_into().expect("length checked");
        if let Ok(header) = DynamicHeader::decode(bytes) {
            let again = DynamicHeader::decode(&header.encode()).expect("re-decode");
            assert_eq!(again.table_offset, header.table_offset);
            assert_eq!(again.block_size, header.block_size);
            assert_eq!(again.locators, header.locators);
        }
    }
});
