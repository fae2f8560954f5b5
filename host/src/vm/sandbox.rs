//! A sandbox: one microVM booted on a snapshot (plus its own overlay), served by an
//! in-process VFS server, and torn down — QEMU, the vsock backend, the server, the
//! sockets and the temporary directory — whatever way it ends. `run_command` is the host
//! end of the exec channel (docs/EXEC.md).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hexz_protocol::exec::{
    exit_code_of_error, GuestMsg, HostMsg, Run, DEFAULT_EXEC_PORT, EXEC_VERSION, MAX_CHUNK,
    MAX_EXEC_FRAME,
};
use hexz_protocol::frame::{decode_body, read_frame, write_frame};
use serde_bytes::ByteBuf;

use super::image::{self, Image};
use super::qemu::{self, Accel, Console, Machine, Qemu, VsockDevice};
use super::vsock::{self, HybridBackend, PortListener};
use crate::error::{Error, Result};
use crate::server::{ListenAddr, ServerConfig};
use crate::snapshot::Snapshot;
use crate::vfs::Vfs;

/// Exit status when the sandbox itself failed (as `docker run`, `env`, `timeout`).
pub const EXIT_SANDBOX_FAILED: i32 = 125;
pub const EXIT_TIMED_OUT: i32 = 124;

/// How long the guest may take to boot (reach the exec channel), and then to mount
/// /workspace and start the command. Generous: TCG boots in ~4 s on an idle core.
const BOOT_LIMIT: Duration = Duration::from_secs(90);
const MOUNT_LIMIT: Duration = Duration::from_secs(75);
/// After the command's exit status: how long the guest has to power off by itself.
const POWER_OFF_LIMIT: Duration = Duration::from_secs(10);
/// After a forwarded Ctrl-C/SIGTERM: how long the command has to exit before the VM is
/// stopped.
const SIGNAL_GRACE: Duration = Duration::from_secs(5);
const FS_PORT: u32 = 5001;
const CONSOLE_TAIL_LINES: usize = 25;

/// Which kernel and initramfs to boot.
#[derive(Clone, Debug)]
pub enum ImageChoice {
    /// The cached image for the fetched kernel and these guest binaries (built if needed,
    /// never downloading).
    Cached {
        guest_bin_dir: Option<PathBuf>,
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
}

/// The command to run in /workspace.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub argv: Vec<OsString>,
    /// `KEY=VALUE`.
    pub env: Vec<OsString>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    /// Measured from the start of `run_command`, boot included.
    pub timeout: Option<Duration>,
}

/// How the console is used by `boot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The exec channel runs one command.
    Exec,
    /// A shell on the user's terminal.
    Console,
    /// /workspace mounted, no shell: the guest waits to be stopped.
    Idle,
}

/// The VFS server of one sandbox, on its own thread; stopped (overlay flushed) on drop.
struct ServerThread {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerThread {
    fn start(vfs: Arc<Vfs>, addr: ListenAddr) -> Result<ServerThread> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hexz-vm-server".into())
            .spawn(move || {
                crate::server::serve(vfs, &[addr], ServerConfig::default(), move || {
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

/// A booted VM. Fields drop in order: QEMU first, then the backend, the listener, the
/// server (flushing the overlay once nothing can write), the temporary directory.
pub struct Vm {
    qemu: Qemu,
    _backend: Option<HybridBackend>,
    exec_listener: Option<PortListener>,
    _server: ServerThread,
    console_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// What QEMU and the vsock backend said, and the last lines of the guest console,
    /// for error messages.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (what, path) in [
            ("QEMU", self._dir.path().join("qemu.log")),
            ("vhost-device-vsock", self._dir.path().join("vsock.log")),
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
fn resolve_image(choice: &ImageChoice) -> Result<Image> {
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
        ImageChoice::Cached { guest_bin_dir } => {
            let cache = image::cache_dir();
            let kernel = image::fetched_kernel(&cache)?;
            let bins = image::find_guest_binaries(guest_bin_dir.as_deref())?;
            image::build(&cache, &kernel, &bins)
        }
    }
}

/// Which accelerator and vsock transport this host gets, and why, in one line.
fn pick_platform(choice: AccelChoice) -> (Accel, bool, String) {
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

fn boot(opts: &VmOptions, mode: Mode) -> Result<Vm> {
    // Everything that can be missing is checked before anything starts.
    let qemu_bin = qemu::binary()?;
    let image = resolve_image(&opts.image)?;
    let (accel, kernel_vsock, platform) = pick_platform(opts.accel);
    let backend_bin = if kernel_vsock {
        None
    } else {
        Some(vsock::backend_binary()?)
    };
    if !opts.quiet {
        eprintln!("hexz-host: booting with {platform}");
    }

    let snap = Arc::new(Snapshot::open_with_cache(
        &opts.snapshot,
        opts.cache_mib << 20,
    )?);
    let vfs = Arc::new(Vfs::new(snap, opts.overlay.as_deref(), false)?);
    let dir = tempfile::Builder::new()
        .prefix("hexz-vm-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
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
        ListenAddr::Vsock(fs_port)
    } else {
        ListenAddr::VsockUds(uds.clone(), fs_port)
    };
    let server = ServerThread::start(vfs, server_addr)?;
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
            "hexz.mode={mode_arg} hexz.fs_port={fs_port} hexz.exec_port={exec_port}"
        ),
        vsock: vsock_device,
        console: if mode == Mode::Console {
            Console::Terminal
        } else {
            Console::Log(console_log.clone())
        },
    };
    let qemu = Qemu::start(&machine, &qemu_bin, helper_log("qemu.log")?)?;
    Ok(Vm {
        qemu,
        _backend: backend,
        exec_listener,
        _server: server,
        console_log,
        _dir: dir,
    })
}

enum Event {
    Guest(GuestMsg),
    ChannelLost(String),
    Signal(i32),
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts) and
/// turns them into events. Call before starting any thread.
fn signals_to_events(events: Sender<Event>) -> Result<()> {
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

type Writer = Arc<Mutex<File>>;

fn send(writer: &Writer, msg: &HostMsg) -> bool {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *w, msg, MAX_EXEC_FRAME).is_ok()
}

fn read_guest(mut conn: File, events: Sender<Event>) {
    let mut buf = Vec::new();
    loop {
        let msg = read_frame(&mut conn, MAX_EXEC_FRAME, &mut buf)
            .and_then(|()| decode_body::<GuestMsg>(&buf));
        let event = match msg {
            Ok(m) => Event::Guest(m),
            Err(e) => Event::ChannelLost(e.to_string()),
        };
        let last = matches!(event, Event::ChannelLost(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// Forwards this process's stdin; its end becomes `StdinEof` (never a half-close).
fn forward_stdin(writer: Writer) {
    let mut stdin = std::io::stdin();
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                send(&writer, &HostMsg::StdinEof);
                return;
            }
            Ok(n) => {
                if !send(&writer, &HostMsg::Stdin(ByteBuf::from(&buf[..n]))) {
                    return;
                }
            }
        }
    }
}

fn write_out(out: &mut dyn Write, bytes: &[u8]) {
    // A closed stdout/stderr of ours must not stop the sandbox.
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// How a run ended.
enum Outcome {
    /// The command's status (or 126/127 when it could not be run).
    Code(i32),
    TimedOut(Duration),
    /// A signal arrived and the command did not end within the grace period.
    Interrupted(i32),
    /// The sandbox failed; the message says what.
    Failed(String),
}

/// Boots a VM on the snapshot, runs the command in /workspace with its stdout and stderr
/// relayed as produced and this process's stdin forwarded, tears everything down, and
/// returns the exit status for `hexz-host run` (the command's; 124 on timeout; 125 when
/// the sandbox failed; 126/127 when the command could not be run; 128+N on signal N).
pub fn run_command(opts: &VmOptions, spec: &CommandSpec) -> i32 {
    let started = Instant::now();
    let (events_tx, events) = mpsc::channel::<Event>();
    if let Err(e) = signals_to_events(events_tx.clone()) {
        eprintln!("hexz-host: {e}");
        return EXIT_SANDBOX_FAILED;
    }
    let mut vm = match boot(opts, Mode::Exec) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("hexz-host: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let outcome = drive(&mut vm, spec, started, &events, &events_tx);
    let code = match outcome {
        Outcome::Code(code) => {
            vm.qemu.stop(POWER_OFF_LIMIT);
            code
        }
        Outcome::TimedOut(limit) => {
            eprintln!(
                "hexz-host: timed out after {:.1} s; the VM was stopped",
                limit.as_secs_f64()
            );
            EXIT_TIMED_OUT
        }
        Outcome::Interrupted(sig) => {
            eprintln!("hexz-host: stopped by signal {sig}");
            128 + sig
        }
        Outcome::Failed(what) => {
            eprint!("hexz-host: {what}\n{}", vm.diagnostics());
            EXIT_SANDBOX_FAILED
        }
    };
    drop(vm);
    code
}

fn drive(
    vm: &mut Vm,
    spec: &CommandSpec,
    started: Instant,
    events: &Receiver<Event>,
    events_tx: &Sender<Event>,
) -> Outcome {
    let run = HostMsg::Run(Run {
        version: EXEC_VERSION,
        argv: spec
            .argv
            .iter()
            .map(|a| ByteBuf::from(a.as_bytes()))
            .collect(),
        env: spec
            .env
            .iter()
            .map(|e| ByteBuf::from(e.as_bytes()))
            .collect(),
        workdir: spec.workdir.clone(),
        uid: spec.uid,
        gid: spec.gid,
        tty: false,
    });
    let mut writer: Option<Writer> = None;
    let mut connected_at: Option<Instant> = None;
    let mut command_started = false;
    let mut grace: Option<(Instant, i32)> = None;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    loop {
        let now = Instant::now();
        if let Some(limit) = spec.timeout {
            if now.duration_since(started) >= limit {
                return Outcome::TimedOut(limit);
            }
        }
        if let Some((deadline, sig)) = grace {
            if now >= deadline {
                return Outcome::Interrupted(sig);
            }
        }
        if writer.is_none() {
            if let Some(listener) = &vm.exec_listener {
                match listener.try_accept() {
                    Ok(Some(conn)) => {
                        let w = match conn.try_clone() {
                            Ok(w) => Arc::new(Mutex::new(w)),
                            Err(e) => return Outcome::Failed(format!("exec channel: {e}")),
                        };
                        if !send(&w, &run) {
                            return Outcome::Failed(
                                "the guest closed the exec channel at once".into(),
                            );
                        }
                        let tx = events_tx.clone();
                        std::thread::spawn(move || read_guest(conn, tx));
                        let wc = w.clone();
                        std::thread::spawn(move || forward_stdin(wc));
                        writer = Some(w);
                        connected_at = Some(now);
                        vm.exec_listener = None;
                    }
                    Ok(None) => {}
                    Err(e) => return Outcome::Failed(format!("exec channel: {e}")),
                }
            }
            if writer.is_none() && now.duration_since(started) > BOOT_LIMIT {
                return Outcome::Failed(format!(
                    "the guest did not boot within {} s (it never opened the exec channel)",
                    BOOT_LIMIT.as_secs()
                ));
            }
        }
        if let Some(at) = connected_at {
            if !command_started && now.duration_since(at) > MOUNT_LIMIT {
                return Outcome::Failed(format!(
                    "the guest booted but did not mount /workspace and start the command within {} s",
                    MOUNT_LIMIT.as_secs()
                ));
            }
        }
        if let Some(status) = vm.qemu.exited() {
            // What the guest sent before it went away may still be on its way.
            while let Ok(Event::Guest(msg)) = events.recv_timeout(Duration::from_secs(1)) {
                if let Some(outcome) = handle_guest(msg, &mut command_started, &stdout, &stderr) {
                    return outcome;
                }
            }
            return Outcome::Failed(format!(
                "QEMU exited ({status}) before the command finished (the guest crashed or could not boot)"
            ));
        }
        let event = match events.recv_timeout(Duration::from_millis(20)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Outcome::Failed("internal: event channel closed".into())
            }
        };
        match event {
            Event::Guest(msg) => {
                if let Some(outcome) = handle_guest(msg, &mut command_started, &stdout, &stderr) {
                    // Closing the channel tells the guest it may power off now.
                    if let Some(w) = &writer {
                        let w = w.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = nix::sys::socket::shutdown(
                            std::os::fd::AsRawFd::as_raw_fd(&*w),
                            nix::sys::socket::Shutdown::Both,
                        );
                    }
                    return outcome;
                }
            }
            Event::ChannelLost(why) => {
                // QEMU may be exiting at this very moment; let the check above say so.
                std::thread::sleep(Duration::from_millis(200));
                if vm.qemu.exited().is_some() {
                    continue;
                }
                return Outcome::Failed(format!(
                    "the exec channel broke before the command finished ({why})"
                ));
            }
            Event::Signal(sig) => match (&writer, grace) {
                (Some(w), None) if command_started => {
                    send(w, &HostMsg::Signal(sig));
                    grace = Some((Instant::now() + SIGNAL_GRACE, sig));
                }
                _ => return Outcome::Interrupted(sig),
            },
        }
    }
}

fn handle_guest(
    msg: GuestMsg,
    command_started: &mut bool,
    stdout: &std::io::Stdout,
    stderr: &std::io::Stderr,
) -> Option<Outcome> {
    match msg {
        GuestMsg::Started { .. } => {
            *command_started = true;
            None
        }
        GuestMsg::Stdout(b) => {
            write_out(&mut stdout.lock(), &b);
            None
        }
        GuestMsg::Stderr(b) => {
            write_out(&mut stderr.lock(), &b);
            None
        }
        GuestMsg::Exited { code } => Some(Outcome::Code(code)),
        GuestMsg::Killed { signal } => Some(Outcome::Code(128 + signal)),
        GuestMsg::Error { errno, what } => {
            let code = exit_code_of_error(errno);
            if code == EXIT_SANDBOX_FAILED {
                Some(Outcome::Failed(what))
            } else {
                eprintln!("hexz-host: {what}");
                Some(Outcome::Code(code))
            }
        }
    }
}

/// `serve --vm`: boots the VM on the snapshot and either gives the user its console
/// (a shell in /workspace; the VM stops when the shell exits) or, with `console: false`,
/// keeps it running with /workspace mounted until SIGINT/SIGTERM. Returns the exit status.
pub fn serve_vm(opts: &VmOptions, console: bool) -> i32 {
    let (events_tx, events) = mpsc::channel::<Event>();
    if !console {
        if let Err(e) = signals_to_events(events_tx) {
            eprintln!("hexz-host: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    }
    let mode = if console { Mode::Console } else { Mode::Idle };
    let mut vm = match boot(opts, mode) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("hexz-host: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    if console {
        let status = vm.qemu.wait();
        return match status {
            Some(s) if s.success() => 0,
            _ => {
                eprintln!("hexz-host: QEMU exited ({status:?})");
                EXIT_SANDBOX_FAILED
            }
        };
    }
    eprintln!(
        "hexz-host: VM running, console in {}; Ctrl-C stops it",
        vm.console_log.display()
    );
    loop {
        if let Some(status) = vm.qemu.exited() {
            eprint!("hexz-host: QEMU exited ({status})\n{}", vm.diagnostics());
            return EXIT_SANDBOX_FAILED;
        }
        if let Ok(Event::Signal(_)) = events.recv_timeout(Duration::from_millis(100)) {
            return 0;
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
