//! Opening a snapshot straight from a registry: the manifest and the small index blobs
//! are fetched (index blobs through the host cache), frames only when first read.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::cache::{DataCache, HostCache, MAX_ACCESS_LOG};
use super::client::{short, Registry, Repo, Retry};
use super::manifest::{Layer, Manifest};
use super::reference::Reference;
use super::share::Shared;
use crate::error::{Error, Result};
use crate::snapshot::format::{Chunk, Frame, HEADER_LEN};
use crate::snapshot::reader::{decode_frame_owned, Window, WindowPlan};
use crate::snapshot::Snapshot;

/// Sequential read-ahead grows from this many stored bytes...
const WINDOW_MIN: u64 = 256 << 10;
/// ...doubling up to this.
pub const WINDOW_MAX: u64 = 8 << 20;
/// Windows fetched ahead of a stream at once.
pub const AHEAD_DEPTH: usize = 2;
/// The most a stream through one large file asks for in one range request; its windows
/// are read off that one response as the stream reaches them.
const FEED_MAX: u64 = 128 << 20;
/// Streams through large files read from their own range request at once, at most.
const MAX_FEEDS: usize = 4;
/// A feed no window was asked of for this long lets its response go.
const FEED_IDLE: Duration = Duration::from_secs(5);
/// Windows a stream keeps in the frame cache behind the one it reads.
pub const KEEP_BEHIND: usize = 2;

/// The data blob of one snapshot in a registry.
pub struct RemoteData {
    reg: Arc<Registry>,
    repo: String,
    /// The manifest this blob was opened through, pinned by digest.
    reference: Reference,
    digest: String,
    size: u64,
    /// The index blob's descriptor (digest, size).
    index: (String, u64),
    cache: Arc<HostCache>,
    /// This blob's copy in the host cache (set once the frame count is known).
    data: OnceLock<Option<DataCache>>,
    /// Fetches of the next windows running ahead of a sequential reader, in order.
    ahead: Mutex<VecDeque<Ahead>>,
    /// The range requests the windows of streams through large files are read from,
    /// oldest first.
    feeds: Mutex<Vec<Feed>>,
    /// The last windows a stream took (first frame, frame after the last), oldest first.
    behind: Mutex<VecDeque<(u32, u32)>>,
    /// (frame where the last fetch ended, current read-ahead window)
    seq: Mutex<(u32, u64)>,
    log: Mutex<AccessLog>,
    /// Set when closed: the prefetch thread (which holds no reference) stops.
    closed: Arc<AtomicBool>,
    /// Bytes and requests fetched from the registry (logged when closed).
    fetched: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Chunks other cached blobs hold ([`Shared`]): built in the background at open,
    /// waited for by the first frame the cache lacks.
    shared: Arc<Sharing>,
    /// Bytes of frames put together from other blobs instead of fetched.
    borrowed: Arc<AtomicU64>,
    /// Frames being put together ahead of a sequential reader, in order.
    assembling: Mutex<VecDeque<Assembly>>,
    /// The frame after the last one put together for a reader (a run continues there).
    last_borrowed: AtomicU64,
}

/// What [`RemoteData::borrow`] put together: the frame asked for, others put together
/// with it (frame, bytes), and whether the frame continues a run read in order.
pub(crate) struct Borrowed {
    pub mine: Vec<u8>,
    pub others: Vec<(u32, Vec<u8>)>,
    pub run: bool,
}

/// The map of chunks other cached blobs hold: being built, then built (None: nothing
/// to share, or sharing is off).
#[derive(Default)]
struct Sharing {
    built: OnceLock<Option<Arc<Shared>>>,
    building: Mutex<Option<std::thread::JoinHandle<Option<Shared>>>>,
}

impl Sharing {
    /// Starts building, in the background, the map for a snapshot chain (whose own blobs
    /// are not looked into): one map for every layer of it. `HEXZ_OCI_SHARE=0` turns
    /// sharing off.
    fn start(cache: &Arc<HostCache>, chain: &[Layer]) -> Arc<Sharing> {
        let sharing = Arc::new(Sharing::default());
        if std::env::var("HEXZ_OCI_SHARE").is_ok_and(|v| v == "0") {
            let _ = sharing.built.set(None);
            return sharing;
        }
        let cache = cache.clone();
        let skip: Vec<String> = chain.iter().map(|l| l.data.digest.clone()).collect();
        match std::thread::Builder::new()
            .name("hexz-share".into())
            .spawn(move || Shared::build(&cache, &skip))
        {
            Ok(h) => *sharing.building.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
            Err(_) => {
                let _ = sharing.built.set(None);
            }
        }
        sharing
    }

    /// The map, waiting for it to be built.
    fn get(&self) -> Option<&Arc<Shared>> {
        self.built
            .get_or_init(|| {
                let h = self
                    .building
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                h.and_then(|h| h.join().ok().flatten()).map(Arc::new)
            })
            .as_ref()
    }

    /// The map if it is built (never waits).
    fn ready(&self) -> Option<&Arc<Shared>> {
        self.built.get().and_then(Option::as_ref)
    }
}

/// Frames put together on another thread: (first frame, frame after the last, thread).
type Assembly = (u32, u32, std::thread::JoinHandle<Vec<Option<Vec<u8>>>>);

/// A fetch running ahead: (first frame, frame after the last, where its checked
/// window arrives).
type Ahead = (u32, u32, mpsc::Receiver<Result<Window>>);

/// One range request being read window by window, by its own thread: where the next
/// window must start to be read from it, where it ends, and where windows are asked.
struct Feed {
    pos: u64,
    end: u64,
    jobs: mpsc::Sender<FeedJob>,
}

/// A window asked of a [`Feed`]: its frames, its bytes in the blob, where to send it.
struct FeedJob {
    plan: WindowPlan,
    offset: u64,
    len: u64,
    done: mpsc::SyncSender<Result<Window>>,
}

/// What a feed's thread needs of the blob (it holds no `RemoteData`, so closing is
/// never delayed by a window nobody reads).
struct FeedSource {
    reg: Arc<Registry>,
    repo: String,
    digest: String,
    size: u64,
    fetched: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl FeedSource {
    /// Reads the windows asked on `jobs`, which start at `start` and follow each other,
    /// from one range request of `start..end`, and checks each on its own thread. The
    /// request is made when the first window is asked. An error (the request, or a body
    /// cut short) goes to the window being read, whose reader then fetches it itself
    /// with retries; the feed ends there, and so do windows asked after it (fetched the
    /// same way), and the next window asked of the stream starts a new feed.
    fn run(self, start: u64, end: u64, jobs: mpsc::Receiver<FeedJob>) {
        let mut body: Option<Box<dyn std::io::Read + Send + Sync>> = None;
        let mut pos = start;
        while let Ok(job) = jobs.recv_timeout(FEED_IDLE) {
            let bytes = if job.offset != pos || job.offset + job.len > end {
                Err(Error::Remote("read-ahead out of order".into()))
            } else {
                self.read(&mut body, start, end, job.len)
            };
            let ok = bytes.is_ok();
            let FeedJob {
                plan, len, done, ..
            } = job;
            let check = move || {
                let _ = done.send(bytes.map(|b| plan.check(b)));
            };
            if ok {
                pos += len;
                self.fetched.fetch_add(len, Ordering::Relaxed);
            }
            if !ok || pos >= end {
                // Nothing more to read: checked here.
                check();
                return;
            }
            // Checked beside the next window's arrival (if spawning fails, the reader
            // finds the window missing and fetches it itself).
            let _ = std::thread::Builder::new()
                .name("hexz-check".into())
                .spawn(check);
        }
    }

    fn read(
        &self,
        body: &mut Option<Box<dyn std::io::Read + Send + Sync>>,
        start: u64,
        end: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let b = match body {
            Some(b) => b,
            None => {
                within_blob(&self.digest, self.size, start, end - start)?;
                let repo = Repo::new(&self.reg, &self.repo);
                self.requests.fetch_add(1, Ordering::Relaxed);
                body.insert(repo.blob_stream(&self.digest, start, end - start, Retry::READ)?)
            }
        };
        let mut buf = crate::bufpool::take(len as usize);
        b.read_exact(&mut buf).map_err(|e| {
            Error::Remote(format!(
                "registry {}: blob {} cut short in a read ahead: {e}",
                self.reg.host(),
                short(&self.digest)
            ))
        })?;
        Ok(buf)
    }
}

#[derive(Default)]
struct AccessLog {
    order: Vec<u32>,
    /// The log as this run found it (loaded at the first save).
    previous: Option<Vec<u32>>,
    seen: HashSet<u32>,
    saved_len: usize,
    saved_at: Option<Instant>,
}

impl RemoteData {
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The index blob's digest and size.
    pub fn index_blob(&self) -> (&str, u64) {
        (&self.index.0, self.index.1)
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.reg
    }

    /// `len` bytes of the blob from `offset`; an unreachable registry is an error
    /// (EIO to a reader) after a short retry, and the next read tries again.
    pub fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let bytes = fetch_range(&self.reg, &self.repo, &self.digest, self.size, offset, len)?;
        self.fetched.fetch_add(len, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.get()
    }

    /// Frame `idx` put together from chunks other cached blobs hold, if they hold all:
    /// taken from a thread that put it together ahead, or put together here. Also the
    /// other frames that thread put together (for the frame cache), and whether `idx`
    /// continues a run of frames read in order.
    pub(crate) fn borrow(&self, idx: u32, f: &Frame, chunks: &[Chunk]) -> Option<Borrowed> {
        let shared = self.shared()?;
        let run = self.last_borrowed.swap(idx as u64 + 1, Ordering::Relaxed) == idx as u64;
        let mut others = Vec::new();
        let mut mine = None;
        if let Some((first, frames)) = self.take_assembled(idx) {
            for (j, b) in (first..).zip(frames) {
                match b {
                    Some(b) if j == idx => mine = Some(b),
                    Some(b) => others.push((j, b)),
                    None => {}
                }
            }
        }
        let mine = match mine {
            Some(b) => b,
            None => {
                let b = shared.assemble(idx, f, chunks)?;
                self.borrowed
                    .fetch_add(f.stored_len as u64, Ordering::Relaxed);
                b
            }
        };
        Some(Borrowed { mine, others, run })
    }

    /// The frame after which more can be put together ahead, and how many threads do.
    pub(crate) fn assembling(&self) -> (Option<u32>, usize) {
        let a = self.assembling.lock().unwrap_or_else(|e| e.into_inner());
        (a.back().map(|w| w.1), a.len())
    }

    /// Puts `frames` (consecutive from `first`, each held by other blobs) together on
    /// another thread.
    pub(crate) fn assemble_ahead(&self, first: u32, frames: Vec<(Frame, Vec<Chunk>)>) {
        let Some(shared) = self.shared().cloned() else {
            return;
        };
        let end = first + frames.len() as u32;
        let borrowed = self.borrowed.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name("hexz-share".into())
            .spawn(move || {
                (first..)
                    .zip(frames)
                    .map(|(j, (f, chunks))| {
                        let b = shared.assemble(j, &f, &chunks)?;
                        borrowed.fetch_add(f.stored_len as u64, Ordering::Relaxed);
                        Some(b)
                    })
                    .collect()
            })
        {
            let mut a = self.assembling.lock().unwrap_or_else(|e| e.into_inner());
            a.push_back((first, end, h));
        }
    }

    /// The frames of the thread putting `idx` together (waited for); threads for frames
    /// before it are let go.
    fn take_assembled(&self, idx: u32) -> Option<(u32, Vec<Option<Vec<u8>>>)> {
        let job = {
            let mut a = self.assembling.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match a.front() {
                    Some(w) if w.1 <= idx => drop(a.pop_front()),
                    Some(w) if w.0 <= idx => break a.pop_front(),
                    _ => break None,
                }
            }
        }?;
        job.2.join().ok().map(|frames| (job.0, frames))
    }

    /// Whether a frame could be put together without a fetch (never waits).
    pub fn borrowable(&self, chunks: &[Chunk]) -> bool {
        self.shared.ready().is_some_and(|s| s.covers(chunks))
    }

    /// A frame's verified bytes from the host cache, if it holds them. A copy that fails
    /// verification is marked absent (and so fetched again).
    pub fn cached_frame(&self, idx: u32, f: &Frame, chunks: &[Chunk]) -> Option<Vec<u8>> {
        let d = self.data.get()?.as_ref()?;
        let stored = d.read(idx, f.offset - HEADER_LEN as u64, f.stored_len as usize)?;
        match decode_frame_owned(idx, f, chunks, stored) {
            Ok(raw) => Some(raw),
            Err(e) => {
                tracing::warn!(
                    "registry cache: frame {idx} of blob {} is damaged ({e}); fetching it again",
                    short(&self.digest)
                );
                d.forget(idx);
                None
            }
        }
    }

    /// Whether the host cache holds frame `idx`.
    pub fn is_cached(&self, idx: u32) -> bool {
        self.data
            .get()
            .and_then(Option::as_ref)
            .is_some_and(|d| d.has(idx))
    }

    /// Adds the verified frames of a checked window to the host cache.
    pub(crate) fn store(&self, w: &Window) {
        if let Some(d) = self.data.get().and_then(Option::as_ref) {
            d.write_window(w);
        }
    }

    /// The checked window a fetch running ahead holds for frame `idx`, if one covers it
    /// (waiting for it to arrive). Windows wholly behind the one taken are dropped: the
    /// stream has passed them.
    pub(crate) fn take_ahead(&self, idx: u32) -> Option<Result<Window>> {
        let h = {
            let mut a = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
            let at = a.iter().position(|w| w.0 <= idx && idx < w.1)?;
            let (first, _, h) = a.remove(at)?;
            a.retain(|w| w.1 > first);
            h
        };
        Some(
            h.recv()
                .unwrap_or_else(|_| Err(Error::Remote("a read ahead was given up".into()))),
        )
    }

    /// For a stream now at frame `from`: keeps the fetches running ahead that continue
    /// it (a chain of windows starting at `from`), lets the others go (another stream's,
    /// or left behind when a stream stopped), and says where the chain ends and how
    /// long it is.
    pub fn ahead(&self, from: u32) -> (u32, usize) {
        let mut a = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        a.make_contiguous().sort_by_key(|w| w.0);
        let mut end = from;
        let mut keep = VecDeque::new();
        while let Some(w) = a.pop_front() {
            if w.0 == end {
                end = w.1;
                keep.push_back(w);
            } // else: dropped (its thread ends by itself)
        }
        *a = keep;
        (end, a.len())
    }

    /// Starts fetching `plan`'s frames (stored bytes `offset..offset + len`) on another
    /// thread, which also checks them, so the registry sends them and their BLAKE3s are
    /// computed while the reader copies earlier ones out.
    ///
    /// `until` is where the stream will stop (the end of the large file it reads), or
    /// None. With it, the window is read off one range request that runs on towards
    /// `until` (at most [`FEED_MAX`]), and so are the windows asked after it while they
    /// follow on: the registry sends one response instead of one per window, and its
    /// disk reads ahead through it. Without it, the window is a range request of its own.
    pub(crate) fn fetch_ahead(&self, plan: WindowPlan, offset: u64, len: u64, until: Option<u64>) {
        let (first, end_frame) = plan.frames();
        let (tx, rx) = mpsc::sync_channel(1);
        let mut job = Some(FeedJob {
            plan,
            offset,
            len,
            done: tx,
        });
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = feeds
            .iter()
            .position(|f| f.pos == offset && offset + len <= f.end)
        {
            let f = &mut feeds[at];
            if let Some(j) = job.take() {
                match f.jobs.send(j) {
                    Ok(()) => f.pos += len,
                    Err(mpsc::SendError(j)) => {
                        // That feed has ended (an error, or idle): a new one instead.
                        job = Some(j);
                        feeds.remove(at);
                    }
                }
            }
        }
        if let Some(j) = job {
            let end = until
                .unwrap_or(0)
                .min(offset.saturating_add(FEED_MAX))
                .min(self.size)
                .max(offset + len);
            let (jobs, asked) = mpsc::channel();
            let _ = jobs.send(j);
            let source = FeedSource {
                reg: self.reg.clone(),
                repo: self.repo.clone(),
                digest: self.digest.clone(),
                size: self.size,
                fetched: self.fetched.clone(),
                requests: self.requests.clone(),
            };
            // If the thread cannot start, the window's sender is dropped with it and
            // the reader fetches the window itself.
            let started = std::thread::Builder::new()
                .name("hexz-read-ahead".into())
                .spawn(move || source.run(offset, end, asked))
                .is_ok();
            if started && end > offset + len {
                // Feeds of other streams are kept (a few): each goes on where its own
                // stream will ask next.
                feeds.retain(|f| f.pos < f.end);
                if feeds.len() == MAX_FEEDS {
                    feeds.remove(0);
                }
                feeds.push(Feed {
                    pos: offset + len,
                    end,
                    jobs,
                });
            }
        }
        drop(feeds);
        let mut a = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        a.push_back((first, end_frame, rx));
    }

    /// Notes that a stream took window `first..end`; returns the window it has left
    /// [`KEEP_BEHIND`] windows behind, whose frames it will not read again.
    pub fn passed(&self, first: u32, end: u32) -> Option<(u32, u32)> {
        let mut b = self.behind.lock().unwrap_or_else(|e| e.into_inner());
        b.push_back((first, end));
        if b.len() > KEEP_BEHIND {
            b.pop_front()
        } else {
            None
        }
    }

    /// Whether reads have settled into a stream at the largest window.
    pub fn streaming(&self) -> bool {
        self.seq.lock().unwrap_or_else(|e| e.into_inner()).1 >= WINDOW_MAX
    }

    /// How many stored bytes to fetch for a miss at frame `idx`: one frame, or a window
    /// that doubles while misses continue where the last fetch ended.
    pub fn window(&self, idx: u32) -> u64 {
        let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        if idx == s.0 && idx != 0 {
            s.1 = (s.1 * 2).clamp(WINDOW_MIN, WINDOW_MAX);
        } else {
            s.1 = 0;
        }
        s.1
    }

    pub fn fetched_to(&self, end: u32) {
        self.seq.lock().unwrap_or_else(|e| e.into_inner()).0 = end;
    }

    /// Notes that frame `idx` was read (for the next run's prefetch).
    pub fn record(&self, idx: u32) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.order.len() < MAX_ACCESS_LOG && log.seen.insert(idx) {
            log.order.push(idx);
        }
        let due = log
            .saved_at
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
        if due && log.order.len() != log.saved_len {
            self.save(&mut log);
        }
    }

    fn save(&self, log: &mut AccessLog) {
        // Frames earlier runs read are kept after this run's, so a shorter run does not
        // forget what a longer one needed.
        let previous = log
            .previous
            .get_or_insert_with(|| self.cache.access_log(&self.digest));
        let mut frames = log.order.clone();
        frames.extend(previous.iter().filter(|f| !log.seen.contains(f)));
        frames.truncate(MAX_ACCESS_LOG);
        self.cache.save_access_log(&self.digest, &frames);
        log.saved_len = log.order.len();
        log.saved_at = Some(Instant::now());
    }
}

impl Drop for RemoteData {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        super::cache::flush(Duration::from_secs(5));
        tracing::info!(
            "fetched {} bytes in {} requests from data blob {} of {} ({} bytes of frames put together from chunks other cached snapshots hold)",
            self.fetched.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            short(&self.digest),
            self.reference,
            self.borrowed.load(Ordering::Relaxed),
        );
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.order.len() != log.saved_len {
            self.save(&mut log);
        }
    }
}

/// Refuses a read of `offset..offset + len` that runs past the end of data blob `digest`
/// (of `size` bytes): the index asked for bytes the blob does not have.
fn within_blob(digest: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::corrupt(format!(
            "read of {offset}+{len} past the end of data blob {} ({size} bytes)",
            short(digest)
        )));
    }
    Ok(())
}

/// `len` bytes of data blob `digest` (of `size` bytes) from `offset`.
fn fetch_range(
    reg: &Registry,
    repo: &str,
    digest: &str,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    within_blob(digest, size, offset, len)?;
    Repo::new(reg, repo).blob_range(digest, offset, len, Retry::READ)
}

/// Opens `oci://…` lazily: resolves the tag to a manifest digest, opens the chain of
/// snapshots it lists. `seen` guards against loops through `oci://` base references.
pub fn open(reference: &str, cache_bytes: u64, seen: &mut Vec<[u8; 32]>) -> Result<Snapshot> {
    let r = Reference::parse(reference)?;
    let reg = Arc::new(Registry::new(&r, false));
    // A tag is asked again every time, first, so that the registry's round trip overlaps
    // opening the host cache (creating its directories on a first run) and the snapshot
    // of the manifest the tag named last time (below).
    let asked = match &r.target {
        super::reference::Target::Tag(_) => {
            let (reg, name, target) = (reg.clone(), r.repo.clone(), r.target_str().to_string());
            Some(
                std::thread::Builder::new()
                    .name("hexz-manifest".into())
                    .spawn(move || Repo::new(&reg, &name).manifest(&target, Retry::COMMAND))
                    .map_err(|e| Error::Remote(format!("cannot start a thread: {e}")))?,
            )
        }
        super::reference::Target::Digest(_) => None,
    };
    let cache = HostCache::shared()?;
    let repo = Repo::new(&reg, &r.repo);
    // A manifest named by digest never changes: the cached copy (checked against the
    // digest) lets `@sha256:` references open without the registry.
    let cached = match &r.target {
        super::reference::Target::Digest(d) => cache.blob(d).map(|bytes| (bytes, d.clone())),
        super::reference::Target::Tag(_) => None,
    };
    let (bytes, digest) = match (cached, asked) {
        (Some(c), _) => c,
        (None, Some(asked)) => {
            // Meanwhile the snapshot of the manifest the tag named last time is opened
            // from the cache, and kept if the tag still names it.
            let key = r.to_string();
            let mut seen_spec = seen.clone();
            let guess = cache.tag_hint(&key).and_then(|d| {
                let bytes = cache.blob(&d)?;
                let chain = Manifest::parse_chain(&bytes, &key).ok()?;
                let pinned = r.pinned(&d);
                let snap = open_layer(
                    &ChainOpen::new(&reg, &cache, &pinned, &chain),
                    0,
                    cache_bytes,
                    &mut seen_spec,
                )
                .ok()?;
                Some((d, snap))
            });
            let m = asked
                .join()
                .unwrap_or_else(|_| Err(Error::Remote("manifest request failed".into())))?;
            cache.put_blob(&m.digest, &m.bytes);
            cache.set_tag_hint(&key, &m.digest);
            if let Some((d, snap)) = guess {
                if d == m.digest {
                    *seen = seen_spec;
                    return Ok(snap);
                }
            }
            (m.bytes, m.digest)
        }
        (None, None) => {
            let m = repo.manifest(r.target_str(), Retry::COMMAND)?;
            cache.put_blob(&m.digest, &m.bytes);
            (m.bytes, m.digest)
        }
    };
    let pinned = r.pinned(&digest);
    let chain = Manifest::parse_chain(&bytes, &r.to_string())?;
    open_layer(
        &ChainOpen::new(&reg, &cache, &pinned, &chain),
        0,
        cache_bytes,
        seen,
    )
    .map_err(|e| e.at(pinned.to_string()))
}

/// What every layer of one manifest's snapshot chain is opened with.
struct ChainOpen<'a> {
    reg: &'a Arc<Registry>,
    cache: &'a Arc<HostCache>,
    pinned: &'a Reference,
    chain: &'a [Layer],
    /// One map of shared chunks for the whole chain.
    sharing: Arc<Sharing>,
}

impl<'a> ChainOpen<'a> {
    fn new(
        reg: &'a Arc<Registry>,
        cache: &'a Arc<HostCache>,
        pinned: &'a Reference,
        chain: &'a [Layer],
    ) -> ChainOpen<'a> {
        ChainOpen {
            reg,
            cache,
            pinned,
            chain,
            sharing: Sharing::start(cache, chain),
        }
    }
}

fn open_layer(
    c: &ChainOpen,
    at: usize,
    cache_bytes: u64,
    seen: &mut Vec<[u8; 32]>,
) -> Result<Snapshot> {
    let (reg, cache, pinned, chain) = (c.reg, c.cache, c.pinned, c.chain);
    let layer = &chain[at];
    let (blob, fetched) = index_blob(reg, cache, &pinned.repo, layer)?;
    let remote = Arc::new(RemoteData {
        reg: reg.clone(),
        repo: pinned.repo.clone(),
        reference: pinned.clone(),
        digest: layer.data.digest.clone(),
        size: layer.data.size,
        index: (layer.index.digest.clone(), layer.index.size),
        cache: cache.clone(),
        data: OnceLock::new(),
        ahead: Mutex::new(VecDeque::new()),
        feeds: Mutex::new(Vec::new()),
        behind: Mutex::new(VecDeque::new()),
        seq: Mutex::new((0, 0)),
        log: Mutex::new(AccessLog::default()),
        closed: Arc::new(AtomicBool::new(false)),
        fetched: Arc::new(AtomicU64::new(0)),
        requests: Arc::new(AtomicU64::new(0)),
        shared: c.sharing.clone(),
        borrowed: Arc::new(AtomicU64::new(0)),
        assembling: Mutex::new(VecDeque::new()),
        last_borrowed: AtomicU64::new(u64::MAX),
    });
    let name = if at == 0 {
        pinned.to_string()
    } else {
        format!(
            "{pinned} (base {})",
            &super::manifest::hex32(&layer.id)[..16]
        )
    };
    // A fetched index blob is checked against its digest and written to the host cache
    // on a second thread while this one decodes it (decoding is bounded, so safe on any
    // bytes); the snapshot is used only if the check passed, and a failed check is the
    // error reported.
    let mut snap = std::thread::scope(|s| {
        let check = fetched.then(|| s.spawn(|| check_fetched_index(cache, layer, &blob)));
        let snap = Snapshot::from_index_blob(
            Path::new(&name),
            &blob,
            layer.data.size,
            remote.clone(),
            cache_bytes,
        );
        if let Some(check) = check {
            check
                .join()
                .unwrap_or_else(|_| Err(Error::corrupt("the index blob's check failed")))?;
        }
        snap
    })?;
    if snap.id() != layer.id {
        return Err(Error::corrupt(format!(
            "index blob {} holds snapshot {}, but the manifest says {}",
            short(&layer.index.digest),
            &snap.id_hex()[..16],
            &super::manifest::hex32(&layer.id)[..16]
        )));
    }
    let _ = remote.data.set(cache.data(
        &layer.data.digest,
        layer.data.size,
        snap.index().frames.len(),
    ));
    cache.link_index(&layer.data.digest, &layer.index.digest);
    prefetch(&snap, &remote);
    let Some(base_ref) = snap.index().base.clone() else {
        return Ok(snap);
    };
    snap.check_depth(seen)?;
    let base_cache = (cache_bytes / 4).max(16 << 20);
    let base = match chain.iter().position(|l| l.id == base_ref.id) {
        Some(i) if i > at => {
            open_layer(c, i, base_cache, seen)?
        }
        Some(_) => return Err(Error::corrupt("the manifest's chain of snapshots loops")),
        None if Reference::is_remote(&base_ref.path) => open(&base_ref.path, base_cache, seen)
            .map_err(|e| snap.missing_base(&base_ref.path, e))?,
        None => {
            return Err(snap.missing_base(
                &base_ref.path,
                Error::Invalid(
                    "the artifact does not include it; push the snapshot again with this hexz (it uploads the base chain)"
                        .into(),
                ),
            ))
        }
    };
    snap.attach_base(base)?;
    Ok(snap)
}

/// An index blob: from the cache (checked against its digest there), else fetched; true
/// if fetched, when the caller checks it ([`check_fetched_index`]).
fn index_blob(
    reg: &Registry,
    cache: &HostCache,
    repo: &str,
    layer: &Layer,
) -> Result<(Vec<u8>, bool)> {
    if let Some(b) = cache.blob(&layer.index.digest) {
        return Ok((b, false));
    }
    if layer.index.size > (1 << 30) + HEADER_LEN as u64 {
        return Err(Error::corrupt(
            "index blob larger than the 1 GiB index limit",
        ));
    }
    let bytes = Repo::new(reg, repo).blob_range(
        &layer.index.digest,
        0,
        layer.index.size,
        Retry::COMMAND,
    )?;
    Ok((bytes, true))
}

/// A fetched index blob checked against its digest, then kept in the host cache.
fn check_fetched_index(cache: &HostCache, layer: &Layer, bytes: &[u8]) -> Result<()> {
    let got = super::client::sha256_digest(bytes);
    if got != layer.index.digest {
        return Err(Error::corrupt(format!(
            "index blob {} arrived with digest {}",
            short(&layer.index.digest),
            short(&got)
        )));
    }
    cache.put_blob(&layer.index.digest, bytes);
    Ok(())
}

/// Starts fetching, in the background, the frames a previous run read that the host
/// cache lacks (`HEXZ_OCI_PREFETCH=0` turns this off).
fn prefetch(snap: &Snapshot, remote: &Arc<RemoteData>) {
    if std::env::var("HEXZ_OCI_PREFETCH").is_ok_and(|v| v == "0") {
        return;
    }
    let log = remote.cache.access_log(&remote.digest);
    if log.is_empty() {
        return;
    }
    let index = snap.index();
    let mut work: Vec<(u32, Frame, Vec<Chunk>)> = Vec::new();
    for idx in log {
        let Some(f) = index.frames.get(idx as usize) else {
            continue;
        };
        if remote.is_cached(idx) {
            continue;
        }
        let chunks =
            index.chunks[f.first_chunk as usize..(f.first_chunk + f.chunk_count) as usize].to_vec();
        work.push((idx, f.clone(), chunks));
    }
    if work.is_empty() {
        return;
    }
    // The thread holds what it needs, not the `RemoteData`, so closing the snapshot is
    // never delayed by it (and its end-of-run work, the cache flush and the access log,
    // runs in the reader's thread).
    let closed = remote.closed.clone();
    let reg = remote.reg.clone();
    let (repo, digest, size) = (remote.repo.clone(), remote.digest.clone(), remote.size);
    let Some(data) = remote.data.get().and_then(Option::clone) else {
        return;
    };
    let sharing = remote.shared.clone();
    let _ = std::thread::Builder::new()
        .name("hexz-prefetch".into())
        .spawn(move || {
            // Frames other cached snapshots hold are put together when read, not fetched.
            if let Some(shared) = sharing.get() {
                work.retain(|(_, _, chunks)| !shared.covers(chunks));
            }
            let n = work.len();
            let started = Instant::now();
            let mut fetched = 0u64;
            let mut i = 0;
            while i < work.len() {
                if closed.load(Ordering::Relaxed) {
                    return;
                }
                // One request for a run of consecutive frames (adjacent in the blob),
                // checked as a read-ahead window is and cached as one write.
                let mut j = i + 1;
                let mut len = work[i].1.stored_len as u64;
                while j < work.len()
                    && work[j].0 == work[j - 1].0 + 1
                    && work[j].1.offset == work[j - 1].1.offset + work[j - 1].1.stored_len as u64
                    && len + (work[j].1.stored_len as u64) <= WINDOW_MAX
                {
                    len += work[j].1.stored_len as u64;
                    j += 1;
                }
                let base = work[i].1.offset;
                match fetch_range(&reg, &repo, &digest, size, base - HEADER_LEN as u64, len) {
                    Ok(bytes) => {
                        fetched += len;
                        let plan = WindowPlan::new(
                            work[i].0,
                            work[i..j]
                                .iter()
                                .map(|(_, f, c)| (f.clone(), c.clone()))
                                .collect(),
                        );
                        data.write_window(&plan.check(bytes));
                    }
                    Err(e) => {
                        tracing::warn!("prefetch stopped: {e}");
                        return;
                    }
                }
                i = j;
            }
            tracing::info!(
                "prefetched {n} frames ({fetched} bytes) a previous run read, in {:.2} s",
                started.elapsed().as_secs_f64()
            );
        });
}
