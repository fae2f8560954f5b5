//! A snapshot's raw stream as the VM's block device: served over NBD on a private Unix
//! socket by this process, under a block copy-on-write overlay, so the guest's writes
//! never reach the snapshot. QEMU connects to the socket at start (`qemu.rs`).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::blockdev::BlockDevice;
use crate::error::{Error, Result};
use crate::nbd::{self, Export, Limits, Listener};
use crate::snapshot::Snapshot;

/// The stream attached when the snapshot has one and nothing else is asked for.
pub const DEFAULT_STREAM: &str = "disk";

/// Which stream, if any, becomes the guest's `/dev/vda`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskChoice {
    /// The `disk` stream when the snapshot has one, else none.
    Auto,
    /// This stream; an error when the snapshot lacks it.
    Stream(String),
    None,
}

impl DiskChoice {
    /// The stream to attach for `snap`, or `None`; an error naming the streams `snap`
    /// has when a stream asked for by name is not one of them.
    pub fn resolve(&self, snap: &Snapshot) -> Result<Option<String>> {
        Ok(match self {
            DiskChoice::Auto => snap
                .stream(DEFAULT_STREAM)
                .map(|_| DEFAULT_STREAM.to_string()),
            DiskChoice::Stream(name) if snap.stream(name).is_none() => {
                return Err(crate::blockdev::missing_stream(snap, name))
            }
            DiskChoice::Stream(name) => Some(name.clone()),
            DiskChoice::None => None,
        })
    }
}

/// Where the block overlay of `stream` lives: inside a persistent overlay directory (kept
/// and reused with it), else in the run's temporary directory (removed with it).
pub fn overlay_path(overlay_dir: Option<&Path>, run_dir: &Path, stream: &str) -> PathBuf {
    crate::blockdev::cow_path(overlay_dir.unwrap_or(run_dir), stream)
}

/// The NBD server of one VM's disk, on its own thread. Dropped after QEMU: it stops
/// accepting, lets the connection end (which flushes the overlay) and flushes once more.
pub struct DiskServer {
    /// The Unix socket QEMU connects to.
    pub socket: PathBuf,
    pub stream: String,
    device: Arc<dyn BlockDevice>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskServer {
    /// Opens `stream` of `snap` under the block overlay at `overlay` (created if missing;
    /// an existing one must belong to this snapshot and stream) and serves it read-write
    /// on `socket`.
    pub fn start(
        snap: Arc<Snapshot>,
        stream: &str,
        overlay: &Path,
        socket: PathBuf,
    ) -> Result<DiskServer> {
        let device = crate::blockdev::open_stream(&snap, stream, Some(overlay))?;
        let listener = UnixListener::bind(&socket).map_err(|e| Error::io(&socket, e))?;
        let export = Arc::new(Export {
            name: stream.to_string(),
            description: format!("hexz snapshot {} stream {stream}", &snap.id_hex()[..16]),
            device: device.clone(),
            writable: true,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let what = socket.clone();
        let thread = std::thread::Builder::new()
            .name("hexz-vm-disk".into())
            .spawn(move || {
                let limits = Limits {
                    max_connections: 2,
                    ..Limits::default()
                };
                if let Err(e) =
                    nbd::serve_until(Listener::Unix(listener), export, limits, &stop_flag)
                {
                    eprintln!("hexz-host: disk server on {}: {e}", what.display());
                }
            })
            .map_err(|e| Error::io("disk server thread", e))?;
        Ok(DiskServer {
            socket,
            stream: stream.to_string(),
            device,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DiskServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept; the server sees the flag and returns once QEMU's connection
        // (already closed: QEMU is gone) has ended.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.device.flush() {
            eprintln!("hexz-host: flushing the {} overlay: {e}", self.stream);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
