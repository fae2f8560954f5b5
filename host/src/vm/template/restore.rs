//! `hexz-host run` from a template: pick it (or boot cold), start the VFS server and a
//! QEMU that loads the checked device state, and say `Resume` first on the exec channel.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hexz_protocol::exec::{HostMsg, RESUME_ENTROPY_LEN};
use serde_bytes::ByteBuf;

use super::{
    cache_root, command, tail, tmpl_err, wanted, Template, Wanted, MEMORY, META, QMP_LIMIT,
};
use crate::error::{Error, Result};
use crate::server::{ListenAddr, ServerConfig};
use crate::snapshot::Snapshot;
use crate::vfs::Vfs;
use crate::vm::qemu::{self, Qemu};
use crate::vm::qmp::Qmp;
use crate::vm::sandbox::{
    boot, open_snapshot, ImageChoice, Mode, ServerThread, TemplateChoice, Vm, VmOptions,
};
use crate::vm::vsock::PortListener;

/// The first message to a restored guest: fresh entropy and the wall clock.
pub(in crate::vm) fn resume_message() -> Result<HostMsg> {
    let mut entropy = vec![0u8; RESUME_ENTROPY_LEN];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(|e| Error::io("/dev/urandom", e))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| tmpl_err("the host clock is before 1970"))?;
    Ok(HostMsg::Resume {
        entropy: ByteBuf::from(entropy),
        unix_nanos: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    })
}

/// The template `run` should restore, if any: `Ok(None)` boots cold. With
/// [`TemplateChoice::Auto`] a missing or stale template is silently skipped and a
/// corrupt one is reported in one line; a given template must be valid.
fn choose(opts: &VmOptions, snap: &Snapshot) -> Result<Option<(Template, Wanted)>> {
    let auto = match &opts.template {
        TemplateChoice::Cold => return Ok(None),
        // Extra QEMU devices (bench/vm.sh) are not in a template: those runs boot.
        TemplateChoice::Auto if std::env::var_os(qemu::EXTRA_ARGS_ENV).is_some() => {
            return Ok(None)
        }
        // `template build` has no `--with`: no cached template has added programs, so
        // such a run boots (without resolving its image twice, or a hint it cannot use).
        TemplateChoice::Auto if matches!(&opts.image, ImageChoice::Cached { programs, .. } if !programs.is_empty()) => {
            return Ok(None)
        }
        TemplateChoice::Auto => true,
        TemplateChoice::Given(_) => false,
    };
    // A template has no disk device: a run that attaches a raw stream boots.
    if let Some(stream) = opts.disk.resolve(snap)? {
        if !auto || !opts.quiet {
            eprintln!(
                "hexz-host: the snapshot's `{stream}` stream is attached as /dev/vda, which a memory template cannot offer; booting cold (--no-disk to restore instead)"
            );
        }
        return Ok(None);
    }
    let w = wanted(opts)?;
    let dir = match &opts.template {
        TemplateChoice::Given(d) => d.clone(),
        _ => cache_root().join(w.key()),
    };
    if auto && !dir.join(META).exists() {
        if !opts.quiet && has_other_templates(&dir) {
            eprintln!(
                "hexz-host: no memory template for this image, QEMU, --memory and --cpus; booting cold (`hexz-host template build` makes one)"
            );
        }
        return Ok(None);
    }
    let checking = Instant::now();
    let found = Template::open(&dir).and_then(|t| {
        let fit = t.fit(&w)?;
        Ok((t, fit))
    });
    tracing::debug!(
        ms = checking.elapsed().as_millis() as u64,
        "template checked"
    );
    match found {
        Ok(x) => Ok(Some(x)),
        Err(e) if auto => {
            eprintln!("hexz-host: {e}; booting cold");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// True when the cache holds templates other than `dir` (built for another image, QEMU
/// or size): worth a hint that this run could be restored too.
fn has_other_templates(dir: &Path) -> bool {
    std::fs::read_dir(cache_root())
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path() != dir && e.path().join(META).exists())
        })
        .unwrap_or(false)
}

/// `run`'s boot: restores the template `opts` names (or the cached one), falling back
/// to a cold boot — and saying so in one line — when QEMU cannot restore it.
pub(in crate::vm) fn boot_for_exec(opts: &VmOptions) -> Result<Vm> {
    if opts.template == TemplateChoice::Cold {
        return boot(opts, Mode::Exec, None);
    }
    // Opened once: the template choice, the restore and a fallback boot all use it.
    let snap = open_snapshot(opts)?;
    let Some((template, w)) = choose(opts, &snap)? else {
        return boot(opts, Mode::Exec, Some(snap));
    };
    match restore(opts, snap.clone(), &template, &w) {
        Ok(vm) => Ok(vm),
        Err(e) => {
            eprintln!(
                "hexz-host: restoring template {} failed ({e}); booting cold",
                template.dir.display()
            );
            boot(opts, Mode::Exec, Some(snap))
        }
    }
}

/// Starts the VFS server and QEMU restoring `t`, and waits until the guest runs.
fn restore(opts: &VmOptions, snap: Arc<Snapshot>, t: &Template, w: &Wanted) -> Result<Vm> {
    let vfs = Arc::new(Vfs::new(snap, opts.overlay.as_deref(), false)?);
    if !opts.quiet {
        eprintln!(
            "hexz-host: restoring memory template {} ({})",
            t.dir.display(),
            t.meta.accel
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("hexz-vm-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let console_log = opts
        .console_log
        .clone()
        .unwrap_or_else(|| dir.path().join("console.log"));
    // QEMU connects the ports at start; the guest says hello only after the restore.
    let config = ServerConfig {
        hello_timeout: Duration::from_secs(90),
        ..ServerConfig::default()
    };
    let server = ServerThread::start(vfs, ListenAddr::Unix(dir.path().join("fs.sock")), config)?;
    let exec_listener = PortListener::hybrid(dir.path().join("exec.sock"))?;
    let log_path = dir.path().join("qemu.log");
    let log = File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut qemu = Qemu::spawn(
        command(
            w,
            &t.meta.cmdline,
            &t.dir.join(MEMORY),
            false,
            dir.path(),
            &console_log,
            true,
        ),
        log,
    )?;
    let started = Instant::now();
    let loaded = (|| -> Result<()> {
        let qmp_path = dir.path().join("qmp.sock");
        let mut qmp = Qmp::connect(&qmp_path, QMP_LIMIT, || qemu.exited().is_none())?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "QMP up");
        qmp.enable_capability("x-ignore-shared")?;
        let mig_path = dir.path().join("migrate.sock");
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("unix:{}", mig_path.display()) })),
        )?;
        let mut s = std::os::unix::net::UnixStream::connect(&mig_path)
            .map_err(|e| Error::io(&mig_path, e))?;
        s.write_all(&t.state).map_err(|e| Error::io(&mig_path, e))?;
        drop(s);
        let deadline = Instant::now() + QMP_LIMIT;
        loop {
            match qmp.status()?.as_str() {
                "inmigrate" if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                "running" => {
                    tracing::debug!(ms = started.elapsed().as_millis() as u64, "guest running");
                    return Ok(());
                }
                "paused" | "postmigrate" | "prelaunch" => {
                    qmp.execute("cont", None)?;
                    return Ok(());
                }
                other => {
                    return Err(tmpl_err(format!(
                        "QEMU is {other} instead of running after loading the state"
                    )))
                }
            }
        }
    })();
    if let Err(e) = loaded {
        let why = tail(&log_path);
        let why = why.lines().last().unwrap_or("").to_string();
        return Err(tmpl_err(if why.is_empty() {
            e.to_string()
        } else {
            format!("{e}; QEMU: {why}")
        }));
    }
    Ok(Vm {
        _disk: None,
        qemu,
        _backend: None,
        exec_listener: Some(exec_listener),
        _server: server,
        console_log,
        dir,
        restored: true,
    })
}
