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

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
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
    let (rec, used): (Record, usize) =
        bincode::decode_from_slice(payload, bincode::config::standard()).ok()?;
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
