//! `commit`: fold an overlay into a new snapshot. By default the new snapshot refers to
//! the chunks its base already holds (by id, format version 2), so only changed data is
//! stored; `standalone` copies everything.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::overlay::journal::{Kind, NodeRec};
use crate::snapshot::format::{Dir, DirEntry, FileData, Node, NodeKind, Stream, Timespec, Xattr};
use crate::snapshot::{Snapshot, SnapshotWriter, WriteStats, WriterOptions};
use crate::vfs::{Vfs, ROOT};

/// Owner id for handles `commit` opens on the VFS.
const COMMIT_OWNER: u64 = u64::MAX;

#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    pub standalone: bool,
    pub writer: WriterOptions,
}

pub fn commit(
    snapshot: &Path,
    overlay: &Path,
    out: &Path,
    opts: &CommitOptions,
) -> Result<WriteStats> {
    let snap = Arc::new(Snapshot::open(snapshot)?);
    if !overlay.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such overlay directory",
            overlay.display()
        )));
    }
    let mut w = SnapshotWriter::create(out, &opts.writer)?;
    if !opts.standalone {
        // A snapshot opened from a registry is named by its pinned reference.
        let base = match snap.remote_ref() {
            Some(r) => r,
            None => base_path(snapshot, out)?,
        };
        w.set_base(snap.clone(), base);
    }
    // A stream-only snapshot has no tree to fold, only its streams.
    let (nodes, ids) = if snap.has_tree() {
        tree(&snap, overlay, &mut w, opts)?
    } else {
        (Vec::new(), Vec::new())
    };

    let mut streams = Vec::new();
    for s in &snap.index().streams {
        // A stream written through `run --disk`, `nbd --rw` or `mount --rw` has a block
        // overlay `<overlay>/<stream>.cow`: the new snapshot holds the stream as it reads
        // through that overlay (chunks the base has are referred to, not stored again).
        // An overlay nothing was written to (a run that never touched its disk) changes
        // nothing, and the stream is referred to without being read.
        let cow = crate::blockdev::cow_path(overlay, &s.name);
        let changed = match cow.is_file() {
            true => {
                Some(crate::blockdev::open_cow(&snap, &s.name, &cow)?).filter(|d| !d.is_unchanged())
            }
            false => None,
        };
        let data = match changed {
            Some(dev) => fold_stream(&dev, &mut w)?,
            None if opts.standalone => fold_stream(
                &crate::blockdev::StreamDevice::open(snap.clone(), &s.name)?,
                &mut w,
            )?,
            None => w.add_base_file(&s.data)?,
        };
        streams.push(Stream {
            name: s.name.clone(),
            data,
        });
    }
    let ids = (!nodes.is_empty()).then_some(ids);
    w.finish_with_ids(nodes, streams, ids)
}

/// The merged tree of `snap` and `overlay`, as the new snapshot's nodes and their ids.
fn tree(
    snap: &Arc<Snapshot>,
    overlay: &Path,
    w: &mut SnapshotWriter,
    opts: &CommitOptions,
) -> Result<(Vec<Node>, Vec<u64>)> {
    let vfs = Vfs::new(snap.clone(), Some(overlay), true)?;
    let vfs_err = |e: hexz_protocol::Errno| Error::Invalid(format!("reading the merged tree: {e}"));

    // Every node keeps the id (inode number) it has in the merged view, so a tool that
    // remembered it (git's index) still recognises the file in the new snapshot.
    let mut ids: Vec<u64> = vec![ROOT];
    let mut nodes: Vec<Node> = Vec::new();
    let mut new_idx: HashMap<u64, u32> = HashMap::new();
    let mut queue = VecDeque::from([(ROOT, 0u32)]);
    let (root_rec, root_xattrs, _) = vfs.export_node(ROOT).map_err(vfs_err)?;
    nodes.push(node_of(
        &root_rec,
        root_xattrs,
        NodeKind::Dir(Dir {
            parent: 0,
            entries: Vec::new(),
        }),
    ));
    while let Some((dir_id, dir_idx)) = queue.pop_front() {
        let (_, _, listing) = vfs.export_node(dir_id).map_err(vfs_err)?;
        let mut entries = Vec::new();
        let mut subdirs = 0;
        for (name, id) in listing.unwrap_or_default() {
            if let Some(&idx) = new_idx.get(&id) {
                nodes[idx as usize].nlink += 1; // another name of a hard-linked file
                entries.push(DirEntry { name, node: idx });
                continue;
            }
            let (rec, xattrs, _) = vfs.export_node(id).map_err(vfs_err)?;
            let idx = nodes.len() as u32;
            let kind = match &rec.kind {
                Kind::Dir => {
                    subdirs += 1;
                    queue.push_back((id, idx));
                    NodeKind::Dir(Dir {
                        parent: dir_idx,
                        entries: Vec::new(),
                    })
                }
                Kind::File => NodeKind::File(file_data(&vfs, snap, w, &rec, opts.standalone)?),
                Kind::Symlink(t) => NodeKind::Symlink(t.clone()),
                Kind::Device => NodeKind::Device(rec.rdev),
                Kind::Fifo => NodeKind::Fifo,
                Kind::Socket => NodeKind::Socket,
            };
            let mut node = node_of(&rec, xattrs, kind);
            node.nlink = if rec.kind == Kind::Dir { 2 } else { 1 };
            nodes.push(node);
            ids.push(id);
            if rec.kind != Kind::Dir {
                new_idx.insert(id, idx);
            }
            entries.push(DirEntry { name, node: idx });
        }
        let dir = &mut nodes[dir_idx as usize];
        dir.nlink = 2 + subdirs;
        if let NodeKind::Dir(d) = &mut dir.kind {
            d.entries = entries; // listings are sorted by name already
        }
    }

    Ok((nodes, ids))
}

/// Stores a stream as `dev` reads (a snapshot stream, or one through its block overlay):
/// only the allocated runs are read (holes and zeroed blocks stay holes).
fn fold_stream(dev: &dyn crate::blockdev::BlockDevice, w: &mut SnapshotWriter) -> Result<FileData> {
    let size = dev.size();
    let mut segments: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let runs = dev.extents(pos, (size - pos).min(1 << 30))?;
        if runs.is_empty() {
            break;
        }
        for r in runs {
            if !r.hole && !r.zero {
                match segments.last_mut() {
                    Some(last) if last.1 == pos => last.1 = pos + r.len,
                    _ => segments.push((pos, pos + r.len)),
                }
            }
            pos += r.len;
        }
    }
    w.add_source(size, &segments, &mut |buf, at| dev.read(at, buf))
}

/// How the new snapshot names its base: by file name when both sit in one directory,
/// otherwise by absolute path.
fn base_path(snapshot: &Path, out: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(snapshot).map_err(|e| Error::io(snapshot, e))?;
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let out_dir = std::fs::canonicalize(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let same_dir = abs.parent() == Some(out_dir.as_path());
    let p = if same_dir {
        abs.file_name()
            .map(std::path::PathBuf::from)
            .unwrap_or(abs.clone())
    } else {
        abs.clone()
    };
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Invalid(format!("{}: base path is not UTF-8", abs.display())))
}

fn node_of(rec: &NodeRec, xattrs: crate::vfs::Xattrs, kind: NodeKind) -> Node {
    let t = |(sec, nsec): (i64, u32)| Timespec { sec, nsec };
    let ftype = match &rec.kind {
        Kind::Dir => libc::S_IFDIR,
        Kind::File => libc::S_IFREG,
        Kind::Symlink(_) => libc::S_IFLNK,
        Kind::Device => rec.mode & libc::S_IFMT,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
    };
    Node {
        mode: ftype | (rec.mode & 0o7777),
        uid: rec.uid,
        gid: rec.gid,
        nlink: rec.nlink,
        atime: t(rec.atime),
        mtime: t(rec.mtime),
        ctime: t(rec.ctime),
        xattrs: xattrs
            .into_iter()
            .map(|(name, value)| Xattr { name, value })
            .collect(),
        kind,
    }
}

/// An unchanged snapshot file keeps its chunks (referenced in the base); anything else is
/// read through the merged view and chunked again (chunks the base has are still shared).
fn file_data(
    vfs: &Vfs,
    snap: &Snapshot,
    w: &mut SnapshotWriter,
    rec: &NodeRec,
    standalone: bool,
) -> Result<FileData> {
    if let (false, Some(idx), false) = (standalone, rec.lower, rec.upper) {
        if let Some(NodeKind::File(d)) = snap.node(idx).map(|n| &n.kind) {
            if d.size == rec.size {
                return w.add_base_file(d);
            }
        }
    }
    let fh = vfs
        .open(COMMIT_OWNER, rec.id, libc::O_RDONLY as u32)
        .map_err(|e| Error::Invalid(format!("node {}: {e}", rec.id)))?;
    let result = (|| {
        let mut segments = Vec::new();
        let mut pos = 0;
        while pos < rec.size {
            let start = match vfs.lseek(COMMIT_OWNER, fh, pos, hexz_protocol::message::SEEK_DATA) {
                Ok(s) => s,
                Err(hexz_protocol::Errno::ENXIO) => break,
                Err(e) => return Err(Error::Invalid(format!("node {}: {e}", rec.id))),
            };
            let end = vfs
                .lseek(COMMIT_OWNER, fh, start, hexz_protocol::message::SEEK_HOLE)
                .unwrap_or(rec.size)
                .max(start + 1);
            segments.push((start, end.min(rec.size)));
            pos = end;
        }
        w.add_source(rec.size, &segments, &mut |buf, at| {
            let mut done = 0;
            while done < buf.len() {
                let want = (buf.len() - done).min(1 << 20) as u32;
                let d = vfs
                    .read(COMMIT_OWNER, fh, at + done as u64, want)
                    .map_err(|e| Error::Invalid(format!("node {}: read: {e}", rec.id)))?;
                if d.is_empty() {
                    return Err(Error::Invalid(format!(
                        "node {}: shorter than its size",
                        rec.id
                    )));
                }
                buf[done..done + d.len()].copy_from_slice(&d);
                done += d.len();
            }
            Ok(())
        })
    })();
    vfs.release(COMMIT_OWNER, fh)
        .map_err(|e| Error::Invalid(format!("node {}: release: {e}", rec.id)))?;
    result
}
