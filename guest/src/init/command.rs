//! Runs the host's command and relays it over the exec channel (docs/PROTOCOL.md §12): stdout and
//! stderr as they are produced, stdin and signals from the host, then the exit status.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hexz_protocol::exec::{GuestMsg, HostMsg, Run, EXEC_VERSION, MAX_CHUNK, MAX_EXEC_FRAME};
use hexz_protocol::frame::{decode_body, read_frame, write_frame, FrameError};
use serde_bytes::ByteBuf;

use crate::boot::WORKSPACE;

const STDIN_QUEUE_CHUNKS: usize = 64;

const DEFAULT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
    ("HOME", WORKSPACE),
    ("TERM", "dumb"),
];

/// The guest's end of one exec connection; sends are whole frames under one lock.
#[derive(Clone)]
pub struct Channel {
    writer: Arc<Mutex<File>>,
}

impl Channel {
    pub fn new(stream: &File) -> std::io::Result<Channel> {
        Ok(Channel {
            writer: Arc::new(Mutex::new(stream.try_clone()?)),
        })
    }

    pub fn send(&self, msg: &GuestMsg) -> Result<(), FrameError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, msg, MAX_EXEC_FRAME)
    }
}

pub fn read_msg(r: &mut File, buf: &mut Vec<u8>) -> Result<HostMsg, FrameError> {
    read_frame(r, MAX_EXEC_FRAME, buf)?;
    decode_body(buf)
}

/// Checks the request and builds the command; `Err` is the message to send back.
pub fn prepare(run: &Run) -> Result<Command, GuestMsg> {
    let refuse = |what: String| GuestMsg::Error { errno: None, what };
    if run.version != EXEC_VERSION {
        return Err(refuse(format!(
            "exec channel version {} is not supported (this guest speaks {EXEC_VERSION}); rebuild the image",
            run.version
        )));
    }
    if run.tty {
        return Err(refuse("a terminal (tty) is not supported yet".into()));
    }
    let Some((program, args)) = run.argv.split_first() else {
        return Err(refuse("empty command".into()));
    };
    use std::os::unix::ffi::OsStrExt;
    let os = |b: &ByteBuf| std::ffi::OsStr::from_bytes(b).to_os_string();
    let workdir = Path::new(WORKSPACE).join(&run.workdir);
    let mut cmd = Command::new(os(program));
    cmd.args(args.iter().map(os))
        .env_clear()
        .envs(DEFAULT_ENV.iter().copied())
        .current_dir(&workdir)
        .uid(run.uid)
        .gid(run.gid)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for entry in &run.env {
        match entry.iter().position(|&b| b == b'=') {
            Some(i) if i > 0 => {
                cmd.env(
                    std::ffi::OsStr::from_bytes(&entry[..i]),
                    std::ffi::OsStr::from_bytes(&entry[i + 1..]),
                );
            }
            _ => {
                return Err(refuse(format!(
                    "environment entry {:?} is not KEY=VALUE",
                    String::from_utf8_lossy(entry)
                )))
            }
        }
    }
    if !crate::boot::is_dir(&workdir) {
        return Err(GuestMsg::Error {
            errno: Some(libc::ENOENT as u32),
            what: format!("working directory {}: not a directory", workdir.display()),
        });
    }
    Ok(cmd)
}

/// Spawns the command, relays everything until it ends, and returns its last message
/// (`Exited` or `Killed`) for the caller to send once /workspace is unmounted.
pub fn run(
    mut cmd: Command,
    argv0: &str,
    channel: &Channel,
    mut from_host: File,
) -> Result<GuestMsg, GuestMsg> {
    let mut child: Child = cmd.spawn().map_err(|e| GuestMsg::Error {
        errno: e.raw_os_error().and_then(|n| u32::try_from(n).ok()),
        what: format!("{argv0}: {e}"),
    })?;
    let pid = child.id();
    crate::boot::trace("command spawned");
    let _ = channel.send(&GuestMsg::Started { pid });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        pumps += 1;
        pump_output(out, channel.clone(), GuestMsg::Stdout, done_tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        pumps += 1;
        pump_output(err, channel.clone(), GuestMsg::Stderr, done_tx.clone());
    }
    drop(done_tx);
    let stdin = child.stdin.take();
    std::thread::spawn(move || relay_host_messages(&mut from_host, stdin, pid));

    let status = child.wait().map_err(|e| GuestMsg::Error {
        errno: e.raw_os_error().and_then(|n| u32::try_from(n).ok()),
        what: format!("waiting for {argv0}: {e}"),
    })?;
    // The command is over: what it left running in its process group would hold the
    // pipes and /workspace open.
    signal_group(pid, libc::SIGKILL);
    // Output still in the pipes belongs before the exit status; a process that left the
    // group but keeps a pipe open gets a short grace, not a hang.
    for _ in 0..pumps {
        if done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
            break;
        }
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => GuestMsg::Exited { code },
        (None, Some(signal)) => GuestMsg::Killed { signal },
        (None, None) => GuestMsg::Exited { code: 125 },
    })
}

fn pump_output(
    mut pipe: impl Read + Send + 'static,
    channel: Channel,
    wrap: fn(ByteBuf) -> GuestMsg,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if channel.send(&wrap(ByteBuf::from(&buf[..n]))).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// Stdin bytes go through their own thread, so a signal waits behind at most
/// `STDIN_QUEUE_CHUNKS` chunks the command has not read yet.
fn relay_host_messages(from_host: &mut File, stdin: Option<std::process::ChildStdin>, pid: u32) {
    // Bounded: a command that does not read its stdin holds the host back (through the
    // socket) instead of filling the guest's memory.
    let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(STDIN_QUEUE_CHUNKS);
    if let Some(mut stdin) = stdin {
        std::thread::spawn(move || {
            while let Ok(Some(bytes)) = rx.recv() {
                if stdin.write_all(&bytes).is_err() {
                    break;
                }
            }
        });
    }
    let mut buf = Vec::new();
    loop {
        match read_msg(from_host, &mut buf) {
            Ok(HostMsg::Stdin(bytes)) => {
                let _ = tx.send(Some(bytes.into_vec()));
            }
            Ok(HostMsg::StdinEof) => {
                let _ = tx.send(None);
            }
            Ok(HostMsg::Signal(sig)) => signal_group(pid, sig),
            Ok(HostMsg::Run(_) | HostMsg::Resume { .. }) => {
                eprintln!("hexz-init: ignoring a second run or resume request")
            }
            Err(e) => {
                // The host is gone: nobody is left to read the output.
                eprintln!("hexz-init: exec channel: {e}; killing the command");
                signal_group(pid, libc::SIGKILL);
                return;
            }
        }
    }
}

fn signal_group(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; the group is our child's.
        unsafe { libc::kill(-pid, sig) };
    }
}

/// The program name for messages.
pub fn argv0(run: &Run) -> String {
    run.argv
        .first()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_default()
}
