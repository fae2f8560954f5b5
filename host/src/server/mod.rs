//! `hexz-host serve`: the protocol over every listener, many connections, many requests
//! in flight per connection, replies as they complete.
//!
//! Each connection has a reader thread. Requests answered from memory (lookups,
//! attributes, listings, reads of cached snapshot data) are answered inline on it, with
//! no thread hand-off; anything that may wait for a disk goes to a shared worker pool,
//! which writes its reply itself. So a slow read never holds up a lookup, and a lone
//! request costs one read and one write system call on the server.

mod dispatch;
pub mod listen;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{unbounded, Sender};
use hexz_protocol::frame::read_frame;
use hexz_protocol::hello::PRE_HELLO_MAX_FRAME;
use hexz_protocol::{
    accept_hello, decode_request, encode_frame, Errno, FrameError, Limits, Op, Reply, ReplyBody,
};

pub use dispatch::Session;
pub use listen::ListenAddr;

use crate::error::{Error, Result};
use crate::vfs::Vfs;

/// Capabilities this server offers (see docs/PROTOCOL.md §4).
pub const CAPS: &[&str] = &["readdirplus", "xattr", "rename2", "lseek", "fallocate"];

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub limits: Limits,
    /// How long clients may cache entries and attributes.
    pub ttl_ms: u32,
    /// Threads serving requests that may block on a disk.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            ttl_ms: 3_600_000,
            workers: 16,
        }
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

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
            ListenAddr::Unix(_) | ListenAddr::VsockUds(..) => {
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
            ListenAddr::Vsock(port) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|e| Error::io("tokio", e))?;
                let l = rt
                    .block_on(async {
                        tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                            tokio_vsock::VMADDR_CID_ANY,
                            *port,
                        ))
                    })
                    .map_err(|e| Error::io(format!("vsock port {port}"), e))?;
                Box::new(move || {
                    let (s, peer) = rt.block_on(l.accept())?;
                    // Serve it with blocking I/O like every other stream.
                    let fd = s.as_fd().try_clone_to_owned()?;
                    drop(s);
                    set_blocking(&fd)?;
                    Ok((fd, format!(" from {peer:?}")))
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
                        let (vfs, cfg, jobs, peer) = (
                            vfs.clone(),
                            cfg.clone(),
                            jobs.clone(),
                            format!("{name}{peer}"),
                        );
                        let spawned = std::thread::Builder::new()
                            .name("hexz-conn".into())
                            .spawn(move || connection(File::from(fd), vfs, cfg, jobs, peer));
                        if let Err(e) = spawned {
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

/// Requests in flight on one connection, bounded by the negotiated limit.
struct InFlight {
    count: Mutex<u32>,
    changed: Condvar,
    max: u32,
}

impl InFlight {
    fn acquire(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= self.max {
            n = self.changed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
    }

    fn release(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.changed.notify_all();
    }

    fn drain(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.changed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The write side of a connection, shared by the reader and the workers.
struct Replies {
    stream: Mutex<File>,
    max_frame: u32,
}

impl Replies {
    fn send(&self, id: u64, body: ReplyBody) {
        let frame = reply_frame(id, body, self.max_frame);
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write means the client is gone; the reader notices and cleans up.
        let _ = s.write_all(&frame);
    }
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
    let (served, why) = match stream.try_clone() {
        Ok(writer) => run_connection(stream, writer, &vfs, &cfg, &jobs, owner),
        Err(e) => (0, format!("cannot clone the stream: {e}")),
    };
    let released = vfs.release_owner(owner);
    tracing::info!(conn = owner, %peer, requests = served, handles_released = released, "connection closed: {why}");
}

/// Serves one connection; returns how many requests it read and why it ended.
fn run_connection(
    mut rd: File,
    wr: File,
    vfs: &Arc<Vfs>,
    cfg: &ServerConfig,
    jobs: &Sender<Job>,
    owner: u64,
) -> (u64, String) {
    let mut buf = Vec::new();
    let pre = Replies {
        stream: Mutex::new(wr),
        max_frame: PRE_HELLO_MAX_FRAME,
    };
    if let Err(e) = read_frame(&mut rd, PRE_HELLO_MAX_FRAME, &mut buf) {
        return (0, format!("before hello: {e}"));
    }
    let limits = match decode_request(&buf) {
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
                    pre.send(req.id, ReplyBody::Hello(r));
                    limits
                }
                Err(e) => {
                    pre.send(req.id, ReplyBody::Err(e));
                    return (0, format!("hello refused: {e}"));
                }
            },
            _ => {
                pre.send(req.id, ReplyBody::Err(Errno::EPROTO));
                return (0, "request before hello".into());
            }
        },
        Err(bad) => {
            if let Some(id) = bad.id {
                pre.send(id, ReplyBody::Err(Errno::EPROTO));
            }
            return (0, format!("first frame is not a hello: {}", bad.reason));
        }
    };
    let replies = Arc::new(Replies {
        stream: pre.stream,
        max_frame: limits.max_frame,
    });
    let session = Arc::new(Session::new(owner, limits, cfg.ttl_ms));
    let in_flight = Arc::new(InFlight {
        count: Mutex::new(0),
        changed: Condvar::new(),
        max: limits.max_in_flight,
    });
    let mut served = 0u64;
    let why = loop {
        in_flight.acquire();
        match read_frame(&mut rd, limits.max_frame, &mut buf) {
            Ok(()) => {}
            Err(FrameError::Closed) => {
                in_flight.release();
                break "client closed".to_string();
            }
            Err(e) => {
                in_flight.release();
                break e.to_string();
            }
        }
        served += 1;
        let req = match decode_request(&buf) {
            Ok(r) => r,
            Err(bad) => {
                in_flight.release();
                match bad.id {
                    Some(id) => {
                        tracing::debug!(conn = owner, id, "bad request: {}", bad.reason);
                        replies.send(id, ReplyBody::Err(bad.errno));
                        continue;
                    }
                    None => break format!("undecodable frame: {}", bad.reason),
                }
            }
        };
        // Answer from memory when possible; otherwise hand off so the reader keeps reading.
        if let Some(body) = dispatch::dispatch_inline(vfs, &session, &req.op) {
            replies.send(req.id, body);
            in_flight.release();
            continue;
        }
        let (vfs, session, replies, in_flight) = (
            vfs.clone(),
            session.clone(),
            replies.clone(),
            in_flight.clone(),
        );
        let job: Job = Box::new(move || {
            let body = dispatch::dispatch(&vfs, &session, req.op);
            replies.send(req.id, body);
            in_flight.release();
        });
        if jobs.send(job).is_err() {
            break "worker pool stopped".into();
        }
    };
    // In-flight requests finish before the connection's handles and references go.
    in_flight.drain();
    session.release_refs(vfs);
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

/// Blocks until SIGINT or SIGTERM arrives. Call before starting any thread, so that
/// every thread inherits the blocked mask and the signal is taken here.
pub fn shutdown_on_signal() -> Result<impl FnOnce()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| Error::Invalid(format!("blocking signals: {e}")))?;
    Ok(move || {
        let _ = set.wait();
    })
}
