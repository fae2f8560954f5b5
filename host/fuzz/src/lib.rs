//! Shared by the fuzz targets and the seed writer: how a fuzz input becomes a snapshot
//! file or an overlay journal. The harness fixes up checksums itself so that the fuzzer
//! spends its time in the decoders and the structural checks behind them, not in
//! guessing BLAKE3 digests (a mode bit still feeds raw bytes straight to the parsers).

use std::path::Path;

use hexz_host::snapshot::format::{Codec, Header, FORMAT_VERSION, HEADER_LEN};

/// `snapshot_open` input: `[flags][data_len: u16 LE][data area][raw index]`.
/// flags bit 0: store the index zstd-compressed; bit 1: header version 1 (else 2);
/// bit 2: raw mode (everything after the flags byte is the whole file, no fix-ups);
/// bit 3: declare an `index_raw_len` one larger than the truth.
pub fn snapshot_file(input: &[u8]) -> Vec<u8> {
    let Some((&flags, rest)) = input.split_first() else {
        return Vec::new();
    };
    if flags & 4 != 0 {
        return rest.to_vec();
    }
    let (data_len, rest) = match rest {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => (0, rest),
    };
    let data_len = data_len.min(rest.len());
    let (data, raw_index) = rest.split_at(data_len);
    let (codec, stored) = if flags & 1 != 0 {
        match zstd::bulk::compress(raw_index, 1) {
            Ok(z) => (Codec::Zstd, z),
            Err(_) => (Codec::Raw, raw_index.to_vec()),
        }
    } else {
        (Codec::Raw, raw_index.to_vec())
    };
    let index_offset = (HEADER_LEN + data.len()) as u64;
    let header = Header {
        version: if flags & 2 != 0 { 1 } else { FORMAT_VERSION },
        flags: 0,
        index_offset,
        index_len: stored.len() as u64,
        index_raw_len: raw_index.len() as u64 + u64::from(flags & 8 != 0),
        index_codec: codec,
        index_hash: *blake3::hash(&stored).as_bytes(),
        id: *blake3::hash(raw_index).as_bytes(),
    };
    let mut file = header.encode().to_vec();
    file.extend_from_slice(data);
    file.extend_from_slice(&stored);
    file
}

/// The inverse, for seeds: a real snapshot file as a `snapshot_open` input.
pub fn snapshot_input(file: &[u8]) -> Option<Vec<u8>> {
    let hb: &[u8; HEADER_LEN] = file.get(..HEADER_LEN)?.try_into().ok()?;
    let h = Header::decode(hb).ok()?;
    let data = file.get(HEADER_LEN..h.index_offset as usize)?;
    let stored = file.get(h.index_offset as usize..)?;
    let raw = match h.index_codec {
        Codec::Raw => stored.to_vec(),
        Codec::Zstd => zstd::bulk::decompress(stored, h.index_raw_len as usize).ok()?,
        Codec::Lz4 => return None,
    };
    let mut out = vec![if h.version == 1 { 2 } else { 0 }];
    out.extend_from_slice(&u16::try_from(data.len()).ok()?.to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&raw);
    Some(out)
}

pub const JOURNAL_MAGIC: &[u8; 8] = b"HEXZJRNL";
pub const JOURNAL_VERSION: u32 = 2;

/// One journal record frame: `[u32 LE len][BLAKE3(payload)[..16]][payload]`.
pub fn journal_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&blake3::hash(payload).as_bytes()[..16]);
    out.extend_from_slice(payload);
    out
}

pub fn journal_header() -> Vec<u8> {
    let mut h = JOURNAL_MAGIC.to_vec();
    h.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h
}

/// `journal_replay` input: `[flags][records...]`, each record `[len: u16 LE][payload]`;
/// bytes left over when a record is short become a raw tail (a torn or damaged end).
/// flags bit 0: raw mode (everything after the flags byte follows the journal header
/// as is); bit 1: open read-only; bit 2: then serve it (walk the tree through the VFS).
/// Outside raw mode the harness writes the `Init` record for the snapshot in use
/// (`init_payload`) first, so replay gets past the identity check.
pub fn journal_file(input: &[u8], init_payload: &[u8]) -> Vec<u8> {
    let mut out = journal_header();
    let Some((&flags, mut rest)) = input.split_first() else {
        return out;
    };
    if flags & 1 != 0 {
        out.extend_from_slice(rest);
        return out;
    }
    out.extend_from_slice(&journal_frame(init_payload));
    loop {
        match rest {
            [a, b, tail @ ..] => {
                let len = u16::from_le_bytes([*a, *b]) as usize;
                if len > tail.len() {
                    out.extend_from_slice(rest);
                    break;
                }
                out.extend_from_slice(&journal_frame(&tail[..len]));
                rest = &tail[len..];
            }
            _ => {
                out.extend_from_slice(rest);
                break;
            }
        }
    }
    out
}

/// A small snapshot like `tests/support.rs`'s sample tree (dirs, files, a symlink, a
/// hard link, an xattr-free fifo), packed into `dir/base.hxz`.
pub fn small_snapshot(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(src.join("d/e")).expect("mkdir");
    std::fs::write(src.join("a.txt"), b"hello hexz\n").expect("write");
    std::fs::write(src.join("d/b.txt"), "fn main() {}\n".repeat(40)).expect("write");
    std::fs::write(src.join("d/e/c.bin"), [7u8; 9000]).expect("write");
    std::os::unix::fs::symlink("d/b.txt", src.join("link")).expect("symlink");
    std::fs::hard_link(src.join("a.txt"), src.join("d/a-again.txt")).expect("link");
    let out = dir.join("base.hxz");
    hexz_host::pack::pack(
        &hexz_host::pack::PackInput {
            tree: Some(src),
            streams: vec![],
            ..Default::default()
        },
        &out,
        &hexz_host::snapshot::WriterOptions {
            threads: 1,
            ..Default::default()
        },
        &(),
    )
    .expect("pack");
    out
}
