//! `hexz-host serve`: the protocol over every listener, many connections, many requests
//! in flight per connection, replies as they complete.
//!
//! Each connection has a reader thread and a writer thread. Requests answered from memory
//! (lookups, attributes, listings, reads of cached snapshot data) are answered inline on
//! the reader, with no thread hand-off; anything that may wait for a disk goes to a
//! shared worker pool. Every reply goes through the connection's own bounded queue to its
//! writer, so a client that stops reading stalls only itself: its writer gives up after
//! `send_timeout` and the connection is closed, while the workers never block on it.
//!
//! Bounds against hostile clients: `max_connections`, a deadline for the hello,
//! `max_in_flight` requests per connection (the reader stops reading at the bound),
//! duplicate in-flight ids close the connection, handles per connection (EMFILE).

mod dispatch;
pub mod listen;

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use hexz_protocol::frame::read_frame;
use hexz_protocol::hello::PRE_HELLO_MAX_FRAME;
use hexz_protocol::{
    accept_hello, decode_request, encode_frame, Errno, FrameError, Limits, Op, Reply, ReplyBody,
};

pub use dispatch::{dispatch, Session};
pub use listen::{parse_listen, ListenAddr};

use crate::error::{Error, Result};
use crate::vfs::Vfs;

/// Capabilities this server offers (see docs/PROTOCOL.md §4).
pub const CAPS: &[&str] = hexz_protocol::CAPS;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub limits: Limits,
    /// How long clients may cache entries and attributes.
    pub ttl_ms: u32,
    /// Threads serving requests that may block on a disk.
    pub workers: usize,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Time a new connection has to send its hello.
    pub hello_timeout: Duration,
    /// Time a reply may wait for the client to read it before the connection is closed.
    pub send_timeout: Duration,
    /// Nameless nodes left by a previous server are kept this long after start, so
    /// reconnecting clients can `retain` them; then unreferenced ones are removed.
    pub orphan_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            ttl_ms: 3_600_000,
            workers: 16,
            max_connections: 256,
            hello_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(30),
        }
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
static OPEN_CONNS: AtomicUsize = AtomicUsize::new(0);

type Job = Box<dyn FnOnce() + Send>;

/// Binds every listener, serves until `wait_for_shutdown` returns, then flushes the
/// overlay (journal, upper files) and removes the socket files it created.
pub fn serve(
    vfs: Arc<Vfs>,
    addrs: &[ListenAddr],
    cfg: ServerConfig,
    wait_for_shutdown: impl FnOnce(),
) -> Result<()> {
    let cfg = Arc::new(cfg);
    let (jobs, job_rx) = unbounded::<Job>();
    for i in 0..cfg.workers.max(1) {
        let rx = job_rx.clone();
        std::thread::Builder::new()
            .name(format!("hexz-worker-{i}"))
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .map_err(|e| Error::io("worker thread", e))?;
    }
    let mut sockets = Vec::new();
    for addr in addrs {
        let accept: Box<dyn FnMut() -> std::io::Result<(OwnedFd, String)> + Send> = match addr {
            ListenAddr::Unix(_) | ListenAddr::VsockUds { .. } => {
                let path = addr
                    .socket_path()
                    .ok_or_else(|| Error::Invalid("no socket path".into()))?;
                let l = bind_unix(&path)?;
                sockets.push(path);
                Box::new(move || l.accept().map(|(s, _)| (OwnedFd::from(s), String::new())))
            }
            ListenAddr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a).map_err(|e| Error::io(a.to_string(), e))?;
                Box::new(move || {
                    let (s, peer) = l.accept()?;
                    s.set_nodelay(true)?;
                    Ok((OwnedFd::from(s), format!(" from {peer}")))
                })
            }
            ListenAddr::VirtioPort(_) => {
                return Err(Error::Invalid(format!(
                    "{addr}: a virtio port is a guest's client end; a server cannot listen on it"
                )))
            }
            ListenAddr::Vsock { cid, port } => {
                let (cid, port) = (*cid, *port);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|e| Error::io("tokio", e))?;
                let l = rt
                    .block_on(async {
                        tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                            tokio_vsock::VMADDR_CID_ANY,
                            port,
                        ))
                    })
                    .map_err(|e| Error::io(format!("vsock port {port}"), e))?;
                Box::new(move || loop {
                    let (s, peer) = rt.block_on(l.accept())?;
                    // Only the VM this server serves may connect (one VM must not mount
                    // another's sandbox).
                    if peer.cid() != cid {
                        tracing::warn!(
                            peer_cid = peer.cid(),
                            serving_cid = cid,
                            "refused a vsock connection from another VM"
                        );
                        continue;
                    }
                    // Serve it with blocking I/O like every other stream.
                    let fd = s.as_fd().try_clone_to_owned()?;
                    drop(s);
                    set_blocking(&fd)?;
                    return Ok((fd, format!(" from {peer:?}")));
                })
            }
        };
        let (vfs, cfg, jobs, name) = (vfs.clone(), cfg.clone(), jobs.clone(), addr.to_string());
        let mut accept = accept;
        std::thread::Builder::new()
            .name(format!("hexz-accept-{name}"))
            .spawn(move || loop {
                match accept() {
                    Ok((fd, peer)) => {
                        let open = OPEN_CONNS.fetch_add(1, Ordering::AcqRel);
                        if open >= cfg.max_connections {
                            OPEN_CONNS.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!(
                                limit = cfg.max_connections,
                                "refused a connection on {name}{peer}: too many connections"
                            );
                            continue;
                        }
                        let (vfs, cfg, jobs, peer) = (
                            vfs.clone(),
                            cfg.clone(),
                            jobs.clone(),
                            format!("{name}{peer}"),
                        );
                        let spawned =
                            std::thread::Builder::new()
                                .name("hexz-conn".into())
                                .spawn(move || {
                                    connection(File::from(fd), vfs, cfg, jobs, peer);
                                    OPEN_CONNS.fetch_sub(1, Ordering::AcqRel);
                                });
                        if let Err(e) = spawned {
                            OPEN_CONNS.fetch_sub(1, Ordering::AcqRel);
                            tracing::error!("cannot start a connection thread: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(listener = %name, "accept failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| Error::io("accept thread", e))?;
        tracing::info!(listener = %addr, "listening");
    }
    start_orphan_collection(&vfs, cfg.orphan_grace);
    start_stats_on_usr1(&vfs);
    wait_for_shutdown();
    tracing::info!("shutting down: flushing the overlay");
    for p in &sockets {
        let _ = std::fs::remove_file(p);
    }
    vfs.shutdown()
}

fn set_blocking(fd: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener> {
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A socket file left by a server that died: replace it, unless someone answers.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::Invalid(format!(
                    "{}: another server is listening here",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
            std::os::unix::net::UnixListener::bind(path).map_err(|e| Error::io(path, e))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Requests in flight on one connection (their ids), bounded by the negotiated limit. A
/// request stays in flight until its reply is written.
struct InFlight {
    state: Mutex<(u32, HashSet<u64>)>,
    changed: Condvar,
    max: u32,
}

impl InFlight {
    fn wait_for_room(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 >= self.max {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Registers `id`; false when a request with that id is still in flight.
    fn start(&self, id: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.1.insert(id) {
            return false;
        }
        st.0 += 1;
        true
    }

    fn done(&self, id: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1.remove(&id) {
            st.0 -= 1;
        }
        self.changed.notify_all();
    }

    fn drain(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Where a connection's replies are written, by its reader (inline answers) and by its
/// writer thread (worker answers), one frame at a time. A write that cannot make progress
/// for `send_timeout` marks the connection broken and shuts the socket down; the reader
/// then ends the connection. Only this connection's threads ever wait here.
struct Output {
    stream: Mutex<(File, bool)>,
    in_flight: Arc<InFlight>,
    owner: u64,
}

impl Output {
    fn write(&self, id: u64, frame: &[u8]) {
        {
            let mut out = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            let (file, broken) = &mut *out;
            if !*broken {
                if let Err(e) = file.write_all(frame) {
                    *broken = true;
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                    {
                        tracing::warn!(
                            conn = self.owner,
                            "client does not read its replies: disconnecting"
                        );
                    }
                    // Wakes the reader, which ends the connection.
                    // SAFETY: shutdown on a descriptor we own; no memory is passed.
                    unsafe { libc::shutdown(file.as_raw_fd(), libc::SHUT_RDWR) };
                }
            }
        }
        self.in_flight.done(id);
    }
}

/// The reply side of a connection. Answers computed on the reader are written at once
/// (no thread hand-off on the fast path); answers from the shared workers go through a
/// queue to the connection's writer thread, so a worker never waits on a client. The
/// queue holds at most `max_in_flight` replies (a request keeps its in-flight slot until
/// its reply is written), so queueing never blocks.
struct Replies {
    out: Arc<Output>,
    queue: Sender<(u64, Vec<u8>)>,
    max_frame: u32,
}

impl Replies {
    /// From the connection's reader.
    fn send_now(&self, id: u64, body: ReplyBody) {
        self.out.write(id, &reply_frame(id, body, self.max_frame));
    }

    /// From a shared worker.
    fn send(&self, id: u64, body: ReplyBody) {
        let frame = reply_frame(id, body, self.max_frame);
        if self.queue.try_send((id, frame)).is_err() {
            tracing::error!(id, "reply queue full or closed; reply dropped");
            self.out.in_flight.done(id);
        }
    }
}

/// Writes the workers' replies until the queue closes.
fn write_replies(out: Arc<Output>, queue: Receiver<(u64, Vec<u8>)>) {
    for (id, frame) in queue {
        out.write(id, &frame);
    }
}

fn set_timeout(fd: &File, opt: libc::c_int, t: Option<Duration>) -> std::io::Result<()> {
    let t = t.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a timeval that lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn connection(
    stream: File,
    vfs: Arc<Vfs>,
    cfg: Arc<ServerConfig>,
    jobs: Sender<Job>,
    peer: String,
) {
    let owner = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    tracing::info!(conn = owner, %peer, "connection opened");
    let mut ops = OpCounts::default();
    let (served, why) = match stream.try_clone() {
        Ok(writer) => run_connection(stream, writer, &vfs, &cfg, &jobs, owner, &mut ops),
        Err(e) => (0, format!("cannot clone the stream: {e}")),
    };
    let (handles, nodes) = vfs.release_owner(owner);
    tracing::info!(conn = owner, %peer, requests = served, ops = %ops, handles_released = handles, nodes_released = nodes, "connection closed: {why}");
}

/// Requests of one connection by operation (`lookup:12 read:40 ...`), for the log line
/// that closes it: what a workload sends is the first thing to know about its speed.
#[derive(Default)]
struct OpCounts(std::collections::BTreeMap<&'static str, u64>);

impl std::fmt::Display for OpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (op, n)) in self.0.iter().enumerate() {
            write!(f, "{}{op}:{n}", if i > 0 { " " } else { "" })?;
        }
        Ok(())
    }
}

/// Reads and answers the hello; returns the agreed limits and capabilities.
fn hello(
    rd: &mut File,
    wr: &mut File,
    vfs: &Vfs,
    cfg: &ServerConfig,
) -> Result<(Limits, Vec<String>), String> {
    let mut buf = Vec::new();
    let _ = set_timeout(rd, libc::SO_RCVTIMEO, Some(cfg.hello_timeout));
    if let Err(e) = read_frame(rd, PRE_HELLO_MAX_FRAME, &mut buf) {
        return Err(format!("no hello: {e}"));
    }
    let _ = set_timeout(rd, libc::SO_RCVTIMEO, None);
    let mut send = |id: u64, body: ReplyBody| {
        let _ = wr.write_all(&reply_frame(id, body, PRE_HELLO_MAX_FRAME));
    };
    match decode_request(&buf) {
        Ok(req) => match req.op {
            Op::Hello(h) => match accept_hello(
                &h,
                &cfg.limits,
                CAPS,
                crate::vfs::ROOT,
                vfs.fs_id().to_vec(),
                "hexz-host",
            ) {
                Ok((r, limits)) => {
                    let caps = r.caps.clone();
                    send(req.id, ReplyBody::Hello(r));
                    Ok((limits, caps))
                }
                Err(e) => {
                    send(req.id, ReplyBody::Err(e));
                    Err(format!("hello refused: {e}"))
                }
            },
            _ => {
                send(req.id, ReplyBody::Err(Errno::EPROTO));
                Err("request before hello".into())
            }
        },
        Err(bad) => {
            if let Some(id) = bad.id {
                send(id, ReplyBody::Err(bad.errno));
            }
            Err(format!("first frame is not a hello: {}", bad.reason))
        }
    }
}

/// Serves one connection; returns how many requests it read and why it ended.
fn run_connection(
    mut rd: File,
    mut wr: File,
    vfs: &Arc<Vfs>,
    cfg: &ServerConfig,
    jobs: &Sender<Job>,
    owner: u64,
    ops: &mut OpCounts,
) -> (u64, String) {
    let (limits, caps) = match hello(&mut rd, &mut wr, vfs, cfg) {
        Ok(v) => v,
        Err(why) => return (0, why),
    };
    let _ = set_timeout(&wr, libc::SO_SNDTIMEO, Some(cfg.send_timeout));
    let in_flight = Arc::new(InFlight {
        state: Mutex::new((0, HashSet::new())),
        changed: Condvar::new(),
        max: limits.max_in_flight,
    });
    let (tx, rx) = bounded(limits.max_in_flight as usize + 1);
    let out = Arc::new(Output {
        stream: Mutex::new((wr, false)),
        in_flight: in_flight.clone(),
        owner,
    });
    let writer = {
        let out = out.clone();
        std::thread::Builder::new()
            .name("hexz-conn-writer".into())
            .spawn(move || write_replies(out, rx))
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => return (0, format!("cannot start the writer thread: {e}")),
    };
    let replies = Arc::new(Replies {
        out,
        queue: tx,
        max_frame: limits.max_frame,
    });
    let session = Arc::new(Session::new(owner, limits, cfg.ttl_ms, caps));
    let mut buf = Vec::new();
    let mut served = 0u64;
    let why = loop {
        in_flight.wait_for_room();
        match read_frame(&mut rd, limits.max_frame, &mut buf) {
            Ok(()) => {}
            Err(FrameError::Closed) => break "client closed".to_string(),
            Err(e) => break e.to_string(),
        }
        served += 1;
        let req = match decode_request(&buf) {
            Ok(r) => r,
            Err(bad) => match bad.id {
                Some(id) if in_flight.start(id) => {
                    tracing::debug!(conn = owner, id, "bad request: {}", bad.reason);
                    replies.send_now(id, ReplyBody::Err(bad.errno));
                    continue;
                }
                Some(id) => break format!("request id {id} reused while in flight"),
                None => break format!("undecodable frame: {}", bad.reason),
            },
        };
        if !in_flight.start(req.id) {
            break format!("request id {} reused while in flight", req.id);
        }
        *ops.0.entry(req.op.name()).or_default() += 1;
        // Answer from memory when possible; otherwise hand off so the reader keeps reading.
        if let Some(body) = dispatch::dispatch_inline(vfs, &session, &req.op) {
            replies.send_now(req.id, body);
            continue;
        }
        let (vfs, session, replies) = (vfs.clone(), session.clone(), replies.clone());
        let job: Job = Box::new(move || {
            let body = dispatch::dispatch(&vfs, &session, req.op);
            replies.send(req.id, body);
        });
        if jobs.send(job).is_err() {
            break "worker pool stopped".into();
        }
    };
    // In-flight requests finish (and their replies go) before the handles and references.
    drop(replies);
    in_flight.drain();
    let _ = writer.join();
    (served, why)
}

fn reply_frame(id: u64, body: ReplyBody, max_frame: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let reply = Reply { id, r: body };
    if let Err(e) = encode_frame(&reply, max_frame, &mut out) {
        tracing::error!(id, "reply does not fit the frame limit: {e}");
        out.clear();
        let _ = encode_frame(
            &Reply {
                id,
                r: ReplyBody::Err(Errno::EOVERFLOW),
            },
            max_frame,
            &mut out,
        );
    }
    out
}

/// Removes nameless nodes nobody retained within `grace` (left by a previous server, or
/// by a closed connection whose client did not come back), checking a few times per
/// grace period.
fn start_orphan_collection(vfs: &Arc<Vfs>, grace: Duration) {
    if vfs.is_read_only() {
        return;
    }
    let vfs = vfs.clone();
    let tick = (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let _ = std::thread::Builder::new()
        .name("hexz-orphans".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            if vfs.stats().orphans == 0 {
                continue;
            }
            match vfs.collect_orphans(grace) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "unreferenced nameless nodes removed"),
                Err(e) => tracing::warn!("removing unreferenced nameless nodes: {e}"),
            }
        });
}

/// Logs the core's counts on SIGUSR1 (when `shutdown_on_signal` blocked it for us).
fn start_stats_on_usr1(vfs: &Arc<Vfs>) {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut current = SigSet::empty();
    if nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, None, Some(&mut current)).is_err()
        || !current.contains(Signal::SIGUSR1)
    {
        return;
    }
    let vfs = vfs.clone();
    let _ = std::thread::Builder::new()
        .name("hexz-stats".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGUSR1);
            while set.wait().is_ok() {
                let s = vfs.stats();
                tracing::info!(
                    "stats: live_nodes={} handles={} orphans={} overlay_bytes={} connections={}",
                    s.live_nodes,
                    s.handles,
                    s.orphans,
                    s.overlay_bytes,
                    OPEN_CONNS.load(Ordering::Relaxed)
                );
            }
        });
}

/// Blocks until SIGINT or SIGTERM arrives. Call before starting any thread, so that
/// every thread inherits the blocked mask and the signal is taken here. SIGUSR1 is
/// blocked too: `serve` then logs its counts on it.
pub fn shutdown_on_signal() -> Result<impl FnOnce()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut block = SigSet::empty();
    block.add(Signal::SIGINT);
    block.add(Signal::SIGTERM);
    block.add(Signal::SIGUSR1);
    block
        .thread_block()
        .map_err(|e| Error::Invalid(format!("blocking signals: {e}")))?;
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    Ok(move || {
        let _ = set.wait();
    })
}
