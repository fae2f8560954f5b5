//! `hexz-host mount`: the snapshot (plus an overlay) as a FUSE file system on the host.
//! The same FUSE adapter as the guest daemon (`hexz-fuse`), over an in-process transport
//! ([`local::Local`]) that hands each request to the server's dispatch: one VFS core,
//! one translation, no socket.

pub mod local;
pub mod streams;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::vfs::{Vfs, VfsOptions};
use local::{Local, ShownOwner};

/// What to mount and how.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub snapshot: PathBuf,
    pub mountpoint: PathBuf,
    /// Persistent overlay directory; `None` with `rw` is an ephemeral one, removed at
    /// unmount.
    pub overlay: Option<PathBuf>,
    /// Changes go to the overlay; otherwise every change is EROFS and nothing is created.
    pub rw: bool,
    /// Decompressed-frame cache, bytes.
    pub cache_bytes: u64,
    pub shown: ShownOwner,
    /// Honour device nodes / set-id bits (off by default: a guest may have made them).
    pub dev: bool,
    pub suid: bool,
    pub threads: usize,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// The kernel sends OPENDIR/RELEASEDIR (off: the no-opendir mode).
    pub opendir_per_dir: bool,
}

/// The mount point, canonical, after checking that it is a directory nothing is mounted
/// on yet.
pub fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    let md = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Invalid(format!(
            "mountpoint {} does not exist (create the directory first)",
            p.display()
        )),
        _ => Error::io(p, e),
    })?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "mountpoint {} is not a directory",
            p.display()
        )));
    }
    let canon = std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
    if mount_points()?.iter().any(|m| m == &canon) {
        return Err(Error::Invalid(format!(
            "{} is already a mount point (unmount it first: umount {})",
            canon.display(),
            canon.display()
        )));
    }
    Ok(canon)
}

/// Every mount point this process sees (`/proc/self/mountinfo`, field 5, unescaped).
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_octal(m)))
        .collect())
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// FUSE needs `/dev/fuse`.
pub fn check_fuse() -> Result<()> {
    if Path::new("/dev/fuse").exists() {
        return Ok(());
    }
    Err(Error::Invalid(
        "/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or, in a \
         container, pass the device in (--device /dev/fuse)"
            .into(),
    ))
}

/// `mount --nbd` needs the kernel's NBD client; without it, says so and what to use.
pub fn check_nbd() -> Result<()> {
    if !Path::new("/sys/module/nbd").exists() || !Path::new("/dev/nbd0").exists() {
        return Err(Error::Invalid(
            "--nbd needs the nbd kernel module (no /sys/module/nbd or /dev/nbd0 here: \
             modprobe nbd); or mount the file tree with FUSE: `hexz-host mount` without --nbd"
                .into(),
        ));
    }
    Err(Error::Invalid(
        "--nbd is not available in this build yet; mount the file tree with FUSE: \
         `hexz-host mount` without --nbd"
            .into(),
    ))
}

/// Opens the snapshot and the overlay as the mount will serve them.
pub fn open_snapshot(o: &MountOptions) -> Result<Arc<Snapshot>> {
    Snapshot::open_with_cache(&o.snapshot, o.cache_bytes)
        .map(Arc::new)
        .map_err(|e| e.at(&o.snapshot))
}

/// The VFS over `snap` (a snapshot with a tree) and the overlay `o` names.
pub fn open_vfs(o: &MountOptions, snap: Arc<Snapshot>) -> Result<Arc<Vfs>> {
    let opts = VfsOptions {
        read_only: !o.rw,
        ..VfsOptions::default()
    };
    let vfs = Vfs::with_options(snap, o.overlay.as_deref(), opts)?;
    // Nameless nodes a previous user of the overlay left: a new mount's kernel knows none
    // of them, so nobody can retain them.
    match vfs.collect_orphans(Duration::ZERO) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "nameless nodes of an earlier run removed"),
        Err(e) => tracing::warn!("removing nameless nodes of an earlier run: {e:?}"),
    }
    Ok(Arc::new(vfs))
}

fn mount_options(o: &MountOptions) -> Vec<MountOption> {
    let mut v = vec![
        MountOption::FSName(format!(
            "hexz:{}",
            crate::oci::absolute(&o.snapshot).display()
        )),
        MountOption::Subtype("hexz".into()),
        MountOption::DefaultPermissions,
        if o.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if o.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
    ];
    if !o.rw {
        v.push(MountOption::RO);
    }
    v
}

/// Mounts `vfs` at `mountpoint` (canonical, checked) and serves it until it is unmounted
/// (by `umount`, or by SIGINT/SIGTERM, which the caller must have blocked in every
/// thread, see [`block_signals`]). `ready` runs once the mount is in place. Then the
/// mount's handles and references are dropped and the overlay flushed (an ephemeral one
/// removed).
pub fn serve_mount(
    o: &MountOptions,
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    signals: nix::sys::signal::SigSet,
    ready: impl FnOnce(),
) -> Result<()> {
    let ttl_ms = u32::try_from(o.ttl.as_millis()).unwrap_or(u32::MAX);
    let local = Arc::new(Local::new(vfs.clone(), ttl_ms, o.shown));
    let fs = hexz_fuse::HexzFs::new(
        local.clone(),
        hexz_fuse::Options {
            no_opendir: !o.opendir_per_dir,
            ..hexz_fuse::Options::default()
        },
    );
    let ended = serve_fs(o, fs, mountpoint, signals, ready);
    local.release();
    let flushed = vfs.shutdown();
    ended?;
    flushed?;
    tracing::info!("unmounted; overlay flushed");
    Ok(())
}

/// Mounts a stream-only snapshot: each stream a file at the root (`streams.rs`), with
/// `rw` writable through a block overlay `<overlay>/<stream>.cow` (a temporary directory
/// removed at unmount when no overlay is named). Serves until unmounted, then flushes.
pub fn serve_streams(
    o: &MountOptions,
    snap: Arc<Snapshot>,
    mountpoint: &Path,
    signals: nix::sys::signal::SigSet,
    ready: impl FnOnce(),
) -> Result<()> {
    use crate::blockdev::BlockDevice;
    let ephemeral = match (&o.overlay, o.rw) {
        (None, true) => Some(
            tempfile::Builder::new()
                .prefix("hexz-mount-")
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?,
        ),
        _ => None,
    };
    let dir = o
        .overlay
        .clone()
        .or_else(|| ephemeral.as_ref().map(|t| t.path().to_path_buf()));
    if let (Some(d), true) = (&dir, o.rw) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut files = Vec::new();
    for st in &snap.index().streams {
        // Read-write: through the stream's block overlay. Read-only: through it only if
        // it exists (to show what was written), never creating one.
        let cow = dir
            .as_ref()
            .map(|d| crate::blockdev::cow_path(d, &st.name))
            .filter(|p| o.rw || p.exists());
        let dev = crate::blockdev::open_stream(&snap, &st.name, cow.as_deref())?;
        files.push(streams::StreamFile {
            name: st.name.clone(),
            dev,
        });
    }
    let devices: Vec<Arc<dyn BlockDevice>> = files.iter().map(|f| f.dev.clone()).collect();
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = streams::StreamFs::new(
        files,
        !o.rw,
        o.shown.uid.unwrap_or(uid),
        o.shown.gid.unwrap_or(gid),
    );
    let ended = serve_fs(o, fs, mountpoint, signals, ready);
    let mut flushed = Ok(());
    for d in devices.iter().filter(|d| o.rw && !d.read_only()) {
        if let Err(e) = d.flush() {
            flushed = Err(e);
        }
    }
    drop(devices);
    drop(ephemeral);
    ended?;
    flushed?;
    tracing::info!("unmounted; stream overlays flushed");
    Ok(())
}

/// Mounts `fs` and serves it until it is unmounted (or a signal in `signals` unmounts it).
fn serve_fs(
    o: &MountOptions,
    fs: impl fuser::Filesystem + 'static,
    mountpoint: &Path,
    signals: nix::sys::signal::SigSet,
    ready: impl FnOnce(),
) -> Result<()> {
    let mut config = Config::default();
    config.mount_options = mount_options(o);
    // SAFETY: geteuid has no preconditions.
    config.acl = if unsafe { libc::geteuid() } == 0 {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(o.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(|e| Error::Invalid(format!("cannot mount {}: {e}", mountpoint.display())))?;
    let background = session
        .spawn()
        .map_err(|e| Error::io("starting the FUSE session", e))?;
    let target = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("hexz-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!("{sig:?}: unmounting {}", target.display());
                unmount(&target);
            }
        })
        .map_err(|e| Error::io("signal thread", e))?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    ready();
    if let Err(e) = background.join() {
        tracing::warn!("FUSE session ended with: {e}");
    }
    Ok(())
}

/// Unmounts `target`; when it is busy, detaches it: the name goes at once, and the
/// session (so this process) ends, flushing the overlay, when the last user lets go.
fn unmount(target: &Path) {
    use nix::mount::{umount2, MntFlags};
    if let Err(e) = umount2(target, MntFlags::empty()) {
        tracing::warn!(
            "unmount failed ({e}); detaching the mount: the overlay is flushed and this \
             process exits when the last process using it lets go"
        );
        if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
            tracing::error!("detach failed: {e}");
        }
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread it starts later,
/// and returns the set for [`serve_mount`] to wait on: all three, or (`detached`, no
/// terminal to lose) SIGINT and SIGTERM only.
pub fn block_signals(detached: bool) -> Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut block = SigSet::empty();
    block.add(Signal::SIGINT);
    block.add(Signal::SIGTERM);
    block.add(Signal::SIGHUP);
    block
        .thread_block()
        .map_err(|e| Error::Invalid(format!("blocking signals: {e}")))?;
    let mut wait = block;
    if detached {
        wait.remove(Signal::SIGHUP);
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::unescape_octal;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(unescape_octal("/x\\134y"), "/x\\y");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/odd\\9"), "/odd\\9");
    }
}
