#![no_main]
//! Any byte stream fed to the frame reader and decoders: no panic, no allocation past
//! the limit, and whatever decodes re-encodes to canonical bytes that decode the same.

use hexz_protocol::frame::{read_frame, PREFIX_LEN};
use hexz_protocol::{check_canonical, decode_reply, decode_request, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_reply(data);
    if let Ok(req) = decode_request(data) {
        let mut out = Vec::new();
        encode_frame(&req, u32::MAX, &mut out).expect("a decoded request re-encodes");
        assert_eq!(
            check_canonical(&out[PREFIX_LEN..]),
            Ok(()),
            "the encoder is canonical"
        );
        assert_eq!(decode_request(&out[PREFIX_LEN..]).expect("re-decodes"), req);
    }
    let mut cursor = std::io::Cursor::new(data);
    let mut buf = Vec::new();
    while read_frame(&mut cursor, 4096, &mut buf).is_ok() {
        assert!(buf.len() <= 4096);
        let _ = decode_request(&buf);
    }
});
