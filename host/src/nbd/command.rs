//! `hexz-host nbd`: a snapshot stream, optionally under a copy-on-write overlay, served
//! over NBD. The only part of `nbd` that knows about snapshots.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use super::{serve, Export, Limits, Listener};
use crate::error::{Error, Result};
use crate::snapshot::Snapshot;

#[derive(clap::Args)]
#[command(
    after_help = "Listens on loopback (127.0.0.1:10809) by default: NBD has no \
authentication or encryption, so anyone who can reach the port can read (and with --rw \
write) the disk. A Unix socket (unix:PATH) is the safest choice."
)]
pub struct NbdArgs {
    pub snapshot: PathBuf,
    /// Which raw stream to export.
    #[arg(long, default_value = "disk")]
    pub stream: String,
    /// 127.0.0.1:PORT (loopback TCP; port 0 picks one) or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Allow a non-loopback TCP address (unauthenticated, unencrypted access to the disk).
    #[arg(long)]
    pub allow_remote: bool,
    /// Accept writes, kept in --overlay (the snapshot is never changed).
    #[arg(long, requires = "overlay")]
    pub rw: bool,
    /// Block overlay file (created if missing); bound to this snapshot and stream.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// Export name (clients may also ask for the default, empty name).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Most concurrent client connections.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Decompressed-frame cache, MiB. Re-reads decompress nothing when the stream's data
    /// fits; a full scan of a larger disk decompresses it all again. Default: enough for
    /// the stream's data, at least 256 and at most a quarter of the memory available at
    /// start (the cache grows only as data is read).
    #[arg(long)]
    pub cache_mib: Option<u64>,
}

fn bind(spec: &str, allow_remote: bool) -> Result<(Listener, String)> {
    if let Some(path) = spec.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let l = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        return Ok((
            Listener::Unix(l),
            format!("nbd+unix:///?socket={}", path.display()),
        ));
    }
    let addr: SocketAddr = spec
        .strip_prefix("tcp:")
        .unwrap_or(spec)
        .parse()
        .map_err(|_| Error::Invalid(format!("--listen {spec}: expected IP:PORT or unix:PATH")))?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(Error::Invalid(format!(
            "--listen {spec} is not a loopback address: NBD has no authentication or encryption; pass --allow-remote to do it anyway"
        )));
    }
    let l = TcpListener::bind(addr).map_err(|e| Error::io(spec, e))?;
    let local = l.local_addr().map_err(|e| Error::io(spec, e))?;
    Ok((Listener::Tcp(l), format!("nbd://{local}")))
}

/// The frame cache's size when `--cache-mib` is not given, MiB.
const DEFAULT_CACHE: u64 = 256;

/// Enough for the stream's stored data (holes and zero runs take none), between
/// [`DEFAULT_CACHE`] and a quarter of the memory available now.
fn auto_cache_mib(snap: &Snapshot, stream: &str) -> u64 {
    let Some(s) = snap.stream(stream) else {
        return DEFAULT_CACHE;
    };
    let data: u64 = s
        .data
        .extents
        .iter()
        .filter_map(|e| snap.index().chunks.get(e.chunk as usize))
        .map(|c| c.len as u64)
        .sum();
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(DEFAULT_CACHE, |kib| kib / 1024 / 4);
    (data.div_ceil(1 << 20) + 16)
        .min(available)
        .max(DEFAULT_CACHE)
}

/// Runs the server until SIGINT/SIGTERM, which flush the overlay and exit.
pub fn run(args: NbdArgs) -> Result<()> {
    // Signals go to one waiting thread; block them before any thread exists.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| Error::Invalid(format!("cannot block signals: {e}")))?;

    let mut snap = Snapshot::open_with_cache(&args.snapshot, DEFAULT_CACHE << 20)?;
    let cache_mib = match args.cache_mib {
        Some(m) => m,
        None => auto_cache_mib(&snap, &args.stream),
    };
    if cache_mib != DEFAULT_CACHE {
        // The index is small next to the data: opening again with the right cache is
        // cheaper than a cache that cannot hold the export.
        snap = Snapshot::open_with_cache(&args.snapshot, cache_mib << 20)?;
    }
    let snap = Arc::new(snap);
    let device = crate::blockdev::open_stream(&snap, &args.stream, args.overlay.as_deref())?;
    let size = device.size();
    let (listener, url) = bind(&args.listen, args.allow_remote)?;
    let export = Arc::new(Export {
        name: args.name.clone(),
        description: format!(
            "hexz snapshot {} stream {}",
            &snap.id_hex()[..16],
            args.stream
        ),
        device: device.clone(),
        writable: args.rw,
    });

    let flusher = device.clone();
    std::thread::spawn(move || {
        let sig = sigs.wait();
        info!(
            "{}: flushing and exiting",
            sig.map_or_else(|e| e.to_string(), |s| s.as_str().to_string())
        );
        let code = match flusher.flush() {
            Ok(()) => 0,
            Err(e) => {
                warn!("final flush failed: {e}");
                1
            }
        };
        std::process::exit(code);
    });

    let mode = if args.rw { "read-write" } else { "read-only" };
    let name = if args.name.is_empty() {
        String::new()
    } else {
        format!("/{}", args.name)
    };
    println!(
        "serving stream '{}' ({size} bytes, {mode}) at {url}{name}; frame cache up to {cache_mib} MiB",
        args.stream
    );
    let _ = std::io::stdout().flush();
    serve(
        listener,
        export,
        Limits {
            max_connections: args.max_connections.max(1),
            ..Limits::default()
        },
    )
    .map_err(|e| Error::io(&args.listen, e))
}
