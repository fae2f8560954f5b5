#![no_main]
//! In memory, fast: any bytes as one overlay journal record payload (what `parse_at`
//! decodes once a record's checksum matches). Never a panic, a stack overflow or an
//! allocation the input does not justify; a record that decodes re-encodes to bytes that
//! decode to the same record (the hand-written `Decode` matches the derived `Encode`;
//! bincode also accepts non-shortest varints, so the bytes themselves may differ).

use hexz_host::overlay::journal::Record;
use hexz_host::snapshot::format::decode_bounded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok((rec, used)) = decode_bounded::<Record>(input) {
        let again = bincode::encode_to_vec(&rec, bincode::config::standard()).expect("encodes");
        assert!(again.len() <= used, "canonical form is never longer");
        let (back, n) = decode_bounded::<Record>(&again).expect("re-decodes");
        assert_eq!((back, n), (rec, again.len()));
    }
});
