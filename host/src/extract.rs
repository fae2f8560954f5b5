//! `extract`: write a snapshot's tree back to disk with the same bytes and metadata.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::error::{Error, Result};
use crate::snapshot::format::Node;
use crate::snapshot::{FileData, NodeIdx, NodeKind, Snapshot, ROOT};

/// Extracts the whole tree into `dest`, which must not exist or be an empty directory.
/// Returns the number of names created.
pub fn extract(snap: &Snapshot, dest: &Path) -> Result<u64> {
    if !snap.has_tree() {
        return Err(Error::Invalid(
            "this snapshot holds only streams; use `cat` to read them".into(),
        ));
    }
    match std::fs::read_dir(dest) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::Invalid(format!(
                    "{}: destination is not empty; extract into a new or empty directory",
                    dest.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dest).map_err(|e| Error::io(dest, e))?;
        }
        Err(e) => return Err(Error::io(dest, e)),
    }
    let mut created = 0u64;
    let mut first_path: HashMap<NodeIdx, PathBuf> = HashMap::new();
    let mut dirs = vec![(ROOT, dest.to_path_buf())];
    let mut i = 0;
    while i < dirs.len() {
        let (dir_idx, dir_path) = dirs[i].clone();
        i += 1;
        let Some(NodeKind::Dir(d)) = snap.node(dir_idx).map(|n| &n.kind) else {
            continue;
        };
        for e in &d.entries {
            let path = dir_path.join(OsStr::from_bytes(&e.name));
            let node = snap
                .node(e.node)
                .ok_or_else(|| Error::corrupt("entry names a missing node"))?;
            created += 1;
            if let Some(first) = first_path.get(&e.node) {
                std::fs::hard_link(first, &path).map_err(|err| Error::io(&path, err))?;
                continue;
            }
            match &node.kind {
                NodeKind::Dir(_) => {
                    std::fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
                    dirs.push((e.node, path));
                    continue; // metadata after its children exist
                }
                NodeKind::File(data) => write_file(snap, data, &path)?,
                NodeKind::Symlink(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), &path)
                    .map_err(|err| Error::io(&path, err))?,
                NodeKind::Device(rdev) => {
                    let kind = SFlag::from_bits_truncate(node.mode & libc::S_IFMT);
                    mknod(
                        &path,
                        kind,
                        Mode::from_bits_truncate(0o600),
                        *rdev as libc::dev_t,
                    )
                    .map_err(|err| Error::io(&path, err.into()))?
                }
                NodeKind::Fifo | NodeKind::Socket => {
                    let kind = SFlag::from_bits_truncate(node.mode & libc::S_IFMT);
                    mknod(&path, kind, Mode::from_bits_truncate(0o600), 0)
                        .map_err(|err| Error::io(&path, err.into()))?
                }
            }
            apply_metadata(node, &path)?;
            if node.nlink > 1 {
                first_path.insert(e.node, path);
            }
        }
    }
    // Directories deepest first, so setting a child's times does not disturb its parent's.
    for (idx, path) in dirs.iter().rev() {
        if let Some(node) = snap.node(*idx) {
            apply_metadata(node, path)?;
        }
    }
    Ok(created)
}

fn write_file(snap: &Snapshot, data: &FileData, path: &Path) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    for ext in &data.extents {
        let chunk = &snap.index().chunks[ext.chunk as usize];
        buf.resize(chunk.len as usize, 0);
        let n = snap.read_at(data, ext.offset, &mut buf)?;
        f.write_all_at(&buf[..n], ext.offset)
            .map_err(|e| Error::io(path, e))?;
    }
    f.set_len(data.size).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Owner, then mode (chown clears setuid), then xattrs, then times (last: the others touch ctime only).
fn apply_metadata(node: &Node, path: &Path) -> Result<()> {
    let is_link = matches!(node.kind, NodeKind::Symlink(_));
    std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid))
        .map_err(|e| Error::io(path, e))?;
    if !is_link {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode & 0o7777))
            .map_err(|e| Error::io(path, e))?;
    }
    for x in &node.xattrs {
        xattr::set(path, OsStr::from_bytes(&x.name), &x.value).map_err(|e| Error::io(path, e))?;
    }
    let ts = |t: crate::snapshot::format::Timespec| TimeSpec::new(t.sec, t.nsec as i64);
    utimensat(
        None,
        path,
        &ts(node.atime),
        &ts(node.mtime),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::io(path, e.into()))?;
    Ok(())
}
