//! What PID 1 does before and after the work: kernel command line, the basic mounts,
//! the kernel modules, starting the workspace mount, powering off.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

pub const WORKSPACE: &str = "/workspace";
/// Module paths, one a line, in load order (written by the image recipe).
const MODULE_ORDER: &str = "/lib/modules/hexz.order";
const GUESTFUSED: &str = "/bin/hexz-guestfused";

/// What the host asked for on the kernel command line (`hexz.*=`).
pub struct Cmdline {
    pub fs_port: u32,
    pub exec_port: u32,
    pub mode: Mode,
    /// `hexz.trace`: print when each start-up step ends (`trace`).
    pub trace: bool,
}

/// What the guest is for (`hexz.mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Run one command over the exec channel (the default).
    Exec,
    /// A shell on the console.
    Console,
    /// Only the workspace mount, until the host stops the VM.
    Idle,
    /// As `Exec`, over virtio-serial ports, after parking for a memory template
    /// (`resume.rs`).
    Template,
}

impl Cmdline {
    pub fn read() -> anyhow::Result<Cmdline> {
        let text = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
        Ok(Cmdline::parse(&text))
    }

    fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline {
            fs_port: 5001,
            exec_port: hexz_protocol::exec::DEFAULT_EXEC_PORT,
            mode: Mode::Exec,
            trace: false,
        };
        for word in text.split_whitespace() {
            match word.split_once('=') {
                Some(("hexz.fs_port", v)) => c.fs_port = v.parse().unwrap_or(c.fs_port),
                Some(("hexz.exec_port", v)) => c.exec_port = v.parse().unwrap_or(c.exec_port),
                Some(("hexz.mode", "console")) => c.mode = Mode::Console,
                Some(("hexz.mode", "idle")) => c.mode = Mode::Idle,
                Some(("hexz.mode", "template")) => c.mode = Mode::Template,
                None if word == "hexz.trace" => c.trace = true,
                _ => {}
            }
        }
        c
    }
}

static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn enable_trace() {
    TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// True once `enable_trace` was called (`hexz.trace` on the kernel command line).
pub fn tracing() -> bool {
    TRACE.load(std::sync::atomic::Ordering::Relaxed)
}

/// With `hexz.trace`: prints the time since the kernel started and `step` on the console.
pub fn trace(step: &str) {
    if tracing() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        let t = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
        eprintln!("hexz-init: {t:.3} s {step}");
    }
}

pub fn mount_basics() -> anyhow::Result<()> {
    let mounts: [(&str, &str, MsFlags); 4] = [
        (
            "proc",
            "/proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID),
        ("tmpfs", "/tmp", MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
    ];
    for (fstype, target, flags) in mounts {
        std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
        mount(Some(fstype), target, Some(fstype), flags, None::<&str>)
            .with_context(|| format!("mounting {fstype} on {target}"))?;
    }
    std::fs::set_permissions("/tmp", std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .context("chmod /tmp")?;
    Ok(())
}

/// Loads every module named in the order file; one already loaded (or built in) is fine.
pub fn load_modules() -> anyhow::Result<()> {
    let order = std::fs::read_to_string(MODULE_ORDER).context(MODULE_ORDER)?;
    for path in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let file = std::fs::File::open(path).with_context(|| format!("module {path}"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: finit_module reads the open file and a NUL-terminated empty parameter string.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                bail!("loading module {path}: {err}");
            }
        }
        trace(path);
    }
    Ok(())
}

/// The guest daemon's `--connect` for the host's file server on vsock `port`.
pub fn vsock_host(port: u32) -> String {
    format!("vsock:2:{port}")
}

/// Starts the guest daemon on /workspace, connecting to `connect` (an address as
/// `hexz-guestfused --connect` takes it), and waits (bounded) until the mount is there.
pub fn mount_workspace(connect: &str, limit: Duration) -> anyhow::Result<Child> {
    wait_for_workspace(start_workspace_daemon(connect, limit)?, connect, limit)
}

/// Starts the guest daemon on /workspace; `wait_for_workspace` waits for the mount.
pub fn start_workspace_daemon(connect: &str, limit: Duration) -> anyhow::Result<Child> {
    std::fs::create_dir_all(WORKSPACE).context("mkdir /workspace")?;
    Command::new(GUESTFUSED)
        .arg(WORKSPACE)
        .arg("--connect")
        .arg(connect)
        .arg("--timeout")
        .arg(limit.as_secs().max(1).to_string())
        .env(
            "RUST_LOG",
            if tracing() {
                "info,fuser=warn,fuser::mnt=error"
            } else {
                "warn,fuser::mnt=error"
            },
        )
        .spawn()
        .with_context(|| format!("starting {GUESTFUSED}"))
}

/// Waits (bounded) until the daemon has mounted /workspace.
pub fn wait_for_workspace(
    mut daemon: Child,
    connect: &str,
    limit: Duration,
) -> anyhow::Result<Child> {
    let deadline = Instant::now() + limit;
    loop {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(WORKSPACE))
        {
            trace("/workspace mounted");
            return Ok(daemon);
        }
        if let Some(status) = daemon.try_wait().context("waiting for hexz-guestfused")? {
            bail!("hexz-guestfused exited ({status}) before mounting /workspace; its error is in the console log");
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            bail!(
                "/workspace was not mounted within {} s (hexz-guestfused could not reach the host at {connect})",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Flushes and unmounts /workspace (detaching it if something still holds it), then
/// lets the daemon finish.
pub fn unmount_workspace(mut daemon: Child) {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if let Err(e) = umount2(WORKSPACE, MntFlags::empty()) {
        eprintln!("hexz-init: unmounting /workspace: {e}; detaching it");
        let _ = umount2(WORKSPACE, MntFlags::MNT_DETACH);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = daemon.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = daemon.kill();
}

/// Syncs and powers the machine off; QEMU (`-no-reboot`) then exits.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions; we are PID 1.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached when not PID 1 (reboot refused).
    std::process::exit(1)
}

/// True when `path` exists and is a directory.
pub fn is_dir(path: &Path) -> bool {
    path.metadata().map(|m| m.is_dir()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_takes_hexz_keys_and_ignores_the_rest() {
        let c = Cmdline::parse("console=ttyS0 quiet hexz.fs_port=6001 hexz.exec_port=6002 x=y");
        assert_eq!((c.fs_port, c.exec_port, c.mode), (6001, 6002, Mode::Exec));
        let c = Cmdline::parse("hexz.mode=console hexz.fs_port=bad");
        assert_eq!((c.fs_port, c.mode), (5001, Mode::Console));
        assert_eq!(Cmdline::parse("hexz.mode=idle").mode, Mode::Idle);
        assert_eq!(Cmdline::parse("hexz.mode=template").mode, Mode::Template);
        assert!(Cmdline::parse("quiet hexz.trace").trace);
        assert!(!Cmdline::parse("quiet hexz.tracex=1").trace);
    }
}
