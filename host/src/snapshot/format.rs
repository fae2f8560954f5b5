//! On-disk layout of a `*.hxz` snapshot, version 1 (see docs/FORMAT.md).
//!
//! A snapshot is `[header | frames... | index]`. The header is fixed-size and
//! self-checked; the index (bincode 2 "standard" encoding, compressed) names every
//! frame, chunk, node and stream; frames hold compressed runs of chunks.

use bincode::{Decode, Encode};

use crate::error::Error as SnapshotError;

pub const MAGIC: [u8; 8] = *b"HEXZSNAP";
/// The newest version this code reads and writes. Version 1 files (no base) are still
/// read, and are what the writer produces when there is no base.
pub const FORMAT_VERSION: u32 = 2;
/// Chunk table `frame` value of a chunk stored in the base snapshot (version 2).
pub const EXTERNAL: u32 = u32::MAX;
pub const HEADER_LEN: usize = 128;
/// Header flag: the uncompressed index is followed by the inode table (`Vec<u64>`, one
/// node id per node, see docs/FORMAT.md §5).
pub const FLAG_INODES: u32 = 1;
/// Every flag this code knows.
pub const KNOWN_FLAGS: u32 = FLAG_INODES;

/// Upper bounds a reader enforces before allocating anything a file claims.
pub const MAX_FRAME_RAW: u32 = 4 << 20;
pub const MAX_INDEX_RAW: u64 = 1 << 30;

/// A chunk's identity: the BLAKE3 digest of its uncompressed bytes.
pub type ChunkId = [u8; 32];

/// How a frame or the index is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    Lz4 = 2,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }
}

/// The fixed 128-byte header at offset 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub index_offset: u64,
    pub index_len: u64,
    pub index_raw_len: u64,
    pub index_codec: Codec,
    /// BLAKE3 of the stored (compressed) index bytes.
    pub index_hash: [u8; 32],
    /// The snapshot id: BLAKE3 of the uncompressed index bytes.
    pub id: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.index_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.index_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_raw_len.to_le_bytes());
        b[40] = self.index_codec as u8;
        b[48..80].copy_from_slice(&self.index_hash);
        b[80..112].copy_from_slice(&self.id);
        let check = blake3::hash(&b[0..112]);
        b[112..128].copy_from_slice(&check.as_bytes()[0..16]);
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, SnapshotError> {
        if b[0..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let version = u32_at(b, 8);
        if version == 0 || version > FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let check = blake3::hash(&b[0..112]);
        if b[112..128] != check.as_bytes()[0..16] {
            return Err(SnapshotError::corrupt("header checksum mismatch"));
        }
        let flags = u32_at(b, 12);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(SnapshotError::corrupt(format!(
                "unknown header flags {:#x} (written by a newer hexz?)",
                flags & !KNOWN_FLAGS
            )));
        }
        let index_codec = Codec::from_u8(b[40])
            .ok_or_else(|| SnapshotError::corrupt(format!("unknown index codec {}", b[40])))?;
        let mut index_hash = [0u8; 32];
        index_hash.copy_from_slice(&b[48..80]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[80..112]);
        Ok(Header {
            version,
            flags,
            index_offset: u64_at(b, 16),
            index_len: u64_at(b, 24),
            index_raw_len: u64_at(b, 32),
            index_codec,
            index_hash,
            id,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Everything but the bytes: the decoded index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Index {
    pub frames: Vec<Frame>,
    pub chunks: Vec<Chunk>,
    /// The file tree; `nodes[0]` is the root directory when `nodes` is non-empty.
    pub nodes: Vec<Node>,
    /// Named raw byte streams (`disk`, `memory`), sorted by name.
    pub streams: Vec<Stream>,
    /// Version 2: the snapshot whose chunks `EXTERNAL` chunk entries refer to.
    pub base: Option<BaseRef>,
}

/// Names the base snapshot: its id (checked on open) and where to find it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct BaseRef {
    pub id: [u8; 32],
    /// Relative to the directory of the snapshot naming it, or absolute.
    pub path: String,
}

/// A compressed run of whole chunks, the unit of I/O and of the cache.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Frame {
    /// Absolute file offset of the stored bytes.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: u8,
    /// The frame holds chunks `first_chunk .. first_chunk + chunk_count`, back to back.
    pub first_chunk: u32,
    pub chunk_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Chunk {
    pub id: ChunkId,
    /// The frame holding the chunk, or `EXTERNAL` (in the base snapshot, found by id).
    pub frame: u32,
    /// Offset of the chunk inside its frame's uncompressed bytes.
    pub offset: u32,
    pub len: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Node {
    /// Full `st_mode`: file type bits and permission bits (incl. setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Names this node has inside the snapshot (dirs: 2 + subdirectories).
    pub nlink: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Sorted by name, names unique.
    pub xattrs: Vec<Xattr>,
    pub kind: NodeKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum NodeKind {
    Dir(Dir),
    File(FileData),
    Symlink(Vec<u8>),
    /// Character or block device (the type is in `mode`).
    Device(u64),
    Fifo,
    Socket,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Dir {
    /// Node index of the parent directory (the root is its own parent).
    pub parent: u32,
    /// Sorted by name (bytewise), names unique.
    pub entries: Vec<DirEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub node: u32,
}

/// The bytes of a regular file or a stream: data extents over an implicit sea of zeros.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct FileData {
    pub size: u64,
    /// Sorted by offset, non-overlapping, inside `size`. Gaps read as zeros.
    pub extents: Vec<Extent>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Extent {
    pub offset: u64,
    /// Index into `Index::chunks`; the extent's length is that chunk's length.
    pub chunk: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Stream {
    pub name: String,
    pub data: FileData,
}

pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Decodes a bincode value from `bytes` with an allocation budget proportional to
/// them. Without a limit bincode reserves whatever length a `Vec` claims before reading
/// a single element, so a few crafted bytes (a length of 2^40) abort the process on
/// allocation. The budget is 256 times the input size rounded up to 64 KiB, 1 MiB or
/// 16 MiB (16 MiB, 256 MiB, 4 GiB), and 16 GiB above that: no honest value comes near
/// it (the largest in-memory/encoded size ratio of any type decoded here is under 100;
/// journal records are at most 64 MiB), and a damaged one fails with `LimitExceeded`.
/// Budgets bound reservations, not resident memory: a `Vec<u8>` reserved and then found
/// short is never touched.
pub fn decode_bounded<T: bincode::Decode<()>>(
    bytes: &[u8],
) -> std::result::Result<(T, usize), bincode::error::DecodeError> {
    let c = bincode::config::standard();
    match bytes.len() {
        0..=0xffff => bincode::decode_from_slice(bytes, c.with_limit::<{ 1 << 24 }>()),
        0x1_0000..=0xf_ffff => bincode::decode_from_slice(bytes, c.with_limit::<{ 1 << 28 }>()),
        0x10_0000..=0xff_ffff => bincode::decode_from_slice(bytes, c.with_limit::<{ 1 << 32 }>()),
        _ => bincode::decode_from_slice(bytes, c.with_limit::<{ 1 << 34 }>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: FORMAT_VERSION,
            flags: 0,
            index_offset: 4096,
            index_len: 77,
            index_raw_len: 300,
            index_codec: Codec::Zstd,
            index_hash: [7; 32],
            id: [9; 32],
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn header_rejects_every_single_byte_flip() {
        let good = header().encode();
        for i in 0..HEADER_LEN {
            let mut b = good;
            b[i] ^= 0x01;
            assert!(Header::decode(&b).is_err(), "flip at byte {i} accepted");
        }
    }

    /// The index decoder had the unbounded reservation `cargo fuzz run journal_replay`
    /// found in the journal (same bincode): a `Vec` length of 2^40 in a well-formed,
    /// checksummed index aborted the process on allocation. Now: a corruption error.
    #[test]
    fn an_index_claiming_a_huge_vec_is_refused_without_allocating_it() {
        let huge = (1u64 << 40).to_le_bytes();
        let cases: Vec<Vec<u8>> = vec![
            [&[253u8][..], &huge].concat(),    // frames
            [&[0u8, 253][..], &huge].concat(), // chunks
            [
                &[0u8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 253][..],
                &huge,
            ]
            .concat(), // an xattr name
            [&[0u8, 0, 253][..], &(u64::MAX / 2).to_le_bytes()].concat(), // nodes
        ];
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("crafted.hxz");
        for raw in cases {
            let h = Header {
                version: 1,
                flags: 0,
                index_offset: HEADER_LEN as u64,
                index_len: raw.len() as u64,
                index_raw_len: raw.len() as u64,
                index_codec: Codec::Raw,
                index_hash: *blake3::hash(&raw).as_bytes(),
                id: *blake3::hash(&raw).as_bytes(),
            };
            let mut file = h.encode().to_vec();
            file.extend_from_slice(&raw);
            std::fs::write(&path, file).unwrap();
            let err = crate::snapshot::Snapshot::open(&path)
                .err()
                .expect("a crafted index must not open");
            assert!(err.to_string().contains("does not decode"), "{err}");
        }
    }

    #[test]
    fn header_refuses_unknown_version() {
        let mut b = header().encode();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        match Header::decode(&b) {
            Err(SnapshotError::UnsupportedVersion(3)) => {}
            other => panic!("expected UnsupportedVersion(3), got {other:?}"),
        }
    }
}
