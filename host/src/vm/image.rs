//! The guest image: Debian's cloud kernel, and an initramfs holding `hexz-init` (as
//! `/init`), `hexz-guestfused`, busybox and the vsock/virtio/FUSE modules.
//!
//! `fetch_kernel` is the only step that downloads (`apt-get download`), and only
//! `hexz-host image build` calls it. Images are content-addressed: the initramfs is built
//! in memory (reproducibly, see `cpio.rs`), hashed with the kernel, and written once to
//! `<cache>/images/<hash>/`; the same inputs find the same directory again.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::{Archive, Entry};
use super::programs::Program;
use crate::error::{Error, Result};

/// Modules the guest loads, in this order (dependencies first).
/// The microvm machine has no PCI bus, so virtio-mmio is the only transport needed.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "fuse",
    // virtio-serial: the channels of a VM restored from a memory template (`template/`).
    "virtio_console",
    // /dev/vda when a raw stream is attached (ext4 and its helpers are built in).
    "virtio_blk",
];

/// The meta-package whose dependency names the kernel package to fetch.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Bumped when the image layout changes, so old cache entries are not reused.
const RECIPE_VERSION: &str = "hexz-image-2";
const MUSL_BUILD: &str =
    "cargo build --release -p hexz-guestfused --target x86_64-unknown-linux-musl";

/// A built image: what QEMU boots.
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The static guest binaries that go into the initramfs.
#[derive(Clone, Debug)]
pub struct GuestBinaries {
    pub init: PathBuf,
    pub guestfused: PathBuf,
    pub busybox: PathBuf,
    /// Host programs added on request (`--with`), with their libraries.
    pub programs: Vec<Program>,
}

/// `$HEXZ_CACHE_DIR`, else `$XDG_CACHE_HOME/hexz`, else `~/.cache/hexz`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HEXZ_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("hexz");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/hexz")
}

fn vm_err(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| vm_err(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(vm_err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Downloads and unpacks the kernel package named by `linux-image-cloud-amd64` into
/// `<cache>/kernels/<package>/` (once), and records it as the kernel images use.
pub fn fetch_kernel(cache: &Path) -> Result<PathBuf> {
    let deps = run_tool(
        Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
        "apt-cache depends",
    )?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            vm_err(format!(
                "apt-cache names no kernel package for {KERNEL_META_PACKAGE}; run `apt-get update`"
            ))
        })?
        .to_string();
    let kernels = cache.join("kernels");
    let root = kernels.join(&package);
    if !root.join(".complete").exists() {
        let work = kernels.join(format!(".download-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        eprintln!("hexz-host: downloading {package} (apt-get download)");
        run_tool(
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&work),
            "apt-get download",
        )?;
        let deb = std::fs::read_dir(&work)
            .map_err(|e| Error::io(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| vm_err(format!("apt-get download {package} left no .deb")))?;
        let tree = work.join("tree");
        run_tool(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
            "dpkg-deb -x",
        )?;
        std::fs::write(tree.join(".complete"), &package).map_err(|e| Error::io(&tree, e))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&tree, &root).map_err(|e| Error::io(&root, e))?;
        let _ = std::fs::remove_dir_all(&work);
    }
    std::fs::write(kernels.join("selected"), &package)
        .map_err(|e| Error::io(kernels.join("selected"), e))?;
    Ok(root)
}

/// The kernel tree `fetch_kernel` last unpacked; never downloads.
pub fn fetched_kernel(cache: &Path) -> Result<PathBuf> {
    let kernels = cache.join("kernels");
    let package = std::fs::read_to_string(kernels.join("selected")).unwrap_or_default();
    let root = kernels.join(package.trim());
    if package.trim().is_empty() || !root.join(".complete").exists() {
        return Err(vm_err(format!(
            "no guest kernel in {}: run `hexz-host image build` once (it downloads the Debian cloud kernel with apt-get), or pass --kernel and --initrd",
            kernels.display()
        )));
    }
    Ok(root)
}

/// Finds the static guest binaries: in `dir` if given, else beside this executable or in
/// the cargo musl release directory next to its target directory.
pub fn find_guest_binaries(dir: Option<&Path>) -> Result<GuestBinaries> {
    let mut candidates = Vec::new();
    if let Some(d) = dir {
        candidates.push(d.to_path_buf());
    } else if let Some(d) = std::env::var_os("HEXZ_GUEST_BIN_DIR") {
        candidates.push(PathBuf::from(d));
    } else if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // target/<profile>/hexz-host -> target/x86_64-unknown-linux-musl/release/
        if let Some(target) = exe_dir.parent() {
            candidates.push(target.join("x86_64-unknown-linux-musl/release"));
        }
        candidates.push(exe_dir);
    }
    let found = candidates.iter().find(|d| {
        d.join("hexz-init").is_file()
            && d.join("hexz-guestfused").is_file()
            && is_static(&d.join("hexz-init")).unwrap_or(false)
    });
    let Some(dir) = found else {
        return Err(vm_err(format!(
            "static hexz-init and hexz-guestfused not found (looked in {}): build them with `{MUSL_BUILD}` (after `rustup target add x86_64-unknown-linux-musl`), or name their directory with --guest-bin-dir",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| vm_err("busybox not found: install the busybox-static package"))?;
    Ok(GuestBinaries {
        init: dir.join("hexz-init"),
        guestfused: dir.join("hexz-guestfused"),
        busybox,
        programs: Vec::new(),
    })
}

/// True when the ELF file has no program interpreter (statically linked).
fn is_static(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(false);
    };
    const PT_INTERP: u32 = 3;
    for i in 0..phnum as usize {
        let at = phoff as usize + i * phentsize as usize;
        match bytes.get(at..at + 4) {
            Some(t) if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP => {
                return Ok(false)
            }
            Some(_) => {}
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// The kernel image and the module files of an unpacked kernel package.
fn kernel_parts(root: &Path) -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| Error::io(&boot, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| vm_err(format!("no vmlinuz-* in {}", boot.display())))?;
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| vm_err(format!("no lib/modules in {}", root.display())))?;
    let mut all = Vec::new();
    collect_files(&modules_dir, &mut all)?;
    let mut modules = Vec::new();
    for name in MODULES {
        let file = format!("{name}.ko");
        let path = all
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == file))
            .ok_or_else(|| {
                vm_err(format!(
                    "module {file} is not in {} (is it built in, or compressed?)",
                    modules_dir.display()
                ))
            })?;
        modules.push((file, path.clone()));
    }
    Ok((vmlinuz, modules))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The initramfs contents, in memory.
fn initramfs(
    bins: &GuestBinaries,
    modules: &[(String, PathBuf)],
    strip_signatures: bool,
) -> Result<Archive> {
    for p in [&bins.init, &bins.guestfused, &bins.busybox] {
        if !is_static(p)? {
            return Err(vm_err(format!(
                "{} is dynamically linked; the guest has no libc: build it with `{MUSL_BUILD}` (busybox: install busybox-static)",
                p.display()
            )));
        }
    }
    let mut a = Archive::default();
    for dir in [
        "dev",
        "etc",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
        "workspace",
        "usr/bin",
        "usr/sbin",
        "sbin",
    ] {
        a.insert(dir, Entry::Dir { mode: 0o755 });
    }
    a.insert("tmp", Entry::Dir { mode: 0o1777 });
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    a.insert(
        "dev/console",
        Entry::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    let file = |mode, path: &Path| -> Result<Entry> {
        Ok(Entry::File {
            mode,
            data: read(path)?,
        })
    };
    a.insert("init", stripped(&bins.init)?);
    a.insert("bin/hexz-guestfused", stripped(&bins.guestfused)?);
    a.insert("bin/busybox", file(0o755, &bins.busybox)?);
    let applets = run_tool(
        Command::new(&bins.busybox).arg("--list-full"),
        "busybox --list-full",
    )?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet.contains("..") || a.contains(applet) || applet == "linuxrc" {
            continue;
        }
        a.insert(
            applet,
            Entry::Symlink {
                target: "/bin/busybox".into(),
            },
        );
    }
    for program in &bins.programs {
        for path in program.files() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .permissions()
                .mode()
                & 0o755;
            a.insert(&path.to_string_lossy(), file(mode, path)?);
        }
    }
    let mut order = String::new();
    for (file_name, path) in modules {
        let dest = format!("lib/modules/{file_name}");
        let data = read(path)?;
        let data = if strip_signatures {
            without_signature(&data).to_vec()
        } else {
            data
        };
        a.insert(&dest, Entry::File { mode: 0o644, data });
        order.push_str(&format!("/{dest}\n"));
    }
    a.insert(
        "lib/modules/hexz.order",
        Entry::File {
            mode: 0o644,
            data: order.into_bytes(),
        },
    );
    a.insert(
        "etc/passwd",
        Entry::File {
            mode: 0o644,
            data: b"root:x:0:0:root:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                .to_vec(),
        },
    );
    a.insert(
        "etc/group",
        Entry::File {
            mode: 0o644,
            data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        },
    );
    Ok(a)
}

const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// The module without its appended signature (as `strip --strip-unneeded` of a signed
/// module would leave it): the guest kernel then skips checking it, a SHA-256 and an RSA
/// verification per module that cost tens of milliseconds under TCG. Unsigned modules
/// taint the kernel ("E"), which is harmless here; kernels that enforce signatures keep
/// them (see `enforces_signatures`).
fn without_signature(module: &[u8]) -> &[u8] {
    let Some(body) = module.strip_suffix(SIGNATURE_MAGIC) else {
        return module;
    };
    // struct module_signature: 8 bytes of fields, then the signature length (big endian).
    let Some(info) = body.len().checked_sub(12).map(|at| &body[at..]) else {
        return module;
    };
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match (body.len() - 12).checked_sub(sig_len) {
        Some(end) => &body[..end],
        None => module,
    }
}

/// True when the kernel's config (`boot/config-*` of the package) refuses unsigned
/// modules, or cannot be read.
fn enforces_signatures(kernel_root: &Path) -> bool {
    let boot = kernel_root.join("boot");
    let Ok(entries) = std::fs::read_dir(&boot) else {
        return true;
    };
    let config = entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("config-"))
    });
    match config.and_then(|c| std::fs::read_to_string(c).ok()) {
        Some(text) => text
            .lines()
            .any(|l| l.trim() == "CONFIG_MODULE_SIG_FORCE=y"),
        None => true,
    }
}

/// The binary without symbols and debug sections when `objcopy` is present (release
/// builds keep debug info, which would triple the initramfs), else as it is.
fn stripped(path: &Path) -> Result<Entry> {
    let Some(objcopy) = super::find_in_path("objcopy") else {
        return Ok(Entry::File {
            mode: 0o755,
            data: read(path)?,
        });
    };
    let tmp = tempfile::NamedTempFile::new().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    run_tool(
        Command::new(objcopy)
            .arg("--strip-all")
            .arg(path)
            .arg(tmp.path()),
        "objcopy --strip-all",
    )?;
    Ok(Entry::File {
        mode: 0o755,
        data: read(tmp.path())?,
    })
}

/// Builds (or finds) the image for these inputs under `<cache>/images/<hash>/`.
pub fn build(cache: &Path, kernel_root: &Path, bins: &GuestBinaries) -> Result<Image> {
    let (vmlinuz, modules) = kernel_parts(kernel_root)?;
    // Fast path: the inputs' paths, sizes and mtimes name an image built before, so a VM
    // start does not re-read and re-hash ~30 MB.
    let mut inputs = vec![vmlinuz.clone(), bins.init.clone(), bins.guestfused.clone()];
    inputs.push(bins.busybox.clone());
    inputs.extend(bins.programs.iter().flat_map(|p| p.files().cloned()));
    inputs.extend(modules.iter().map(|(_, p)| p.clone()));
    let stamp = input_stamp(&inputs)?;
    let stamp_file = cache.join("images").join("stamps").join(&stamp);
    if let Ok(name) = std::fs::read_to_string(&stamp_file) {
        let dir = cache.join("images").join(name.trim());
        let image = Image {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
        };
        if !name.trim().is_empty() && image.kernel.is_file() && image.initrd.is_file() {
            return Ok(image);
        }
    }
    let strip_signatures = !enforces_signatures(kernel_root);
    let image = build_from_contents(cache, &vmlinuz, bins, &modules, strip_signatures)?;
    if let Some(name) = image.kernel.parent().and_then(Path::file_name) {
        let _ = std::fs::create_dir_all(cache.join("images").join("stamps"));
        let _ = std::fs::write(&stamp_file, name.to_string_lossy().as_bytes());
    }
    Ok(image)
}

/// A name for the inputs as they are on disk (path, size, mtime, inode of each).
fn input_stamp(inputs: &[PathBuf]) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    h.update(RECIPE_VERSION.as_bytes());
    for p in inputs {
        let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        h.update(p.as_os_str().as_encoded_bytes());
        for n in [m.len(), m.mtime() as u64, m.mtime_nsec() as u64, m.ino()] {
            h.update(&n.to_le_bytes());
        }
    }
    Ok(h.finalize().to_hex()[..32].to_string())
}

fn build_from_contents(
    cache: &Path,
    vmlinuz: &Path,
    bins: &GuestBinaries,
    modules: &[(String, PathBuf)],
    strip_signatures: bool,
) -> Result<Image> {
    let initrd_bytes = initramfs(bins, modules, strip_signatures)?.to_bytes();
    let kernel_bytes = read(vmlinuz)?;
    let mut h = blake3::Hasher::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update(&(kernel_bytes.len() as u64).to_le_bytes());
    h.update(&kernel_bytes);
    h.update(&initrd_bytes);
    let hash = h.finalize().to_hex();
    let dir = cache.join("images").join(&hash[..32]);
    let image = Image {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
    };
    if image.kernel.is_file() && image.initrd.is_file() {
        prune_images(&cache.join("images"), &dir);
        return Ok(image);
    }
    let tmp = cache
        .join("images")
        .join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // The unpacked kernel is never rewritten, so images can share it.
    if std::fs::hard_link(vmlinuz, tmp.join("vmlinuz")).is_err() {
        std::fs::write(tmp.join("vmlinuz"), &kernel_bytes).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::write(tmp.join("initrd.cpio"), &initrd_bytes).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another build of the same inputs got there first: same bytes, fine.
        if !image.initrd.is_file() {
            return Err(Error::io(&dir, e));
        }
    }
    prune_images(&cache.join("images"), &dir);
    Ok(image)
}

/// Images kept in the cache; older ones (from earlier guest builds) are removed.
const KEEP_IMAGES: usize = 4;

/// Removes all but the newest `KEEP_IMAGES` image directories (never `current`). A VM
/// already started is unaffected: QEMU reads the kernel and initramfs at start.
fn prune_images(images: &Path, current: &Path) {
    let Ok(entries) = std::fs::read_dir(images) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("initrd.cpio").is_file() && p != current)
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    dirs.sort();
    let excess = (dirs.len() + 1).saturating_sub(KEEP_IMAGES);
    for (_, old) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_signature_is_cut_off_and_an_unsigned_module_kept() {
        let mut signed = b"ELF module body".to_vec();
        let sig = [7u8; 300];
        signed.extend_from_slice(&sig);
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&signed), b"ELF module body");
        assert_eq!(without_signature(b"plain"), b"plain");
        // A length past the start leaves the module as it is.
        let mut bad = b"x".to_vec();
        bad.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0]);
        bad.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&bad), &bad[..]);
    }

    #[test]
    fn static_check_tells_this_test_binary_from_a_static_one() {
        let exe = std::env::current_exe().expect("current_exe");
        // Test binaries link glibc dynamically.
        assert!(!is_static(&exe).expect("read"));
        assert!(!is_static(Path::new("/proc/self/cmdline")).expect("read"));
    }
}
