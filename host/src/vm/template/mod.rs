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
//!
//! `build.rs` boots and saves a template, `restore.rs` starts a `run` from one,
//! `memory.rs` makes the memory file sparse and hashes it.

mod build;
mod memory;
mod restore;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::image::{self, Image};
use super::qemu::{self, Accel};
use super::sandbox::{pick_platform, resolve_image, ImageChoice, VmOptions};
use crate::error::{Error, Result};

use memory::hash_extents;

pub use build::{build, build_options};
pub(super) use restore::{boot_for_exec, resume_message};

/// Bumped when the template layout or the guest's template protocol changes.
const FORMAT: &str = "hexz-template-1";
const META: &str = "template.json";
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// How long the template VM may take to boot and park.
const PARK_LIMIT: Duration = Duration::from_secs(120);
/// How long QEMU may take to open QMP, and to save or load the device state.
const QMP_LIMIT: Duration = Duration::from_secs(30);

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
        if let Some(why) = self.outdated(meta) {
            return Some(why);
        }
        if meta.accel != accel_name(self.accel) {
            return Some(format!(
                "it was built for {} (this run uses {})",
                meta.accel,
                accel_name(self.accel)
            ));
        }
        None
    }

    /// Why no run on this host can use `meta` any more (its format, guest image, QEMU or
    /// kernel command line is not this host's), if so. Another accelerator, memory
    /// size or CPU count is not outdated: another run may ask for it.
    pub(super) fn outdated(&self, meta: &Meta) -> Option<String> {
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
        let unreadable = |what: &str, e: std::io::Error| {
            tmpl_err(format!(
                "template {} is incomplete ({what}: {e}); rebuild it with `hexz-host template build`",
                dir.display()
            ))
        };
        let state = std::fs::read(&state_path).map_err(|e| unreadable(STATE, e))?;
        if blake3::hash(&state).to_hex().as_str() != meta.state_blake3 {
            return Err(corrupt("the device state"));
        }
        let mem_path = dir.join(MEMORY);
        let mem = File::open(&mem_path).map_err(|e| unreadable(MEMORY, e))?;
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

fn tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
