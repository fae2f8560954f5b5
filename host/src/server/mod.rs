//! `hexz-host serve`: the protocol over every listener, many connections, many requests
//! in flight per connection, replies as they complete.

mod dispatch;
pub mod listen;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hexz_protocol::frame::tokio_io::read_frame;
use hexz_protocol::hello::PRE_HELLO_MAX_FRAME as PRE_HELLO_MAX_FRAME_BODY;
use hexz_protocol::{
    accept_hello, decode_request, encode_frame, Errno, FrameError, Limits, Op, Reply, ReplyBody,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            ttl_ms: 3_600_000,
        }
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Serves until `shutdown` resolves, then flushes the overlay.
pub async fn serve(
    vfs: Arc<Vfs>,
    addrs: &[ListenAddr],
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let cfg = Arc::new(cfg);
    let mut tasks = tokio::task::JoinSet::new();
    let mut sockets = Vec::new();
    for addr in addrs {
        match addr {
            ListenAddr::Unix(_) | ListenAddr::VsockUds(..) => {
                let path = addr
                    .socket_path()
                    .ok_or_else(|| Error::Invalid("no socket path".into()))?;
                let l = bind_unix(&path)?;
                sockets.push(path);
                let (vfs, cfg, name) = (vfs.clone(), cfg.clone(), addr.to_string());
                tasks.spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => spawn_conn(s, vfs.clone(), cfg.clone(), name.clone()),
                            Err(e) => tracing::warn!(listener = %name, "accept failed: {e}"),
                        }
                    }
                });
            }
            ListenAddr::Tcp(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| Error::io(a.to_string(), e))?;
                let (vfs, cfg, name) = (vfs.clone(), cfg.clone(), addr.to_string());
                tasks.spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, peer)) => {
                                let _ = s.set_nodelay(true);
                                spawn_conn(
                                    s,
                                    vfs.clone(),
                                    cfg.clone(),
                                    format!("{name} from {peer}"),
                                )
                            }
                            Err(e) => tracing::warn!(listener = %name, "accept failed: {e}"),
                        }
                    }
                });
            }
            ListenAddr::Vsock(port) => {
                let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    tokio_vsock::VMADDR_CID_ANY,
                    *port,
                ))
                .map_err(|e| Error::io(format!("vsock port {port}"), e))?;
                let (vfs, cfg, name) = (vfs.clone(), cfg.clone(), addr.to_string());
                tasks.spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, peer)) => spawn_conn(
                                s,
                                vfs.clone(),
                                cfg.clone(),
                                format!("{name} from {peer:?}"),
                            ),
                            Err(e) => tracing::warn!(listener = %name, "accept failed: {e}"),
                        }
                    }
                });
            }
        }
        tracing::info!(listener = %addr, "listening");
    }
    shutdown.await;
    tracing::info!("shutting down: flushing the overlay");
    tasks.abort_all();
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    let v = vfs.clone();
    tokio::task::spawn_blocking(move || v.shutdown())
        .await
        .map_err(|e| Error::Invalid(format!("shutdown task: {e}")))?
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    match tokio::net::UnixListener::bind(path) {
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
            tokio::net::UnixListener::bind(path).map_err(|e| Error::io(path, e))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

fn spawn_conn<S>(stream: S, vfs: Arc<Vfs>, cfg: Arc<ServerConfig>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    tokio::spawn(async move {
        let owner = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        tracing::info!(conn = owner, %peer, "connection opened");
        let (served, why) = connection(stream, vfs.clone(), cfg, owner).await;
        let v = vfs.clone();
        let released = tokio::task::spawn_blocking(move || v.release_owner(owner))
            .await
            .unwrap_or(0);
        tracing::info!(conn = owner, %peer, requests = served, handles_released = released, "connection closed: {why}");
    });
}

/// Runs one connection; returns how many requests it served and why it ended.
async fn connection<S>(
    stream: S,
    vfs: Arc<Vfs>,
    cfg: Arc<ServerConfig>,
    owner: u64,
) -> (u64, String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let mut buf = Vec::new();

    // Hello first, under the small pre-hello frame limit.
    let (limits, hello_frame) = match read_frame(&mut rd, PRE_HELLO_MAX_FRAME_BODY, &mut buf).await
    {
        Err(e) => return (0, format!("before hello: {e}")),
        Ok(()) => match decode_request(&buf) {
            Ok(req) => match req.op {
                Op::Hello(h) => match accept_hello(
                    &h,
                    &cfg.limits,
                    CAPS,
                    crate::vfs::ROOT,
                    vfs.fs_id().to_vec(),
                    "hexz-host",
                ) {
                    Ok((r, limits)) => (
                        Some(limits),
                        reply_frame(req.id, ReplyBody::Hello(r), PRE_HELLO_MAX_FRAME_BODY),
                    ),
                    Err(e) => (
                        None,
                        reply_frame(req.id, ReplyBody::Err(e), PRE_HELLO_MAX_FRAME_BODY),
                    ),
                },
                _ => (
                    None,
                    reply_frame(
                        req.id,
                        ReplyBody::Err(Errno::EPROTO),
                        PRE_HELLO_MAX_FRAME_BODY,
                    ),
                ),
            },
            Err(bad) => match bad.id {
                Some(id) => (
                    None,
                    reply_frame(id, ReplyBody::Err(Errno::EPROTO), PRE_HELLO_MAX_FRAME_BODY),
                ),
                None => return (0, format!("first frame is not a request: {}", bad.reason)),
            },
        },
    };
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    if wr.write_all(&hello_frame).await.is_err() || wr.flush().await.is_err() {
        return (0, "write failed during hello".into());
    }
    let Some(limits) = limits else {
        return (0, "hello refused".into());
    };

    let session = Arc::new(Session {
        owner,
        limits,
        ttl_ms: cfg.ttl_ms,
    });
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(limits.max_in_flight as usize + 8);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
            // Batch replies that are already waiting into one write.
            while let Ok(frame) = rx.try_recv() {
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight as usize));
    let mut served = 0u64;
    let why = loop {
        let permit = match in_flight.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break "server stopping".to_string(),
        };
        match read_frame(&mut rd, limits.max_frame, &mut buf).await {
            Ok(()) => {}
            Err(FrameError::Closed) => break "client closed".into(),
            Err(e) => break format!("{e}"),
        }
        served += 1;
        let req = match decode_request(&buf) {
            Ok(r) => r,
            Err(bad) => match bad.id {
                Some(id) => {
                    tracing::debug!(conn = owner, id, "bad request: {}", bad.reason);
                    if tx
                        .send(reply_frame(id, ReplyBody::Err(bad.errno), limits.max_frame))
                        .await
                        .is_err()
                    {
                        break "writer gone".into();
                    }
                    continue;
                }
                None => break format!("undecodable frame: {}", bad.reason),
            },
        };
        let (vfs, session, tx) = (vfs.clone(), session.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let body = dispatch::dispatch(&vfs, &session, req.op);
            let frame = reply_frame(req.id, body, session.limits.max_frame);
            let _ = tx.blocking_send(frame);
            drop(permit);
        });
    };
    // Let in-flight requests finish before their handles are released.
    let _ = in_flight.acquire_many(limits.max_in_flight).await;
    drop(tx);
    let _ = writer.await;
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
