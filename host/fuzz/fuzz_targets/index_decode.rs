#![no_main]
//! In memory, fast: any bytes as a snapshot header (`Header::decode`) and as an
//! uncompressed index (`decode_bounded::<Index>` then `validate`, what `Snapshot::open`
//! runs once the checksums match). Never a panic or an allocation the input does not
//! justify; an index that decodes re-encodes to bytes that decode to the same index; one that validates
//! supports the arithmetic `Snapshot::open` does next (stored bytes per node, chunk
//! ranges of every frame) without overflow or out-of-bounds access.

use hexz_host::snapshot::format::{
    bincode_config, decode_bounded, Header, Index, NodeKind, HEADER_LEN,
};
use hexz_host::snapshot::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    if let Some(h) = rest.get(..HEADER_LEN) {
        let h: &[u8; HEADER_LEN] = h.try_into().expect("128 bytes");
        if let Ok(header) = Header::decode(h) {
            assert_eq!(Header::decode(&header.encode()).ok(), Some(header));
        }
    }
    let Ok((index, used)) = decode_bounded::<Index>(rest) else {
        return;
    };
    let again = bincode::encode_to_vec(&index, bincode_config()).expect("re-encodes");
    assert!(again.len() <= used, "canonical form is never longer");
    let (back, n) = decode_bounded::<Index>(&again).expect("re-decodes");
    assert_eq!((&back, n), (&index, again.len()));
    let version = if flags & 1 != 0 { 1 } else { 2 };
    let data_end = 128 + (u64::from(flags >> 1) << 12);
    if validate(&index, data_end, version).is_err() {
        return;
    }
    for f in &index.frames {
        let chunks =
            &index.chunks[f.first_chunk as usize..(f.first_chunk + f.chunk_count) as usize];
        assert!(chunks.iter().all(|c| c.offset + c.len <= f.raw_len));
    }
    for n in &index.nodes {
        if let NodeKind::File(d) = &n.kind {
            let stored: u64 = d
                .extents
                .iter()
                .map(|e| index.chunks[e.chunk as usize].len as u64)
                .sum();
            assert!(stored <= d.size);
        }
    }
});
