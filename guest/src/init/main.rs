//! `hexz-init`: PID 1 of the hexz guest image. Loads the vsock and FUSE modules, mounts
//! the workspace with `hexz-guestfused`, runs the host's command over the exec channel
//! (docs/PROTOCOL.md §12) — or, with `hexz.mode=console`, a shell on the console; with
//! `hexz.mode=template` it first parks for a memory template (`resume.rs`) — then syncs,
//! unmounts and powers off.

mod boot;
mod command;
mod resume;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use hexz_protocol::exec::{GuestMsg, HostMsg};

/// How long the guest waits for the host's listeners and for the workspace mount.
const HOST_WAIT: Duration = Duration::from_secs(60);
/// How long the guest waits, after its last message, for the host to close the channel
/// (the sign that the message arrived) before powering off anyway.
const CLOSE_WAIT_MS: u16 = 10_000;

fn main() {
    if let Err(e) = start() {
        eprintln!("hexz-init: {e:#}");
    }
    boot::power_off()
}

fn start() -> anyhow::Result<()> {
    boot::mount_basics()?;
    let cmdline = boot::Cmdline::read()?;
    if cmdline.trace {
        boot::enable_trace();
        boot::trace("init started");
    }
    boot::load_modules()?;
    let fs = boot::vsock_host(cmdline.fs_port);
    match cmdline.mode {
        boot::Mode::Console => console(&fs),
        boot::Mode::Idle => {
            let _daemon = boot::mount_workspace(&fs, HOST_WAIT)?;
            println!("hexz: /workspace is mounted; the host stops this VM");
            loop {
                std::thread::park();
            }
        }
        boot::Mode::Exec => {
            // The daemon starts (and reaches the host) while the exec channel connects.
            let daemon = boot::start_workspace_daemon(&fs, HOST_WAIT);
            let stream = connect_host(cmdline.exec_port, HOST_WAIT)
                .with_context(|| format!("exec channel (vsock port {})", cmdline.exec_port))?;
            exec(stream, &fs, daemon)
        }
        boot::Mode::Template => {
            let exec_port = resume::port(resume::EXEC_PORT, HOST_WAIT)?;
            let fs_port = resume::port(resume::FS_PORT, HOST_WAIT)?;
            let stream = resume::park_and_resume(&exec_port)?;
            // Only now: the template must not hold a live file session.
            let fs = format!("virtio-port:{}", fs_port.display());
            let daemon = boot::start_workspace_daemon(&fs, HOST_WAIT);
            exec(stream, &fs, daemon)
        }
    }
}

/// The exec channel's guest end on `stream`: mounts /workspace from `fs` with the
/// `daemon` already started, runs the host's command, unmounts, reports, and waits
/// (bounded) for the host to close.
fn exec(stream: File, fs: &str, daemon: anyhow::Result<Child>) -> anyhow::Result<()> {
    boot::trace("exec channel connected");
    let channel = command::Channel::new(&stream).context("exec channel")?;
    let from_host_fd = stream.try_clone().context("exec channel")?;
    let from_host = stream;
    let mounted = daemon.and_then(|d| boot::wait_for_workspace(d, fs, HOST_WAIT));
    let last = match mounted {
        Ok(daemon) => {
            let last = run_requested(&channel, from_host);
            boot::unmount_workspace(daemon);
            last
        }
        Err(e) => GuestMsg::Error {
            errno: None,
            what: format!("{e:#}"),
        },
    };
    if let GuestMsg::Error { what, .. } = &last {
        eprintln!("hexz-init: {what}");
    }
    channel.send(&last).context("sending the exit status")?;
    // Powering off at once could drop the frame still queued for the device: wait
    // (bounded) for the host to close the channel, which it does once it has read it.
    // Only the peer's close counts (POLLRDHUP on a socket; a virtio port reports POLLHUP,
    // which poll always returns), not stdin bytes still in flight.
    let closed = nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP);
    let deadline = Instant::now() + Duration::from_millis(CLOSE_WAIT_MS.into());
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut poll = [nix::poll::PollFd::new(from_host_fd.as_fd(), closed)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(CLOSE_WAIT_MS);
        match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(ms)) {
            Err(nix::errno::Errno::EINTR) => continue,
            _ => break,
        }
    }
    Ok(())
}

/// Reads the run request and runs it; returns the message that ends the exchange.
fn run_requested(channel: &command::Channel, mut from_host: File) -> GuestMsg {
    let mut buf = Vec::new();
    let last = match command::read_msg(&mut from_host, &mut buf) {
        Ok(HostMsg::Run(run)) => match command::prepare(&run) {
            Ok(cmd) => command::run(cmd, &command::argv0(&run), channel, from_host),
            Err(refusal) => Err(refusal),
        },
        Ok(other) => Err(GuestMsg::Error {
            errno: None,
            what: format!("expected a run request first, got {other:?}"),
        }),
        Err(e) => Err(GuestMsg::Error {
            errno: None,
            what: format!("reading the run request: {e}"),
        }),
    };
    last.unwrap_or_else(|e| e)
}

/// A login shell on the console in /workspace; powers off when it exits.
fn console(fs: &str) -> anyhow::Result<()> {
    let daemon = boot::mount_workspace(fs, HOST_WAIT)?;
    println!("hexz: /workspace is mounted; exit the shell to stop the VM");
    let status = std::process::Command::new("/bin/busybox")
        .args(["setsid", "-c", "/bin/sh", "-l"])
        .current_dir(boot::WORKSPACE)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", boot::WORKSPACE)
        .env("TERM", "linux")
        .status()
        .context("starting /bin/sh")?;
    println!("hexz: shell exited ({status}); powering off");
    boot::unmount_workspace(daemon);
    Ok(())
}

/// Connects to the host (CID 2) on `port`, retrying until `limit`.
fn connect_host(port: u32, limit: Duration) -> anyhow::Result<File> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let deadline = Instant::now() + limit;
    loop {
        let fd: OwnedFd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("vsock socket (is the vsock module loaded?)")?;
        match connect(fd.as_raw_fd(), &VsockAddr::new(2, port)) {
            Ok(()) => return Ok(File::from(fd)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("hexz-init: host not reachable on vsock port {port} yet ({e})");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context("the host did not answer"),
        }
    }
}
