//! An NBD server for any `BlockDevice` (fixed newstyle, structured replies,
//! `base:allocation`). It knows nothing of snapshots; `command` wires a snapshot stream
//! and overlay to it for `hexz-host nbd`.

pub mod command;
mod handshake;
mod transmission;
mod wire;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::blockdev::BlockDevice;
use wire::*;

/// Largest request payload (read or write); larger writes end the connection, larger
/// reads fail with EOVERFLOW (EINVAL without structured replies).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve_until` waits, once stopped, for open connections to end.
const STOP_DRAIN: Duration = Duration::from_secs(5);

/// The one export a server offers.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Accept writes (the device must be writable).
    pub writable: bool,
}

impl Export {
    /// The export answers to its name and to the empty (default) name.
    fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Flags that hold for this export: multi-conn holds because every connection shares
    /// one device and a flush on any of them syncs all of it.
    fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.writable {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        f
    }
}

/// Limits of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Requests of one connection processed at once.
    pub workers_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 16,
            workers_per_connection: 4,
        }
    }
}

/// A listening socket: TCP (the caller decides which addresses are allowed) or Unix.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// One client connection.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accepts clients forever, one thread per connection; returns only if accepting fails.
pub fn serve(listener: Listener, export: Arc<Export>, limits: Limits) -> io::Result<()> {
    serve_until(listener, export, limits, &AtomicBool::new(false))
}

/// `serve` that returns once `stop` is set and the next connection (the caller's wake-up)
/// arrives, after waiting up to `STOP_DRAIN` for open connections to end (each flushes a
/// writable device as it ends).
pub fn serve_until(
    listener: Listener,
    export: Arc<Export>,
    limits: Limits,
    stop: &AtomicBool,
) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    for n in 1u64.. {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Conn::Tcp(s), a.to_string())
            }),
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| (Conn::Unix(s), format!("client {n}"))),
        };
        if stop.load(Ordering::Acquire) {
            let deadline = std::time::Instant::now() + STOP_DRAIN;
            while active.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(());
        }
        let (conn, peer) = accepted?;
        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!(
                "refusing {peer}: {} connections already open",
                limits.max_connections
            );
            conn.shutdown();
            continue;
        }
        let export = export.clone();
        let active = active.clone();
        std::thread::spawn(move || {
            info!("{peer} connected");
            match session(conn, &export, limits) {
                Ok(()) => info!("{peer} disconnected"),
                Err(e) => warn!("{peer}: {e}; connection closed"),
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

fn session(mut conn: Conn, export: &Export, limits: Limits) -> io::Result<()> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let Some(sess) = handshake::negotiate(&mut conn, export)? else {
        return Ok(());
    };
    conn.set_read_timeout(None)?;
    let res = transmission::transmit(conn, export, sess, limits.workers_per_connection.max(1));
    // Leave nothing unflushed behind a departing client that forgot to flush.
    if export.writable {
        if let Err(e) = export.device.flush() {
            warn!("flush after disconnect failed: {e}");
        }
    }
    res
}
