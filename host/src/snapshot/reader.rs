//! Opening a snapshot and reading from it: thread-safe, with a byte-bounded frame cache.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::bufpool::PoolBuf;

use super::codec::decompress;
use super::format::{
    decode_bounded, Chunk, ChunkId, Codec, FileData, Frame, Header, Index, Node, NodeKind, Stream,
    EXTERNAL, FLAG_INODES, HEADER_LEN, MAX_FRAME_RAW, MAX_INDEX_RAW,
};
use super::ids::NodeIds;
use super::validate::validate;
use crate::error::{Error, Result};

/// Index of a node in the snapshot's node table; the root directory is `ROOT`.
pub type NodeIdx = u32;
pub const ROOT: NodeIdx = 0;

/// Default size of the decompressed-frame cache.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Longest chain of base snapshots a reader follows.
pub const MAX_BASE_DEPTH: usize = 64;

/// A frame's decompressed bytes as the cache holds them: a decoded `Vec`, shared rather
/// than copied into a new allocation, or — for a frame stored raw — its range of the
/// buffer it was fetched in, so a cold read copies each byte once fewer.
#[derive(Clone)]
pub struct FrameBytes {
    buf: Arc<PoolBuf>,
    start: usize,
    len: usize,
}

impl FrameBytes {
    fn whole(v: Vec<u8>) -> FrameBytes {
        let len = v.len();
        FrameBytes {
            buf: Arc::new(v.into()),
            start: 0,
            len,
        }
    }
}

impl std::ops::Deref for FrameBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

#[derive(Clone)]
struct FrameWeight;

impl Weighter<u32, FrameBytes> for FrameWeight {
    fn weight(&self, _key: &u32, val: &FrameBytes) -> u64 {
        val.len().max(1) as u64
    }
}

/// Where a snapshot's frames come from.
pub(crate) enum Backing {
    /// A local `.hxz` file.
    File(File),
    /// A data blob in an OCI registry, read by range through the host's registry cache.
    Remote(Arc<crate::oci::lazy::RemoteData>),
}

/// An open, validated snapshot. Share it between threads with `Arc`.
pub struct Snapshot {
    path: PathBuf,
    backing: Backing,
    header: Header,
    index: Index,
    file_len: u64,
    cache: Cache<u32, FrameBytes, FrameWeight>,
    /// The base snapshot, for chunks stored there (format version 2).
    base: Option<Arc<Snapshot>>,
    /// Chunks `local_chunks..` live in the base: their index there.
    local_chunks: usize,
    external: Vec<u32>,
    by_id: OnceLock<HashMap<ChunkId, u32>>,
    /// Per node: bytes its extents store (what `st_blocks` reports), summed once at open.
    stored: Vec<u64>,
    /// The inode numbers of the nodes.
    ids: NodeIds,
}

impl Snapshot {
    /// Opens and validates header and index; reads no frame data.
    pub fn open(path: impl AsRef<Path>) -> Result<Snapshot> {
        Snapshot::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: u64) -> Result<Snapshot> {
        let path = path.as_ref();
        if let Some(r) = path
            .to_str()
            .filter(|s| crate::oci::Reference::is_remote(s))
        {
            return crate::oci::lazy::open(r, cache_bytes, &mut Vec::new());
        }
        Snapshot::open_chain(path, cache_bytes, &mut Vec::new()).map_err(|e| e.at(path))
    }

    fn open_chain(path: &Path, cache_bytes: u64, seen: &mut Vec<[u8; 32]>) -> Result<Snapshot> {
        let mut snap = Snapshot::open_inner(path, cache_bytes)?;
        let Some(base_ref) = snap.index.base.clone() else {
            return Ok(snap);
        };
        snap.check_depth(seen)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        // `pull` writes a base it cannot place at its recorded path under this name.
        let pulled = dir.join(pulled_base_name(&base_ref.id));
        let base_path = match Path::new(&base_ref.path) {
            _ if crate::oci::Reference::is_remote(&base_ref.path) && pulled.exists() => {
                pulled.clone()
            }
            _ if crate::oci::Reference::is_remote(&base_ref.path) => {
                let base =
                    crate::oci::lazy::open(&base_ref.path, (cache_bytes / 4).max(16 << 20), seen)?;
                snap.attach_base(base)?;
                return Ok(snap);
            }
            p if p.is_absolute() => p.to_path_buf(),
            p => dir.join(p),
        };
        let base_path = if !base_path.exists() && pulled.exists() {
            pulled
        } else {
            base_path
        };
        let base = Snapshot::open_chain(&base_path, (cache_bytes / 4).max(16 << 20), seen)
            .map_err(|e| snap.missing_base(&base_path.display().to_string(), e.at(&base_path)))?;
        snap.attach_base(base)?;
        Ok(snap)
    }

    /// Refuses a chain deeper than `MAX_BASE_DEPTH` or one that loops; records this one.
    pub(crate) fn check_depth(&self, seen: &mut Vec<[u8; 32]>) -> Result<()> {
        if seen.len() >= MAX_BASE_DEPTH || seen.contains(&self.header.id) {
            return Err(Error::corrupt(
                "chain of base snapshots is too deep or loops",
            ));
        }
        seen.push(self.header.id);
        Ok(())
    }

    /// The error for a base that cannot be used.
    pub(crate) fn missing_base(&self, base: &str, e: Error) -> Error {
        let id = self.index.base.as_ref().map_or([0; 32], |b| b.id);
        Error::Invalid(format!(
            "base snapshot {base} (id {}) cannot be used: {e}; keep the base beside this snapshot, or commit with --standalone",
            &hex(&id)[..16]
        ))
    }

    /// Links the opened base: checks its id and finds every external chunk in it.
    pub(crate) fn attach_base(&mut self, base: Snapshot) -> Result<()> {
        let Some(base_ref) = self.index.base.clone() else {
            return Ok(());
        };
        let name = base.path.display().to_string();
        if base.header.id != base_ref.id {
            return Err(self.missing_base(
                &name,
                Error::Invalid(format!("it has id {}", &base.id_hex()[..16])),
            ));
        }
        let base_ids = base.chunk_ids();
        let mut external = Vec::with_capacity(self.index.chunks.len() - self.local_chunks);
        for c in &self.index.chunks[self.local_chunks..] {
            match base_ids.get(&c.id) {
                Some(&bi) if base.index.chunks[bi as usize].len == c.len => external.push(bi),
                _ => {
                    return Err(self.missing_base(
                        &name,
                        Error::Invalid(format!("it lacks chunk {}", &hex(&c.id)[..16])),
                    ));
                }
            }
        }
        self.external = external;
        self.base = Some(Arc::new(base));
        Ok(())
    }

    /// The base snapshot this one refers to, if any (format version 2).
    pub fn base(&self) -> Option<&Arc<Snapshot>> {
        self.base.as_ref()
    }

    /// Chunk id → chunk index, built on first use.
    fn chunk_ids(&self) -> &HashMap<ChunkId, u32> {
        self.by_id.get_or_init(|| {
            self.index
                .chunks
                .iter()
                .enumerate()
                .map(|(i, c)| (c.id, i as u32))
                .collect()
        })
    }

    /// Whether a chunk with this id is readable from this snapshot (or its bases).
    pub fn has_chunk(&self, id: &ChunkId) -> Option<u32> {
        self.chunk_ids()
            .get(id)
            .map(|&i| self.index.chunks[i as usize].len)
    }

    /// A chunk's verified bytes: the frame holding it and the chunk's offset in the frame.
    /// With `cached_only`, `None` when the frame is not in the cache.
    fn chunk_bytes(
        &self,
        ci: u32,
        cached_only: bool,
        last: Option<u32>,
    ) -> Option<Result<(FrameBytes, usize)>> {
        let c = &self.index.chunks[ci as usize];
        if c.frame != EXTERNAL {
            if cached_only {
                return self.cache.get(&c.frame).map(|f| Ok((f, c.offset as usize)));
            }
            return Some(
                self.frame_of_read(c.frame, last)
                    .map(|f| (f, c.offset as usize))
                    .map_err(|e| e.at(&self.path)),
            );
        }
        match (
            &self.base,
            self.external.get(ci as usize - self.local_chunks),
        ) {
            (Some(base), Some(&bi)) => base.chunk_bytes(bi, cached_only, None),
            _ => Some(Err(Error::corrupt(
                "chunk in a base snapshot that is not open",
            )
            .at(&self.path))),
        }
    }

    fn open_inner(path: &Path, cache_bytes: u64) -> Result<Snapshot> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_LEN as u64 {
            if file_len >= 8 {
                let mut magic = [0u8; 8];
                file.read_exact_at(&mut magic, 0)
                    .map_err(|e| Error::io(path, e))?;
                if magic == super::format::MAGIC {
                    return Err(Error::corrupt("truncated inside the header"));
                }
            }
            return Err(Error::NotASnapshot);
        }
        let mut hb = [0u8; HEADER_LEN];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| Error::io(path, e))?;
        let header = Header::decode(&hb)?;
        let index_end = header.index_offset.checked_add(header.index_len);
        if header.index_offset < HEADER_LEN as u64 || index_end != Some(file_len) {
            return Err(Error::corrupt(format!(
                "index at {}+{} does not end the {file_len}-byte file (truncated or appended to)",
                header.index_offset, header.index_len
            )));
        }
        if header.index_raw_len > MAX_INDEX_RAW {
            return Err(Error::corrupt("index larger than the 1 GiB limit"));
        }
        let mut stored = vec![0u8; header.index_len as usize];
        file.read_exact_at(&mut stored, header.index_offset)
            .map_err(|e| Error::io(path, e))?;
        Snapshot::from_parts(path, header, &stored, Backing::File(file), cache_bytes)
    }

    /// A snapshot whose header and stored index are `blob` (an OCI index blob) and whose
    /// data area (`data_len` bytes) is `remote`.
    pub(crate) fn from_index_blob(
        name: &Path,
        blob: &[u8],
        data_len: u64,
        remote: Arc<crate::oci::lazy::RemoteData>,
        cache_bytes: u64,
    ) -> Result<Snapshot> {
        let header = index_blob_header(blob, Some(data_len))?;
        Snapshot::from_parts(
            name,
            header,
            &blob[HEADER_LEN..],
            Backing::Remote(remote),
            cache_bytes,
        )
    }

    /// The index an index blob (header + index) holds, checked as `open` checks it, for
    /// reading another snapshot's frames out of the host cache.
    pub(crate) fn index_of_blob(blob: &[u8]) -> Result<Index> {
        let header = index_blob_header(blob, None)?;
        let raw = checked_index(&header, &blob[HEADER_LEN..])?;
        let (index, _): (Index, usize) = decode_bounded(&raw)
            .map_err(|e| Error::corrupt(format!("index does not decode: {e}")))?;
        validate(&index, header.index_offset, header.version)?;
        Ok(index)
    }

    fn from_parts(
        path: &Path,
        header: Header,
        stored: &[u8],
        backing: Backing,
        cache_bytes: u64,
    ) -> Result<Snapshot> {
        let raw = checked_index(&header, stored)?;
        let file_len = header.index_offset + header.index_len;
        let (index, used): (Index, usize) = decode_bounded(&raw)
            .map_err(|e| Error::corrupt(format!("index does not decode: {e}")))?;
        let ids = if header.flags & FLAG_INODES != 0 {
            let (table, more): (Vec<u64>, usize) = decode_bounded(&raw[used..])
                .map_err(|e| Error::corrupt(format!("inode table does not decode: {e}")))?;
            if used + more != raw.len() {
                return Err(Error::corrupt("trailing bytes after the inode table"));
            }
            NodeIds::from_table(table, index.nodes.len())?
        } else {
            if used != raw.len() {
                return Err(Error::corrupt("trailing bytes after the index"));
            }
            NodeIds::sequential(index.nodes.len())
        };
        validate(&index, header.index_offset, header.version)?;
        let local_chunks = index
            .frames
            .last()
            .map_or(0, |f| (f.first_chunk + f.chunk_count) as usize);
        let stored_per_node = index
            .nodes
            .iter()
            .map(|n| match &n.kind {
                NodeKind::File(d) => d
                    .extents
                    .iter()
                    .map(|e| index.chunks[e.chunk as usize].len as u64)
                    .sum(),
                _ => 0,
            })
            .collect();
        let cache = Cache::with_weighter(
            (cache_bytes / (64 << 10)).max(16) as usize,
            cache_bytes.max(MAX_FRAME_RAW as u64),
            FrameWeight,
        );
        Ok(Snapshot {
            path: path.to_path_buf(),
            backing,
            header,
            index,
            file_len,
            cache,
            base: None,
            local_chunks,
            external: Vec::new(),
            by_id: OnceLock::new(),
            stored: stored_per_node,
            ids,
        })
    }

    /// For a snapshot opened from a registry: its reference pinned to the manifest digest.
    pub fn remote_ref(&self) -> Option<String> {
        match &self.backing {
            Backing::Remote(r) => Some(r.reference().to_string()),
            Backing::File(_) => None,
        }
    }

    /// Opens one snapshot file without its base (for copying it, not for reading).
    pub fn open_alone(path: &Path) -> Result<Snapshot> {
        Snapshot::open_inner(path, 16 << 20).map_err(|e| e.at(path))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The local file, for a snapshot opened from one.
    pub fn local_file(&self) -> Option<&File> {
        match &self.backing {
            Backing::File(f) => Some(f),
            Backing::Remote(_) => None,
        }
    }

    pub(crate) fn remote(&self) -> Option<&Arc<crate::oci::lazy::RemoteData>> {
        match &self.backing {
            Backing::Remote(r) => Some(r),
            Backing::File(_) => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The snapshot id: a digest over the whole index, which names every chunk by hash.
    pub fn id(&self) -> [u8; 32] {
        self.header.id
    }

    pub fn format_version(&self) -> u32 {
        self.header.version
    }

    pub fn id_hex(&self) -> String {
        hex(&self.header.id)
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn has_tree(&self) -> bool {
        !self.index.nodes.is_empty()
    }

    /// The id (inode number) of node `idx`.
    pub fn node_id(&self, idx: NodeIdx) -> u64 {
        self.ids.id(idx)
    }

    /// The node whose id is `id`, if any.
    pub fn node_index(&self, id: u64) -> Option<NodeIdx> {
        self.ids.index(id)
    }

    /// The ids of the nodes: the recorded inode table, if any.
    pub fn node_ids(&self) -> &NodeIds {
        &self.ids
    }

    /// The node at `idx`. Indices come from the snapshot itself (validated on open).
    pub fn node(&self, idx: NodeIdx) -> Option<&Node> {
        self.index.nodes.get(idx as usize)
    }

    /// Finds `name` in directory `dir` by binary search.
    pub fn lookup(&self, dir: NodeIdx, name: &[u8]) -> Option<NodeIdx> {
        match &self.node(dir)?.kind {
            NodeKind::Dir(d) => d
                .entries
                .binary_search_by(|e| e.name.as_slice().cmp(name))
                .ok()
                .map(|i| d.entries[i].node),
            _ => None,
        }
    }

    /// Resolves a `/`-separated path from the root without following symlinks.
    pub fn resolve(&self, path: &str) -> Result<NodeIdx> {
        if !self.has_tree() {
            return Err(Error::NotFound(format!(
                "{path} (this snapshot holds only streams)"
            )));
        }
        let mut cur = super::reader::ROOT;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            cur = if part == ".." {
                match &self.index.nodes[cur as usize].kind {
                    NodeKind::Dir(d) => d.parent,
                    _ => return Err(Error::NotFound(path.to_string())),
                }
            } else {
                self.lookup(cur, part.as_bytes())
                    .ok_or_else(|| Error::NotFound(path.to_string()))?
            };
        }
        Ok(cur)
    }

    pub fn stream(&self, name: &str) -> Option<&Stream> {
        self.index.streams.iter().find(|s| s.name == name)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns fewer only at end of data.
    /// Every byte returned is verified against its chunk's BLAKE3 (on cache fill).
    pub fn read_at(&self, data: &FileData, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_with(data, offset, buf, false)
            .unwrap_or_else(|| Err(Error::corrupt("read needed a frame it may not load")))
    }

    /// As `read_at`, but only from frames already in the cache: `None` if any is missing.
    pub fn read_at_cached(
        &self,
        data: &FileData,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<usize>> {
        self.read_with(data, offset, buf, true)
    }

    fn read_with(
        &self,
        data: &FileData,
        offset: u64,
        buf: &mut [u8],
        cached_only: bool,
    ) -> Option<Result<usize>> {
        if offset >= data.size {
            return Some(Ok(0));
        }
        let want = buf.len().min((data.size - offset) as usize);
        let buf = &mut buf[..want];
        let last = self.last_frame(data);
        let mut done = 0usize;
        // First extent that could cover `offset`: the last one starting at or before it.
        let mut ei = data
            .extents
            .partition_point(|e| e.offset <= offset)
            .saturating_sub(1);
        while done < want {
            let pos = offset + done as u64;
            let ext = data.extents.get(ei);
            match ext {
                Some(e) if e.offset <= pos => {
                    let chunk = &self.index.chunks[e.chunk as usize];
                    let end = e.offset + chunk.len as u64;
                    if pos >= end {
                        ei += 1;
                        continue;
                    }
                    let (frame, chunk_off) = match self.chunk_bytes(e.chunk, cached_only, last)? {
                        Ok(x) => x,
                        Err(err) => return Some(Err(err)),
                    };
                    let in_chunk = (pos - e.offset) as usize;
                    let n = (chunk.len as usize - in_chunk).min(want - done);
                    let start = chunk_off + in_chunk;
                    buf[done..done + n].copy_from_slice(&frame[start..start + n]);
                    done += n;
                    ei += 1;
                }
                _ => {
                    // A hole up to the next extent (or the end).
                    let next = ext.map_or(data.size, |e| e.offset);
                    let n = ((next - pos) as usize).min(want - done);
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Some(Ok(done))
    }

    /// A frame's verified, decompressed bytes, from the cache or the file.
    pub fn frame(&self, idx: u32) -> Result<FrameBytes> {
        self.frame_of_read(idx, None)
    }

    /// As [`Self::frame`], for a read of a file whose data ends in frame `last` (if
    /// known): frames of a registry's snapshot are not fetched ahead past it.
    fn frame_of_read(&self, idx: u32, last: Option<u32>) -> Result<FrameBytes> {
        self.cache.get_or_insert_with(&idx, || match &self.backing {
            Backing::File(_) => self.load_frame(idx).map(FrameBytes::whole),
            Backing::Remote(r) => self.load_remote(idx, r, last),
        })
    }

    fn frame_meta(&self, idx: u32) -> Result<(&Frame, &[Chunk])> {
        let f: &Frame = self
            .index
            .frames
            .get(idx as usize)
            .ok_or_else(|| Error::corrupt(format!("frame {idx} out of range")))?;
        let chunks =
            &self.index.chunks[f.first_chunk as usize..(f.first_chunk + f.chunk_count) as usize];
        Ok((f, chunks))
    }

    /// Reads, decompresses and verifies one frame, bypassing the caches (for a snapshot
    /// in a registry: fetched from the registry).
    pub fn load_frame(&self, idx: u32) -> Result<Vec<u8>> {
        let (f, chunks) = self.frame_meta(idx)?;
        let stored = match &self.backing {
            Backing::File(file) => {
                let mut stored = vec![0u8; f.stored_len as usize];
                file.read_exact_at(&mut stored, f.offset)
                    .map_err(|e| Error::io(&self.path, e))?;
                stored
            }
            Backing::Remote(r) => r.fetch(f.offset - HEADER_LEN as u64, f.stored_len as u64)?,
        };
        decode_frame_owned(idx, f, chunks, stored)
    }

    /// A frame of a snapshot in a registry: from the host's registry cache if it holds
    /// it, else from a window fetched by range — with the frames after it when reads are
    /// sequential, which go into the frame cache too; a stream keeps the next windows
    /// in flight.
    fn load_remote(
        &self,
        idx: u32,
        r: &Arc<crate::oci::lazy::RemoteData>,
        last: Option<u32>,
    ) -> Result<FrameBytes> {
        let (f, chunks) = self.frame_meta(idx)?;
        // Where fetching ahead stops: after the file's last frame when the read is of a
        // file that ends ahead (the frames after it are another file's), else at the end.
        let limit = last
            .filter(|&l| l >= idx)
            .map_or(self.index.frames.len(), |l| l as usize + 1);
        r.record(idx);
        if let Some(raw) = r.cached_frame(idx, f, chunks) {
            return Ok(FrameBytes::whole(raw));
        }
        if let Some(b) = r.borrow(idx, f, chunks) {
            for (j, raw) in b.others {
                self.cache.insert(j, FrameBytes::whole(raw));
            }
            if b.run {
                self.assemble_ahead(idx + 1, r);
            }
            return Ok(FrameBytes::whole(b.mine));
        }
        let has = |w: &Window| {
            w.frames
                .get((idx - w.first) as usize)
                .is_some_and(|f| f.is_ok())
        };
        let ahead = r.take_ahead(idx);
        if let Some(Err(e)) = &ahead {
            tracing::debug!("frame {idx}: read ahead failed ({e}); fetching it again");
        }
        let window = match ahead {
            Some(Ok(w)) if has(&w) => w,
            // A window that failed on its way, or failed a check before `idx` (or none):
            // fetched here from `idx`, which reports why if it fails again.
            _ => {
                let (end, len) = self.window_from(idx, r.window(idx), r, limit);
                let bytes = r.fetch(f.offset - HEADER_LEN as u64, len)?;
                self.window_plan(idx, end as u32).check(bytes)
            }
        };
        r.fetched_to(window.end);
        let streaming = r.streaming();
        if streaming {
            self.read_ahead(r, window.end, limit, last.is_some());
        }
        // Only verified frames go into the host cache.
        r.store(&window);
        let mut mine = None;
        for (j, frame) in (window.first..).zip(window.frames) {
            match frame {
                Ok(raw) if j == idx => mine = Some(raw),
                Ok(raw) => {
                    if j > idx {
                        r.record(j);
                    }
                    self.cache.insert(j, raw);
                }
                Err(e) if j == idx => return Err(e.at(&self.path)),
                Err(e) => {
                    tracing::warn!("{}: read-ahead: {e}", self.path.display());
                    break;
                }
            }
        }
        if streaming {
            if let Some((a, b)) = r.passed(window.first, window.end) {
                // Drop-behind: frames a stream has passed are in the host cache, and
                // keeping them in memory would push out what other readers use (and take
                // fresh memory for every window). Those not written there yet stay.
                for j in a..b {
                    if r.is_cached(j) {
                        self.cache.remove(&j);
                    }
                }
            }
        }
        mine.ok_or_else(|| Error::corrupt(format!("frame {idx} was not fetched")))
    }

    /// Keeps [`AHEAD_DEPTH`] runs of frames that other cached blobs hold being put
    /// together after frame `from`, for a reader going through them in order.
    fn assemble_ahead(&self, from: u32, r: &crate::oci::lazy::RemoteData) {
        use crate::oci::lazy::{AHEAD_DEPTH, WINDOW_MAX};
        let (end, running) = r.assembling();
        let mut next = end.map_or(from, |e| e.max(from)) as usize;
        for _ in running..AHEAD_DEPTH {
            let mut plan = Vec::new();
            let mut raw = 0u64;
            while raw < WINDOW_MAX / 2 && next < self.index.frames.len() {
                let j = next as u32;
                if self.cache.contains_key(&j) || r.is_cached(j) {
                    break;
                }
                let Ok((f, chunks)) = self.frame_meta(j) else {
                    break;
                };
                if !r.borrowable(chunks) {
                    break;
                }
                raw += f.raw_len as u64;
                plan.push((f.clone(), chunks.to_vec()));
                next += 1;
            }
            if plan.is_empty() {
                return;
            }
            let first = (next - plan.len()) as u32;
            r.assemble_ahead(first, plan);
        }
    }

    /// Keeps [`AHEAD_DEPTH`] windows of a stream in flight after frame `from`, none of
    /// them past frame `limit`; `to_limit` when the stream is known to go on to `limit`
    /// (it reads a large file that ends there).
    fn read_ahead(
        &self,
        r: &crate::oci::lazy::RemoteData,
        from: u32,
        limit: usize,
        to_limit: bool,
    ) {
        use crate::oci::lazy::{AHEAD_DEPTH, WINDOW_MAX};
        let (chain_end, running) = r.ahead(from);
        let mut next = chain_end as usize;
        // Where a stream through a large file stops: the end of frame `limit - 1`.
        let until = to_limit
            .then(|| self.index.frames.get(limit - 1))
            .flatten()
            .map(|f| f.offset + f.stored_len as u64 - HEADER_LEN as u64);
        for _ in running..AHEAD_DEPTH {
            // Frames already held need no fetch (a few are skipped, not a whole file).
            let skip = limit.min(next + 64);
            while next < skip && self.held(next as u32, r) {
                next += 1;
            }
            if next >= skip {
                return;
            }
            let (end, len) = self.window_from(next as u32, WINDOW_MAX, r, limit);
            let off = self.index.frames[next].offset - HEADER_LEN as u64;
            r.fetch_ahead(self.window_plan(next as u32, end as u32), off, len, until);
            next = end;
        }
    }

    /// What checking frames `first..end` fetched as one range needs of the index.
    fn window_plan(&self, first: u32, end: u32) -> WindowPlan {
        let frames = (first..end)
            .filter_map(|j| self.frame_meta(j).ok())
            .map(|(f, c)| (f.clone(), c.to_vec()))
            .collect();
        WindowPlan::new(first, frames)
    }

    /// Whether frame `idx` needs no fetch: in the frame cache, the host cache, or made of
    /// chunks other cached blobs hold.
    fn held(&self, idx: u32, r: &crate::oci::lazy::RemoteData) -> bool {
        self.cache.contains_key(&idx)
            || r.is_cached(idx)
            || self
                .frame_meta(idx)
                .is_ok_and(|(_, chunks)| r.borrowable(chunks))
    }

    /// The frames one fetch from `idx` covers: contiguous in the blob, within `budget`
    /// stored bytes, before frame `limit`, not cached; returns the end frame and the
    /// stored length.
    fn window_from(
        &self,
        idx: u32,
        budget: u64,
        r: &crate::oci::lazy::RemoteData,
        limit: usize,
    ) -> (usize, u64) {
        let mut end = idx as usize + 1;
        let mut len = self.index.frames[idx as usize].stored_len as u64;
        while let Some(next) = self.index.frames.get(end).filter(|_| end < limit) {
            let prev = &self.index.frames[end - 1];
            if len + next.stored_len as u64 > budget
                || next.offset != prev.offset + prev.stored_len as u64
                || self.held(end as u32, r)
            {
                break;
            }
            len += next.stored_len as u64;
            end += 1;
        }
        (end, len)
    }

    /// The frame a large file's data ends in, where a sequential read of it stops
    /// fetching ahead; None for smaller files (whose reads, in a walk of a tree, go on to
    /// the next file, the next frames in pack order) and data ending in a base.
    fn last_frame(&self, data: &FileData) -> Option<u32> {
        if data.size < crate::oci::lazy::WINDOW_MAX || !matches!(self.backing, Backing::Remote(_)) {
            return None;
        }
        let chunk = self.index.chunks.get(data.extents.last()?.chunk as usize)?;
        (chunk.frame != EXTERNAL).then_some(chunk.frame)
    }

    /// Bytes a node's file data occupies in chunks (holes and zero runs excluded).
    pub fn stored_bytes(&self, idx: NodeIdx) -> u64 {
        self.stored.get(idx as usize).copied().unwrap_or(0)
    }

    /// Bytes currently held by the frame cache.
    pub fn cache_weight(&self) -> u64 {
        self.cache.weight()
    }
}

/// The header at the start of an OCI index blob, checked against the blob's length (and
/// the data blob's, when given).
fn index_blob_header(blob: &[u8], data_len: Option<u64>) -> Result<Header> {
    if blob.len() < HEADER_LEN {
        return Err(Error::NotASnapshot);
    }
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&blob[..HEADER_LEN]);
    let header = Header::decode(&hb)?;
    let data_fits = data_len.is_none_or(|d| header.index_offset == HEADER_LEN as u64 + d);
    if !data_fits || header.index_len != (blob.len() - HEADER_LEN) as u64 {
        return Err(Error::corrupt(format!(
            "index blob ({} bytes) and data blob ({} bytes) do not match the header (index at {}+{})",
            blob.len(),
            data_len.map_or_else(|| "?".to_string(), |d| d.to_string()),
            header.index_offset,
            header.index_len
        )));
    }
    if header.index_raw_len > MAX_INDEX_RAW {
        return Err(Error::corrupt("index larger than the 1 GiB limit"));
    }
    Ok(header)
}

/// The decompressed index of `stored`, checked against the header's hash and id.
fn checked_index(header: &Header, stored: &[u8]) -> Result<Vec<u8>> {
    if blake3::hash(stored).as_bytes() != &header.index_hash {
        return Err(Error::corrupt("index checksum mismatch"));
    }
    let raw = decompress(header.index_codec, stored, header.index_raw_len as usize)?;
    if blake3::hash(&raw).as_bytes() != &header.id {
        return Err(Error::corrupt("index does not match the snapshot id"));
    }
    Ok(raw)
}

/// The frames one range fetch from a registry covers, with what checking them needs.
pub(crate) struct WindowPlan {
    first: u32,
    frames: Vec<(Frame, Vec<Chunk>)>,
}

/// A fetched range, checked: each frame's verified bytes in order (ending at the first
/// that fails, which is the last entry), and the buffer they arrived in.
pub(crate) struct Window {
    pub first: u32,
    /// The frame after the last fetched.
    pub end: u32,
    pub frames: Vec<Result<FrameBytes>>,
    pub bytes: Arc<PoolBuf>,
    /// Where the range starts in the data blob.
    pub blob_offset: u64,
    /// How many frames from `first` passed their checks, and how many bytes of
    /// `bytes` they take: what may go into the host cache.
    pub verified: u32,
    pub verified_len: usize,
}

impl WindowPlan {
    /// Frames `first..`, each with its chunks.
    pub fn new(first: u32, frames: Vec<(Frame, Vec<Chunk>)>) -> WindowPlan {
        WindowPlan { first, frames }
    }

    /// (first frame, frame after the last).
    pub fn frames(&self) -> (u32, u32) {
        (self.first, self.first + self.frames.len() as u32)
    }

    /// Verifies (and decompresses) each frame in `bytes`, the stored bytes of the range.
    /// Raw frames are shared from the buffer only when all of it is raw frames: a slice
    /// keeps its whole buffer alive, which the frame cache weighs by the slice.
    pub fn check(self, bytes: Vec<u8>) -> Window {
        let (first, end) = self.frames();
        let base = self.frames.first().map_or(0, |(f, _)| f.offset);
        let share = self.frames.iter().all(|(f, _)| stored_raw(f));
        let bytes = Arc::new(PoolBuf::from(bytes));
        let mut frames = Vec::with_capacity(self.frames.len());
        let mut verified_len = 0;
        for (j, (f, chunks)) in (first..).zip(&self.frames) {
            let at = (f.offset - base) as usize;
            let checked = match bytes.get(at..at + f.stored_len as usize) {
                None => Err(Error::corrupt(format!("frame {j} was not fetched whole"))),
                Some(stored) if share => verify_chunks(j, chunks, stored).map(|()| FrameBytes {
                    buf: bytes.clone(),
                    start: at,
                    len: stored.len(),
                }),
                Some(stored) => decode_frame(j, f, chunks, stored).map(FrameBytes::whole),
            };
            let failed = checked.is_err();
            frames.push(checked);
            if failed {
                break;
            }
            verified_len = at + f.stored_len as usize;
        }
        let verified = frames.iter().take_while(|f| f.is_ok()).count() as u32;
        Window {
            first,
            end,
            frames,
            bytes,
            blob_offset: base.saturating_sub(HEADER_LEN as u64),
            verified,
            verified_len,
        }
    }
}

/// Decompresses one frame's stored bytes and checks every chunk in it against its BLAKE3.
pub(crate) fn decode_frame(
    idx: u32,
    f: &Frame,
    chunks: &[Chunk],
    stored: &[u8],
) -> Result<Vec<u8>> {
    let codec = Codec::from_u8(f.codec)
        .ok_or_else(|| Error::corrupt(format!("frame {idx}: unknown codec {}", f.codec)))?;
    let raw = decompress(codec, stored, f.raw_len as usize).map_err(|e| match e {
        Error::Corrupt(what) => {
            Error::corrupt(format!("frame {idx} at offset {}: {what}", f.offset))
        }
        other => other,
    })?;
    verify_chunks(idx, chunks, &raw)?;
    Ok(raw)
}

/// As `decode_frame`, taking the stored bytes by value: a raw frame is checked in place
/// and returned without a copy.
pub(crate) fn decode_frame_owned(
    idx: u32,
    f: &Frame,
    chunks: &[Chunk],
    stored: Vec<u8>,
) -> Result<Vec<u8>> {
    if stored_raw(f) && stored.len() == f.raw_len as usize {
        verify_chunks(idx, chunks, &stored)?;
        return Ok(stored);
    }
    decode_frame(idx, f, chunks, &stored)
}

/// A frame stored uncompressed: its stored bytes are its raw bytes.
fn stored_raw(f: &Frame) -> bool {
    f.codec == Codec::Raw as u8 && f.stored_len == f.raw_len
}

pub(crate) fn verify_chunks(idx: u32, chunks: &[Chunk], raw: &[u8]) -> Result<()> {
    for c in chunks {
        let bytes = raw
            .get(c.offset as usize..(c.offset + c.len) as usize)
            .ok_or_else(|| Error::corrupt(format!("frame {idx} is shorter than its chunks")))?;
        if blake3::hash(bytes).as_bytes() != &c.id {
            return Err(Error::corrupt(format!(
                "chunk {} in frame {idx} fails its BLAKE3 check",
                &hex(&c.id)[..16]
            )));
        }
    }
    Ok(())
}

/// The name `pull` gives a base it cannot place at the path its snapshot records.
pub fn pulled_base_name(id: &[u8; 32]) -> String {
    format!("hexz-base-{}.hxz", &hex(id)[..16])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
