//! The local cache for snapshots opened from a registry, shared by every process on the
//! host: `$HEXZ_CACHE_DIR` (else `$XDG_CACHE_HOME/hexz`, else `~/.cache/hexz`) + `/oci/`.
//!
//! - `data/<64 hex>`: a sparse copy of one data blob, named by its sha256 digest, holding
//!   the frames fetched so far at their offsets in the blob, as stored (compressed);
//!   `data/<64 hex>.map`: one byte per frame, 1 once the frame's bytes are written.
//!   Content-addressed by blob: every snapshot of a commit chain reads its base's
//!   chunks from the base's blob, so they share these entries, and so do all sandboxes
//!   and processes on the host. A frame read from here is checked like one from the
//!   registry (every chunk against its BLAKE3); one that fails is marked absent and
//!   fetched again.
//! - `blobs/sha256/<64 hex>`: small blobs (manifests, snapshot indexes), checked against
//!   their sha256 on every read.
//! - `access/<64 hex>`: the frames a previous run read from a data blob, in order, for
//!   prefetch.
//!
//! Frames are written with `pwrite` before their map byte, so a reader trusts only whole
//! frames (and verifies them anyway); processes need no lock to read or add. Size is
//! bounded (`HEXZ_OCI_CACHE_BYTES`, default 10 GiB, counted in allocated blocks): after
//! every 1/16 of the bound added, one process (holding `lock` with `flock`) removes the
//! least recently used entries (by mtime, which opening refreshes) down to 90 % of it.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::bufpool::PoolBuf;
use crate::error::{Error, Result};

/// Default bound on the cache's bytes.
pub const DEFAULT_LIMIT: u64 = 10 << 30;
/// A hit refreshes an entry's mtime (its LRU age) at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// An access log keeps at most this many frames.
pub const MAX_ACCESS_LOG: usize = 1 << 20;
/// Temporary files older than this are leftovers of a crash.
const STALE_TMP: Duration = Duration::from_secs(3600);

pub struct HostCache {
    root: PathBuf,
    limit: u64,
    added: AtomicU64,
    seq: AtomicU64,
    evicting: std::sync::Mutex<()>,
}

/// What `cache info` prints.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Usage {
    /// Data blobs with a cached copy, and the bytes those copies occupy on disk.
    pub data_blobs: u64,
    pub data_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub limit: u64,
}

impl HostCache {
    /// The host's cache, shared by the whole process.
    pub fn shared() -> Result<Arc<HostCache>> {
        static SHARED: OnceLock<Arc<HostCache>> = OnceLock::new();
        if let Some(c) = SHARED.get() {
            return Ok(c.clone());
        }
        let limit = match std::env::var("HEXZ_OCI_CACHE_BYTES") {
            Ok(v) => parse_size(&v).ok_or_else(|| {
                Error::Invalid(format!(
                    "HEXZ_OCI_CACHE_BYTES={v} is not a size (bytes, or with K, M, G, T)"
                ))
            })?,
            Err(_) => DEFAULT_LIMIT,
        };
        let c = Arc::new(HostCache::open(&default_root(), limit)?);
        Ok(SHARED.get_or_init(|| c).clone())
    }

    pub fn open(root: &Path, limit: u64) -> Result<HostCache> {
        for d in ["data", "blobs/sha256", "access", "tags"] {
            fs::create_dir_all(root.join(d)).map_err(|e| {
                Error::io(root.join(d), e).at("the registry cache (set HEXZ_CACHE_DIR to move it)")
            })?;
        }
        Ok(HostCache {
            root: root.to_path_buf(),
            limit,
            added: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            evicting: std::sync::Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        Some(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// The cached copy of a data blob of `size` bytes with `frames` frames, created
    /// (sparse) if absent. None if the cache cannot hold it.
    pub fn data(self: &Arc<Self>, digest: &str, size: u64, frames: usize) -> Option<DataCache> {
        self.data_used(digest, size, frames, true)
    }

    /// As [`Self::data`]; `used` marks it recently used (for eviction).
    fn data_used(
        self: &Arc<Self>,
        digest: &str,
        size: u64,
        frames: usize,
        used: bool,
    ) -> Option<DataCache> {
        let path = self.root.join("data").join(hex_of(digest)?);
        let open = |p: &Path, len: u64| -> std::io::Result<File> {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)?;
            if f.metadata()?.len() != len {
                f.set_len(len)?;
            }
            Ok(f)
        };
        let res = (|| {
            let data = open(&path, size)?;
            let map = open(&path.with_extension("map"), frames as u64)?;
            if used {
                let _ = data.set_modified(SystemTime::now());
            }
            Ok::<_, std::io::Error>((data, map))
        })();
        match res {
            Ok((data, map)) => Some(DataCache {
                cache: self.clone(),
                files: Arc::new(DataFiles {
                    direct: File::options()
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(&path)
                        .ok(),
                    data,
                    map,
                }),
                frames,
            }),
            Err(e) => {
                tracing::warn!(
                    "registry cache: {}: {e}; reading without the cache",
                    path.display()
                );
                None
            }
        }
    }

    /// A cached blob, checked against its digest.
    pub fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let mut f = File::open(&path).ok()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        if super::client::sha256_digest(&bytes) != digest {
            tracing::warn!(
                "registry cache: blob {} is damaged; removing it and fetching it again",
                super::client::short(digest)
            );
            let _ = fs::remove_file(&path);
            return None;
        }
        touch(&f);
        Some(bytes)
    }

    /// Adds a blob whose digest the caller has verified.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) {
        if let Some(path) = self.blob_path(digest) {
            if !path.exists() && self.write_atomic(&path, bytes).is_ok() {
                self.added(bytes.len() as u64);
            }
        }
    }

    /// Records which index blob describes a cached data blob, so that other snapshots can
    /// find their chunks in it ([`super::share`]).
    pub fn link_index(&self, data_digest: &str, index_digest: &str) {
        let Some(h) = hex_of(data_digest) else { return };
        let path = self.root.join("data").join(format!("{h}.idx"));
        if fs::read_to_string(&path).is_ok_and(|t| t.trim() == index_digest) {
            return;
        }
        let _ = self.write_atomic(&path, index_digest.as_bytes());
    }

    /// Cached data blobs not in `except` that name their index blob, most recently used
    /// first: (data digest, index digest).
    pub fn linked(&self, except: &[String]) -> Vec<(String, String)> {
        let Ok(rd) = fs::read_dir(self.root.join("data")) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "idx") {
                continue;
            }
            let Some(h) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let digest = format!("sha256:{h}");
            if except.contains(&digest) || hex_of(&digest).is_none() {
                continue;
            }
            let Ok(meta) = fs::metadata(path.with_extension("")) else {
                let _ = fs::remove_file(&path); // its data blob was evicted
                continue;
            };
            let Ok(index) = fs::read_to_string(&path) else {
                continue;
            };
            let index = index.trim().to_string();
            if hex_of(&index).is_some() {
                found.push((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    digest,
                    index,
                ));
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.into_iter().map(|(_, d, i)| (d, i)).collect()
    }

    /// The cached copy of a data blob of `frames` frames if the cache already has one
    /// (never creates it, and does not count as a use: [`DataCache::touch`] does).
    pub fn existing_data(self: &Arc<Self>, digest: &str, frames: usize) -> Option<DataCache> {
        let path = self.root.join("data").join(hex_of(digest)?);
        let size = fs::metadata(&path).ok()?.len();
        let map = fs::metadata(path.with_extension("map")).ok()?;
        if map.len() != frames as u64 {
            return None;
        }
        self.data_used(digest, size, frames, false)
    }

    /// The manifest digest `reference` (a tag) resolved to last time: a hint only, for
    /// opening that manifest's snapshot while the registry is asked again.
    pub fn tag_hint(&self, reference: &str) -> Option<String> {
        let key = super::client::sha256_digest(reference.as_bytes());
        let text = fs::read_to_string(self.root.join("tags").join(hex_of(&key)?)).ok()?;
        let digest = text.trim();
        hex_of(digest)?;
        Some(digest.to_string())
    }

    pub fn set_tag_hint(&self, reference: &str, digest: &str) {
        if self.tag_hint(reference).as_deref() == Some(digest) {
            return;
        }
        let key = super::client::sha256_digest(reference.as_bytes());
        if let Some(h) = hex_of(&key) {
            let _ = self.write_atomic(&self.root.join("tags").join(h), digest.as_bytes());
        }
    }

    /// The frames a previous run read from a data blob, in order.
    pub fn access_log(&self, data_digest: &str) -> Vec<u32> {
        let Some(h) = hex_of(data_digest) else {
            return Vec::new();
        };
        let Ok(text) = fs::read_to_string(self.root.join("access").join(h)) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(MAX_ACCESS_LOG)
            .collect()
    }

    pub fn save_access_log(&self, data_digest: &str, frames: &[u32]) {
        let Some(h) = hex_of(data_digest) else {
            return;
        };
        let mut text = String::with_capacity(frames.len() * 6);
        for f in frames {
            text.push_str(&f.to_string());
            text.push('\n');
        }
        let _ = self.write_atomic(&self.root.join("access").join(h), text.as_bytes());
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".tmp.{}.{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    pub(crate) fn added(&self, n: u64) {
        let step = (self.limit / 16).max(64 << 10);
        if self.added.fetch_add(n, Ordering::Relaxed) + n >= step {
            self.added.store(0, Ordering::Relaxed);
            if let Err(e) = self.evict(self.limit) {
                tracing::warn!("registry cache: eviction failed: {e}");
            }
        }
    }

    /// Deletes least-recently-used entries until the cache holds at most 90 % of `limit`
    /// (nothing if it is within `limit`). Skips if another process is evicting.
    pub fn evict(&self, limit: u64) -> Result<u64> {
        self.evict_down(limit, limit / 10 * 9)
    }

    /// Deletes least-recently-used entries down to `target` bytes if the cache holds
    /// more than `limit`.
    pub fn evict_down(&self, limit: u64, target: u64) -> Result<u64> {
        let Ok(_one_thread) = self.evicting.try_lock() else {
            return Ok(0);
        };
        let lock_path = self.root.join("lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // SAFETY: flock on a file descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(0);
        }
        let mut entries = Vec::new();
        let mut total = 0u64;
        let now = SystemTime::now();
        for top in ["data", "blobs/sha256"] {
            walk(&self.root.join(top), &mut |path, meta| {
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(".tmp.") {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TMP {
                        let _ = fs::remove_file(path);
                    }
                    return;
                }
                if path.extension().is_some_and(|e| e == "map" || e == "idx") {
                    return; // removed with its data file
                }
                let used = allocated(meta);
                total += used;
                entries.push((mtime, used, path.to_path_buf()));
            });
        }
        if total <= limit {
            return Ok(0);
        }
        entries.sort();
        let mut freed = 0u64;
        for (_, len, path) in entries {
            if total - freed <= target {
                break;
            }
            // The map first: without it no process trusts the data file.
            let _ = fs::remove_file(path.with_extension("map"));
            let _ = fs::remove_file(path.with_extension("idx"));
            if fs::remove_file(&path).is_ok() {
                freed += len;
            }
        }
        tracing::info!(
            "registry cache: evicted {freed} bytes of least recently used entries (bound {limit})"
        );
        Ok(freed)
    }

    pub fn usage(&self) -> Usage {
        let mut u = Usage {
            limit: self.limit,
            ..Usage::default()
        };
        walk(&self.root.join("data"), &mut |p, m| {
            if !is_tmp(p) && p.extension().is_none() {
                u.data_blobs += 1;
                u.data_bytes += allocated(m);
            }
        });
        walk(&self.root.join("blobs/sha256"), &mut |p, m| {
            if !is_tmp(p) {
                u.blobs += 1;
                u.blob_bytes += allocated(m);
            }
        });
        u
    }
}

/// The 64 hex digits of a valid `sha256:` digest: the name of its cache entries.
fn hex_of(digest: &str) -> Option<&str> {
    super::reference::check_digest(digest).ok()?;
    digest.strip_prefix("sha256:")
}

/// The cached copy of one data blob (see the module comment).
#[derive(Clone)]
pub struct DataCache {
    cache: Arc<HostCache>,
    files: Arc<DataFiles>,
    frames: usize,
}

struct DataFiles {
    data: File,
    /// The same file opened with O_DIRECT, for the block-aligned middle of large writes
    /// (None where the file system refuses it).
    direct: Option<File>,
    map: File,
}

/// Direct I/O granularity.
const BLOCK: u64 = 4096;

/// A block-aligned buffer the writer thread reuses for O_DIRECT writes.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

impl Aligned {
    fn layout(cap: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(cap, BLOCK as usize).ok()
    }

    fn with_capacity(cap: usize) -> Option<Aligned> {
        let layout = Aligned::layout(cap)?;
        // SAFETY: the layout has a non-zero size (cap ≥ BLOCK).
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        Some(Aligned { ptr, cap })
    }

    /// The first `len` bytes, filled from `src`.
    fn fill(&mut self, src: &[u8]) -> &[u8] {
        let len = src.len().min(self.cap);
        // SAFETY: `ptr` is valid for `cap` bytes and `len <= cap`; `src` does not alias it.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr(), len);
            std::slice::from_raw_parts(self.ptr.as_ptr(), len)
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        if let Some(layout) = Aligned::layout(self.cap) {
            // SAFETY: allocated in `with_capacity` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

// SAFETY: `Aligned` owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for Aligned {}

impl DataFiles {
    /// Writes `bytes` at `offset`: the block-aligned middle with O_DIRECT (new page-cache
    /// pages cost more than the network here), the ends through the page cache.
    fn write(&self, bytes: &[u8], offset: u64, buf: &mut Option<Aligned>) -> std::io::Result<()> {
        let end = offset + bytes.len() as u64;
        let (a0, a1) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        let (Some(direct), true) = (&self.direct, a1 > a0 && a1 - a0 >= 16 * BLOCK) else {
            return self.data.write_all_at(bytes, offset);
        };
        let mid = &bytes[(a0 - offset) as usize..(a1 - offset) as usize];
        if buf.as_ref().is_none_or(|b| b.cap < mid.len()) {
            *buf = Aligned::with_capacity(mid.len().max(8 << 20));
        }
        let Some(b) = buf.as_mut() else {
            return self.data.write_all_at(bytes, offset);
        };
        if direct.write_all_at(b.fill(mid), a0).is_err() {
            return self.data.write_all_at(bytes, offset);
        }
        self.data
            .write_all_at(&bytes[..(a0 - offset) as usize], offset)?;
        self.data.write_all_at(&bytes[(a1 - offset) as usize..], a1)
    }
}

/// A write for the cache's writer thread.
enum Job {
    Write {
        cache: Arc<HostCache>,
        files: Arc<DataFiles>,
        first: u32,
        n: u32,
        offset: u64,
        /// The first `len` bytes are to be written.
        bytes: Arc<PoolBuf>,
        len: usize,
    },
    Flush(crossbeam_channel::Sender<()>),
}

/// Writes queued at once, at most (each up to the 8 MiB read-ahead window).
const QUEUE: usize = 16;

/// The process's cache writer: readers hand it verified frames and go on, so a cold
/// sequential read costs one copy into the page cache on another core, not on its path.
fn writer() -> &'static crossbeam_channel::Sender<Job> {
    static WRITER: OnceLock<crossbeam_channel::Sender<Job>> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        let _ = std::thread::Builder::new()
            .name("hexz-cache-writer".into())
            .spawn(move || {
                let mut aligned: Option<Aligned> = None;
                for job in rx {
                    match job {
                        Job::Write {
                            cache,
                            files,
                            first,
                            n,
                            offset,
                            bytes,
                            len,
                        } => {
                            let bytes = &bytes[..len.min(bytes.len())];
                            if files.write(bytes, offset, &mut aligned).is_ok()
                                && files
                                    .map
                                    .write_all_at(&vec![1u8; n as usize], first as u64)
                                    .is_ok()
                            {
                                cache.added(bytes.len() as u64);
                            }
                        }
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        tx
    })
}

/// Waits (at most `limit`) until the writes queued so far are written.
pub fn flush(limit: Duration) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if writer().send_timeout(Job::Flush(tx), limit).is_ok() {
        let _ = rx.recv_timeout(limit);
    }
}

impl DataCache {
    /// Whether frame `idx` is marked present (by any process).
    pub fn has(&self, idx: u32) -> bool {
        let mut b = [0u8];
        (idx as usize) < self.frames
            && self.files.map.read_exact_at(&mut b, idx as u64).is_ok()
            && b[0] == 1
    }

    /// Marks the blob recently used (at most every few seconds).
    pub fn touch(&self) {
        touch(&self.files.data);
    }

    /// Which frames are marked present, read in one go.
    pub fn present(&self) -> Vec<bool> {
        let mut map = vec![0u8; self.frames];
        if self.files.map.read_exact_at(&mut map, 0).is_err() {
            return Vec::new();
        }
        map.into_iter().map(|b| b == 1).collect()
    }

    /// The stored bytes of a present frame at `offset` in the blob (unverified).
    pub fn read(&self, idx: u32, offset: u64, len: usize) -> Option<Vec<u8>> {
        if !self.has(idx) {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.files.data.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// Queues the verified frames of a checked window for writing.
    pub(crate) fn write_window(&self, w: &crate::snapshot::reader::Window) {
        if w.verified > 0 {
            self.write(
                w.first,
                w.verified,
                w.blob_offset,
                w.bytes.clone(),
                w.verified_len,
            );
        }
    }

    /// Queues verified frames `first..first + n`, whose stored bytes start at `offset`,
    /// for writing; dropped (fetched again next time) if the writer is far behind.
    pub fn write(&self, first: u32, n: u32, offset: u64, bytes: Arc<PoolBuf>, len: usize) {
        if n == 0 || first as usize + n as usize > self.frames {
            return;
        }
        let job = Job::Write {
            cache: self.cache.clone(),
            files: self.files.clone(),
            first,
            n,
            offset,
            bytes,
            len,
        };
        if writer().try_send(job).is_err() {
            tracing::debug!("registry cache: writer busy, frames {first}+{n} not cached");
        }
    }

    /// Marks a frame absent (its bytes failed verification).
    pub fn forget(&self, idx: u32) {
        let _ = self.files.map.write_all_at(&[0], idx as u64);
    }
}

/// Bytes a file occupies on disk (a sparse cache file counts only what it holds).
fn allocated(m: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    m.blocks() * 512
}

fn is_tmp(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".tmp."))
}

/// Calls `f` on every regular file under `dir` (two levels at most).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            if let Ok(sub) = fs::read_dir(e.path()) {
                for e2 in sub.flatten() {
                    if let Ok(m2) = e2.metadata() {
                        if m2.is_file() {
                            f(&e2.path(), &m2);
                        }
                    }
                }
            }
        } else if m.is_file() {
            f(&e.path(), &m);
        }
    }
}

/// Marks an entry used (its mtime is its LRU age), at most once a minute.
fn touch(f: &File) {
    if let Ok(m) = f.metadata() {
        let old = m
            .modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > TOUCH_EVERY);
        if old {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}

/// `$HEXZ_CACHE_DIR/oci`, else `$XDG_CACHE_HOME/hexz/oci`, else `~/.cache/hexz/oci`.
pub fn default_root() -> PathBuf {
    crate::vm::image::cache_dir().join("oci")
}

/// `1073741824`, `512M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_present_only_once_written_and_can_be_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Arc::new(HostCache::open(dir.path(), 1 << 30).expect("open"));
        let digest = format!("sha256:{}", "ab".repeat(32));
        let d = c.data(&digest, 1 << 20, 8).expect("data");
        assert!(!d.has(3));
        assert!(d.read(3, 4096, 100).is_none());
        d.write(3, 2, 4096, Arc::new(vec![9u8; 200].into()), 200);
        flush(Duration::from_secs(5));
        assert!(d.has(3) && d.has(4) && !d.has(5));
        assert_eq!(d.read(3, 4096, 100), Some(vec![9u8; 100]));
        // Another handle (another process) sees the same frames.
        let d2 = c.data(&digest, 1 << 20, 8).expect("data");
        assert!(d2.has(4));
        d2.forget(4);
        assert!(!d.has(4));
        assert!(!d.has(100), "out of range is absent");
    }

    #[test]
    fn large_unaligned_writes_read_back_exactly() {
        // The block-aligned middle goes through O_DIRECT, the ends through the page cache.
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Arc::new(HostCache::open(dir.path(), 1 << 30).expect("open"));
        let digest = format!("sha256:{}", "cd".repeat(32));
        let d = c.data(&digest, 4 << 20, 4).expect("data");
        let bytes: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        let other: Vec<u8> = (0..500_001u32).map(|i| (i * 13 % 241) as u8).collect();
        d.write(1, 1, 12_345, Arc::new(bytes.clone().into()), bytes.len());
        d.write(
            2,
            1,
            12_345 + bytes.len() as u64,
            Arc::new(other.clone().into()),
            other.len(),
        );
        flush(Duration::from_secs(5));
        assert_eq!(d.read(1, 12_345, bytes.len()), Some(bytes.clone()));
        assert_eq!(
            d.read(2, 12_345 + bytes.len() as u64, other.len()),
            Some(other)
        );
        assert!(d.read(0, 0, 100).is_none());
    }

    #[test]
    fn eviction_removes_the_least_recently_used_down_to_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = HostCache::open(dir.path(), 1 << 30).expect("open");
        let mut digests = Vec::new();
        for i in 0..10u8 {
            let bytes = vec![i; 40_960];
            let d = crate::oci::client::sha256_digest(&bytes);
            c.put_blob(&d, &bytes);
            let f = File::options()
                .write(true)
                .open(c.blob_path(&d).expect("path"))
                .expect("open");
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i as u64))
                .expect("mtime");
            digests.push(d);
        }
        let freed = c.evict(204_800).expect("evict");
        assert_eq!(freed, 245_760, "down to 90 % of 204,800 bytes");
        for (i, d) in digests.iter().enumerate() {
            assert_eq!(c.blob(d).is_some(), i >= 6, "entry {i}");
        }
        assert_eq!(c.usage().blob_bytes, 163_840);
    }

    #[test]
    fn damaged_blobs_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = HostCache::open(dir.path(), 1 << 30).expect("open");
        let d = crate::oci::client::sha256_digest(b"hello");
        c.put_blob(&d, b"hello");
        assert_eq!(c.blob(&d).as_deref(), Some(&b"hello"[..]));
        fs::write(c.blob_path(&d).expect("path"), b"jello").expect("write");
        assert!(c.blob(&d).is_none());
        assert!(!c.blob_path(&d).expect("path").exists());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
