//! The host end of the exec channel (docs/PROTOCOL.md §12): `hexz-host run` boots a sandbox,
//! sends the command, relays stdout/stderr as they arrive and this process's stdin, passes
//! signals on, and turns how it ended into an exit status.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hexz_protocol::exec::{
    exit_code_of_error, GuestMsg, HostMsg, Run, EXEC_VERSION, MAX_CHUNK, MAX_EXEC_FRAME,
};
use hexz_protocol::frame::{decode_body, read_frame, write_frame};
use serde_bytes::ByteBuf;

use super::sandbox::{signals_to_events, Event, Vm, VmOptions};

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
    super::trace("run starts");
    let (events_tx, events) = mpsc::channel::<Event>();
    if let Err(e) = signals_to_events(events_tx.clone()) {
        eprintln!("hexz-host: {e}");
        return EXIT_SANDBOX_FAILED;
    }
    let mut vm = match super::template::boot_for_exec(opts) {
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
    let mut closer: Option<File> = None;
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
                        let (w, c) = match (conn.try_clone(), conn.try_clone()) {
                            (Ok(w), Ok(c)) => (Arc::new(Mutex::new(w)), c),
                            (Err(e), _) | (_, Err(e)) => {
                                return Outcome::Failed(format!("exec channel: {e}"))
                            }
                        };
                        closer = Some(c);
                        if vm.restored {
                            let sent =
                                super::template::resume_message().map(|resume| send(&w, &resume));
                            match sent {
                                Ok(true) => {}
                                Ok(false) => {
                                    return Outcome::Failed(
                                        "the restored guest closed the exec channel at once".into(),
                                    )
                                }
                                Err(e) => return Outcome::Failed(e.to_string()),
                            }
                        }
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
                        super::trace("exec channel connected, run request sent");
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
        // The exec listener is polled: often until the guest connects (start-up latency),
        // then only as often as the timeouts need.
        let tick = if writer.is_none() { 2 } else { 20 };
        let event = match events.recv_timeout(Duration::from_millis(tick)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Outcome::Failed("internal: event channel closed".into())
            }
        };
        match event {
            Event::Guest(msg) => {
                if let Some(outcome) = handle_guest(msg, &mut command_started, &stdout, &stderr) {
                    // Closing the channel tells the guest it may power off now. (Through
                    // its own descriptor: the stdin thread may be holding the writer.)
                    if let Some(conn) = &closer {
                        let _ = nix::sys::socket::shutdown(
                            std::os::fd::AsRawFd::as_raw_fd(conn),
                            nix::sys::socket::Shutdown::Both,
                        );
                    }
                    return outcome;
                }
            }
            Event::ChannelLost(why) => {
                // QEMU may be exiting at this very moment (a guest panic takes a while to
                // end QEMU on a loaded host); let the check above say so.
                let deadline = Instant::now() + Duration::from_secs(5);
                while vm.qemu.exited().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if vm.qemu.exited().is_some() {
                    continue;
                }
                return Outcome::Failed(format!(
                    "the exec channel broke before the command finished ({why})"
                ));
            }
            Event::Signal(sig) => match (&writer, grace) {
                (Some(w), None) if command_started => {
                    // Not from this thread: the stdin thread may hold the writer while
                    // the guest is not reading, and the grace timer must keep running.
                    let w = w.clone();
                    std::thread::spawn(move || send(&w, &HostMsg::Signal(sig)));
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
            super::trace("command started");
            None
        }
        GuestMsg::Stdout(b) => {
            if super::tracing_startup() {
                super::trace(&format!("{} bytes of stdout", b.len()));
            }
            write_out(&mut stdout.lock(), &b);
            None
        }
        GuestMsg::Stderr(b) => {
            write_out(&mut stderr.lock(), &b);
            None
        }
        // Only a template being built parks (template/build.rs reads it there).
        GuestMsg::Parked => None,
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
