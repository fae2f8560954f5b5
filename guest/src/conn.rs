//! The connection to the host server: one stream, many requests in flight (one reader
//! thread routes replies to waiting callers by id), reconnect with backoff, and bounded
//! waits while the host is away.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hexz_protocol::client::default_hello;
use hexz_protocol::frame::read_frame;
use hexz_protocol::hello::PRE_HELLO_MAX_FRAME;
use hexz_protocol::{
    check_hello_reply, decode_reply, encode_frame, Errno, HelloReply, Limits, Op, ReplyBody,
    Request,
};

/// Where the host server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Addr, String> {
        let bad = || format!("'{s}': expected vsock:CID:PORT, unix:PATH or tcp:HOST:PORT");
        match s.split_once(':').ok_or_else(bad)? {
            ("vsock", rest) => {
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                Ok(Addr::Vsock {
                    cid: cid.parse().map_err(|_| bad())?,
                    port: port.parse().map_err(|_| bad())?,
                })
            }
            ("unix", p) if !p.is_empty() => Ok(Addr::Unix(PathBuf::from(p))),
            ("tcp", a) if a.contains(':') => Ok(Addr::Tcp(a.to_string())),
            _ => Err(bad()),
        }
    }
}

impl Addr {
    fn open(&self) -> std::io::Result<OwnedFd> {
        match self {
            Addr::Unix(p) => Ok(std::os::unix::net::UnixStream::connect(p)?.into()),
            Addr::Tcp(a) => {
                let s = std::net::TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Ok(s.into())
            }
            Addr::Vsock { cid, port } => {
                use nix::sys::socket::{
                    connect, socket, AddressFamily, SockFlag, SockType, VsockAddr,
                };
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
}

/// Why a call did not get a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// The server answered with an errno.
    Errno(Errno),
    /// The connection dropped after the request was sent: its outcome is unknown.
    Lost,
}

type Waiter = SyncSender<Result<ReplyBody, CallError>>;

struct Link {
    writer: Arc<Mutex<File>>,
    limits: Limits,
}

pub struct Conn {
    addr: Addr,
    timeout: Duration,
    link: Mutex<Option<Link>>,
    linked: Condvar,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    epoch: AtomicU64,
    fs_id: Vec<u8>,
    pub hello: HelloReply,
}

fn establish(addr: &Addr) -> std::io::Result<(File, File, HelloReply, Limits)> {
    let fd = addr.open()?;
    let mut rd = File::from(fd);
    let mut wr = rd.try_clone()?;
    let hello = default_hello("hexz-guestfused");
    let mut out = Vec::new();
    encode_frame(
        &Request {
            id: 0,
            op: Op::Hello(hello.clone()),
        },
        PRE_HELLO_MAX_FRAME,
        &mut out,
    )
    .map_err(other)?;
    wr.write_all(&out)?;
    let mut buf = Vec::new();
    read_frame(&mut rd, PRE_HELLO_MAX_FRAME, &mut buf).map_err(other)?;
    match decode_reply(&buf).map_err(other)?.r {
        ReplyBody::Hello(r) => {
            let limits =
                check_hello_reply(&hello, &r).map_err(|e| other(format!("server hello: {e}")))?;
            Ok((rd, wr, r, limits))
        }
        ReplyBody::Err(e) => Err(other(format!("server refused hello: {e}"))),
        r => Err(other(format!("unexpected hello reply {r:?}"))),
    }
}

fn other(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Conn {
    /// Connects (retrying until `timeout`), says hello, and starts the reader thread.
    pub fn connect(addr: Addr, timeout: Duration) -> std::io::Result<Arc<Conn>> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(50);
        let (rd, wr, hello, limits) = loop {
            match establish(&addr) {
                Ok(x) => break x,
                Err(e) if Instant::now() + delay < deadline => {
                    tracing::info!("host not reachable at {addr:?} yet ({e}); retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        let conn = Arc::new(Conn {
            addr,
            timeout,
            link: Mutex::new(Some(Link {
                writer: Arc::new(Mutex::new(wr)),
                limits,
            })),
            linked: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(1),
            fs_id: hello.fs_id.clone(),
            hello,
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name("hexz-reader".into())
            .spawn(move || c.reader(rd))?;
        Ok(conn)
    }

    pub fn limits(&self) -> Limits {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(Limits::default(), |l| l.limits)
    }

    /// Increases each time the connection is re-established (server handles are gone).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Routes replies; on a dropped connection fails the waiting calls and reconnects.
    fn reader(self: Arc<Self>, mut rd: File) {
        let mut buf = Vec::new();
        loop {
            let max = self.limits().max_frame;
            match read_frame(&mut rd, max, &mut buf) {
                Ok(()) => match decode_reply(&buf) {
                    Ok(r) => {
                        let waiter = self
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&r.id);
                        if let Some(w) = waiter {
                            let res = match r.r {
                                ReplyBody::Err(e) => Err(CallError::Errno(e.sanitized())),
                                body => Ok(body),
                            };
                            let _ = w.send(res);
                        }
                    }
                    Err(e) => tracing::warn!("undecodable reply from the host: {e}"),
                },
                Err(e) => {
                    tracing::warn!("connection to the host lost: {e}; reconnecting");
                    rd = self.reconnect();
                }
            }
        }
    }

    fn reconnect(&self) -> File {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for (_, w) in self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = w.send(Err(CallError::Lost));
        }
        let mut delay = Duration::from_millis(20);
        loop {
            match establish(&self.addr) {
                Ok((rd, wr, hello, limits)) => {
                    if hello.fs_id != self.fs_id {
                        tracing::error!("the host now serves a different filesystem (fs_id changed); refusing it");
                    } else {
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(Link {
                            writer: Arc::new(Mutex::new(wr)),
                            limits,
                        });
                        self.linked.notify_all();
                        tracing::info!("reconnected to the host");
                        return rd;
                    }
                }
                Err(e) => tracing::debug!("reconnect failed: {e}"),
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// The live writer, waiting for a reconnection until `deadline`.
    fn writer(&self, deadline: Instant) -> Result<(Arc<Mutex<File>>, u32), CallError> {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = link.as_ref() {
                return Ok((l.writer.clone(), l.limits.max_frame));
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

    /// Sends `op` and waits for its reply (at most the configured timeout, including any
    /// wait for the host to come back).
    pub fn call(&self, op: Op) -> Result<ReplyBody, CallError> {
        let deadline = Instant::now() + self.timeout;
        let (writer, max_frame) = self.writer(deadline)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_frame(&Request { id, op }, max_frame, &mut frame)
            .map_err(|_| CallError::Errno(Errno::EINVAL))?;
        let (tx, rx) = sync_channel(1);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let sent = writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&frame);
        if sent.is_err() {
            // The reader notices the broken stream and fails every waiter, this one too.
            tracing::debug!(id, "write to the host failed");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(CallError::Errno(Errno::ETIMEDOUT))
            }
        }
    }

    /// Sends `op` without waiting for the reply (forget).
    pub fn post(&self, op: Op) {
        let Ok((writer, max_frame)) = self.writer(Instant::now()) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        if encode_frame(&Request { id, op }, max_frame, &mut frame).is_ok() {
            let _ = writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(&frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "vsock:2:5001".parse(),
            Ok(Addr::Vsock { cid: 2, port: 5001 })
        );
        assert_eq!(
            "unix:/run/h.sock".parse(),
            Ok(Addr::Unix("/run/h.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(Addr::Tcp("127.0.0.1:7000".into()))
        );
        assert!("vsock:2".parse::<Addr>().is_err());
        assert!("ftp:x".parse::<Addr>().is_err());
    }
}
