//! What changed between two trees — a snapshot and its overlay (what a job did before it
//! is committed or thrown away), or two snapshots — as `docker diff` shows it: added,
//! changed (content and/or metadata) and deleted paths, with sizes. Only indexes and
//! overlay records are read, never file data: snapshot contents compare by their chunk
//! ids (BLAKE3), overlay contents by whether the overlay rewrote them.

use std::sync::Arc;

use serde::Serialize;

use crate::overlay::journal::Kind;
use crate::snapshot::{NodeKind, Snapshot};
use crate::vfs::{Vfs, ROOT};
use crate::{Error, Result};

/// How a path differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Changed,
    Deleted,
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub change: Change,
    /// `/`-separated from the tree's root, starting with `/`.
    pub path: String,
    /// `file`, `dir`, `symlink`, `device`, `fifo` or `socket` (the new one when changed).
    pub kind: &'static str,
    /// Size before (absent when added).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
    /// Size after (absent when deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_size: Option<u64>,
    /// Changed: the bytes differ.
    pub content: bool,
    /// Changed: mode, owner, times, xattrs, link target or type differ.
    pub metadata: bool,
}

/// What a diff compares of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Info {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    size: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target or device number.
    extra: Vec<u8>,
    content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    /// The bytes, named by their chunks: (offset, chunk id) over a size.
    Chunks(Vec<(u64, [u8; 32])>),
    /// Rewritten in an overlay: differs from everything else.
    Rewritten(u64),
    None,
}

/// A tree a diff can walk.
trait Tree {
    fn root(&self) -> u64;
    fn children(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64)>>;
    fn info(&self, node: u64) -> Result<Info>;
}

fn kind_name(k: &NodeKind) -> &'static str {
    match k {
        NodeKind::Dir(_) => "dir",
        NodeKind::File(_) => "file",
        NodeKind::Symlink(_) => "symlink",
        NodeKind::Device(_) => "device",
        NodeKind::Fifo => "fifo",
        NodeKind::Socket => "socket",
    }
}

fn snapshot_info(snap: &Snapshot, idx: u32) -> Result<Info> {
    let n = snap
        .node(idx)
        .ok_or_else(|| Error::corrupt(format!("node {idx} out of range")))?;
    let chunks = snap.index().chunks.as_slice();
    let (size, extra, content) = match &n.kind {
        NodeKind::File(f) => {
            let named = f
                .extents
                .iter()
                .map(|e| {
                    chunks
                        .get(e.chunk as usize)
                        .map(|c| (e.offset, c.id))
                        .ok_or_else(|| Error::corrupt(format!("chunk {} out of range", e.chunk)))
                })
                .collect::<Result<Vec<_>>>()?;
            (f.size, Vec::new(), Content::Chunks(named))
        }
        NodeKind::Symlink(t) => (t.len() as u64, t.clone(), Content::None),
        NodeKind::Device(r) => (0, r.to_le_bytes().to_vec(), Content::None),
        _ => (0, Vec::new(), Content::None),
    };
    Ok(Info {
        kind: kind_name(&n.kind),
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        mtime: (n.mtime.sec, n.mtime.nsec),
        size,
        xattrs: n
            .xattrs
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect(),
        extra,
        content,
    })
}

struct SnapshotTree<'a>(&'a Snapshot);

impl Tree for SnapshotTree<'_> {
    fn root(&self) -> u64 {
        0
    }

    fn children(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64)>> {
        match self.0.node(dir as u32).map(|n| &n.kind) {
            Some(NodeKind::Dir(d)) => Ok(d
                .entries
                .iter()
                .map(|e| (e.name.clone(), e.node as u64))
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    fn info(&self, node: u64) -> Result<Info> {
        snapshot_info(self.0, node as u32)
    }
}

/// The merged view of a snapshot and its overlay.
struct OverlayTree<'a>(&'a Vfs);

impl OverlayTree<'_> {
    fn export(&self, node: u64) -> Result<crate::vfs::ExportedNode> {
        self.0
            .export_node(node)
            .map_err(|e| Error::Invalid(format!("reading the overlay: node {node}: {e}")))
    }
}

impl Tree for OverlayTree<'_> {
    fn root(&self) -> u64 {
        ROOT
    }

    fn children(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64)>> {
        Ok(self.export(dir)?.2.unwrap_or_default())
    }

    fn info(&self, node: u64) -> Result<Info> {
        let (rec, xattrs, _) = self.export(node)?;
        let snap = self.0.snapshot();
        // Bytes the overlay never touched keep the snapshot's chunk names.
        let lower = rec.lower.and_then(|i| match snap.node(i).map(|n| &n.kind) {
            Some(NodeKind::File(f)) => Some((i, f.size)),
            _ => None,
        });
        let content = match (&rec.kind, lower) {
            (Kind::File, Some((i, size)))
                if !rec.upper && rec.size == size && rec.lower_limit >= size =>
            {
                snapshot_info(snap, i)?.content
            }
            (Kind::File, _) => Content::Rewritten(rec.id),
            _ => Content::None,
        };
        let (kind, extra) = match &rec.kind {
            Kind::Dir => ("dir", Vec::new()),
            Kind::File => ("file", Vec::new()),
            Kind::Symlink(t) => ("symlink", t.clone()),
            Kind::Device => ("device", rec.rdev.to_le_bytes().to_vec()),
            Kind::Fifo => ("fifo", Vec::new()),
            Kind::Socket => ("socket", Vec::new()),
        };
        Ok(Info {
            kind,
            mode: rec.mode,
            uid: rec.uid,
            gid: rec.gid,
            mtime: rec.mtime,
            size: if kind == "dir" { 0 } else { rec.size },
            xattrs,
            extra,
            content,
        })
    }
}

/// The changes from snapshot `base` to the same snapshot merged with `overlay`.
pub fn overlay(base: Arc<Snapshot>, overlay: &std::path::Path) -> Result<Vec<Entry>> {
    if !overlay.join("journal").exists() {
        return Err(Error::Invalid(format!(
            "{}: no overlay here (no journal)",
            overlay.display()
        )));
    }
    let vfs = Vfs::new(base.clone(), Some(overlay), true)?;
    diff(&SnapshotTree(&base), &OverlayTree(&vfs))
}

/// The changes from snapshot `a` to snapshot `b`.
pub fn snapshots(a: &Snapshot, b: &Snapshot) -> Result<Vec<Entry>> {
    for s in [a, b] {
        if !s.has_tree() {
            return Err(Error::Invalid(format!(
                "{}: snapshot has no file tree to compare (stream-only)",
                s.path().display()
            )));
        }
    }
    diff(&SnapshotTree(a), &SnapshotTree(b))
}

fn diff(a: &dyn Tree, b: &dyn Tree) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), Some(a.root()), Some(b.root()))];
    while let Some((path, na, nb)) = stack.pop() {
        let ia = na.map(|n| a.info(n)).transpose()?;
        let ib = nb.map(|n| b.info(n)).transpose()?;
        let shown = if path.is_empty() {
            "/".to_string()
        } else {
            path.clone()
        };
        match (&ia, &ib) {
            (Some(x), Some(y)) if x != y => {
                let content = x.content != y.content || x.size != y.size;
                let metadata = (x.kind, x.mode, x.uid, x.gid, x.mtime, &x.xattrs, &x.extra)
                    != (y.kind, y.mode, y.uid, y.gid, y.mtime, &y.xattrs, &y.extra);
                out.push(Entry {
                    change: Change::Changed,
                    path: shown,
                    kind: y.kind,
                    old_size: Some(x.size),
                    new_size: Some(y.size),
                    content,
                    metadata,
                });
            }
            (Some(x), None) => out.push(Entry {
                change: Change::Deleted,
                path: shown,
                kind: x.kind,
                old_size: Some(x.size),
                new_size: None,
                content: false,
                metadata: false,
            }),
            (None, Some(y)) => out.push(Entry {
                change: Change::Added,
                path: shown,
                kind: y.kind,
                old_size: None,
                new_size: Some(y.size),
                content: false,
                metadata: false,
            }),
            _ => {}
        }
        // Children, matched by name (listings are sorted by name).
        let ca = match (na, &ia) {
            (Some(n), Some(i)) if i.kind == "dir" => a.children(n)?,
            _ => Vec::new(),
        };
        let cb = match (nb, &ib) {
            (Some(n), Some(i)) if i.kind == "dir" => b.children(n)?,
            _ => Vec::new(),
        };
        let (mut i, mut j) = (0, 0);
        let mut next = Vec::new();
        while i < ca.len() || j < cb.len() {
            let order = match (ca.get(i), cb.get(j)) {
                (Some(x), Some(y)) => x.0.cmp(&y.0),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let (name, x, y) = match order {
                std::cmp::Ordering::Less => {
                    i += 1;
                    (&ca[i - 1].0, Some(ca[i - 1].1), None)
                }
                std::cmp::Ordering::Greater => {
                    j += 1;
                    (&cb[j - 1].0, None, Some(cb[j - 1].1))
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                    (&ca[i - 1].0, Some(ca[i - 1].1), Some(cb[j - 1].1))
                }
            };
            let child = format!("{path}/{}", String::from_utf8_lossy(name));
            next.push((child, x, y));
        }
        // Depth first, in name order.
        stack.extend(next.into_iter().rev());
    }
    Ok(out)
}

/// One line per change: `A|C|D PATH` and sizes, as `docker diff` prints them.
pub fn render(entries: &[Entry]) -> String {
    let mut s = String::new();
    for e in entries {
        let (tag, sizes) = match e.change {
            Change::Added => ("A", format!("{}", e.new_size.unwrap_or(0))),
            Change::Deleted => ("D", format!("{}", e.old_size.unwrap_or(0))),
            Change::Changed => {
                let what = match (e.content, e.metadata) {
                    (true, true) => "content+metadata",
                    (true, false) => "content",
                    _ => "metadata",
                };
                (
                    "C",
                    format!(
                        "{} -> {} ({what})",
                        e.old_size.unwrap_or(0),
                        e.new_size.unwrap_or(0)
                    ),
                )
            }
        };
        s.push_str(&format!("{tag} {}\t{} {sizes}\n", e.path, e.kind));
    }
    s
}
