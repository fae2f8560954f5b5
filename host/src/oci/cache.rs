//! The local cache for snapshots opened from a registry, shared by every process on the
//! host: `$HEXZ_CACHE_DIR` (else `$XDG_CACHE_HOME/hexz`, else `~/.cache/hexz`) + `/oci/`.
//!
//! - `chunks/<2 hex>/<64 hex>`: one file per chunk, named by its BLAKE3 and holding its
//!   uncompressed bytes. Content-addressed: snapshots that share a chunk share its entry,
//!   whichever frame or blob it came from. Checked against its name on every read; an
//!   entry that fails is deleted and the chunk fetched again.
//! - `blobs/sha256/<64 hex>`: small blobs (snapshot indexes), checked against their
//!   sha256 on every read.
//! - `access/<64 hex>`: the frames a previous run read from a data blob, in order, for
//!   prefetch.
//!
//! Entries are written to a temporary name and renamed, so a reader sees a whole entry
//! or none, and processes never need a lock to read or add. Size is bounded
//! (`HEXZ_OCI_CACHE_BYTES`, default 10 GiB): after every 1/16 of the bound added, one
//! process (holding `lock` with `flock`) deletes the least recently used entries (by
//! mtime, which a hit refreshes) down to 90 % of the bound.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::snapshot::format::ChunkId;
use crate::snapshot::reader::hex;

/// Default bound on the cache's bytes.
pub const DEFAULT_LIMIT: u64 = 10 << 30;
/// A hit refreshes an entry's mtime (its LRU age) at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Temporary files older than this are leftovers of a crash.
const STALE_TMP: Duration = Duration::from_secs(3600);

pub struct ChunkCache {
    root: PathBuf,
    limit: u64,
    added: AtomicU64,
    seq: AtomicU64,
    evicting: std::sync::Mutex<()>,
}

/// What `cache info` prints.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Usage {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub limit: u64,
}

impl ChunkCache {
    /// The host's cache, shared by the whole process.
    pub fn shared() -> Result<Arc<ChunkCache>> {
        static SHARED: OnceLock<Arc<ChunkCache>> = OnceLock::new();
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
        let c = Arc::new(ChunkCache::open(&default_root(), limit)?);
        Ok(SHARED.get_or_init(|| c).clone())
    }

    pub fn open(root: &Path, limit: u64) -> Result<ChunkCache> {
        for d in ["chunks", "blobs/sha256", "access"] {
            fs::create_dir_all(root.join(d)).map_err(|e| {
                Error::io(root.join(d), e).at("the registry cache (set HEXZ_CACHE_DIR to move it)")
            })?;
        }
        Ok(ChunkCache {
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

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = hex(id);
        self.root.join("chunks").join(&h[..2]).join(h)
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let h = digest.strip_prefix("sha256:")?;
        (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.root.join("blobs/sha256").join(h))
    }

    /// Whether an entry for the chunk exists (not verified).
    pub fn has(&self, id: &ChunkId) -> bool {
        self.chunk_path(id).exists()
    }

    /// Fills `out` (exactly the chunk's length) from the cache; false if absent or bad.
    pub fn get(&self, id: &ChunkId, out: &mut [u8]) -> bool {
        let path = self.chunk_path(id);
        let Ok(mut f) = File::open(&path) else {
            return false;
        };
        let ok = match f.metadata() {
            Ok(m) if m.len() == out.len() as u64 => {
                f.read_exact(out).is_ok() && blake3::hash(out).as_bytes() == id
            }
            _ => false,
        };
        if !ok {
            tracing::warn!(
                "registry cache: chunk {} is damaged; removing it and fetching it again",
                &hex(id)[..16]
            );
            let _ = fs::remove_file(&path);
            return false;
        }
        touch(&f);
        true
    }

    /// Adds a chunk whose bytes the caller has verified.
    pub fn put(&self, id: &ChunkId, bytes: &[u8]) {
        let path = self.chunk_path(id);
        if path.exists() {
            return;
        }
        if let Some(dir) = path.parent() {
            let _ = fs::create_dir(dir);
        }
        if self.write_atomic(&path, bytes).is_ok() {
            self.added(bytes.len() as u64);
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

    /// The frames a previous run read from a data blob, in order.
    pub fn access_log(&self, data_digest: &str) -> Vec<u32> {
        let Some(h) = data_digest.strip_prefix("sha256:") else {
            return Vec::new();
        };
        let Ok(text) = fs::read_to_string(self.root.join("access").join(h)) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(1 << 22)
            .collect()
    }

    pub fn save_access_log(&self, data_digest: &str, frames: &[u32]) {
        let Some(h) = data_digest.strip_prefix("sha256:") else {
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

    fn added(self: &ChunkCache, n: u64) {
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
        for top in ["chunks", "blobs/sha256"] {
            walk(&self.root.join(top), &mut |path, meta| {
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(".tmp.") {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TMP {
                        let _ = fs::remove_file(path);
                    }
                    return;
                }
                total += meta.len();
                entries.push((mtime, meta.len(), path.to_path_buf()));
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
        walk(&self.root.join("chunks"), &mut |p, m| {
            if !is_tmp(p) {
                u.chunks += 1;
                u.chunk_bytes += m.len();
            }
        });
        walk(&self.root.join("blobs/sha256"), &mut |p, m| {
            if !is_tmp(p) {
                u.blobs += 1;
                u.blob_bytes += m.len();
            }
        });
        u
    }
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
    fn entries_are_verified_and_damaged_ones_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        let bytes = vec![7u8; 1000];
        let id = *blake3::hash(&bytes).as_bytes();
        let mut out = vec![0u8; 1000];
        assert!(!c.get(&id, &mut out));
        c.put(&id, &bytes);
        assert!(c.get(&id, &mut out));
        assert_eq!(out, bytes);
        // Damage the entry: it is detected, removed, and reported as a miss.
        let p = c.chunk_path(&id);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        fs::write(&p, &bad).expect("write");
        assert!(!c.get(&id, &mut out));
        assert!(!p.exists());
    }

    #[test]
    fn eviction_removes_the_least_recently_used_down_to_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ChunkCache::open(dir.path(), 1 << 30).expect("open");
        let mut ids = Vec::new();
        for i in 0..10u8 {
            let bytes = vec![i; 10_000];
            let id = *blake3::hash(&bytes).as_bytes();
            c.put(&id, &bytes);
            let f = File::options()
                .write(true)
                .open(c.chunk_path(&id))
                .expect("open");
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i as u64))
                .expect("mtime");
            ids.push(id);
        }
        let freed = c.evict(50_000).expect("evict");
        assert_eq!(freed, 60_000, "down to 90 % of 50,000 bytes");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(c.has(id), i >= 6, "entry {i}");
        }
        assert_eq!(c.usage().chunk_bytes, 40_000);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
    }
}
