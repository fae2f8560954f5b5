//! The connection to the host server: one stream, many requests in flight (one reader
//! thread routes replies to waiting callers by id), reconnect with backoff, bounded
//! waits while the host is away, and the node references the host holds for this
//! daemon, taken again after a reconnect.
//!
//! Epochs: each established connection has a number. A host handle is valid only on the
//! connection that opened it, so a request naming one is sent with [`Conn::call_on`],
//! which refuses ([`CallError::Stale`]) to put it on a newer connection where the same
//! number may name another file.
//!
//! References (docs/PROTOCOL.md §5): the host adds one per `entry`/`created` reply and
//! per `dir_plus` entry other than `.`/`..`, and drops a connection's references when it
//! closes. The reader thread counts them as replies arrive (so the count is exact when it
//! reconnects), [`Conn::forget`] takes them off, and a reconnect sends `retain` for all
//! of them before any other request, so nodes the kernel still knows (an unlinked file
//! that is still open) survive a server restart.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hexz_fuse::{CallError, Then, Transport};
use hexz_protocol::addr::Addr;
use hexz_protocol::client::{self, default_hello};
use hexz_protocol::frame::{read_frame, FrameError};
use hexz_protocol::{
    decode_reply, encode_frame, Errno, HelloReply, Limits, Op, ReplyBody, Request,
};

/// Items per `retain` / `batch_forget` request: within the protocol's 4096, and small
/// enough (≤ 19 bytes each) to fit the smallest frame a hello can agree on.
const REFS_PER_REQUEST: usize = 2048;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a stream to `addr`. `vsock-uds` connects to its `<path>_<port>` socket (what a
/// process on the host reaches the server listening there through).
fn open(addr: &Addr) -> std::io::Result<OwnedFd> {
    match addr {
        Addr::Unix(_) | Addr::VsockUds { .. } => {
            let path = addr
                .socket_path()
                .ok_or_else(|| std::io::Error::other("no socket path"))?;
            Ok(std::os::unix::net::UnixStream::connect(path)?.into())
        }
        Addr::Tcp(a) => {
            let s = std::net::TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Ok(s.into())
        }
        Addr::VirtioPort(path) => Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?
            .into()),
        Addr::Vsock { cid, port } => {
            use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(*cid, *port),
            )?;
            Ok(fd)
        }
    }
}

/// Bounds (or, with `None`, unbounds) how long a read on `f` may block. A virtio port is
/// not a socket and has no such bound: there the caller's own deadline must do.
fn read_timeout(f: &File, t: Option<Duration>) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::{TimeVal, TimeValLike};
    let tv = match t {
        Some(t) => TimeVal::milliseconds(t.as_millis().clamp(1, i64::MAX as u128) as i64),
        None => TimeVal::zero(),
    };
    match setsockopt(f, ReceiveTimeout, &tv) {
        Err(nix::errno::Errno::ENOTSOCK) => Ok(()),
        r => r.map_err(std::io::Error::from),
    }
}

/// Who a reply goes to: a caller waiting for it, or what it is handed to on the reader
/// thread ([`Conn::call_then`]).
enum Waiter {
    Caller(SyncSender<Result<ReplyBody, CallError>>),
    Then(Then),
}

impl Waiter {
    /// Hands over `res` (from connection `epoch`); false if nobody takes it any more.
    fn deliver(self, res: Result<ReplyBody, CallError>, epoch: u64) -> bool {
        match self {
            Waiter::Caller(tx) => tx.send(res).is_ok(),
            Waiter::Then(then) => {
                then(res.map(|b| (b, epoch)));
                true
            }
        }
    }
}

struct Link {
    writer: Arc<Mutex<File>>,
    limits: Limits,
    epoch: u64,
}

pub struct Conn {
    addr: Addr,
    timeout: Duration,
    link: Mutex<Option<Link>>,
    linked: Condvar,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    epoch: AtomicU64,
    /// Node id → references the host holds for this daemon. Lock order: `refs`, then
    /// `link`.
    refs: Mutex<HashMap<u64, u64>>,
    /// References in replies nobody waited for any more (a caller that timed out): to be
    /// forgotten by the next caller (the reader thread never writes).
    orphans: Mutex<Vec<(u64, u64)>>,
    has_orphans: AtomicBool,
    /// Single forgets waiting to go out together, with the connection each belongs to:
    /// the kernel's BATCH_FORGET reaches the adapter one node at a time (fuser calls
    /// `forget` per node), and a cache drop forgets thousands.
    forgets: Mutex<Vec<(u64, u64, u64)>>,
    forgets_queued: Condvar,
    fs_id: Vec<u8>,
    pub hello: HelloReply,
}

/// The references a reply gives the client (docs/PROTOCOL.md §7).
fn refs_in(body: &ReplyBody) -> Vec<u64> {
    match body {
        ReplyBody::Entry(e) => vec![e.node],
        ReplyBody::Created { entry, .. } => vec![entry.node],
        ReplyBody::DirPlus { entries, .. }
        | ReplyBody::Opened {
            list: Some(hexz_protocol::DirList { entries, .. }),
            ..
        } => entries
            .iter()
            .filter(|e| e.is_referenced())
            .map(|e| e.entry.node)
            .collect(),
        ReplyBody::Listings { dirs } => dirs
            .iter()
            .flat_map(|d| d.entries.iter().flatten())
            .filter(|e| e.is_referenced())
            .map(|e| e.entry.node)
            .collect(),
        ReplyBody::Batch { replies } => replies.iter().flat_map(refs_in).collect(),
        _ => Vec::new(),
    }
}

/// A fresh connection after hello, its reads bounded by `timeout` until the caller is
/// done with its own exchanges.
fn establish(addr: &Addr, timeout: Duration) -> std::io::Result<(File, HelloReply, Limits)> {
    let mut f = File::from(open(addr)?);
    read_timeout(&f, Some(timeout))?;
    let (hello, limits) =
        client::hello(&mut f, &default_hello("hexz-guestfused")).map_err(io_err)?;
    Ok((f, hello, limits))
}

fn io_err(e: FrameError) -> std::io::Error {
    match e {
        FrameError::Io(e) => e,
        e => std::io::Error::other(e.to_string()),
    }
}

/// Sends `retain` for `refs` on a connection nothing else uses yet, one request at a time.
fn retain(f: &File, limits: Limits, refs: &HashMap<u64, u64>) -> std::io::Result<()> {
    let items: Vec<(u64, u64)> = refs.iter().map(|(&n, &k)| (n, k)).collect();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (i, chunk) in items.chunks(REFS_PER_REQUEST).enumerate() {
        let id = i as u64 + 1;
        out.clear();
        encode_frame(
            &Request {
                id,
                op: Op::Retain {
                    items: chunk.to_vec(),
                },
            },
            limits.max_frame,
            &mut out,
        )
        .map_err(io_err)?;
        (&*f).write_all(&out)?;
        read_frame(&mut &*f, limits.max_frame, &mut buf).map_err(io_err)?;
        let r = decode_reply(&buf).map_err(io_err)?;
        match r.r {
            ReplyBody::Ok { .. } if r.id == id => {}
            ReplyBody::Err(Errno::ENOSYS) => {
                tracing::warn!(
                    "the host does not know `retain`: files unlinked while open may be gone \
                     after this reconnect"
                );
                return Ok(());
            }
            other => {
                return Err(std::io::Error::other(format!(
                    "retain answered with {other:?} (id {})",
                    r.id
                )))
            }
        }
    }
    Ok(())
}

impl Conn {
    /// Connects (retrying until `timeout`), says hello, and starts the reader thread.
    pub fn connect(addr: Addr, timeout: Duration) -> std::io::Result<Arc<Conn>> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(50);
        let (f, hello, limits) = loop {
            match establish(&addr, timeout) {
                Ok(x) => break x,
                Err(e) if Instant::now() + delay < deadline => {
                    tracing::info!("host not reachable at {addr} yet ({e}); retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        read_timeout(&f, None)?;
        let wr = f.try_clone()?;
        let conn = Arc::new(Conn {
            addr,
            timeout,
            link: Mutex::new(Some(Link {
                writer: Arc::new(Mutex::new(wr)),
                limits,
                epoch: 1,
            })),
            linked: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(1),
            refs: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            has_orphans: AtomicBool::new(false),
            forgets: Mutex::new(Vec::new()),
            forgets_queued: Condvar::new(),
            fs_id: hello.fs_id.clone(),
            hello,
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name("hexz-reader".into())
            .spawn(move || c.reader(f))?;
        let weak = Arc::downgrade(&conn);
        std::thread::Builder::new()
            .name("hexz-forgets".into())
            .spawn(move || forget_sender(weak))?;
        Ok(conn)
    }

    /// Sends the queued single forgets, as few requests as possible; each only on the
    /// connection whose references it gives back.
    fn send_forgets(&self) {
        let queued = std::mem::take(&mut *lock(&self.forgets));
        let mut rest = queued.as_slice();
        while let Some(&(epoch, _, _)) = rest.first() {
            let n = rest.iter().take_while(|f| f.0 == epoch).count();
            let (same, tail) = rest.split_at(n);
            rest = tail;
            // One item per node: the counts of a node forgotten twice add up.
            let mut items: Vec<(u64, u64)> = same.iter().map(|&(_, node, k)| (node, k)).collect();
            items.sort_unstable();
            items.dedup_by(|b, a| {
                let same_node = a.0 == b.0;
                if same_node {
                    a.1 += b.1;
                }
                same_node
            });
            self.post_forgets(epoch, &items);
        }
    }

    /// Gives back `items` on connection `epoch`: one `forget`, or `batch_forget`s.
    fn post_forgets(&self, epoch: u64, items: &[(u64, u64)]) {
        match items {
            [] => {}
            &[(node, nlookup)] => self.post_on(epoch, Op::Forget { node, nlookup }),
            many => {
                for chunk in many.chunks(REFS_PER_REQUEST) {
                    self.post_on(
                        epoch,
                        Op::BatchForget {
                            items: chunk.to_vec(),
                        },
                    );
                }
            }
        }
    }

    pub fn limits(&self) -> Limits {
        lock(&self.link)
            .as_ref()
            .map_or(Limits::default(), |l| l.limits)
    }

    /// The number of the current (or last) connection; handles opened on an older one
    /// are gone on the host.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// References the host holds for this daemon on `node` (for tests and logs).
    #[cfg(test)]
    fn refs_on(&self, node: u64) -> u64 {
        lock(&self.refs).get(&node).copied().unwrap_or(0)
    }

    /// Routes replies; on a dropped connection fails the waiting calls and reconnects.
    fn reader(self: Arc<Self>, mut rd: File) {
        let mut buf = Vec::new();
        loop {
            let max = self.limits().max_frame;
            match read_frame(&mut rd, max, &mut buf) {
                Ok(()) => match decode_reply(&buf) {
                    Ok(r) => self.route(r.id, r.r),
                    Err(e) => tracing::warn!("undecodable reply from the host: {e}"),
                },
                Err(e) => {
                    tracing::warn!("connection to the host lost: {e}; reconnecting");
                    rd = self.reconnect();
                }
            }
        }
    }

    /// Counts the references a reply gives, and hands it to its caller; references in
    /// a reply nobody waits for are forgotten again.
    fn route(&self, id: u64, body: ReplyBody) {
        let refs = refs_in(&body);
        if !refs.is_empty() {
            let mut held = lock(&self.refs);
            for &n in &refs {
                *held.entry(n).or_default() += 1;
            }
        }
        let waiter = lock(&self.pending).remove(&id);
        let res = match body {
            ReplyBody::Err(e) => Err(CallError::Errno(e.sanitized())),
            body => Ok(body),
        };
        let epoch = self.epoch();
        let delivered = waiter.is_some_and(|w| w.deliver(res, epoch));
        if !delivered && !refs.is_empty() {
            lock(&self.orphans).extend(refs.into_iter().map(|n| (n, 1)));
            self.has_orphans.store(true, Ordering::Release);
        }
    }

    fn reconnect(&self) -> File {
        *lock(&self.link) = None;
        let waiting: Vec<Waiter> = lock(&self.pending).drain().map(|(_, w)| w).collect();
        let epoch = self.epoch();
        for w in waiting {
            w.deliver(Err(CallError::Lost), epoch);
        }
        let mut delay = Duration::from_millis(20);
        loop {
            match establish(&self.addr, self.timeout) {
                Ok((f, hello, _)) if hello.fs_id != self.fs_id => {
                    drop(f);
                    tracing::error!(
                        "the host now serves a different filesystem (fs_id changed); refusing it"
                    );
                }
                Ok((f, _, limits)) => {
                    // Holding `refs` until the link is published: no reference can be
                    // forgotten between the count sent in `retain` and the first request
                    // that may follow it.
                    let refs = lock(&self.refs);
                    let published = retain(&f, limits, &refs)
                        .and_then(|()| read_timeout(&f, None))
                        .and_then(|()| f.try_clone());
                    match published {
                        Ok(wr) => {
                            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                            *lock(&self.link) = Some(Link {
                                writer: Arc::new(Mutex::new(wr)),
                                limits,
                                epoch,
                            });
                            self.linked.notify_all();
                            tracing::info!(retained = refs.len(), "reconnected to the host");
                            return f;
                        }
                        Err(e) => tracing::warn!("re-taking node references failed: {e}"),
                    }
                }
                Err(e) => tracing::debug!("reconnect failed: {e}"),
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// The live writer, waiting for a reconnection until `deadline`.
    fn writer(&self, deadline: Instant) -> Result<(Arc<Mutex<File>>, u32, u64), CallError> {
        let mut link = lock(&self.link);
        loop {
            if let Some(l) = link.as_ref() {
                return Ok((l.writer.clone(), l.limits.max_frame, l.epoch));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Errno(Errno::ETIMEDOUT));
            }
            link = self
                .linked
                .wait_timeout(link, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    #[cfg(test)]
    fn call(&self, op: Op) -> Result<ReplyBody, CallError> {
        self.exchange(op, None).map(|(b, _)| b)
    }

    /// Sends `op` and waits for its reply (at most the configured timeout, including any
    /// wait for the host to come back); also says on which connection the request went (a
    /// handle in the reply is valid there only).
    pub fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError> {
        self.exchange(op, None)
    }

    /// As [`Conn::call_epoch`], but only on connection `epoch` (the one whose handle `op`
    /// names): on any other, nothing is sent and the answer is [`CallError::Stale`].
    pub fn call_on(&self, epoch: u64, op: Op) -> Result<ReplyBody, CallError> {
        self.exchange(op, Some(epoch)).map(|(b, _)| b)
    }

    fn exchange(&self, op: Op, want: Option<u64>) -> Result<(ReplyBody, u64), CallError> {
        if self.has_orphans.swap(false, Ordering::AcqRel) {
            let orphans = std::mem::take(&mut *lock(&self.orphans));
            self.forget(&orphans);
        }
        let deadline = Instant::now() + self.timeout;
        let (tx, rx) = sync_channel(1);
        let (id, epoch) = self
            .send(op, Waiter::Caller(tx), deadline, want)
            .map_err(|(e, _)| e)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let r = match rx.recv_timeout(left) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                if lock(&self.pending).remove(&id).is_some() {
                    Err(CallError::Errno(Errno::ETIMEDOUT))
                } else {
                    // The reader has just taken the reply (or the loss) and is handing it
                    // over: take it, so references in it are not lost.
                    rx.recv().unwrap_or(Err(CallError::Errno(Errno::ETIMEDOUT)))
                }
            }
        };
        r.map(|b| (b, epoch))
    }

    /// Sends `op` and hands its reply to `then` on the reader thread, without waiting
    /// for it (or for a reconnection: with no connection, `then` gets the error now).
    /// `then` must neither send nor wait: the reader thread never writes (a write can
    /// block until the host reads, and the host may be waiting for its replies to be
    /// read).
    pub fn call_then(&self, op: Op, then: Then) {
        if let Err((e, Some(w))) = self.send(op, Waiter::Then(then), Instant::now(), None) {
            w.deliver(Err(e), 0);
        }
    }

    /// Sends `op` with `waiter` registered for its reply (waiting for a reconnection
    /// until `deadline`; on connection `want` only, if given), and says with which id
    /// and on which connection. If it was not sent, says why and hands the waiter back
    /// — unless a reconnect has already handed it the loss.
    fn send(
        &self,
        op: Op,
        waiter: Waiter,
        deadline: Instant,
        want: Option<u64>,
    ) -> Result<(u64, u64), (CallError, Option<Waiter>)> {
        let (writer, max_frame, epoch) = match self.writer(deadline) {
            Ok(w) => w,
            Err(e) => return Err((e, Some(waiter))),
        };
        if want.is_some_and(|w| w != epoch) {
            return Err((CallError::Stale, Some(waiter)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        if encode_frame(&Request { id, op }, max_frame, &mut frame).is_err() {
            return Err((CallError::Errno(Errno::EINVAL), Some(waiter)));
        }
        lock(&self.pending).insert(id, waiter);
        // A reconnect clears the link before failing the waiters: if the link is still
        // ours here, a drop from now on fails this waiter too; if not, nothing was sent.
        if lock(&self.link).as_ref().map(|l| l.epoch) != Some(epoch) {
            let waiter = lock(&self.pending).remove(&id);
            return Err((CallError::Stale, waiter));
        }
        if lock(&writer).write_all(&frame).is_err() {
            // The reader notices the broken stream and fails every waiter, this one too.
            tracing::debug!(id, "write to the host failed");
        }
        Ok((id, epoch))
    }

    /// Sends `op` without waiting for the reply, on connection `epoch` only (release of a
    /// handle opened there); on another connection it is dropped.
    pub fn post_on(&self, epoch: u64, op: Op) {
        let Ok((writer, max_frame, live)) = self.writer(Instant::now()) else {
            return;
        };
        if live != epoch {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        if encode_frame(&Request { id, op }, max_frame, &mut frame).is_ok() {
            let _ = lock(&writer).write_all(&frame);
        }
    }

    /// Drops references (the kernel forgot nodes, or entries never reached it): takes
    /// them off the count and tells the host, never more than the host holds for us.
    pub fn forget(&self, items: &[(u64, u64)]) {
        let (dropped, epoch) = {
            let mut refs = lock(&self.refs);
            let mut dropped = Vec::with_capacity(items.len());
            for &(node, n) in items {
                let Some(held) = refs.get_mut(&node) else {
                    continue;
                };
                let k = n.min(*held);
                *held -= k;
                if *held == 0 {
                    refs.remove(&node);
                }
                if k > 0 {
                    dropped.push((node, k));
                }
            }
            // Read under `refs`: a reconnect publishes its link only after sending
            // `retain` with the counts as they were, without these.
            let epoch = lock(&self.link).as_ref().map(|l| l.epoch);
            (dropped, epoch)
        };
        let Some(epoch) = epoch else {
            return; // no connection: the next one retains only what is left
        };
        match dropped.as_slice() {
            [] => {}
            &[(node, nlookup)] => {
                // Queued a moment: the kernel forgets many nodes at once, one per call.
                let full = {
                    let mut q = lock(&self.forgets);
                    q.push((epoch, node, nlookup));
                    q.len() >= REFS_PER_REQUEST
                };
                if full {
                    self.send_forgets();
                } else {
                    self.forgets_queued.notify_one();
                }
            }
            many => self.post_forgets(epoch, many),
        }
    }
}

/// Sends queued single forgets a moment after the first of a burst arrives, until the
/// connection is gone.
fn forget_sender(conn: std::sync::Weak<Conn>) {
    loop {
        let Some(c) = conn.upgrade() else { return };
        let waiting = {
            let q = lock(&c.forgets);
            let (q, _) = c
                .forgets_queued
                .wait_timeout_while(q, Duration::from_secs(1), |q| q.is_empty())
                .unwrap_or_else(|p| p.into_inner());
            !q.is_empty()
        };
        if waiting {
            // Let the rest of the burst arrive, then send it in one request (each send
            // costs the guest a system call and a wake-up; a forget is never waited for).
            std::thread::sleep(Duration::from_millis(10));
            c.send_forgets();
        }
    }
}

impl Transport for Conn {
    fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError> {
        Conn::call_epoch(self, op)
    }

    fn call_on(&self, epoch: u64, op: Op) -> Result<ReplyBody, CallError> {
        Conn::call_on(self, epoch, op)
    }

    fn call_then(&self, op: Op, then: Then) {
        Conn::call_then(self, op, then)
    }

    fn replies_later(&self) -> bool {
        true
    }

    fn post_on(&self, epoch: u64, op: Op) {
        Conn::post_on(self, epoch, op)
    }

    fn forget(&self, items: &[(u64, u64)]) {
        Conn::forget(self, items)
    }

    fn limits(&self) -> Limits {
        Conn::limits(self)
    }

    fn epoch(&self) -> u64 {
        Conn::epoch(self)
    }

    fn has_cap(&self, cap: &str) -> bool {
        self.hello.caps.iter().any(|c| c == cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexz_protocol::{Attr, DirEntryPlus, Entry};

    fn entry(node: u64) -> Entry {
        Entry {
            node,
            generation: 0,
            attr: Attr::default(),
            entry_ttl_ms: 0,
            attr_ttl_ms: 0,
            dir_attr: None,
        }
    }

    #[test]
    fn references_are_those_the_host_adds() {
        assert_eq!(refs_in(&ReplyBody::Entry(entry(5))), vec![5]);
        assert_eq!(
            refs_in(&ReplyBody::Created {
                entry: entry(6),
                fh: 1
            }),
            vec![6]
        );
        let plus = |name: &[u8], node| DirEntryPlus {
            name: name.to_vec(),
            cookie: 0,
            entry: entry(node),
        };
        assert_eq!(
            refs_in(&ReplyBody::DirPlus {
                entries: vec![
                    plus(b".", 1),
                    plus(b"..", 1),
                    plus(b"a", 7),
                    plus(b"..b", 8)
                ],
                eof: true
            }),
            vec![7, 8]
        );
        assert_eq!(
            refs_in(&ReplyBody::Listings {
                dirs: vec![
                    hexz_protocol::DirListing {
                        node: 3,
                        entries: Some(vec![plus(b".", 3), plus(b"..", 1), plus(b"c", 9)])
                    },
                    hexz_protocol::DirListing {
                        node: 4,
                        entries: None
                    },
                    hexz_protocol::DirListing {
                        node: 5,
                        entries: Some(vec![plus(b"d", 10), plus(b"e", 9)])
                    },
                ]
            }),
            vec![9, 10, 9]
        );
        assert!(refs_in(&ReplyBody::ok()).is_empty());
    }

    /// A server on a Unix socket that answers hello and then what `answer` says for the
    /// request on its `k`th connection (None: hang up that connection). Reports every
    /// request but hello as `(k, op)`.
    fn fake_server(
        answer: impl Fn(usize, &Op) -> Option<ReplyBody> + Send + 'static,
    ) -> (
        Arc<Conn>,
        std::sync::mpsc::Receiver<(usize, Op)>,
        tempfile_dir::Dir,
    ) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let (seen_tx, seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (k, s) in listener.incoming().enumerate() {
                let Ok(mut s) = s else {
                    return;
                };
                let mut buf = Vec::new();
                let mut out = Vec::new();
                let limits = Limits::default();
                while read_frame(&mut s, limits.max_frame, &mut buf).is_ok() {
                    let Ok(req) = hexz_protocol::decode_request(&buf) else {
                        break;
                    };
                    let r = match &req.op {
                        Op::Hello(h) => {
                            let (r, _) = hexz_protocol::accept_hello(
                                h,
                                &limits,
                                &["readdirplus"],
                                1,
                                vec![1],
                                "fake",
                            )
                            .expect("hello");
                            ReplyBody::Hello(r)
                        }
                        op => {
                            let _ = seen_tx.send((k, op.clone()));
                            match answer(k, op) {
                                Some(r) => r,
                                None => break,
                            }
                        }
                    };
                    out.clear();
                    encode_frame(
                        &hexz_protocol::Reply { id: req.id, r },
                        limits.max_frame,
                        &mut out,
                    )
                    .expect("encode");
                    if s.write_all(&out).is_err() {
                        break;
                    }
                }
            }
        });
        let conn = Conn::connect(Addr::Unix(path), Duration::from_secs(5)).expect("connect");
        (conn, seen, dir)
    }

    mod tempfile_dir {
        /// A scratch directory removed on drop (no dev-dependency for one directory).
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "hexz-guest-conn-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).expect("mkdir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn references_are_counted_and_forgotten_no_further_than_held() {
        let (conn, seen, _dir) = fake_server(|_, op| match op {
            Op::Lookup { .. } => Some(ReplyBody::Entry(entry(9))),
            _ => Some(ReplyBody::ok()),
        });
        for _ in 0..3 {
            let lookup = Op::Lookup {
                parent: 1,
                name: b"x".to_vec(),
            };
            assert!(matches!(conn.call(lookup), Ok(ReplyBody::Entry(_))));
        }
        assert_eq!(conn.refs_on(9), 3);
        conn.forget(&[(9, 2)]);
        assert_eq!(conn.refs_on(9), 1);
        conn.forget(&[(9, 5), (10, 1)]);
        assert_eq!(conn.refs_on(9), 0);
        // Sent: 3 lookups, then 2 + 1 forgotten (not 5; nothing for node 10) — as one
        // request when the two calls fall in one queueing moment, as two otherwise.
        let forgets: Vec<Op> = (0..5)
            .filter_map(|_| seen.recv_timeout(Duration::from_secs(2)).ok())
            .map(|(_, op)| op)
            .filter(|op| !matches!(op, Op::Lookup { .. }))
            .collect();
        let mut forgotten = HashMap::new();
        for op in &forgets {
            let items = match op {
                Op::Forget { node, nlookup } => vec![(*node, *nlookup)],
                Op::BatchForget { items } => items.clone(),
                other => panic!("unexpected {other:?}"),
            };
            for (node, n) in items {
                *forgotten.entry(node).or_insert(0u64) += n;
            }
        }
        assert_eq!(forgotten, HashMap::from([(9, 3)]), "sent: {forgets:?}");
    }

    #[test]
    fn after_a_reconnect_references_are_retained_before_anything_else() {
        let plus = |name: &[u8], node| DirEntryPlus {
            name: name.to_vec(),
            cookie: node,
            entry: entry(node),
        };
        let dir = ReplyBody::DirPlus {
            entries: vec![plus(b".", 1), plus(b"a", 7), plus(b"b", 8)],
            eof: true,
        };
        let (conn, seen, _dir) = fake_server(move |k, op| match op {
            Op::Lookup { .. } => Some(ReplyBody::Entry(entry(9))),
            Op::Readdirplus { .. } => Some(dir.clone()),
            Op::Getattr { .. } if k == 0 => None, // the host goes away
            _ => Some(ReplyBody::ok()),
        });
        let lookup = || Op::Lookup {
            parent: 1,
            name: b"x".to_vec(),
        };
        conn.call(lookup()).expect("lookup");
        conn.call(lookup()).expect("lookup");
        let list = Op::Readdirplus {
            fh: 1,
            cookie: 0,
            max_entries: 10,
        };
        conn.call(list).expect("readdirplus");
        conn.forget(&[(8, 1)]);
        let getattr = || Op::Getattr { node: 9, fh: None };
        // Taken before the loss: the reader thread reconnects at once, maybe before the
        // failed call returns.
        let before = conn.epoch();
        assert_eq!(conn.call(getattr()), Err(CallError::Lost));
        assert_eq!(conn.call(getattr()), Ok(ReplyBody::ok()));
        assert_eq!(conn.epoch(), before + 1);
        let second: Vec<Op> = std::iter::from_fn(|| seen.recv_timeout(Duration::from_secs(5)).ok())
            .filter(|(k, _)| *k == 1)
            .map(|(_, op)| op)
            .take(2)
            .collect();
        match &second[..] {
            [Op::Retain { items }, Op::Getattr { node: 9, .. }] => {
                let mut items = items.clone();
                items.sort();
                assert_eq!(items, vec![(7, 1), (9, 2)]);
            }
            other => panic!("the new connection began with {other:?}"),
        }
    }

    #[test]
    fn a_reply_handed_on_counts_its_references_and_a_loss_reaches_it() {
        let (conn, _seen, _dir) = fake_server(|k, op| match op {
            Op::Lookup { .. } => Some(ReplyBody::Entry(entry(9))),
            Op::Getattr { .. } if k == 0 => None, // the host goes away
            _ => Some(ReplyBody::ok()),
        });
        let (tx, rx) = sync_channel(2);
        let lookup = Op::Lookup {
            parent: 1,
            name: b"x".to_vec(),
        };
        let t = tx.clone();
        conn.call_then(lookup, Box::new(move |r| t.send(r).expect("send")));
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("handed on");
        assert!(
            matches!(got, Ok((ReplyBody::Entry(ref e), 1)) if e.node == 9),
            "{got:?}"
        );
        // Counted as the reply arrived: the host gave a reference for it.
        assert_eq!(conn.refs_on(9), 1);
        // No reply will come: the connection drops, and the loss is handed on instead.
        let getattr = Op::Getattr { node: 9, fh: None };
        conn.call_then(getattr, Box::new(move |r| tx.send(r).expect("send")));
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("handed on");
        assert_eq!(got, Err(CallError::Lost));
    }

    #[test]
    fn a_request_for_an_older_connection_is_not_sent() {
        let (conn, _seen, _dir) = fake_server(|_, _| Some(ReplyBody::ok()));
        let e = conn.epoch();
        assert_eq!(conn.call_on(e, Op::Release { fh: 1 }), Ok(ReplyBody::ok()));
        assert_eq!(
            conn.call_on(e + 1, Op::Release { fh: 1 }),
            Err(CallError::Stale)
        );
    }
}
