//! The `mount` command's process side: arguments, `--daemon` (a detached child that
//! reports readiness through its pid file), the pid file, one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hexz_host::mount::{self, local::ShownOwner, MountOptions};

use crate::cli_fmt;

#[derive(clap::Args)]
pub struct MountArgs {
    snapshot: PathBuf,
    mountpoint: PathBuf,
    /// Persistent overlay directory (created if missing). With --rw and without it: an
    /// ephemeral overlay removed at unmount. Read-only mounts show it without changing it.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Allow changes (to the overlay). Default: read-only, every change is EROFS.
    #[arg(long)]
    rw: bool,
    /// Detach once the mount is ready; log to --log, pid in --pid-file.
    #[arg(long)]
    daemon: bool,
    /// Decompressed-frame cache, e.g. 256M, 1G.
    #[arg(long, value_parser = cli_fmt::parse_size, default_value = "256M")]
    cache_size: u64,
    /// Show every file as owned by this user (default: as stored).
    #[arg(long)]
    uid: Option<u32>,
    /// Show every file as owned by this group (default: as stored).
    #[arg(long)]
    gid: Option<u32>,
    /// Honour device nodes (default: nodev).
    #[arg(long)]
    dev: bool,
    /// Honour set-user-id and set-group-id bits (default: nosuid).
    #[arg(long)]
    suid: bool,
    /// Serve the raw disk stream as a block device over NBD instead.
    #[arg(long)]
    nbd: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Have the kernel send OPENDIR/RELEASEDIR for every directory (default: directories
    /// open without a round trip; for comparison).
    #[arg(long)]
    opendir_per_dir: bool,
    /// Log file of a --daemon mount. Default: /tmp/hexz-mount-<mountpoint>.log.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Pid file, written once the mount is ready and removed at unmount. Default with
    /// --daemon: /tmp/hexz-mount-<mountpoint>.pid.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Set in the detached child of --daemon.
    #[arg(long, hide = true)]
    detached: bool,
}

/// `/tmp/hexz-mount-<mountpoint with / as ->.<ext>`.
fn default_file(mountpoint: &Path, ext: &str) -> PathBuf {
    let name: String = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    std::env::temp_dir().join(format!("hexz-mount-{name}.{ext}"))
}

pub fn run(a: MountArgs) -> anyhow::Result<ExitCode> {
    if a.nbd {
        mount::check_nbd()?;
    }
    mount::check_fuse()?;
    let mountpoint = mount::check_mountpoint(&a.mountpoint)?;
    if a.daemon && !a.detached {
        return daemonize(&a, &mountpoint);
    }
    let signals = mount::block_signals(a.detached)?;
    let opts = MountOptions {
        snapshot: a.snapshot.clone(),
        mountpoint: mountpoint.clone(),
        overlay: a.overlay.clone(),
        rw: a.rw,
        cache_bytes: a.cache_size,
        shown: ShownOwner {
            uid: a.uid,
            gid: a.gid,
        },
        dev: a.dev,
        suid: a.suid,
        threads: a.threads,
        ttl: Duration::from_secs(3600),
        opendir_per_dir: a.opendir_per_dir,
    };
    let snap = mount::open_snapshot(&opts)?;
    let streams_only = !snap.has_tree();
    let vfs = if streams_only {
        None
    } else {
        Some(mount::open_vfs(&opts, snap.clone())?)
    };
    let overlay = match (&a.overlay, a.rw) {
        (Some(d), true) => format!("read-write, overlay {}", d.display()),
        (Some(d), false) => format!("read-only, overlay {}", d.display()),
        (None, true) => "read-write, ephemeral overlay".into(),
        (None, false) => "read-only".into(),
    };
    let pid_file = a.pid_file.clone();
    let mut pid_err = None;
    let ready = || {
        if let Some(p) = &pid_file {
            pid_err = std::fs::write(p, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing the pid file {}", p.display()))
                .err();
        }
        tracing::info!(
            "mounted {} at {} ({overlay}{})",
            a.snapshot.display(),
            mountpoint.display(),
            if streams_only {
                "; its streams as files"
            } else {
                ""
            }
        );
    };
    match vfs {
        Some(vfs) => mount::serve_mount(&opts, vfs, &mountpoint, signals, ready)?,
        None => mount::serve_streams(&opts, snap, &mountpoint, signals, ready)?,
    }
    if let Some(p) = &pid_file {
        let _ = std::fs::remove_file(p);
    }
    if let Some(e) = pid_err {
        return Err(e);
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts this command again, detached (own process group, output to the log file),
/// and returns once its pid file names it (mounted), or fails with its error.
fn daemonize(a: &MountArgs, mountpoint: &Path) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let log = a
        .log
        .clone()
        .unwrap_or_else(|| default_file(mountpoint, "log"));
    let pid_file = a
        .pid_file
        .clone()
        .unwrap_or_else(|| default_file(mountpoint, "pid"));
    let _ = std::fs::remove_file(&pid_file);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("log file {}", log.display()))?;
    let err = out.try_clone().context("log file")?;
    let exe = std::env::current_exe().context("finding this program")?;
    // The child runs in `/`: every path it gets is absolute.
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut args: Vec<std::ffi::OsString> = vec![
        "mount".into(),
        hexz_host::oci::absolute(&a.snapshot).into(),
        mountpoint.into(),
        "--cache-size".into(),
        a.cache_size.to_string().into(),
        "--threads".into(),
        a.threads.to_string().into(),
    ];
    if let Some(o) = &a.overlay {
        args.extend(["--overlay".into(), abs(o).into()]);
    }
    for (on, flag) in [(a.rw, "--rw"), (a.dev, "--dev"), (a.suid, "--suid")] {
        if on {
            args.push(flag.into());
        }
    }
    for (v, flag) in [(a.uid, "--uid"), (a.gid, "--gid")] {
        if let Some(v) = v {
            args.extend([flag.into(), v.to_string().into()]);
        }
    }
    let mut child = Command::new(exe)
        .args(args)
        .arg("--detached")
        .arg("--pid-file")
        .arg(abs(&pid_file))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,fuser::mnt=error".into()),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("starting the mount process")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let named = std::fs::read_to_string(&pid_file).ok();
        if named.as_deref().map(str::trim) == Some(pid.to_string().as_str()) {
            break;
        }
        if let Some(status) = child.try_wait().context("waiting for the mount process")? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let why = text
                .lines()
                .rev()
                .find_map(|l| {
                    l.split_once("hexz-host: error: ")
                        .map(|(_, e)| e.to_string())
                })
                .unwrap_or_else(|| format!("it exited with {status}; see {}", log.display()));
            bail!("{why}");
        }
        if Instant::now() > deadline {
            bail!(
                "the mount process ({pid}) was not ready within 120 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "mounted {} at {} (pid {pid}, log {}, pid file {}); stop with `umount {}`",
        a.snapshot.display(),
        mountpoint.display(),
        log.display(),
        pid_file.display(),
        mountpoint.display()
    );
    Ok(ExitCode::SUCCESS)
}
