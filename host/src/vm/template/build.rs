//! `hexz-host template build`: boot the template VM, wait for its init to park, save
//! the machine over QMP, and write the template directory atomically.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hexz_protocol::exec::{GuestMsg, MAX_EXEC_FRAME};
use hexz_protocol::frame::{decode_body, read_frame};

use super::memory::{hash_extents, punch_zero_pages};
use super::{
    accel_name, cache_root, command, qemu_version, tail, tmpl_err, wanted, Meta, Template, Wanted,
    EXTRA_CMDLINE, FORMAT, MEMORY, META, PARK_LIMIT, QMP_LIMIT, STATE,
};
use crate::error::{Error, Result};
use crate::vm::qemu::{self, Qemu};
use crate::vm::qmp::Qmp;
use crate::vm::sandbox::{AccelChoice, ImageChoice, TemplateChoice, VmOptions};
use crate::vm::vsock::PortListener;

/// Waits (bounded, watching QEMU) for one connection on `l`.
fn accept(l: &PortListener, qemu: &mut Qemu, limit: Duration, what: &str) -> Result<File> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(conn) = l.try_accept()? {
            return Ok(conn);
        }
        if let Some(status) = qemu.exited() {
            return Err(tmpl_err(format!("QEMU exited ({status}) before {what}")));
        }
        if Instant::now() > deadline {
            return Err(tmpl_err(format!("no {what} within {} s", limit.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Where `build` puts the template for `w` (`out`, or the cache by key), and whether a
/// valid one is already there.
pub fn build(opts: &VmOptions, out: Option<&Path>) -> Result<(PathBuf, bool)> {
    let w = wanted(opts)?;
    let dest = match out {
        Some(p) => p.to_path_buf(),
        None => cache_root().join(w.key()),
    };
    if dest.join(META).exists() {
        match Template::open(&dest).and_then(|t| t.fit(&w).map(|_| ())) {
            Ok(()) => return Ok((dest, false)),
            Err(e) => {
                eprintln!("hexz-host: {e}; rebuilding it");
                std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
            }
        }
    } else if dest.exists() {
        return Err(tmpl_err(format!(
            "{} exists and is not a template; name a new directory",
            dest.display()
        )));
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    eprintln!(
        "hexz-host: building a memory template ({} MiB, {} CPU, {}): one boot of the guest",
        w.memory_mib,
        w.cpus,
        accel_name(w.accel)
    );
    let work = tempfile::Builder::new()
        .prefix(".template-build-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    save(&w, work.path())?;
    if out.is_none() {
        let removed = remove_stale(&w);
        if removed > 0 {
            eprintln!("hexz-host: removed {removed} cached template(s) of an older image or QEMU");
        }
    }
    let work = work.keep();
    match std::fs::rename(&work, &dest) {
        Ok(()) => Ok((dest, true)),
        // Another build finished first: keep its template.
        Err(_) if dest.join(META).exists() => {
            let _ = std::fs::remove_dir_all(&work);
            Ok((dest, false))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(Error::io(&dest, e))
        }
    }
}

/// Boots the template VM in `dir`, waits for its init to park, saves the machine and
/// writes the template files there.
fn save(w: &Wanted, dir: &Path) -> Result<()> {
    let cmdline = qemu::kernel_cmdline(EXTRA_CMDLINE);
    let memory = dir.join(MEMORY);
    let console = dir.join("console.log");
    let exec = PortListener::hybrid(dir.join("exec.sock"))?;
    // Nothing serves files while the template is built; QEMU just needs a peer.
    let fs_path = dir.join("fs.sock");
    let _fs = UnixListener::bind(&fs_path).map_err(|e| Error::io(&fs_path, e))?;
    let log_path = dir.join("qemu.log");
    let log = File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut qemu = Qemu::spawn(
        command(w, &cmdline, &memory, true, dir, &console, false),
        log,
    )?;
    let fail = |e: Error| {
        tmpl_err(format!(
            "building the template failed: {e}\n--- QEMU:\n{}\n--- the guest console:\n{}",
            tail(&log_path),
            tail(&console)
        ))
    };
    let saved = (|| -> Result<Vec<u8>> {
        let mut conn = accept(&exec, &mut qemu, QMP_LIMIT, "QEMU connected the exec port")?;
        // The guest says `Parked` once booted; QEMU must stay alive meanwhile.
        conn.set_read_timeout_secs(PARK_LIMIT)?;
        let mut buf = Vec::new();
        read_frame(&mut conn, MAX_EXEC_FRAME, &mut buf)
            .and_then(|()| decode_body::<GuestMsg>(&buf))
            .map_err(|e| tmpl_err(format!("the guest did not park: {e}")))
            .and_then(|m| match m {
                GuestMsg::Parked => Ok(()),
                other => Err(tmpl_err(format!(
                    "the guest said {other:?} instead of parking"
                ))),
            })?;
        let mut qmp = Qmp::connect(&dir.join("qmp.sock"), QMP_LIMIT, || true)?;
        qmp.enable_capability("x-ignore-shared")?;
        let mig_path = dir.join("migrate.sock");
        let mig = UnixListener::bind(&mig_path).map_err(|e| Error::io(&mig_path, e))?;
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("unix:{}", mig_path.display()) })),
        )?;
        let (mut s, _) = mig.accept().map_err(|e| Error::io(&mig_path, e))?;
        s.set_read_timeout(Some(QMP_LIMIT))
            .map_err(|e| Error::io(&mig_path, e))?;
        let mut state = Vec::new();
        s.read_to_end(&mut state)
            .map_err(|e| Error::io(&mig_path, e))?;
        qmp.wait_migration(QMP_LIMIT)?;
        let _ = qmp.execute("quit", None);
        let _ = std::fs::remove_file(&mig_path);
        drop(conn);
        Ok(state)
    })()
    .map_err(fail)?;
    qemu.stop(Duration::from_secs(10));
    for sock in [
        "exec.sock",
        "fs.sock",
        "qmp.sock",
        "qemu.log",
        "console.log",
    ] {
        let _ = std::fs::remove_file(dir.join(sock));
    }

    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memory)
        .map_err(|e| Error::io(&memory, e))?;
    punch_zero_pages(&mem)?;
    mem.sync_all().map_err(|e| Error::io(&memory, e))?;
    let (memory_blake3, memory_data_bytes) = hash_extents(&mem)?;
    let state_path = dir.join(STATE);
    write_synced(&state_path, &saved)?;
    let meta = Meta {
        format: FORMAT.into(),
        image: w.image_name.clone(),
        kernel: w.image.kernel.clone(),
        initrd: w.image.initrd.clone(),
        cmdline,
        qemu_version: qemu_version(&w.qemu)?,
        qemu_stamp: w.qemu_stamp.clone(),
        accel: accel_name(w.accel).into(),
        memory_mib: w.memory_mib,
        cpus: w.cpus,
        memory_blake3,
        state_blake3: blake3::hash(&saved).to_hex().to_string(),
        memory_data_bytes,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| tmpl_err(e.to_string()))?;
    write_synced(&dir.join(META), &json)?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

trait ReadTimeout {
    fn set_read_timeout_secs(&self, limit: Duration) -> Result<()>;
}

impl ReadTimeout for File {
    fn set_read_timeout_secs(&self, limit: Duration) -> Result<()> {
        use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
        use nix::sys::time::{TimeVal, TimeValLike};
        let tv = TimeVal::milliseconds(i64::try_from(limit.as_millis()).unwrap_or(i64::MAX));
        setsockopt(self, ReceiveTimeout, &tv).map_err(|e| Error::io("exec port", e.into()))
    }
}

/// Removes cached templates that no run on this host can restore any more (built for
/// another format, image, QEMU or kernel command line than `w`'s); returns how many.
fn remove_stale(w: &Wanted) -> usize {
    let Ok(entries) = std::fs::read_dir(cache_root()) else {
        return 0;
    };
    let mut removed = 0;
    for dir in entries.flatten().map(|e| e.path()) {
        let Ok(text) = std::fs::read(dir.join(META)) else {
            continue;
        };
        let stale = match serde_json::from_slice::<Meta>(&text) {
            Ok(meta) => w.outdated(&meta).is_some(),
            Err(_) => true,
        };
        if stale && std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `template build`'s options: the cached image unless given, this host's platform.
pub fn build_options(
    memory_mib: u64,
    cpus: u32,
    accel: AccelChoice,
    guest_bin_dir: Option<PathBuf>,
) -> VmOptions {
    VmOptions {
        snapshot: PathBuf::new(),
        overlay: None,
        memory_mib,
        cpus,
        image: ImageChoice::Cached {
            guest_bin_dir,
            programs: Vec::new(),
        },
        accel,
        console_log: None,
        cache_mib: 0,
        quiet: true,
        template: TemplateChoice::Auto,
        disk: crate::vm::disk::DiskChoice::None,
    }
}
