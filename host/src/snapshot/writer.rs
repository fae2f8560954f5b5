//! Building a snapshot: chunk, deduplicate, compress in parallel, write atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use tempfile::NamedTempFile;

use super::codec::{Compression, Compressor};
use super::format::{
    bincode_config, BaseRef, Chunk, ChunkId, Codec, Extent, FileData, Frame, Header, Index, Node,
    NodeKind, Stream, EXTERNAL, FLAG_INODES, HEADER_LEN,
};
use super::reader::Snapshot;
use crate::error::{Error, Result};

/// Content-defined chunk sizes (FastCDC 2020): small enough to share, large enough to compress.
pub const CHUNK_MIN: u32 = 8 << 10;
pub const CHUNK_AVG: u32 = 32 << 10;
pub const CHUNK_MAX: u32 = 128 << 10;
/// Chunks are grouped into frames of about this many raw bytes: the unit of compression,
/// I/O and caching (small files share frames, as squashfs fragments do).
pub const FRAME_TARGET: usize = 128 << 10;
/// How much of a file the chunker looks at at once.
const WINDOW: usize = 8 << 20;
/// Marks a provisional chunk index as "stored in the base" until `finish` renumbers it.
const EXT_BIT: u32 = 1 << 31;

#[derive(Clone, Debug, Default)]
pub struct WriterOptions {
    pub compression: Compression,
    /// Compression threads; 0 means one per core.
    pub threads: usize,
}

/// What a finished snapshot holds, for the summary line and `info`.
#[derive(Clone, Debug, Default)]
pub struct WriteStats {
    /// Logical bytes of all files and streams (holes included).
    pub bytes_in: u64,
    /// Bytes of data that were neither zeros nor duplicates, before compression.
    pub bytes_unique: u64,
    /// Bytes skipped because an identical chunk was already stored.
    pub bytes_deduped: u64,
    /// Bytes that read as zeros (holes and all-zero chunks) and cost nothing.
    pub bytes_zero: u64,
    /// Bytes referenced in the base snapshot instead of stored.
    pub bytes_in_base: u64,
    pub chunks: u64,
    pub frames: u64,
    pub file_len: u64,
    pub id: [u8; 32],
}

type Placement = (u64, u32, Codec);

/// Streams data into a new snapshot file. Dropping it without `finish` leaves nothing behind.
pub struct SnapshotWriter {
    dest: PathBuf,
    tmp: NamedTempFile,
    chunks: Vec<Chunk>,
    /// Chunks stored in the base, numbered `EXT_BIT | i` until `finish`.
    external: Vec<Chunk>,
    chunk_ids: HashMap<ChunkId, u32>,
    base: Option<(Arc<Snapshot>, String)>,
    frames: Vec<Frame>,
    cur: Vec<u8>,
    window: Vec<u8>,
    stats: WriteStats,
    raw_tx: Option<Sender<(u32, Vec<u8>)>>,
    workers: Vec<JoinHandle<()>>,
    sink: Option<JoinHandle<Result<Vec<Placement>>>>,
}

impl SnapshotWriter {
    pub fn create(dest: impl AsRef<Path>, opts: &WriterOptions) -> Result<SnapshotWriter> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".hexz-pack-")
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| Error::io(tmp.path(), e))?;
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        // Fail on a bad level now, not inside a worker.
        Compressor::new(opts.compression)?;
        let (raw_tx, raw_rx) = bounded::<(u32, Vec<u8>)>(threads * 4);
        let (out_tx, out_rx) = bounded::<(u32, Codec, Vec<u8>)>(threads * 4);
        let workers = (0..threads)
            .map(|_| {
                let rx = raw_rx.clone();
                let tx = out_tx.clone();
                let kind = opts.compression;
                std::thread::spawn(move || compress_worker(kind, rx, tx))
            })
            .collect();
        drop(out_tx);
        let tmp_path = tmp.path().to_path_buf();
        let sink = std::thread::spawn(move || write_frames(file, tmp_path, out_rx));
        Ok(SnapshotWriter {
            dest,
            tmp,
            chunks: Vec::new(),
            external: Vec::new(),
            chunk_ids: HashMap::new(),
            base: None,
            frames: Vec::new(),
            cur: Vec::with_capacity(FRAME_TARGET + CHUNK_MAX as usize),
            window: Vec::new(),
            stats: WriteStats::default(),
            raw_tx: Some(raw_tx),
            workers,
            sink: Some(sink),
        })
    }

    /// Layers the new snapshot on `base`: chunks the base already has are referenced by
    /// id instead of stored. `path` is how readers will find the base (relative to the
    /// new snapshot's directory, or absolute).
    pub fn set_base(&mut self, base: Arc<Snapshot>, path: String) {
        self.base = Some((base, path));
    }

    /// Reads `file` (skipping holes) and stores its bytes; returns where they went.
    /// `size` is the length the caller saw; a file that changes size meanwhile is an error.
    pub fn add_file(&mut self, file: &File, size: u64, path: &Path) -> Result<FileData> {
        let mut segments = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let (start, end) =
                next_data_segment(file, pos, size).map_err(|e| Error::io(path, e))?;
            if start >= size {
                break;
            }
            segments.push((start, end));
            pos = end;
        }
        self.add_source(size, &segments, &mut |buf, at| {
            read_full_at(file, buf, at, path)
        })
    }

    /// Stores a file's bytes given its data `segments` (everything else reads as zeros)
    /// and a function that reads exactly `buf.len()` bytes at an offset.
    pub fn add_source(
        &mut self,
        size: u64,
        segments: &[(u64, u64)],
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<FileData> {
        let mut data = FileData {
            size,
            extents: Vec::new(),
        };
        for &(start, end) in segments {
            self.add_segment(read, start, end.min(size), &mut data.extents)?;
        }
        self.stats.bytes_in += size;
        let stored: u64 = data
            .extents
            .iter()
            .map(|e| self.chunk_len(e.chunk) as u64)
            .sum();
        self.stats.bytes_zero += size - stored;
        Ok(data)
    }

    /// Stores a file or stream of the base snapshot by referring to its chunks, without
    /// reading them.
    pub fn add_base_file(&mut self, data: &FileData) -> Result<FileData> {
        let base = self
            .base
            .as_ref()
            .map(|(b, _)| b.clone())
            .ok_or_else(|| Error::Invalid("no base snapshot set".into()))?;
        let mut out = FileData {
            size: data.size,
            extents: Vec::with_capacity(data.extents.len()),
        };
        let mut stored = 0u64;
        for e in &data.extents {
            let c = base
                .index()
                .chunks
                .get(e.chunk as usize)
                .ok_or_else(|| Error::corrupt("extent names a missing chunk"))?;
            out.extents.push(Extent {
                offset: e.offset,
                chunk: self.add_base_chunk(c.id, c.len)?,
            });
            stored += c.len as u64;
        }
        self.stats.bytes_in += data.size;
        self.stats.bytes_zero += data.size.saturating_sub(stored);
        Ok(out)
    }

    /// Refers to a chunk of the base snapshot without reading it.
    fn add_base_chunk(&mut self, id: ChunkId, len: u32) -> Result<u32> {
        if let Some(&idx) = self.chunk_ids.get(&id) {
            self.stats.bytes_deduped += len as u64;
            return Ok(idx);
        }
        if self.base.as_ref().and_then(|(b, _)| b.has_chunk(&id)) != Some(len) {
            return Err(Error::Invalid(
                "the base snapshot does not hold that chunk".into(),
            ));
        }
        self.stats.bytes_in_base += len as u64;
        Ok(self.push_external(id, len))
    }

    fn push_external(&mut self, id: ChunkId, len: u32) -> u32 {
        let idx = EXT_BIT | self.external.len() as u32;
        self.external.push(Chunk {
            id,
            frame: EXTERNAL,
            offset: 0,
            len,
        });
        self.chunk_ids.insert(id, idx);
        idx
    }

    fn chunk_len(&self, idx: u32) -> u32 {
        if idx & EXT_BIT != 0 {
            self.external[(idx & !EXT_BIT) as usize].len
        } else {
            self.chunks[idx as usize].len
        }
    }

    fn add_segment(
        &mut self,
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
        start: u64,
        end: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<()> {
        let mut window = std::mem::take(&mut self.window);
        window.clear();
        let mut base = start; // file offset of window[0]
        let mut read_to = start;
        loop {
            let want = (WINDOW - window.len()).min((end - read_to) as usize);
            let old = window.len();
            window.resize(old + want, 0);
            read(&mut window[old..], read_to)?;
            read_to += want as u64;
            let last_window = read_to == end;
            let mut consumed = 0usize;
            for c in fastcdc::v2020::FastCDC::new(&window, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
                if !last_window && c.offset + c.length == window.len() {
                    break; // the cut at the window's end is arbitrary: re-chunk with more data
                }
                let bytes = &window[c.offset..c.offset + c.length];
                if let Some(idx) = self.add_chunk(bytes)? {
                    extents.push(Extent {
                        offset: base + c.offset as u64,
                        chunk: idx,
                    });
                }
                consumed = c.offset + c.length;
            }
            if last_window {
                break;
            }
            window.drain(..consumed);
            base += consumed as u64;
        }
        self.window = window;
        Ok(())
    }

    /// Stores one chunk (deduplicated); `None` for an all-zero chunk, which is not stored.
    fn add_chunk(&mut self, bytes: &[u8]) -> Result<Option<u32>> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let id: ChunkId = *blake3::hash(bytes).as_bytes();
        if let Some(&idx) = self.chunk_ids.get(&id) {
            self.stats.bytes_deduped += bytes.len() as u64;
            return Ok(Some(idx));
        }
        if self.base.as_ref().and_then(|(b, _)| b.has_chunk(&id)) == Some(bytes.len() as u32) {
            self.stats.bytes_in_base += bytes.len() as u64;
            return Ok(Some(self.push_external(id, bytes.len() as u32)));
        }
        if !self.cur.is_empty() && self.cur.len() + bytes.len() > FRAME_TARGET {
            self.seal_frame()?;
        }
        let idx = u32::try_from(self.chunks.len())
            .map_err(|_| Error::Invalid("more than 2^32 chunks".into()))?;
        self.chunks.push(Chunk {
            id,
            frame: self.frames.len() as u32,
            offset: self.cur.len() as u32,
            len: bytes.len() as u32,
        });
        self.cur.extend_from_slice(bytes);
        self.chunk_ids.insert(id, idx);
        self.stats.bytes_unique += bytes.len() as u64;
        Ok(Some(idx))
    }

    fn seal_frame(&mut self) -> Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let seq = self.frames.len() as u32;
        let first_chunk = self
            .frames
            .last()
            .map_or(0, |f| f.first_chunk + f.chunk_count);
        let raw = std::mem::replace(
            &mut self.cur,
            Vec::with_capacity(FRAME_TARGET + CHUNK_MAX as usize),
        );
        self.frames.push(Frame {
            offset: 0,
            stored_len: 0,
            raw_len: raw.len() as u32,
            codec: 0,
            first_chunk,
            chunk_count: self.chunks.len() as u32 - first_chunk,
        });
        let tx = self
            .raw_tx
            .as_ref()
            .ok_or_else(|| Error::Invalid("writer already finished".into()))?;
        if tx.send((seq, raw)).is_err() {
            // The sink stopped early; `finish` reports its error.
            return self.collect().map(|_| ());
        }
        Ok(())
    }

    /// Stops the pipeline and returns where each frame landed.
    fn collect(&mut self) -> Result<Vec<Placement>> {
        self.raw_tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.sink.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Invalid("snapshot writer thread panicked".into()))?,
            None => Err(Error::Invalid("snapshot writer already stopped".into())),
        }
    }

    /// Writes index and header, fsyncs, and renames into place. Node ids are sequential.
    pub fn finish(self, nodes: Vec<Node>, streams: Vec<Stream>) -> Result<WriteStats> {
        self.finish_with_ids(nodes, streams, None)
    }

    /// As `finish`, recording `ids` (one per node, root first: 1) as the nodes' inode
    /// numbers when given.
    pub fn finish_with_ids(
        mut self,
        mut nodes: Vec<Node>,
        mut streams: Vec<Stream>,
        ids: Option<Vec<u64>>,
    ) -> Result<WriteStats> {
        if let Some(t) = &ids {
            super::ids::NodeIds::from_table(t.clone(), nodes.len())
                .map_err(|e| Error::Invalid(format!("writing the inode table: {e}")))?;
        }
        self.seal_frame()?;
        let placements = self.collect()?;
        if placements.len() != self.frames.len() {
            return Err(Error::Invalid("lost frames while writing".into()));
        }
        for (f, (offset, len, codec)) in self.frames.iter_mut().zip(placements) {
            f.offset = offset;
            f.stored_len = len;
            f.codec = codec as u8;
        }
        // Chunks in the base go after the local ones; renumber the extents naming them.
        let local = self.chunks.len() as u32;
        let renumber = |data: &mut FileData| {
            for e in &mut data.extents {
                if e.chunk & EXT_BIT != 0 {
                    e.chunk = local + (e.chunk & !EXT_BIT);
                }
            }
        };
        for n in &mut nodes {
            if let NodeKind::File(d) = &mut n.kind {
                renumber(d);
            }
        }
        for st in &mut streams {
            renumber(&mut st.data);
        }
        let mut chunks = std::mem::take(&mut self.chunks);
        chunks.append(&mut self.external);
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        let base = self.base.as_ref().map(|(b, path)| BaseRef {
            id: b.id(),
            path: path.clone(),
        });
        let version = if base.is_some() { 2 } else { 1 };
        let index = Index {
            frames: std::mem::take(&mut self.frames),
            chunks,
            nodes,
            streams,
            base,
        };
        super::validate::validate(&index, u64::MAX, version)?;
        let mut raw = bincode::encode_to_vec(&index, bincode_config())
            .map_err(|e| Error::Invalid(format!("encoding the index: {e}")))?;
        let mut flags = 0;
        if let Some(t) = &ids {
            flags |= FLAG_INODES;
            raw.extend(
                bincode::encode_to_vec(t, bincode_config())
                    .map_err(|e| Error::Invalid(format!("encoding the inode table: {e}")))?,
            );
        }
        let (index_codec, stored) = Compressor::new(Compression::Zstd { level: 3 })?.compress(&raw);
        let path = self.tmp.path().to_path_buf();
        let io = |e| Error::io(&path, e);
        let file = self.tmp.as_file_mut();
        let index_offset = file.seek(SeekFrom::End(0)).map_err(io)?;
        file.write_all(&stored).map_err(io)?;
        let id = *blake3::hash(&raw).as_bytes();
        let header = Header {
            version,
            flags,
            index_offset,
            index_len: stored.len() as u64,
            index_raw_len: raw.len() as u64,
            index_codec,
            index_hash: *blake3::hash(&stored).as_bytes(),
            id,
        };
        file.write_all_at(&header.encode(), 0).map_err(io)?;
        // Snapshots are shared read-only between sandboxes: readable by all, like `cp` output.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| Error::io(&self.dest, e.error))?;
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))?;
        }
        let mut stats = std::mem::take(&mut self.stats);
        stats.chunks = index.chunks.len() as u64;
        stats.frames = index.frames.len() as u64;
        stats.file_len = index_offset + stored.len() as u64;
        stats.id = id;
        Ok(stats)
    }
}

fn compress_worker(
    kind: Compression,
    rx: Receiver<(u32, Vec<u8>)>,
    tx: Sender<(u32, Codec, Vec<u8>)>,
) {
    let Ok(mut c) = Compressor::new(kind) else {
        return;
    };
    for (seq, raw) in rx {
        let (codec, stored) = c.compress(&raw);
        if tx.send((seq, codec, stored)).is_err() {
            return;
        }
    }
}

/// Writes compressed frames in sequence order after the header's space.
fn write_frames(
    file: File,
    path: PathBuf,
    rx: Receiver<(u32, Codec, Vec<u8>)>,
) -> Result<Vec<Placement>> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut pos = HEADER_LEN as u64;
    let mut placements = Vec::new();
    let mut pending = BTreeMap::new();
    let mut failed = None;
    let result = out.write_all(&[0u8; HEADER_LEN]);
    if let Err(e) = result {
        failed = Some(e);
    }
    for (seq, codec, stored) in rx {
        if failed.is_some() {
            continue; // keep draining so the workers never block
        }
        pending.insert(seq, (codec, stored));
        while let Some((codec, stored)) = pending.remove(&(placements.len() as u32)) {
            if let Err(e) = out.write_all(&stored) {
                failed = Some(e);
                break;
            }
            placements.push((pos, stored.len() as u32, codec));
            pos += stored.len() as u64;
        }
    }
    if let Some(e) = failed {
        return Err(Error::io(path, e));
    }
    out.flush().map_err(|e| Error::io(&path, e))?;
    Ok(placements)
}

fn read_full_at(file: &File, buf: &mut [u8], at: u64, path: &Path) -> Result<()> {
    file.read_exact_at(buf, at).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Invalid(format!(
                "{}: file shrank while being packed",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })
}

/// The next `[start, end)` range holding data at or after `pos`, per SEEK_DATA/SEEK_HOLE.
/// File systems without hole reporting give one range to the end.
fn next_data_segment(file: &File, pos: u64, size: u64) -> std::io::Result<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a valid, owned descriptor; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok((size, size)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((pos, size)),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Ok((start as u64, size));
    }
    Ok(((start as u64).min(size), (end as u64).min(size)))
}
