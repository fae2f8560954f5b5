//! Write-behind of creates and unlinks (docs/PROTOCOL.md §7.1 `reserve`, `create_as`,
//! `batch`): creating a file (with its first bytes) and removing a name are answered at
//! once in this daemon and sent to the host in order, many per round trip.
//!
//! Why answering early is exact: the overlay has one writer, this mount (`names.rs`);
//! the kernel has checked permissions (`default_permissions`) and the file type before
//! it sends the request; a create is answered early only in a directory whose every name
//! is known, so the name is certainly free, and its node id is one the host set aside
//! for this connection (`reserve`), so the kernel gets the id the file will have.
//!
//! What is left are the host's own failures (its disk full or failing, the connection
//! lost before the change was applied). Those are reported late, as a local
//! filesystem reports write-back errors: `fsync` on the file or its directory says EIO,
//! the log says what failed, and write-behind stops, so later changes get their errors
//! in time.
//!
//! Ordering: [`Behind`] is the transport the adapter uses, and every call passes its
//! barrier (it waits until every change answered before it was sent has been applied);
//! forgets wait too, since the connection counts a reference only once the reply that
//! added it arrived.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use hexz_protocol::{ByteBuf, Limits, Op, ReplyBody, Timed, Timespec, MAX_BATCH};

use crate::transport::{CallError, Then, Transport};

/// Ids asked for at a time; more are asked for when fewer than [`LOW_IDS`] are left.
const RESERVE_IDS: u32 = 256;
const LOW_IDS: usize = 64;
/// Bytes of first data one early create may carry.
pub const MAX_FIRST_DATA: usize = 64 * 1024;
/// Changes waiting to be sent at most (beyond, they wait for the host like any other).
const MAX_QUEUED: usize = 4 * MAX_BATCH;
/// Bytes of data waiting to be sent at most.
const MAX_QUEUED_BYTES: usize = 4 << 20;
/// Bytes of data queued that make a batch worth sending without waiting for more.
const SEND_BYTES: usize = 512 << 10;
/// How long a change may wait for more to go in the same batch, unless something waits
/// for it: the app never waits for it, and every batch costs the guest a round of system
/// calls and wake-ups.
const LINGER: Duration = Duration::from_millis(20);
/// Host handles of early-created files kept for their next use at most (older ones are
/// released, and reopened if needed).
const MAX_KEPT_FHS: usize = 256;

struct Queued {
    op: Op,
    /// When it happened here (the host stamps the change with it).
    at: Timespec,
    /// For `create_as`: the node it makes; for `write`: the node written (its handle is
    /// filled in when the batch is sent, the create's reply having come).
    node: Option<u64>,
    parent: u64,
}

#[derive(Default)]
struct State {
    /// Changes not sent yet, in order.
    queue: Vec<Queued>,
    /// The connection the queued changes belong to.
    epoch: u64,
    /// Changes ever queued / ever finished (applied or failed).
    queued: u64,
    done: u64,
    /// A batch is on its way.
    busy: bool,
    /// Since when the oldest change of `queue` waits.
    since: Option<Instant>,
    /// Callers in [`Behind::barrier`].
    waiting: usize,
    /// Reserved, unused ids of connection `ids_epoch`.
    ids: VecDeque<u64>,
    ids_epoch: u64,
    want_ids: bool,
    /// The host handle each early-created file got, for its next data request.
    fhs: HashMap<u64, (u64, u64)>,
    fh_order: VecDeque<u64>,
    /// Early-created nodes whose create is queued or on its way; those of them the
    /// kernel has forgotten meanwhile.
    pending: HashSet<u64>,
    gone: HashSet<u64>,
    /// Early-created files whose writes may still be answered early: their size so far.
    early: HashMap<u64, u64>,
    /// Forgets waiting for the changes before them.
    forgets: Vec<(u64, u64)>,
    /// Nodes (files and directories) a change failed on: their next fsync says EIO.
    failed: HashSet<u64>,
    /// After a failure, or without the host's support: nothing more is answered early.
    off: bool,
    queued_bytes: usize,
    /// Changes that failed since the last batch, for [`Behind::on_lost`].
    lost: Vec<Lost>,
}

/// A change answered early that the host then refused or never got: what the mount
/// showed of it may not be what the host has (`name` in `parent` for a create or an
/// unlink; `node`'s attributes and bytes for a create or a write).
#[derive(Clone, Debug)]
pub struct Lost {
    pub parent: u64,
    pub name: Option<Vec<u8>>,
    pub node: Option<u64>,
}

pub struct Behind {
    inner: Arc<dyn Transport>,
    state: Mutex<State>,
    changed: Condvar,
    /// Told of the changes that failed, before the requests waiting for them go on.
    on_lost: OnceLock<LostHook>,
}

type LostHook = Box<dyn Fn(Vec<Lost>) + Send + Sync>;

impl Behind {
    /// Wraps `inner`; the thread that sends the changes runs while the wrapper lives.
    pub fn start(inner: Arc<dyn Transport>) -> Arc<Behind> {
        let b = Arc::new(Behind {
            inner,
            state: Mutex::new(State {
                want_ids: true,
                ..State::default()
            }),
            changed: Condvar::new(),
            on_lost: OnceLock::new(),
        });
        let weak = Arc::downgrade(&b);
        let spawned = std::thread::Builder::new()
            .name("hexz-behind".into())
            .spawn(move || sender(weak));
        if let Err(e) = spawned {
            tracing::warn!("no write-behind thread: {e}");
            b.state().off = true;
        }
        b
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `hook` with the changes that failed on the host after they were answered,
    /// after each batch, before the requests waiting for that batch go on (so they see
    /// what it did). It runs on the sending thread, under its lock, and must neither
    /// call back into write-behind nor wait for the kernel.
    pub fn on_lost(&self, hook: LostHook) {
        let _ = self.on_lost.set(hook);
    }

    /// A reserved node id for an early create on the current connection, if one is at
    /// hand and nothing failed.
    pub fn take_id(&self) -> Option<(u64, u64)> {
        let epoch = self.inner.epoch();
        let mut s = self.state();
        if s.off || s.queue.len() >= MAX_QUEUED || s.queued_bytes >= MAX_QUEUED_BYTES {
            return None;
        }
        if s.ids_epoch != epoch {
            s.ids.clear(); // reserved on a connection that is gone
        }
        if !can_queue(&s, epoch) {
            return None;
        }
        let id = s.ids.pop_front();
        if s.ids.len() < LOW_IDS && !s.want_ids {
            s.want_ids = true;
            self.changed.notify_all();
        }
        id.map(|id| (id, epoch))
    }

    /// Queues an early create (a `create_as` naming `node`, taken with
    /// [`Behind::take_id`] on connection `epoch`) made at `at`.
    pub fn create(&self, epoch: u64, op: Op, at: Timespec, node: u64, parent: u64) {
        let mut s = self.state();
        s.pending.insert(node);
        s.early.insert(node, 0);
        self.push(&mut s, epoch, op, at, Some(node), parent);
    }

    /// Answers a write early when it lands in the first `max` bytes of a file created
    /// early (at any offset: an assembler writes its sections first and the header
    /// last): written into the queued create's first bytes (the file is new and only
    /// this mount writes it, so a gap before the write is zeros), or queued after the
    /// create once that was sent. `None` when the write must go the usual way;
    /// otherwise the time the host will stamp it with, if not the create's.
    pub fn write(
        &self,
        node: u64,
        offset: u64,
        data: &[u8],
        max: usize,
    ) -> Option<Option<Timespec>> {
        let mut s = self.state();
        let size = *s.early.get(&node)?;
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&end| end <= max)?;
        if s.off
            || s.queued_bytes + data.len().max(end.saturating_sub(size as usize)) > MAX_QUEUED_BYTES
            || s.queue.len() >= MAX_QUEUED
        {
            return None;
        }
        let (added, at) = match queued_create(&mut s.queue, node) {
            Some(first) => {
                let before = first.len();
                if before < end {
                    first.resize(end, 0);
                }
                first[offset as usize..end].copy_from_slice(data);
                (first.len() - before, None)
            }
            None => {
                let op = Op::Write {
                    fh: 0, // the create's handle, once its reply has come
                    offset,
                    data: data.to_vec(),
                };
                let (epoch, at) = (s.epoch, now());
                self.push(&mut s, epoch, op, at, Some(node), 0);
                (data.len(), Some(at))
            }
        };
        s.queued_bytes += added;
        s.early.insert(node, size.max(end as u64));
        Some(at)
    }

    /// What a read of a file created early gets while its create is still queued here:
    /// the create holds every byte written to the file so far (and the file is new), so
    /// its bytes are the answer. `None` otherwise.
    pub fn read_early(&self, node: u64, offset: u64, size: u32) -> Option<Vec<u8>> {
        let mut s = self.state();
        s.early.get(&node)?;
        let data = queued_create(&mut s.queue, node)?;
        let start = usize::try_from(offset).map_or(data.len(), |o| o.min(data.len()));
        let end = start.saturating_add(size as usize).min(data.len());
        Some(data[start..end].to_vec())
    }

    /// Queues an unlink made at `at` of a name the kernel and this mount know
    /// (connection `epoch`); false if it must go the usual way.
    pub fn unlink(&self, epoch: u64, parent: u64, name: Vec<u8>, at: Timespec) -> bool {
        let mut s = self.state();
        if s.off
            || s.queue.len() >= MAX_QUEUED
            || epoch != self.inner.epoch()
            || !can_queue(&s, epoch)
        {
            return false;
        }
        self.push(&mut s, epoch, Op::Unlink { parent, name }, at, None, parent);
        true
    }

    fn push(
        &self,
        s: &mut State,
        epoch: u64,
        op: Op,
        at: Timespec,
        node: Option<u64>,
        parent: u64,
    ) {
        s.epoch = epoch;
        if s.queue.is_empty() {
            s.since = Some(Instant::now());
        }
        s.queue.push(Queued {
            op,
            at,
            node,
            parent,
        });
        s.queued += 1;
        // The sender sets its deadline on the first change; a full batch or a caller
        // waiting sends at once.
        if s.queue.len() == 1 || s.queue.len() >= MAX_BATCH || s.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until every change queued before this call has been applied (or failed).
    pub fn barrier(&self) {
        let mut s = self.state();
        let target = s.queued;
        if s.done >= target {
            return;
        }
        s.waiting += 1;
        self.changed.notify_all(); // the sender stops lingering
        while s.done < target {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.waiting -= 1;
    }

    /// The host handle an early create opened for `node`, for its next data request
    /// (call after [`Behind::barrier`]); its writes go the usual way from now on.
    pub fn take_fh(&self, node: u64) -> Option<(u64, u64)> {
        let mut s = self.state();
        s.early.remove(&node);
        s.fhs.remove(&node)
    }

    /// The kernel forgot `node`: the host handle its early create opened is released
    /// with the next batch, once the changes queued for it are done.
    pub fn forgotten(&self, node: u64) {
        let mut s = self.state();
        s.early.remove(&node);
        if s.pending.contains(&node) || s.queue.iter().any(|q| q.node == Some(node)) {
            s.gone.insert(node);
            return;
        }
        if let Some(h) = s.fhs.remove(&node) {
            let now_instead = self.release(&mut s, h);
            drop(s);
            now_instead
                .into_iter()
                .for_each(|(fh, e)| self.post_release(fh, e));
        }
    }

    /// Queues the release of host handle `fh` of connection `epoch` for the next batch;
    /// returns it if it must be released on its own (changes of another connection are
    /// still queued).
    fn release(&self, s: &mut State, (fh, epoch): (u64, u64)) -> Option<(u64, u64)> {
        if !can_queue(s, epoch) {
            return Some((fh, epoch));
        }
        self.push(s, epoch, Op::Release { fh }, now(), None, 0);
        None
    }

    fn post_release(&self, fh: u64, epoch: u64) {
        self.inner.post_on(epoch, Op::Release { fh });
    }

    /// True (once) if a change on `node` failed on the host after it was answered.
    pub fn take_failed(&self, node: u64) -> bool {
        self.state().failed.remove(&node)
    }

    /// Reserves ids or sends a batch, whichever is due (see [`due_in`]).
    fn run_once(&self) {
        let mut s = self.state();
        if due_in(&s).is_some() {
            return;
        }
        if s.want_ids && !s.off {
            s.want_ids = false;
            drop(s);
            return self.reserve();
        }
        let n = batch_len(&s.queue, self.inner.limits().max_frame as usize);
        let taken: Vec<Queued> = s.queue.drain(..n).collect();
        s.since = (!s.queue.is_empty()).then(Instant::now);
        let whole = s.queue.is_empty();
        let forgets_before = if whole { s.forgets.len() } else { 0 };
        let epoch = s.epoch;
        let mut release = Vec::new();
        // Writes after an early create go on the handle its reply brought.
        let mut batch = Vec::with_capacity(taken.len());
        for mut q in taken {
            if let (Op::Write { fh, .. }, Some(node)) = (&mut q.op, q.node) {
                match s.fhs.get(&node) {
                    Some(&(h, e)) if e == epoch => *fh = h,
                    _ => {
                        let why = "its file was not created".to_string();
                        finish(&mut s, q, Err(why), &mut release, epoch);
                        s.done += 1;
                        continue;
                    }
                }
            }
            batch.push(q);
        }
        let n = batch.len();
        s.busy = true;
        drop(s);

        let ops: Vec<Timed> = batch
            .iter()
            .map(|q| Timed {
                at: q.at,
                op: q.op.clone(),
            })
            .collect();
        let replies = match self.inner.call_on(epoch, Op::Batch { ops }) {
            Ok(ReplyBody::Batch { replies }) => Ok(replies),
            Ok(other) => Err(format!("a {} reply to a batch", other.name())),
            Err(CallError::Errno(e)) => Err(e.to_string()),
            Err(CallError::Lost) | Err(CallError::Stale) => {
                Err("the connection to the host was lost".to_string())
            }
        };
        let mut s = self.state();
        let mut batch = batch.into_iter();
        match replies {
            Ok(replies) => {
                for (q, r) in batch.by_ref().zip(replies) {
                    finish(&mut s, q, Ok(r), &mut release, epoch);
                }
                // Not executed (the reply had no room for them): first in line again.
                let rest: Vec<Queued> = batch.collect();
                s.done += n as u64 - rest.len() as u64;
                s.queue.splice(0..0, rest);
            }
            Err(why) => {
                for q in batch {
                    finish(&mut s, q, Err(why.clone()), &mut release, epoch);
                }
                s.done += n as u64;
            }
        }
        s.busy = false;
        settle_gone(&mut s, &mut release);
        let lost = std::mem::take(&mut s.lost);
        if !lost.is_empty() {
            if let Some(hook) = self.on_lost.get() {
                hook(lost);
            }
        }
        let forgets: Vec<(u64, u64)> = if s.queue.is_empty() {
            std::mem::take(&mut s.forgets)
        } else {
            let k = forgets_before.min(s.forgets.len());
            s.forgets.drain(..k).collect()
        };
        self.changed.notify_all();
        // Handles let go go with the next batch.
        let now_instead: Vec<_> = release
            .into_iter()
            .filter_map(|h| self.release(&mut s, h))
            .collect();
        drop(s);
        now_instead
            .into_iter()
            .for_each(|(fh, e)| self.post_release(fh, e));
        if !forgets.is_empty() {
            self.inner.forget(&forgets);
        }
    }

    fn reserve(&self) {
        match self.inner.call_epoch(Op::Reserve { count: RESERVE_IDS }) {
            Ok((ReplyBody::Reserved { first, count }, epoch)) => {
                let mut s = self.state();
                if s.ids_epoch != epoch {
                    s.ids.clear();
                    s.ids_epoch = epoch;
                }
                s.ids.extend(first..first.saturating_add(count as u64));
            }
            Ok(_) | Err(CallError::Errno(_)) => {
                // A host without write-behind, or read-only: creates wait for it.
                self.state().off = true;
            }
            Err(_) => {
                // The connection dropped: ask again on the next early create.
            }
        }
    }
}

/// Whether a change of connection `epoch` may join the queue: not while changes of
/// another connection are queued or on their way (they go on theirs, or fail).
fn can_queue(s: &State, epoch: u64) -> bool {
    (s.queue.is_empty() && !s.busy) || s.epoch == epoch
}

/// `None` if the sender has something to do now (ids to reserve, or a batch to send:
/// it is full, a caller waits for it, or its oldest change lingered long enough);
/// otherwise how long it may sleep.
fn due_in(s: &State) -> Option<Duration> {
    if s.want_ids && !s.off {
        return None;
    }
    if s.queue.is_empty() {
        return Some(Duration::from_millis(500));
    }
    let age = s.since.map_or(LINGER, |t| t.elapsed());
    let full = s.queue.len() >= MAX_BATCH || s.queued_bytes >= SEND_BYTES;
    (s.waiting == 0 && !full && age < LINGER).then(|| LINGER - age)
}

/// The first bytes of `node`'s `create_as`, if it waits in the queue (not sent yet).
fn queued_create(queue: &mut [Queued], node: u64) -> Option<&mut ByteBuf> {
    queue.iter_mut().find_map(|q| match &mut q.op {
        Op::CreateAs { node: n, data, .. } if *n == node => Some(data),
        _ => None,
    })
}

/// How many of the queued changes go in the next batch: at most [`MAX_BATCH`], and no
/// more than fit one request frame of `max_frame` bytes (at least one: a change alone
/// always fits, its data being at most [`MAX_FIRST_DATA`] or `max_write`).
fn batch_len(queue: &[Queued], max_frame: usize) -> usize {
    let room = max_frame.saturating_sub(BATCH_BASE);
    let mut bytes = 0;
    let mut n = 0;
    for q in queue.iter().take(MAX_BATCH) {
        bytes += queued_data(&q.op) + BATCH_ITEM;
        if n > 0 && bytes > room {
            break;
        }
        n += 1;
    }
    n
}

/// Bytes of a `batch` request besides its items (envelope, request id).
const BATCH_BASE: usize = 1024;
/// Bytes of one batch item besides its data, at most: the time, the request's keys and
/// fields, a name of up to 255 bytes.
const BATCH_ITEM: usize = 512;

/// The bytes of file data a queued change holds (bounded by [`MAX_QUEUED_BYTES`]).
fn queued_data(op: &Op) -> usize {
    match op {
        Op::CreateAs { data, .. } => data.len(),
        Op::Write { data, .. } => data.len(),
        _ => 0,
    }
}

/// Forgotten early-created files with nothing left queued: their handles go.
fn settle_gone(s: &mut State, release: &mut Vec<(u64, u64)>) {
    let done: Vec<u64> = s
        .gone
        .iter()
        .copied()
        .filter(|n| !s.pending.contains(n) && !s.queue.iter().any(|q| q.node == Some(*n)))
        .collect();
    for n in done {
        s.gone.remove(&n);
        release.extend(s.fhs.remove(&n));
    }
}

/// Keeps at most [`MAX_KEPT_FHS`] handles of early-created files: the oldest go first,
/// except those with changes still queued.
fn trim_fhs(s: &mut State, release: &mut Vec<(u64, u64)>) {
    let mut spared = 0;
    while s.fh_order.len() > MAX_KEPT_FHS && spared < s.fh_order.len() {
        let Some(old) = s.fh_order.pop_front() else {
            break;
        };
        if !s.fhs.contains_key(&old) {
            continue; // taken or released already
        }
        if s.queue.iter().any(|q| q.node == Some(old)) {
            s.fh_order.push_back(old);
            spared += 1;
            continue;
        }
        s.early.remove(&old);
        release.extend(s.fhs.remove(&old));
    }
}

/// This machine's clock now.
pub(crate) fn now() -> Timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timespec(d.as_secs() as i64, d.subsec_nanos())
}

/// Records what became of one change (under the lock); handles to release go out.
fn finish(
    s: &mut State,
    q: Queued,
    r: Result<ReplyBody, String>,
    release: &mut Vec<(u64, u64)>,
    epoch: u64,
) {
    s.queued_bytes = s.queued_bytes.saturating_sub(queued_data(&q.op));
    if matches!(q.op, Op::Release { .. }) {
        return; // a handle let go: nothing depends on how that went
    }
    let failed = match (&q.op, r) {
        (Op::CreateAs { .. }, Ok(ReplyBody::Created { entry, fh })) => {
            let node = entry.node;
            s.pending.remove(&node);
            s.fhs.insert(node, (fh, epoch));
            s.fh_order.push_back(node);
            trim_fhs(s, release);
            None
        }
        (Op::Unlink { .. }, Ok(ReplyBody::Ok { .. })) => None,
        (Op::Write { data, .. }, Ok(ReplyBody::Written { size, .. }))
            if size as usize == data.len() =>
        {
            None
        }
        (_, Ok(ReplyBody::Err(e))) => Some(e.to_string()),
        (_, Ok(other)) => Some(format!("an unexpected {} reply", other.name())),
        (_, Err(why)) => Some(why),
    };
    let Some(why) = failed else { return };
    let what = match &q.op {
        Op::CreateAs { name, .. } => format!("creating {:?}", String::from_utf8_lossy(name)),
        Op::Unlink { name, .. } => format!("removing {:?}", String::from_utf8_lossy(name)),
        Op::Write { offset, data, .. } => format!("writing {} bytes at {offset}", data.len()),
        op => op.name().to_string(),
    };
    tracing::error!(
        parent = q.parent,
        node = q.node,
        "write-behind: {what} failed on the host after it was answered: {why}; fsync on \
         the file or its directory reports EIO, and changes now wait for the host"
    );
    s.failed.insert(q.parent);
    s.lost.push(Lost {
        parent: q.parent,
        name: match &q.op {
            Op::CreateAs { name, .. } | Op::Unlink { name, .. } => Some(name.clone()),
            _ => None,
        },
        node: q.node,
    });
    if let Some(node) = q.node {
        s.failed.insert(node);
        s.pending.remove(&node);
        s.early.remove(&node);
    }
    s.off = true;
}

fn sender(weak: Weak<Behind>) {
    loop {
        let Some(b) = weak.upgrade() else { return };
        b.run_once();
        let s = b.state();
        // Decided under the lock the wait releases, so that no wake-up is missed.
        if let Some(wait) = due_in(&s) {
            // Woken by the first change, a full batch or a waiting caller; the timeout
            // also lets the thread end with the adapter.
            let _ = b.changed.wait_timeout(s, wait);
        }
    }
}

impl Transport for Behind {
    fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError> {
        self.barrier();
        self.inner.call_epoch(op)
    }

    fn call_on(&self, epoch: u64, op: Op) -> Result<ReplyBody, CallError> {
        self.barrier();
        self.inner.call_on(epoch, op)
    }

    fn call_then(&self, op: Op, then: Then) {
        self.barrier();
        self.inner.call_then(op, then)
    }

    fn replies_later(&self) -> bool {
        self.inner.replies_later()
    }

    fn post_on(&self, epoch: u64, op: Op) {
        // Releases of handles the host already gave: nothing queued can concern them.
        self.inner.post_on(epoch, op)
    }

    fn forget(&self, items: &[(u64, u64)]) {
        let mut s = self.state();
        if s.busy || !s.queue.is_empty() {
            s.forgets.extend_from_slice(items);
            return;
        }
        drop(s);
        self.inner.forget(items)
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }

    fn has_cap(&self, cap: &str) -> bool {
        self.inner.has_cap(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(data: usize) -> Queued {
        Queued {
            op: Op::CreateAs {
                parent: 1,
                name: b"f".to_vec(),
                mode: 0o644,
                flags: 0,
                uid: 0,
                gid: 0,
                node: 9,
                data: ByteBuf::from(vec![0; data]),
            },
            at: Timespec::default(),
            node: Some(9),
            parent: 1,
        }
    }

    #[test]
    fn a_batch_fits_one_frame_and_holds_at_least_one_change() {
        let frame = 1 << 20;
        let big: Vec<Queued> = (0..40).map(|_| create(MAX_FIRST_DATA)).collect();
        let n = batch_len(&big, frame);
        assert!(n > 0 && n < 16, "{n} creates of 64 KiB in a 1 MiB frame");
        assert!(n * (MAX_FIRST_DATA + BATCH_ITEM) + BATCH_BASE <= frame);
        assert_eq!(
            batch_len(&big[..1], 1000),
            1,
            "one change alone always goes"
        );
        let small: Vec<Queued> = (0..MAX_BATCH + 5).map(|_| create(10)).collect();
        assert_eq!(batch_len(&small, frame), MAX_BATCH);
        assert_eq!(batch_len(&[], frame), 0);
    }
}
