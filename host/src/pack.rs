//! `pack`: turn a directory tree and/or raw files into a snapshot.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::format::{Dir, DirEntry, Node, NodeKind, Stream, Timespec, Xattr};
use crate::snapshot::{check_name, SnapshotWriter, WriteStats, WriterOptions};

/// What goes into a snapshot.
#[derive(Clone, Debug, Default)]
pub struct PackInput {
    pub tree: Option<PathBuf>,
    /// Named raw streams, e.g. `("disk", path)`.
    pub streams: Vec<(String, PathBuf)>,
    /// Number the nodes 1, 2, 3... instead of recording the inode numbers the files
    /// have (the snapshot then depends only on the tree's contents and metadata).
    pub sequential_inodes: bool,
}

#[derive(Clone, Debug, Default)]
pub struct PackSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub others: u64,
    pub stats: WriteStats,
}

/// Receives byte progress while file contents are read.
pub trait Progress {
    fn set_total(&self, bytes: u64);
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

struct PendingFile {
    node: u32,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

pub fn pack(
    input: &PackInput,
    out: &Path,
    opts: &WriterOptions,
    progress: &dyn Progress,
) -> Result<PackSummary> {
    let mut summary = PackSummary::default();
    let (mut nodes, pending, source_inos) = match &input.tree {
        Some(root) => walk(root, &mut summary)?,
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    let ids = (!input.sequential_inodes && !nodes.is_empty()).then(|| inode_table(&source_inos));
    let mut total = 0u64;
    for p in &pending {
        if let NodeKind::File(d) = &nodes[p.node as usize].kind {
            total += d.size;
        }
    }
    let mut stream_files = Vec::new();
    for (name, path) in &input.streams {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let m = f.metadata().map_err(|e| Error::io(path, e))?;
        if !m.is_file() {
            return Err(Error::Invalid(format!(
                "{}: stream '{name}' must be a regular file",
                path.display()
            )));
        }
        total += m.len();
        stream_files.push((name.clone(), path.clone(), f, m.len()));
    }
    progress.set_total(total);

    let mut w = SnapshotWriter::create(out, opts)?;
    for p in pending {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p.path)
            .map_err(|e| Error::io(&p.path, e))?;
        let m = f.metadata().map_err(|e| Error::io(&p.path, e))?;
        let node = &mut nodes[p.node as usize];
        let NodeKind::File(data) = &mut node.kind else {
            continue;
        };
        if m.dev() != p.dev || m.ino() != p.ino || m.len() != data.size {
            return Err(Error::Invalid(format!(
                "{}: file changed while being packed",
                p.path.display()
            )));
        }
        *data = w.add_file(&f, m.len(), &p.path)?;
        progress.advance(m.len());
    }
    let mut streams = Vec::new();
    for (name, path, f, len) in stream_files {
        let data = w.add_file(&f, len, &path)?;
        progress.advance(len);
        streams.push(Stream { name, data });
    }
    summary.stats = w.finish_with_ids(nodes, streams, ids)?;
    Ok(summary)
}

/// The inode table from the source's numbers: the root is 1; a number that is 0 or 1,
/// too large, or already taken (a tree spanning file systems) is replaced by one above
/// every other, so the table stays valid and most files keep theirs.
fn inode_table(source: &[u64]) -> Vec<u64> {
    use crate::snapshot::ids::MAX_TABLE_ID;
    let ok = |i: u64| (2..=MAX_TABLE_ID / 2).contains(&i);
    let mut next = source.iter().copied().filter(|&i| ok(i)).max().unwrap_or(1) + 1;
    let mut seen = std::collections::HashSet::with_capacity(source.len());
    let mut out = Vec::with_capacity(source.len());
    for (i, &ino) in source.iter().enumerate() {
        let id = if i == 0 {
            1
        } else if ok(ino) && seen.insert(ino) {
            ino
        } else {
            next += 1;
            next - 1
        };
        out.push(id);
    }
    out
}

type Walked = (Vec<Node>, Vec<PendingFile>, Vec<u64>);

/// Reads the tree's metadata, breadth first with sorted names, so that the files of one
/// directory sit next to each other in the node table and in the data.
fn walk(root: &Path, summary: &mut PackSummary) -> Result<Walked> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a directory",
            root.display()
        )));
    }
    let mut nodes = vec![node_from(root, &meta, NodeKind::Dir(Dir::default()))?];
    let mut inos = vec![meta.ino()];
    summary.dirs += 1;
    let mut pending = Vec::new();
    let mut links: HashMap<(u64, u64), u32> = HashMap::new();
    let mut queue = VecDeque::from([(0u32, root.to_path_buf())]);
    while let Some((dir_idx, dir_path)) = queue.pop_front() {
        let mut names: Vec<_> = std::fs::read_dir(&dir_path)
            .map_err(|e| Error::io(&dir_path, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(&dir_path, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Vec::with_capacity(names.len());
        let mut subdirs = 0u32;
        for name in names {
            let path = dir_path.join(&name);
            check_name(name.as_bytes())
                .map_err(|w| Error::Invalid(format!("{}: {w}", path.display())))?;
            let m = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let key = (m.dev(), m.ino());
            if !m.is_dir() {
                if let Some(&idx) = links.get(&key) {
                    nodes[idx as usize].nlink += 1;
                    entries.push(DirEntry {
                        name: name.as_bytes().to_vec(),
                        node: idx,
                    });
                    continue;
                }
            }
            let idx = u32::try_from(nodes.len())
                .map_err(|_| Error::Invalid("more than 2^32 nodes".into()))?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                summary.dirs += 1;
                subdirs += 1;
                queue.push_back((idx, path.clone()));
                NodeKind::Dir(Dir {
                    parent: dir_idx,
                    entries: Vec::new(),
                })
            } else if ft.is_file() {
                summary.files += 1;
                pending.push(PendingFile {
                    node: idx,
                    path: path.clone(),
                    dev: m.dev(),
                    ino: m.ino(),
                });
                NodeKind::File(crate::snapshot::FileData {
                    size: m.len(),
                    extents: Vec::new(),
                })
            } else if ft.is_symlink() {
                summary.symlinks += 1;
                let t = std::fs::read_link(&path).map_err(|e| Error::io(&path, e))?;
                NodeKind::Symlink(t.as_os_str().as_bytes().to_vec())
            } else {
                summary.others += 1;
                match m.mode() & libc::S_IFMT {
                    libc::S_IFCHR | libc::S_IFBLK => NodeKind::Device(m.rdev()),
                    libc::S_IFIFO => NodeKind::Fifo,
                    _ => NodeKind::Socket,
                }
            };
            let mut node = node_from(&path, &m, kind)?;
            node.nlink = if m.is_dir() { 2 } else { 1 };
            if !m.is_dir() && m.nlink() > 1 {
                links.insert(key, idx);
            }
            nodes.push(node);
            inos.push(m.ino());
            entries.push(DirEntry {
                name: name.as_bytes().to_vec(),
                node: idx,
            });
        }
        let dir = &mut nodes[dir_idx as usize];
        dir.nlink = 2 + subdirs;
        if let NodeKind::Dir(d) = &mut dir.kind {
            d.entries = entries;
        }
    }
    Ok((nodes, pending, inos))
}

fn node_from(path: &Path, m: &Metadata, kind: NodeKind) -> Result<Node> {
    Ok(Node {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        nlink: 1,
        atime: Timespec {
            sec: m.atime(),
            nsec: m.atime_nsec() as u32,
        },
        mtime: Timespec {
            sec: m.mtime(),
            nsec: m.mtime_nsec() as u32,
        },
        ctime: Timespec {
            sec: m.ctime(),
            nsec: m.ctime_nsec() as u32,
        },
        xattrs: read_xattrs(path)?,
        kind,
    })
}

fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(|e| Error::io(path, e))? {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::inode_table;

    #[test]
    fn source_numbers_are_kept_unless_they_cannot_be() {
        // The root becomes 1; 0, 1, a duplicate and a huge number get fresh ones above
        // the largest kept number.
        let t = inode_table(&[2, 40, 0, 7, 40, 1, u64::MAX]);
        assert_eq!(t, vec![1, 40, 41, 7, 42, 43, 44]);
        // The root's own number is free for a file (it shows as 1).
        assert_eq!(inode_table(&[5, 5]), vec![1, 5]);
    }
}
