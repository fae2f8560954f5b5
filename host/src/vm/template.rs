//! Memory templates: boot the guest image once to the point where its init waits for
//! work, save the machine, and start every later `run` by restoring it.
//!
//! QEMU cannot migrate the vhost-user vsock device (it is marked unmigratable), so a
//! template VM has none: its exec channel and its file protocol go over two
//! virtio-serial ports whose host ends are QEMU `-chardev socket`s connecting to this
//! process's Unix sockets (`exec.sock`, `fs.sock`). Guest memory is a file: the
//! template VM maps it shared, so saving it (`x-ignore-shared`) writes only device
//! state; a clone maps the same file private, so pages are read on first touch and
//! clean pages are shared by every clone through the page cache.
//!
//! A template is a directory: `memory` (sparse), `state` (QEMU's migration stream) and
//! `template.json` ([`Meta`]: what it was built from, BLAKE3 of both files).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hexz_protocol::exec::{GuestMsg, HostMsg, MAX_EXEC_FRAME, RESUME_ENTROPY_LEN};
use hexz_protocol::frame::{decode_body, read_frame};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::image::{self, Image};
use super::qemu::{self, Accel, Qemu};
use super::qmp::Qmp;
use super::sandbox::{
    boot, pick_platform, resolve_image, AccelChoice, ImageChoice, Mode, ServerThread,
    TemplateChoice, Vm, VmOptions,
};
use super::vsock::PortListener;
use crate::error::{Error, Result};
use crate::server::{ListenAddr, ServerConfig};
use crate::snapshot::Snapshot;
use crate::vfs::Vfs;

/// Bumped when the template layout or the guest's template protocol changes.
const FORMAT: &str = "hexz-template-1";
const META: &str = "template.json";
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// How long the template VM may take to boot and park.
const PARK_LIMIT: Duration = Duration::from_secs(120);
/// How long QEMU may take to open QMP, and to save or load the device state.
const QMP_LIMIT: Duration = Duration::from_secs(30);
const PAGE: usize = 4096;

/// What a template was built from and what it holds. Two templates with the same
/// [`Meta::key`] are interchangeable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    /// The image directory's name (a hash of the kernel and initramfs contents).
    pub image: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line the template booted with (it must be given again).
    pub cmdline: String,
    /// `qemu-system-x86_64 --version`'s first line, for messages.
    pub qemu_version: String,
    /// The QEMU binary's path, size, mtime and inode: a restore needs the same QEMU.
    pub qemu_stamp: String,
    pub accel: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub memory_blake3: String,
    pub state_blake3: String,
    /// Bytes of `memory` that are not holes.
    pub memory_data_bytes: u64,
}

/// What a template must match to be restored by this host for these options.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub image: Image,
    pub image_name: String,
    pub qemu: PathBuf,
    pub qemu_stamp: String,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
}

impl Wanted {
    /// The cache directory name of the template for these inputs.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [
            FORMAT,
            &self.image_name,
            &self.qemu_stamp,
            accel_name(self.accel),
            &self.memory_mib.to_string(),
            &self.cpus.to_string(),
            &qemu::kernel_cmdline(EXTRA_CMDLINE),
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        h.finalize().to_hex()[..32].to_string()
    }

    /// Why `meta` does not fit these inputs, if it does not.
    fn mismatch(&self, meta: &Meta) -> Option<String> {
        if meta.format != FORMAT {
            return Some(format!(
                "it is in format {} (this hexz uses {FORMAT})",
                meta.format
            ));
        }
        if meta.image != self.image_name {
            return Some(format!(
                "it was built for guest image {} (the current image is {})",
                meta.image, self.image_name
            ));
        }
        if meta.qemu_stamp != self.qemu_stamp {
            return Some(format!(
                "it was built with another QEMU ({}; QEMU here is {})",
                meta.qemu_version,
                qemu_version(&self.qemu).unwrap_or_else(|_| "unknown".into())
            ));
        }
        if meta.accel != accel_name(self.accel) {
            return Some(format!(
                "it was built for {} (this run uses {})",
                meta.accel,
                accel_name(self.accel)
            ));
        }
        if meta.cmdline != qemu::kernel_cmdline(EXTRA_CMDLINE) {
            return Some("its kernel command line differs from this host's".into());
        }
        None
    }
}

/// The template VM's settings on the kernel command line.
const EXTRA_CMDLINE: &str = "hexz.mode=template";

fn accel_name(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}

fn tmpl_err(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// `<cache>/templates`.
pub fn cache_root() -> PathBuf {
    image::cache_dir().join("templates")
}

fn qemu_version(qemu: &Path) -> Result<String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| Error::io(qemu, e))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn file_stamp(p: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    Ok(format!(
        "{}:{}:{}.{}:{}",
        p.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    ))
}

/// The inputs for `opts` on this host (the image is resolved, and built if needed,
/// without downloading).
pub fn wanted(opts: &VmOptions) -> Result<Wanted> {
    let qemu = qemu::binary()?;
    let image = resolve_image(&opts.image)?;
    let image_name = match &opts.image {
        ImageChoice::Cached { .. } => image
            .kernel
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| tmpl_err("the cached image has no directory name"))?,
        ImageChoice::Given(_) => {
            let mut h = blake3::Hasher::new();
            for p in [&image.kernel, &image.initrd] {
                h.update(file_stamp(p)?.as_bytes());
            }
            format!("given-{}", &h.finalize().to_hex()[..32])
        }
    };
    let (accel, _, _) = pick_platform(opts.accel);
    Ok(Wanted {
        image,
        image_name,
        qemu_stamp: file_stamp(&qemu)?,
        qemu,
        accel,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus.max(1),
    })
}

/// A QEMU option value: commas are doubled.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// QEMU's command line for a template VM. `share`: the template VM writes its memory
/// into `memory`; a clone maps it private. `dir` holds the sockets.
fn command(
    w: &Wanted,
    cmdline: &str,
    memory: &Path,
    share: bool,
    dir: &Path,
    console: &Path,
    incoming: bool,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(&w.qemu);
    let (accel, cpu) = match w.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mem = format!("{}M", w.memory_mib);
    cmd.args(["-accel", accel, "-cpu", cpu, "-m", &mem]);
    cmd.args(["-smp", &w.cpus.to_string()]);
    cmd.args(["-M", "microvm,memory-backend=mem"]);
    cmd.arg("-object").arg(format!(
        "memory-backend-file,id=mem,size={mem},mem-path={},share={}",
        opt_path(memory),
        if share { "on" } else { "off" }
    ));
    cmd.args(["-device", "virtio-serial-device"]);
    for (id, name, sock) in [
        ("hexz-exec", "hexz.exec", "exec.sock"),
        ("hexz-fs", "hexz.fs", "fs.sock"),
    ] {
        cmd.arg("-chardev")
            .arg(format!("socket,id={id},path={}", opt_path(&dir.join(sock))));
        cmd.arg("-device")
            .arg(format!("virtserialport,chardev={id},name={name}"));
    }
    cmd.arg("-kernel").arg(&w.image.kernel);
    cmd.arg("-initrd").arg(&w.image.initrd);
    cmd.arg("-append").arg(cmdline);
    cmd.args([
        "-no-reboot",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
    ]);
    cmd.arg("-serial")
        .arg(format!("file:{}", opt_path(console)));
    cmd.arg("-qmp").arg(format!(
        "unix:{},server=on,wait=off",
        opt_path(&dir.join("qmp.sock"))
    ));
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    cmd
}

/// BLAKE3 over the data extents of `file` (offset, length, bytes of each), so holes
/// cost nothing; returns the hash and the bytes hashed.
fn hash_extents(file: &File) -> Result<(String, u64)> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(|e| Error::io("memory", e))?.len();
    let fd = file.as_raw_fd();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    let mut data_bytes = 0;
    while pos < len {
        let off = i64::try_from(pos).map_err(|_| tmpl_err("memory file too large"))?;
        // SAFETY: lseek has no memory-safety preconditions.
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let (start, end) = (start as u64, (end.max(start) as u64).min(len));
        h.update(&start.to_le_bytes());
        h.update(&(end - start).to_le_bytes());
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io("memory", e))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        data_bytes += end - start;
        pos = end.max(pos + 1);
    }
    h.update(&len.to_le_bytes());
    Ok((h.finalize().to_hex().to_string(), data_bytes))
}

/// Turns zero pages of `file` into holes, so the template costs what the guest used.
fn punch_zero_pages(file: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(|e| Error::io("memory", e))?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let punch = |from: u64, to: u64| -> Result<()> {
        if to <= from {
            return Ok(());
        }
        // SAFETY: fallocate has no memory-safety preconditions.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                (to - from) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(Error::io("memory", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let mut zero_from: Option<u64> = None;
    while at < len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io("memory", e))?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let off = at + (i * PAGE) as u64;
            let zero = page.iter().all(|&b| b == 0);
            match (zero, zero_from) {
                (true, None) => zero_from = Some(off),
                (false, Some(from)) => {
                    punch(from, off)?;
                    zero_from = None;
                }
                _ => {}
            }
        }
        at += n as u64;
    }
    if let Some(from) = zero_from {
        punch(from, len)?;
    }
    Ok(())
}

/// A template directory whose files match its [`Meta`].
pub struct Template {
    pub dir: PathBuf,
    pub meta: Meta,
    /// The device state, read once and checked; sent to QEMU from memory, so what is
    /// restored is what was checked.
    state: Vec<u8>,
}

impl Template {
    /// Reads `dir`'s meta and checks both files against it (BLAKE3 of the state and of
    /// the memory's data extents). Errors say what is wrong and how to rebuild.
    pub fn open(dir: &Path) -> Result<Template> {
        let meta_path = dir.join(META);
        let text = std::fs::read(&meta_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                tmpl_err(format!(
                    "{}: not a hexz memory template (no {META}); build one with `hexz-host template build`",
                    dir.display()
                ))
            } else {
                Error::io(&meta_path, e)
            }
        })?;
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| {
            tmpl_err(format!(
                "corrupt template {}: {META}: {e}; rebuild it with `hexz-host template build`",
                dir.display()
            ))
        })?;
        let corrupt = |what: &str| {
            tmpl_err(format!(
                "corrupt template {}: {what} does not match its BLAKE3 in {META}; rebuild it with `hexz-host template build`",
                dir.display()
            ))
        };
        let state_path = dir.join(STATE);
        let state = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
        if blake3::hash(&state).to_hex().as_str() != meta.state_blake3 {
            return Err(corrupt("the device state"));
        }
        let mem_path = dir.join(MEMORY);
        let mem = File::open(&mem_path).map_err(|e| Error::io(&mem_path, e))?;
        let (hash, _) = hash_extents(&mem)?;
        if hash != meta.memory_blake3 {
            return Err(corrupt("the memory image"));
        }
        Ok(Template {
            dir: dir.to_path_buf(),
            meta,
            state,
        })
    }

    /// The inputs this template must be restored with (its own memory and CPUs).
    fn fit(&self, w: &Wanted) -> Result<Wanted> {
        if let Some(why) = w.mismatch(&self.meta) {
            return Err(tmpl_err(format!(
                "template {} is stale: {why}; rebuild it with `hexz-host template build`",
                self.dir.display()
            )));
        }
        Ok(Wanted {
            memory_mib: self.meta.memory_mib,
            cpus: self.meta.cpus,
            ..w.clone()
        })
    }
}

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

fn tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
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

/// The first message to a restored guest: fresh entropy and the wall clock.
pub(super) fn resume_message() -> Result<HostMsg> {
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
fn choose(opts: &VmOptions) -> Result<Option<(Template, Wanted)>> {
    let auto = match &opts.template {
        TemplateChoice::Cold => return Ok(None),
        // Extra QEMU devices (bench/vm.sh) are not in a template: those runs boot.
        TemplateChoice::Auto if std::env::var_os(qemu::EXTRA_ARGS_ENV).is_some() => {
            return Ok(None)
        }
        TemplateChoice::Auto => true,
        TemplateChoice::Given(_) => false,
    };
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

/// Removes cached templates that no run on this host can restore any more (built for
/// another image or QEMU than `w`'s); returns how many.
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
            Ok(meta) => meta.image != w.image_name || meta.qemu_stamp != w.qemu_stamp,
            Err(_) => true,
        };
        if stale && std::fs::remove_dir_all(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `run`'s boot: restores the template `opts` names (or the cached one), falling back
/// to a cold boot — and saying so in one line — when QEMU cannot restore it.
pub(super) fn boot_for_exec(opts: &VmOptions) -> Result<Vm> {
    let Some((template, w)) = choose(opts)? else {
        return boot(opts, Mode::Exec);
    };
    match restore(opts, &template, &w) {
        Ok(vm) => Ok(vm),
        Err(e) => {
            eprintln!(
                "hexz-host: restoring template {} failed ({e}); booting cold",
                template.dir.display()
            );
            boot(opts, Mode::Exec)
        }
    }
}

/// Starts the VFS server and QEMU restoring `t`, and waits until the guest runs.
fn restore(opts: &VmOptions, t: &Template, w: &Wanted) -> Result<Vm> {
    let snap = Arc::new(Snapshot::open_with_cache(
        &opts.snapshot,
        opts.cache_mib << 20,
    )?);
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
        qemu,
        _backend: None,
        exec_listener: Some(exec_listener),
        _server: server,
        console_log,
        dir,
        restored: true,
    })
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
        image: ImageChoice::Cached { guest_bin_dir },
        accel,
        console_log: None,
        cache_mib: 0,
        quiet: true,
        template: TemplateChoice::Auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_the_hash_covers_data_and_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("memory");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.set_len(64 * PAGE as u64).expect("len");
        f.write_all_at(&[0u8; 8 * PAGE], 0).expect("zeros");
        f.write_all_at(b"guest", 10 * PAGE as u64).expect("data");
        punch_zero_pages(&f).expect("punch");
        let (h1, data) = hash_extents(&f).expect("hash");
        assert!(
            data < 64 * PAGE as u64,
            "nothing was punched ({data} bytes)"
        );
        assert!(data >= PAGE as u64);
        f.write_all_at(b"Guest", 10 * PAGE as u64).expect("flip");
        let (h2, _) = hash_extents(&f).expect("hash");
        assert_ne!(h1, h2, "a changed byte must change the hash");
    }
}
