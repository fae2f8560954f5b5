//! `hexz-guestfused`: mounts the workspace served by the host (`hexz-host serve`) with
//! FUSE: the adapter in `hexz-fuse` over one socket connection (`conn.rs`).

mod conn;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fuser::{Config, MountOption, SessionACL};
use hexz_protocol::addr::Addr;

/// See guest/Cargo.toml: musl's allocator maps and unmaps memory groups as they fill and empty.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hexz-guestfused",
    version,
    about = "Mount a hexz workspace served by the host"
)]
struct Cli {
    /// Where to mount the workspace.
    mountpoint: PathBuf,
    /// The host server: vsock:CID:PORT (the host is CID 2), vsock-uds:PATH[:PORT] (the
    /// Unix socket PATH_PORT), unix:PATH or tcp:IP:PORT.
    #[arg(long, default_value = "vsock:2:5001")]
    connect: Addr,
    /// How long a request waits (including for the host to come back) before failing
    /// with ETIMEDOUT; also how long startup waits for the host. Seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// How long the kernel may remember that a name does not exist. Seconds; 0 disables.
    #[arg(long, default_value_t = 60)]
    negative_ttl: u64,
    /// Let the kernel cache writes (faster small writes). Off by default: with it, this
    /// kernel sends a FLUSH on every close and forgets each closed file's block count,
    /// so read-mostly work (tar, git status) pays a round trip per file.
    #[arg(long)]
    writeback: bool,
    /// Have the kernel send OPEN/RELEASE for every file (off by default: files open
    /// without a round trip and their data goes through one host handle per file).
    #[arg(long)]
    open_per_file: bool,
    /// Have the kernel send OPENDIR/RELEASEDIR for every directory, answered by the
    /// daemon (off by default: directories open without that hop; listings work the
    /// same either way).
    #[arg(long)]
    opendir_per_dir: bool,
    /// In the default (no-open) mode, how many host handles for file data to keep at once;
    /// beyond it, handles not in use are released (and reopened when needed again).
    #[arg(long, default_value_t = hexz_fuse::MAX_NODE_HANDLES)]
    max_node_handles: usize,
    /// Do not read ahead of tree walks: a directory's other small files when the first
    /// one is read (where the host offers `read_files`), the next directories' listings
    /// when a walk goes down, and a directory's whole listing at a lookup in it (where the
    /// host offers `list_dirs`). On by default.
    #[arg(long)]
    no_read_ahead: bool,
    /// Do not answer creates (with their first bytes) and unlinks before the host has
    /// applied them (where the host offers `write_behind`, they are answered at once and
    /// sent behind, in order, many per round trip; a failure the host reports later
    /// makes fsync on the file or its directory return EIO). On by default.
    #[arg(long)]
    no_write_behind: bool,
}

fn main() -> ExitCode {
    // No transparent huge pages for this process. Debian's kernels default to THP
    // "always" in guests of 512 MiB or more, and then a first touch of the allocator's
    // memory takes a whole 2 MiB. In a 1 GiB guest, after a cold `find | xargs stat`
    // of 6.4k files, the daemon held 95-97 MB with THP and 27 MB without, for the same
    // walk time (bench/guest-mem.sh). Its memory is many small objects, not large arrays.
    let thp = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::mnt=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = thp {
        tracing::debug!("transparent huge pages stay on: {e}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hexz-guestfused: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    use nix::sys::signal::{SigSet, Signal};
    // Take SIGINT/SIGTERM in one thread (below), never in the FUSE workers.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking signals")?;

    let conn = conn::Conn::connect(cli.connect.clone(), Duration::from_secs(cli.timeout))
        .with_context(|| format!("cannot reach the host at {}", cli.connect))?;
    tracing::info!(server = %conn.hello.server, "connected to the host");
    let fs = hexz_fuse::HexzFs::new(
        conn,
        hexz_fuse::Options {
            writeback: cli.writeback,
            negative_ttl: Duration::from_secs(cli.negative_ttl),
            no_open: !cli.open_per_file,
            max_node_handles: cli.max_node_handles,
            no_opendir: !cli.opendir_per_dir,
            read_ahead: !cli.no_read_ahead,
            write_behind: !cli.no_write_behind,
        },
    );
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("hexz".into()),
        MountOption::Subtype("hexz".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(cli.threads.max(1));
    config.clone_fd = true;
    let mountpoint = std::fs::canonicalize(&cli.mountpoint)
        .with_context(|| format!("mountpoint {}", cli.mountpoint.display()))?;
    let notifier = fs.notifier_slot();
    let session = fuser::Session::new(fs, &mountpoint, &config)
        .with_context(|| format!("cannot mount {}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    let background = session.spawn().context("starting the FUSE session")?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    std::thread::Builder::new()
        .name("hexz-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig:?}: unmounting {}", mountpoint.display());
                // Unmounting ends the FUSE session, and with it the daemon.
                if let Err(e) = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::empty()) {
                    // Busy (a process still has a file open): detach it so the daemon can go;
                    // the kernel fails what is still pending with ENOTCONN.
                    tracing::warn!("unmount failed ({e}); detaching the mount");
                    if let Err(e) =
                        nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    {
                        tracing::error!("detach failed: {e}");
                    }
                    std::process::exit(0);
                }
            }
        })?;
    background.join().context("FUSE session")?;
    tracing::info!("unmounted");
    Ok(())
}
