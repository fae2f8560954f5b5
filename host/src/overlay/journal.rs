//! The overlay's metadata journal: an append-only file of checksummed records.
//!
//! Layout: a 16-byte header (`HEXZJRNL`, u32 version 1, u32 zero), then records
//! `[u32 LE payload length][first 16 bytes of BLAKE3(payload)][payload: bincode Record]`.
//! Replay stops at the first record that is short, fails its checksum or does not
//! decode. If nothing valid follows it, that tail was torn by a crash and is cut off,
//! never half-applied; if a valid record follows it, the journal was damaged in the
//! middle and opening it fails (cutting there would silently lose later changes).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bincode::{Decode, Encode};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"HEXZJRNL";
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 16;
/// The largest record replay accepts; `append` refuses anything larger.
pub const MAX_RECORD: usize = 64 << 20;
/// Directory entries per checkpoint record (a huge directory takes several).
pub const DIR_ENTRIES_PER_RECORD: usize = 16_384;
/// Bytes hashed while looking for a valid record after a bad one.
const CORRUPTION_SCAN_LIMIT: usize = 64 << 20;

pub type Time = (i64, u32);
/// A node's extended attributes, sorted by name.
pub type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Kind {
    Dir,
    File,
    Symlink(Vec<u8>),
    Device,
    Fifo,
    Socket,
}

/// Everything the overlay knows about one node that differs from (or is absent in) the
/// snapshot, except its xattrs (journaled one by one). Written whole when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct NodeRec {
    pub id: u64,
    /// The snapshot node this one started as, if any.
    pub lower: Option<u32>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub size: u64,
    /// Lower bytes are visible only below this offset (lowered by truncation).
    pub lower_limit: u64,
    /// Directories: the parent directory.
    pub parent: u64,
    /// An upper data file exists for this node.
    pub upper: bool,
}

/// `Decode` is written out below (same layout as derived) to bound `Batch` nesting.
#[derive(Clone, Debug, PartialEq, Eq, Encode)]
pub enum Record {
    /// First record: which snapshot this overlay belongs to, and the overlay's own id.
    Init {
        snapshot: [u8; 32],
        overlay: [u8; 16],
    },
    Node(NodeRec),
    /// A directory's listing (checkpoints): replaces it with `entries`...
    Dir {
        id: u64,
        entries: Vec<(Vec<u8>, u64)>,
    },
    /// ...to which each following `DirPart` adds more (a huge directory).
    DirPart {
        id: u64,
        entries: Vec<(Vec<u8>, u64)>,
    },
    /// All of a node's xattrs (sorted by name): the first change of a snapshot node's
    /// xattrs, and checkpoints.
    Xattrs {
        id: u64,
        all: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Set (`Some`) or remove (`None`) one xattr of a node whose xattrs are in the overlay.
    Xattr {
        id: u64,
        name: Vec<u8>,
        value: Option<Vec<u8>>,
    },
    /// Set (`Some`) or remove (`None`) one directory entry.
    Entry {
        dir: u64,
        name: Vec<u8>,
        node: Option<u64>,
    },
    /// The upper file holds `[start, end)` of a lower-backed file.
    Present {
        id: u64,
        start: u64,
        end: u64,
    },
    /// The node no longer exists.
    Drop {
        id: u64,
    },
    /// Node ids below this are used.
    NextId(u64),
    /// Records applied together or not at all.
    Batch(Vec<Record>),
}

/// Deepest nesting of `Batch` records replay accepts. Writers nest at most two levels
/// (a batch of a live operation's records inside a commit); anything deeper is damage
/// or a crafted file, and decoding it recursively could exhaust the stack.
pub const MAX_BATCH_DEPTH: u32 = 8;

thread_local! {
    static BATCH_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The derived layout (variant index as a varint `u32`, then the fields in order), with
/// the nesting of `Batch` bounded.
impl<Ctx> Decode<Ctx> for Record {
    fn decode<D: bincode::de::Decoder<Context = Ctx>>(
        d: &mut D,
    ) -> std::result::Result<Self, bincode::error::DecodeError> {
        let variant: u32 = Decode::decode(d)?;
        Ok(match variant {
            0 => Record::Init {
                snapshot: Decode::decode(d)?,
                overlay: Decode::decode(d)?,
            },
            1 => Record::Node(Decode::decode(d)?),
            2 => Record::Dir {
                id: Decode::decode(d)?,
                entries: Decode::decode(d)?,
            },
            3 => Record::DirPart {
                id: Decode::decode(d)?,
                entries: Decode::decode(d)?,
            },
            4 => Record::Xattrs {
                id: Decode::decode(d)?,
                all: Decode::decode(d)?,
            },
            5 => Record::Xattr {
                id: Decode::decode(d)?,
                name: Decode::decode(d)?,
                value: Decode::decode(d)?,
            },
            6 => Record::Entry {
                dir: Decode::decode(d)?,
                name: Decode::decode(d)?,
                node: Decode::decode(d)?,
            },
            7 => Record::Present {
                id: Decode::decode(d)?,
                start: Decode::decode(d)?,
                end: Decode::decode(d)?,
            },
            8 => Record::Drop {
                id: Decode::decode(d)?,
            },
            9 => Record::NextId(Decode::decode(d)?),
            10 => {
                let depth = BATCH_DEPTH.with(|c| c.get());
                if depth >= MAX_BATCH_DEPTH {
                    return Err(bincode::error::DecodeError::Other(
                        "journal batches nested too deep",
                    ));
                }
                BATCH_DEPTH.with(|c| c.set(depth + 1));
                let inner = Decode::decode(d);
                BATCH_DEPTH.with(|c| c.set(depth));
                Record::Batch(inner?)
            }
            found => {
                return Err(bincode::error::DecodeError::UnexpectedVariant {
                    type_name: "Record",
                    allowed: &bincode::error::AllowedEnumVariants::Range { min: 0, max: 10 },
                    found,
                })
            }
        })
    }
}
bincode::impl_borrow_decode!(Record);

pub struct Journal {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

fn frame(rec: &Record) -> Result<Vec<u8>> {
    let payload = bincode::encode_to_vec(rec, bincode::config::standard())
        .map_err(|e| Error::Invalid(format!("encoding a journal record: {e}")))?;
    if payload.len() > MAX_RECORD {
        return Err(Error::TooLarge(format!(
            "a journal record of {} bytes exceeds the {} MiB limit",
            payload.len(),
            MAX_RECORD >> 20
        )));
    }
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&blake3::hash(&payload).as_bytes()[..16]);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// What replay found.
pub struct Replay {
    pub records: Vec<Record>,
    /// Bytes cut off the end because the last record(s) were torn.
    pub torn_bytes: u64,
}

impl Journal {
    /// Opens an existing journal, returning its intact records. With `writable`, a torn
    /// tail is truncated away (and that truncation made durable).
    pub fn open(path: &Path, writable: bool) -> Result<(Journal, Replay)> {
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return Err(Error::Invalid(format!(
                "{}: not a hexz overlay journal",
                path.display()
            )));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(Error::Invalid(format!(
                "{}: overlay journal version {version} is not supported (this hexz reads {VERSION}); commit it with the hexz that wrote it",
                path.display()
            )));
        }
        let mut records = Vec::new();
        let mut at = HEADER_LEN as usize;
        while let Some(rec) = parse_at(&bytes, at) {
            let (r, next) = rec;
            records.push(r);
            at = next;
        }
        if at < bytes.len() {
            if let Some(valid) = valid_record_after(&bytes, at) {
                return Err(Error::CorruptOverlay(format!(
                    "{}: journal damaged at byte {at} (record {}), with valid records after it at byte {valid}: \
                     refusing to drop later changes. Keep a copy; to keep only the changes before the damage, \
                     `truncate -s {at}` the journal",
                    path.display(),
                    records.len()
                )));
            }
        }
        let torn_bytes = (bytes.len() - at) as u64;
        if torn_bytes > 0 && writable {
            file.set_len(at as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let journal = Journal {
            file: Arc::new(file),
            path: path.to_path_buf(),
            len: at as u64,
        };
        Ok((
            journal,
            Replay {
                records,
                torn_bytes,
            },
        ))
    }

    /// Writes a new journal holding `records` atomically (temp file, fsync, rename, fsync
    /// dir): when it returns, every record is durable.
    pub fn create(path: &Path, records: &[Record]) -> Result<Journal> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let io = |e| Error::io(path, e);
        let mut tmp = tempfile::Builder::new()
            .prefix(".journal-")
            .tempfile_in(dir)
            .map_err(io)?;
        let mut buf = header().to_vec();
        for r in records {
            buf.extend_from_slice(&frame(r)?);
        }
        tmp.write_all(&buf).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        let file = tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
        Ok(Journal {
            file: Arc::new(file),
            path: path.to_path_buf(),
            len: buf.len() as u64,
        })
    }

    /// The open journal file, for syncing without holding whatever guards the journal.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Appends one record (visible to a restarted server even after kill -9; durable
    /// against power loss after `sync`) and returns its size. A record larger than replay
    /// accepts is refused (`Error::TooLarge`); a failed append leaves the journal as it was.
    pub fn append(&mut self, rec: &Record) -> Result<u64> {
        let bytes = frame(rec)?;
        if let Err(e) = self.file.write_all_at(&bytes, self.len) {
            let _ = self.file.set_len(self.len);
            return Err(Error::io(&self.path, e));
        }
        self.len += bytes.len() as u64;
        Ok(bytes.len() as u64)
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len <= HEADER_LEN
    }
}

/// Where a valid record starts after the bad one at `bad`, if anywhere (bounded work).
fn valid_record_after(bytes: &[u8], bad: usize) -> Option<usize> {
    let mut hashed = 0usize;
    for at in bad + 1..bytes.len().saturating_sub(20) {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().ok()?) as usize;
        if len == 0 || len > MAX_RECORD || at + 20 + len > bytes.len() {
            continue;
        }
        hashed += len;
        if hashed > CORRUPTION_SCAN_LIMIT {
            return None;
        }
        if parse_at(bytes, at).is_some() {
            return Some(at);
        }
    }
    None
}

fn parse_at(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let head = bytes.get(at..at + 20)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let payload = bytes.get(at + 20..at + 20 + len)?;
    if blake3::hash(payload).as_bytes()[..16] != head[4..20] {
        return None;
    }
    let (rec, used): (Record, usize) = crate::snapshot::format::decode_bounded(payload).ok()?;
    (used == len).then_some((rec, at + 20 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> Record {
        Record::Entry {
            dir: 1,
            name: format!("file-{i}").into_bytes(),
            node: Some(i),
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_length_and_earlier_records_survive() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let mut j = Journal::create(&path, &[rec(0)]).unwrap();
        for i in 1..5 {
            j.append(&rec(i)).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let boundary_after_3 = {
            let (_, r) = Journal::open(&path, false).unwrap();
            assert_eq!(r.records.len(), 5);
            full.len() - frame(&rec(4)).unwrap().len()
        };
        for cut in boundary_after_3..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (j, r) = Journal::open(&path, true).unwrap();
            assert_eq!(
                r.records,
                (0..4).map(rec).collect::<Vec<_>>(),
                "cut at {cut}"
            );
            assert_eq!(j.len(), boundary_after_3 as u64);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                boundary_after_3 as u64
            );
        }
        // A flipped byte inside the last record: the record is dropped, not misread.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let (_, r) = Journal::open(&path, true).unwrap();
        assert_eq!(r.records.len(), 4);
        assert!(r.torn_bytes > 0);
    }

    #[test]
    fn a_bad_record_in_the_middle_is_corruption_not_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let mut j = Journal::create(&path, &[rec(0)]).unwrap();
        for i in 1..5 {
            j.append(&rec(i)).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let second = HEADER_LEN as usize + frame(&rec(0)).unwrap().len();
        for flip in [second + 2, second + 10, second + 24] {
            let mut bad = full.clone();
            bad[flip] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let err = Journal::open(&path, true).err().expect("must refuse");
            let msg = err.to_string();
            assert!(matches!(err, Error::CorruptOverlay(_)), "{msg}");
            assert!(msg.contains(&format!("at byte {second}")), "{msg}");
            assert!(msg.contains("truncate -s"), "{msg}");
            // Nothing was cut.
            assert_eq!(std::fs::read(&path).unwrap(), bad);
        }
    }

    #[test]
    fn a_record_larger_than_replay_accepts_is_refused_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let mut j = Journal::create(&path, &[rec(0)]).unwrap();
        let before = j.len();
        let huge = Record::Xattrs {
            id: 9,
            all: vec![(b"user.x".to_vec(), vec![7u8; MAX_RECORD + 1])],
        };
        assert!(matches!(j.append(&huge), Err(Error::TooLarge(_))));
        assert_eq!(j.len(), before);
        j.append(&rec(1)).unwrap();
        let (_, r) = Journal::open(&path, false).unwrap();
        assert_eq!(r.records, vec![rec(0), rec(1)]);
    }

    /// A journal holding one good record, then `payload` framed with a valid checksum.
    fn journal_with(path: &Path, payload: &[u8]) {
        let mut bytes = header().to_vec();
        bytes.extend_from_slice(&frame(&rec(0)).unwrap());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&blake3::hash(payload).as_bytes()[..16]);
        bytes.extend_from_slice(payload);
        std::fs::write(path, bytes).unwrap();
    }

    /// Found by `cargo fuzz run journal_replay` (host/fuzz/regressions/journal_replay/):
    /// a checksummed record whose `Vec` claims 2^40 elements made bincode reserve them
    /// up front and the process abort on allocation. Now the record does not decode (the
    /// budget is proportional to its bytes) and is treated like any bad record.
    #[test]
    fn a_record_claiming_a_huge_vec_is_refused_without_allocating_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        // Record::Dir { id: 1, entries: <2^40 entries> }, and the same for a byte string.
        for payload in [
            [&[2u8, 1, 253][..], &(1u64 << 40).to_le_bytes()].concat(),
            [&[5u8, 1, 253][..], &(1u64 << 40).to_le_bytes()].concat(),
            [&[10u8, 253][..], &(u64::MAX >> 4).to_le_bytes()].concat(),
        ] {
            journal_with(&path, &payload);
            let (_, r) = Journal::open(&path, false).unwrap();
            assert_eq!(r.records, vec![rec(0)]);
            assert_eq!(r.torn_bytes, 20 + payload.len() as u64);
        }
        // The fuzzer's own input, replayed through the same journal layout.
        let crash = include_bytes!(
            "../../fuzz/regressions/journal_replay/crash-57b3069953e32427f167b854deca73142fdb0b7f"
        );
        let mut bytes = header().to_vec();
        let mut rest = &crash[1..];
        while let [a, b, tail @ ..] = rest {
            let len = u16::from_le_bytes([*a, *b]) as usize;
            if len > tail.len() {
                break;
            }
            bytes.extend_from_slice(&(len as u32).to_le_bytes());
            bytes.extend_from_slice(&blake3::hash(&tail[..len]).as_bytes()[..16]);
            bytes.extend_from_slice(&tail[..len]);
            rest = &tail[len..];
        }
        std::fs::write(&path, bytes).unwrap();
        let _ = Journal::open(&path, false);
    }

    /// Found while fixing the above: `Batch` records nest, and bincode decodes them by
    /// recursion, so 2 bytes per level (a 200 KB record) overflowed the stack and killed
    /// the server at open. Nesting is now bounded (`MAX_BATCH_DEPTH`).
    #[test]
    fn deeply_nested_batches_are_refused_without_exhausting_the_stack() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        let mut payload = [10u8, 1].repeat(100_000);
        payload.extend_from_slice(&[9, 0]);
        journal_with(&path, &payload);
        let (_, r) = Journal::open(&path, false).unwrap();
        assert_eq!(r.records, vec![rec(0)]);
        // Nesting within the bound decodes as before.
        let mut nested = Record::NextId(7);
        for _ in 0..MAX_BATCH_DEPTH {
            nested = Record::Batch(vec![nested, rec(1)]);
        }
        let mut j = Journal::create(&path, &[rec(0)]).unwrap();
        j.append(&nested).unwrap();
        let (_, r) = Journal::open(&path, false).unwrap();
        assert_eq!(r.records, vec![rec(0), nested.clone()]);
        let deeper = Record::Batch(vec![nested]);
        j.append(&deeper).unwrap();
        let (_, r) = Journal::open(&path, false).unwrap();
        assert_eq!(
            r.records.len(),
            2,
            "a batch nested past the bound is a bad record"
        );
    }

    /// The hand-written `Decode` reads exactly what the derived `Encode` writes.
    #[test]
    fn every_record_variant_round_trips() {
        let node = NodeRec {
            id: 1 << 40,
            lower: Some(3),
            kind: Kind::Symlink(b"target".to_vec()),
            mode: 0o120777,
            uid: 1000,
            gid: 1000,
            nlink: 1,
            rdev: 7,
            atime: (-5, 999_999_999),
            mtime: (i64::MAX, 0),
            ctime: (i64::MIN, 1),
            size: u64::MAX,
            lower_limit: 9,
            parent: 1,
            upper: true,
        };
        let all = vec![
            Record::Init {
                snapshot: [3; 32],
                overlay: [4; 16],
            },
            Record::Node(node.clone()),
            Record::Node(NodeRec {
                kind: Kind::Device,
                lower: None,
                ..node
            }),
            Record::Dir {
                id: 2,
                entries: vec![(b"a".to_vec(), 3), (b"b".to_vec(), u64::MAX)],
            },
            Record::DirPart {
                id: 2,
                entries: vec![],
            },
            Record::Xattrs {
                id: 5,
                all: vec![(b"user.a".to_vec(), vec![0; 300])],
            },
            Record::Xattr {
                id: 5,
                name: b"user.b".to_vec(),
                value: None,
            },
            Record::Xattr {
                id: 5,
                name: b"user.b".to_vec(),
                value: Some(b"v".to_vec()),
            },
            rec(9),
            Record::Entry {
                dir: 1,
                name: b"x".to_vec(),
                node: None,
            },
            Record::Present {
                id: 6,
                start: 4096,
                end: 8192,
            },
            Record::Drop { id: u64::MAX },
            Record::NextId(12),
            Record::Batch(vec![Record::NextId(1), Record::Batch(vec![rec(2)])]),
        ];
        for r in all {
            let bytes = bincode::encode_to_vec(&r, bincode::config::standard()).unwrap();
            let (back, used): (Record, usize) =
                crate::snapshot::format::decode_bounded(&bytes).unwrap();
            assert_eq!((back, used), (r, bytes.len()));
        }
        let unknown = [11u8, 0];
        assert!(crate::snapshot::format::decode_bounded::<Record>(&unknown).is_err());
    }

    #[test]
    fn appends_after_a_reopen_continue_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("journal");
        Journal::create(&path, &[rec(0)]).unwrap();
        let (mut j, _) = Journal::open(&path, true).unwrap();
        j.append(&rec(1)).unwrap();
        j.sync().unwrap();
        let (_, r) = Journal::open(&path, true).unwrap();
        assert_eq!(r.records, vec![rec(0), rec(1)]);
    }
}
