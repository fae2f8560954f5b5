//! A sandbox: one microVM booted on a snapshot (plus its own overlay), served by an
//! in-process VFS server, and torn down — QEMU, the vsock backend, the server, the
//! sockets and the temporary directory — whatever way it ends. `serve --vm` is here;
//! `run` (the exec channel) is in `exec.rs`.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use hexz_protocol::exec::{GuestMsg, DEFAULT_EXEC_PORT};

use super::disk::{self, DiskChoice, DiskServer};
use super::exec::EXIT_SANDBOX_FAILED;
use super::image::{self, Image};
use super::programs::Program;
use super::qemu::{self, Accel, Console, Machine, Qemu, VsockDevice};
use super::vsock::{self, HybridBackend, PortListener};
use crate::error::{Error, Result};
use crate::server::{ListenAddr, ServerConfig};
use crate::snapshot::Snapshot;
use crate::vfs::Vfs;

const FS_PORT: u32 = 5001;
const CONSOLE_TAIL_LINES: usize = 25;

/// Which kernel and initramfs to boot.
#[derive(Clone, Debug)]
pub enum ImageChoice {
    /// The cached image for the fetched kernel and these guest binaries (built if needed,
    /// never downloading).
    Cached {
        guest_bin_dir: Option<PathBuf>,
        /// Host programs to add (`--with`): a name on `PATH` or a path.
        programs: Vec<String>,
    },
    Given(Image),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM + vhost-vsock when /dev/kvm works and /dev/vhost-vsock exists, else TCG +
    /// vhost-device-vsock.
    Auto,
    Kvm,
    Tcg,
}

/// Everything about the machine and the workspace.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub snapshot: PathBuf,
    /// Persistent overlay; `None`: an ephemeral one, removed at the end.
    pub overlay: Option<PathBuf>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub image: ImageChoice,
    pub accel: AccelChoice,
    /// Keep the guest console here (else a temporary file, shown on failure).
    pub console_log: Option<PathBuf>,
    pub cache_mib: u64,
    /// Do not say which platform was picked.
    pub quiet: bool,
    /// `run` only: restore a memory template or boot cold (`template/`).
    pub template: TemplateChoice,
    /// Which raw stream, if any, becomes the guest's `/dev/vda`.
    pub disk: DiskChoice,
}

/// Whether `run` restores a memory template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The cached template for this image, QEMU, memory and CPUs when there is one.
    Auto,
    /// Always boot.
    Cold,
    /// This template directory; refused (not booted cold) when stale or corrupt.
    Given(PathBuf),
}

/// How the console is used by `boot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// The exec channel runs one command.
    Exec,
    /// A shell on the user's terminal.
    Console,
    /// /workspace mounted, no shell: the guest waits to be stopped.
    Idle,
}

/// The VFS server of one sandbox, on its own thread; stopped (overlay flushed) on drop.
pub(super) struct ServerThread {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerThread {
    pub(super) fn start(
        vfs: Arc<Vfs>,
        addr: ListenAddr,
        config: ServerConfig,
    ) -> Result<ServerThread> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hexz-vm-server".into())
            .spawn(move || {
                crate::server::serve(vfs, &[addr], config, move || {
                    let _ = ready_tx.send(());
                    let _ = stop_rx.recv();
                })
            })
            .map_err(|e| Error::io("server thread", e))?;
        let mut server = ServerThread {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            return Err(match server.thread.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => e,
                _ => Error::Invalid("the VFS server did not start within 10 s".into()),
            });
        }
        Ok(server)
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("hexz-host: VFS server: {e}"),
                Err(_) => eprintln!("hexz-host: VFS server thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// A booted VM. Fields drop in order: QEMU first, then the disk server (flushing its
/// overlay once nothing can write), the backend, the listener, the
/// server (flushing the overlay once nothing can write), the temporary directory.
pub struct Vm {
    pub(super) qemu: Qemu,
    pub(super) _disk: Option<DiskServer>,
    pub(super) _backend: Option<HybridBackend>,
    pub(super) exec_listener: Option<PortListener>,
    pub(super) _server: ServerThread,
    pub(super) console_log: PathBuf,
    pub(super) dir: tempfile::TempDir,
    /// Restored from a memory template: the guest waits for `Resume` before `Run`.
    pub(super) restored: bool,
}

impl Vm {
    /// What QEMU and the vsock backend said, and the last lines of the guest console,
    /// for error messages.
    pub(super) fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (what, path) in [
            ("QEMU", self.dir.path().join("qemu.log")),
            ("vhost-device-vsock", self.dir.path().join("vsock.log")),
            ("the guest console", self.console_log.clone()),
        ] {
            let text = std::fs::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
            if !tail.is_empty() {
                out.push_str(&format!("--- {what} (last lines):\n{}\n", tail.join("\n")));
            }
        }
        if out.is_empty() {
            out.push_str("(QEMU and the guest console said nothing)\n");
        }
        out
    }
}

/// Resolves the image without downloading anything.
pub(super) fn resolve_image(choice: &ImageChoice) -> Result<Image> {
    match choice {
        ImageChoice::Given(image) => {
            for p in [&image.kernel, &image.initrd] {
                if !p.is_file() {
                    return Err(Error::Invalid(format!(
                        "{}: no such file (--kernel/--initrd)",
                        p.display()
                    )));
                }
            }
            Ok(image.clone())
        }
        ImageChoice::Cached {
            guest_bin_dir,
            programs,
        } => {
            let cache = image::cache_dir();
            let kernel = image::fetched_kernel(&cache)?;
            let mut bins = image::find_guest_binaries(guest_bin_dir.as_deref())?;
            bins.programs = programs
                .iter()
                .map(|p| Program::find(p))
                .collect::<Result<_>>()?;
            image::build(&cache, &kernel, &bins)
        }
    }
}

/// Which accelerator and vsock transport this host gets, and why, in one line.
pub(super) fn pick_platform(choice: AccelChoice) -> (Accel, bool, String) {
    let kernel_vsock = vsock::kernel_vsock_available();
    match choice {
        AccelChoice::Tcg => (
            Accel::Tcg,
            false,
            "TCG + vhost-device-vsock (--accel tcg)".into(),
        ),
        AccelChoice::Kvm if kernel_vsock => (Accel::Kvm, true, "KVM + vhost-vsock".into()),
        AccelChoice::Kvm => (
            Accel::Kvm,
            false,
            "KVM + vhost-device-vsock (no /dev/vhost-vsock)".into(),
        ),
        AccelChoice::Auto => {
            if !kernel_vsock {
                (
                    Accel::Tcg,
                    false,
                    "TCG + vhost-device-vsock (no /dev/vhost-vsock on this host)".into(),
                )
            } else if !qemu::kvm_usable() {
                (
                    Accel::Tcg,
                    false,
                    "TCG + vhost-device-vsock (/dev/kvm is not usable)".into(),
                )
            } else {
                (Accel::Kvm, true, "KVM + vhost-vsock".into())
            }
        }
    }
}

/// Opens the snapshot `opts` names, with its decompressed-frame cache.
pub(super) fn open_snapshot(opts: &VmOptions) -> Result<Arc<Snapshot>> {
    Ok(Arc::new(Snapshot::open_with_cache(
        &opts.snapshot,
        opts.cache_mib << 20,
    )?))
}

/// Boots a VM for `opts`; `snap` is the snapshot when the caller has opened it already.
pub(super) fn boot(opts: &VmOptions, mode: Mode, snap: Option<Arc<Snapshot>>) -> Result<Vm> {
    // Everything that can be missing is checked before anything starts.
    let qemu_bin = qemu::binary()?;
    let image = resolve_image(&opts.image)?;
    let (accel, kernel_vsock, platform) = pick_platform(opts.accel);
    let backend_bin = if kernel_vsock {
        None
    } else {
        Some(vsock::backend_binary()?)
    };

    let snap = match snap {
        Some(s) => s,
        None => open_snapshot(opts)?,
    };
    let disk_stream = opts.disk.resolve(&snap)?;
    let vfs = Arc::new(Vfs::new(snap.clone(), opts.overlay.as_deref(), false)?);
    super::trace("image ready, snapshot and overlay open");
    if !opts.quiet {
        eprintln!("hexz-host: booting with {platform}");
    }
    let dir = tempfile::Builder::new()
        .prefix("hexz-vm-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let disk = match &disk_stream {
        Some(stream) => {
            let overlay = disk::overlay_path(opts.overlay.as_deref(), dir.path(), stream);
            let server = DiskServer::start(snap, stream, &overlay, dir.path().join("disk.sock"))?;
            if !opts.quiet {
                eprintln!(
                    "hexz-host: stream '{stream}' is the guest's /dev/vda (writes go to {})",
                    overlay.display()
                );
            }
            Some(server)
        }
        None => None,
    };
    let console_log = opts
        .console_log
        .clone()
        .unwrap_or_else(|| dir.path().join("console.log"));
    let helper_log = |name: &str| -> Result<File> {
        let p = dir.path().join(name);
        File::create(&p).map_err(|e| Error::io(&p, e))
    };

    // Ports: fixed per VM with the hybrid backend (each VM has its own sockets); unique
    // per process with kernel vsock, where every VM shares the host's port space.
    let (fs_port, exec_port, cid) = if kernel_vsock {
        let n = std::process::id() % 20_000;
        (20_000 + 2 * n, 20_001 + 2 * n, 3 + std::process::id())
    } else {
        (FS_PORT, DEFAULT_EXEC_PORT, 0)
    };
    let uds = dir.path().join("vm.vsock");
    let server_addr = if kernel_vsock {
        // Only this VM's CID may connect (another VM must not mount this sandbox).
        ListenAddr::Vsock { cid, port: fs_port }
    } else {
        ListenAddr::VsockUds {
            path: uds.clone(),
            port: fs_port,
        }
    };
    let server = ServerThread::start(vfs, server_addr, ServerConfig::default())?;
    super::trace("VFS server listening");
    let exec_listener = match (mode, kernel_vsock) {
        (Mode::Exec, true) => Some(PortListener::kernel(exec_port, cid)?),
        (Mode::Exec, false) => Some(PortListener::hybrid(PathBuf::from(format!(
            "{}_{exec_port}",
            uds.display()
        )))?),
        _ => None,
    };
    let backend = match &backend_bin {
        Some(bin) => Some(HybridBackend::start(
            bin,
            dir.path(),
            helper_log("vsock.log")?,
        )?),
        None => None,
    };
    super::trace("vsock backend ready");
    let vsock_device = match &backend {
        Some(b) => VsockDevice::VhostUser {
            socket: b.vhost_socket.clone(),
        },
        None => VsockDevice::Kernel { cid },
    };
    let mode_arg = match mode {
        Mode::Exec => "exec",
        Mode::Console => "console",
        Mode::Idle => "idle",
    };
    let machine = Machine {
        accel,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus.max(1),
        kernel: image.kernel,
        initrd: image.initrd,
        extra_cmdline: format!(
            "hexz.mode={mode_arg} hexz.fs_port={fs_port} hexz.exec_port={exec_port}{}",
            if super::tracing_startup() {
                " hexz.trace"
            } else {
                ""
            }
        ),
        vsock: vsock_device,
        nbd_disk: disk.as_ref().map(|d| d.socket.clone()),
        console: if mode == Mode::Console {
            Console::Terminal
        } else {
            Console::Log(console_log.clone())
        },
    };
    let qemu = Qemu::start(&machine, &qemu_bin, helper_log("qemu.log")?)?;
    super::trace("QEMU started");
    Ok(Vm {
        qemu,
        _disk: disk,
        _backend: backend,
        exec_listener,
        _server: server,
        console_log,
        dir,
        restored: false,
    })
}

pub(super) enum Event {
    Guest(GuestMsg),
    ChannelLost(String),
    Signal(i32),
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts) and
/// turns them into events. Call before starting any thread.
pub(super) fn signals_to_events(events: Sender<Event>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| Error::Invalid(format!("blocking signals: {e}")))?;
    std::thread::Builder::new()
        .name("hexz-signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if events.send(Event::Signal(sig as i32)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("signal thread", e))?;
    Ok(())
}

/// `serve --vm`: boots the VM on the snapshot and either gives the user its console
/// (a shell in /workspace; the VM stops when the shell exits) or, with `console: false`,
/// keeps it running with /workspace mounted until SIGINT/SIGTERM. Returns the exit status.
pub fn serve_vm(opts: &VmOptions, console: bool) -> i32 {
    let (events_tx, events) = mpsc::channel::<Event>();
    // On the console, Ctrl-C goes to the guest (QEMU puts the terminal in raw mode);
    // SIGTERM/SIGHUP from elsewhere still stop the VM cleanly.
    if let Err(e) = signals_to_events(events_tx) {
        eprintln!("hexz-host: {e}");
        return EXIT_SANDBOX_FAILED;
    }
    let mode = if console { Mode::Console } else { Mode::Idle };
    let mut vm = match boot(opts, mode, None) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("hexz-host: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    if !console {
        eprintln!(
            "hexz-host: VM running, console in {}; Ctrl-C stops it",
            vm.console_log.display()
        );
    }
    loop {
        if let Some(status) = vm.qemu.exited() {
            if console && status.success() {
                return 0;
            }
            eprint!("hexz-host: QEMU exited ({status})\n{}", vm.diagnostics());
            return EXIT_SANDBOX_FAILED;
        }
        if let Ok(Event::Signal(sig)) = events.recv_timeout(Duration::from_millis(100)) {
            return if console { 128 + sig } else { 0 };
        }
    }
}

/// `DUR`: a number with `ms`, `s`, `m` or `h` (seconds when bare).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a duration like 30s, 500ms, 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{s}': must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `SIZE`: MiB when bare, or with `M`/`G` (`512M`, `2G`).
pub fn parse_memory_mib(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b', 'i']);
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a size like 512M or 1G"))?;
    match n.checked_mul(mult) {
        Some(mib) if mib >= 64 => Ok(mib),
        _ => Err(format!("'{s}': at least 64M")),
    }
}

/// `UID[:GID]` (GID defaults to UID).
pub fn parse_user(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("'{s}': expected UID[:GID] (numbers)");
    match s.split_once(':') {
        Some((u, g)) => Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?)),
        None => {
            let u = s.parse().map_err(|_| bad())?;
            Ok((u, u))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_users_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("1G"), Ok(1024));
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert!(parse_memory_mib("1M").is_err());
        assert_eq!(parse_user("1000"), Ok((1000, 1000)));
        assert_eq!(parse_user("1000:100"), Ok((1000, 100)));
        assert!(parse_user("bob").is_err());
    }
}
