//! The copy-on-write overlay: where a sandbox's changes live. A directory holding
//! `journal` (metadata records, see `journal.rs`), `data/<node id>` (sparse upper files)
//! and `lock`. Persistent when the user names the directory, ephemeral otherwise.

pub mod journal;
pub mod ranges;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use journal::{Journal, Kind, NodeRec, Record, DIR_ENTRIES_PER_RECORD};
use ranges::RangeSet;

use crate::error::{Error, Result};
use crate::snapshot::{NodeKind, Snapshot};

/// The overlay's view of what changed, rebuilt from the journal on open.
#[derive(Default)]
pub struct OverlayState {
    pub nodes: HashMap<u64, NodeRec>,
    /// Directories whose listing differs from the snapshot's (full listing).
    pub dirs: HashMap<u64, BTreeMap<Vec<u8>, u64>>,
    /// Lower-backed files: which ranges the upper file holds.
    pub present: HashMap<u64, Arc<RangeSet>>,
    /// Nodes whose xattrs differ from the snapshot's (all of them, sorted by name).
    pub xattrs: HashMap<u64, journal::XattrList>,
    /// Snapshot nodes that no longer exist.
    pub gone: HashSet<u64>,
    pub next_id: u64,
}

impl OverlayState {
    fn new(snap: &Snapshot) -> OverlayState {
        OverlayState {
            next_id: snap.node_ids().next_free(),
            ..Default::default()
        }
    }

    /// The one way state changes: replay and live operations both come through here.
    pub fn apply(&mut self, rec: &Record, snap: &Snapshot) {
        match rec {
            Record::Init { .. } => {}
            Record::Node(n) => {
                self.next_id = self.next_id.max(n.id.saturating_add(1));
                if n.kind == Kind::Dir && n.lower.is_none() {
                    self.dirs.entry(n.id).or_default();
                }
                if let Some(p) = self.present.get_mut(&n.id) {
                    Arc::make_mut(p).truncate(n.size);
                }
                self.nodes.insert(n.id, n.clone());
            }
            Record::Dir { id, entries } => {
                self.dirs.insert(*id, entries.iter().cloned().collect());
            }
            Record::DirPart { id, entries } => {
                self.dirs
                    .entry(*id)
                    .or_default()
                    .extend(entries.iter().cloned());
            }
            Record::Xattrs { id, all } => {
                self.xattrs.insert(*id, all.clone());
            }
            Record::Xattr { id, name, value } => {
                let all = self.xattrs.entry(*id).or_default();
                match (all.binary_search_by(|(n, _)| n.cmp(name)), value) {
                    (Ok(i), Some(v)) => all[i].1 = v.clone(),
                    (Ok(i), None) => {
                        all.remove(i);
                    }
                    (Err(i), Some(v)) => all.insert(i, (name.clone(), v.clone())),
                    (Err(_), None) => {}
                }
            }
            Record::Entry { dir, name, node } => {
                let listing = self.listing_mut(*dir, snap);
                match node {
                    Some(n) => listing.insert(name.clone(), *n),
                    None => listing.remove(name),
                };
            }
            Record::Present { id, start, end } => {
                Arc::make_mut(self.present.entry(*id).or_default()).insert(*start, *end);
            }
            Record::Drop { id } => {
                self.nodes.remove(id);
                self.dirs.remove(id);
                self.present.remove(id);
                self.xattrs.remove(id);
                self.gone.insert(*id);
                self.next_id = self.next_id.max(id.saturating_add(1));
            }
            Record::NextId(n) => self.next_id = self.next_id.max(*n),
            Record::Batch(v) => {
                for r in v {
                    self.apply(r, snap);
                }
            }
        }
    }

    /// A directory's listing, copied up from the snapshot the first time it changes.
    fn listing_mut(&mut self, dir: u64, snap: &Snapshot) -> &mut BTreeMap<Vec<u8>, u64> {
        self.dirs.entry(dir).or_insert_with(|| {
            match snap
                .node_index(dir)
                .and_then(|i| snap.node(i))
                .map(|n| &n.kind)
            {
                Some(NodeKind::Dir(d)) => d
                    .entries
                    .iter()
                    .map(|e| (e.name.clone(), snap.node_id(e.node)))
                    .collect(),
                _ => BTreeMap::new(),
            }
        })
    }

    /// Records that rebuild this state from nothing (a checkpoint).
    fn checkpoint(&self, init: Record) -> Vec<Record> {
        let mut out = vec![init, Record::NextId(self.next_id)];
        let mut ids: Vec<_> = self.nodes.keys().copied().collect();
        ids.sort_unstable();
        out.extend(ids.iter().map(|id| Record::Node(self.nodes[id].clone())));
        for (id, p) in &self.present {
            out.extend(p.iter().map(|(start, end)| Record::Present {
                id: *id,
                start,
                end,
            }));
        }
        for (id, listing) in &self.dirs {
            let entries: Vec<(Vec<u8>, u64)> =
                listing.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let mut parts = entries.chunks(DIR_ENTRIES_PER_RECORD);
            out.push(Record::Dir {
                id: *id,
                entries: parts.next().unwrap_or_default().to_vec(),
            });
            out.extend(parts.map(|p| Record::DirPart {
                id: *id,
                entries: p.to_vec(),
            }));
        }
        for (id, all) in &self.xattrs {
            out.push(Record::Xattrs {
                id: *id,
                all: all.clone(),
            });
        }
        let mut gone: Vec<_> = self.gone.iter().copied().collect();
        gone.sort_unstable();
        out.extend(gone.into_iter().map(|id| Record::Drop { id }));
        out
    }
}

pub struct Overlay {
    dir: PathBuf,
    journal: Option<Journal>,
    init: Record,
    pub state: OverlayState,
    /// Identity of this overlay (random, made when it was created).
    pub id: [u8; 16],
    /// Bytes appended to the journal since open (never decreases; compaction included).
    appended: u64,
    /// Journal length past which to consider compacting again.
    next_compaction_check: u64,
    _lock: Option<File>,
    _ephemeral: Option<tempfile::TempDir>,
}

impl Overlay {
    /// Opens (or creates) the overlay for `snap`. `dir = None` makes an ephemeral overlay
    /// in a temporary directory removed on drop; with `read_only` nothing is created or
    /// written, and without a directory the overlay is empty.
    pub fn open(snap: &Snapshot, dir: Option<&Path>, read_only: bool) -> Result<Overlay> {
        let (dir, ephemeral) = match dir {
            Some(d) => (d.to_path_buf(), None),
            None if read_only => {
                return Ok(Overlay {
                    dir: PathBuf::new(),
                    journal: None,
                    init: Record::Init {
                        snapshot: snap.id(),
                        overlay: [0; 16],
                    },
                    state: OverlayState::new(snap),
                    id: [0; 16],
                    appended: 0,
                    next_compaction_check: u64::MAX,
                    _lock: None,
                    _ephemeral: None,
                })
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("hexz-overlay-")
                    .tempdir()
                    .map_err(|e| Error::io("/tmp", e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        if read_only && !dir.join("journal").exists() {
            return Err(Error::Invalid(format!(
                "{}: no overlay here (read-only mode creates none)",
                dir.display()
            )));
        }
        if !read_only {
            std::fs::create_dir_all(dir.join("data")).map_err(|e| Error::io(&dir, e))?;
            // The overlay directory itself must survive a power cut (its entry in the
            // parent, and `data` in it), or everything fsynced inside it is lost.
            for d in [
                dir.parent().filter(|p| !p.as_os_str().is_empty()),
                Some(&dir),
            ]
            .into_iter()
            .flatten()
            {
                File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(d, e))?;
            }
        }
        let lock = lock(&dir.join("lock"), read_only)?;
        let jpath = dir.join("journal");
        let (journal, records) = if jpath.exists() {
            let (j, replay) = Journal::open(&jpath, !read_only)?;
            if replay.torn_bytes > 0 {
                tracing::warn!(overlay = %dir.display(), bytes = replay.torn_bytes, "journal had a torn tail (crash during a write); rolled back to the last complete record");
            }
            (j, replay.records)
        } else {
            let init = Record::Init {
                snapshot: snap.id(),
                overlay: random_id()?,
            };
            (
                Journal::create(&jpath, std::slice::from_ref(&init))?,
                vec![init],
            )
        };
        let (init, id) = match records.first() {
            Some(r @ Record::Init { snapshot, overlay }) => {
                if *snapshot != snap.id() {
                    return Err(Error::Invalid(format!(
                        "{}: this overlay belongs to snapshot {}, not {} ({})",
                        dir.display(),
                        &crate::snapshot::reader::hex(snapshot)[..16],
                        &snap.id_hex()[..16],
                        snap.path().display()
                    )));
                }
                (r.clone(), *overlay)
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: overlay journal does not start with its identity",
                    jpath.display()
                )))
            }
        };
        let mut state = OverlayState::new(snap);
        for r in &records {
            state.apply(r, snap);
        }
        let mut ov = Overlay {
            dir,
            journal: Some(journal),
            init,
            state,
            id,
            appended: 0,
            next_compaction_check: 0,
            _lock: Some(lock),
            _ephemeral: ephemeral,
        };
        let reconciled = ov.reconcile_upper_files(!read_only)?;
        if reconciled && !read_only {
            // What recovery decided must be what the journal says before anything builds
            // on it (a later record would otherwise be written against a size the journal
            // never held).
            ov.checkpoint()?;
        }
        if !read_only {
            ov.compact_if_large()?;
        }
        Ok(ov)
    }

    /// Checks the upper files against the journal after a crash. A missing upper file
    /// means its creation never became durable: the node reads from the snapshot again. A
    /// new file (no snapshot origin) may be longer than journaled (writes after its last
    /// fsync that survived): that length is kept; a snapshot file keeps its journaled
    /// size. With `clean`, upper files no journal record names (a node id whose creation
    /// was lost, reused later) are deleted.
    /// Returns whether it changed the state (the caller then checkpoints it).
    fn reconcile_upper_files(&mut self, clean: bool) -> Result<bool> {
        let mut changed = false;
        for rec in self.state.nodes.values_mut() {
            if !rec.upper {
                continue;
            }
            match std::fs::metadata(self.dir.join("data").join(format!("{:016x}", rec.id))) {
                Ok(m) if rec.lower.is_none() && m.len() > rec.size => {
                    rec.size = m.len();
                    changed = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    rec.upper = false;
                    self.state.present.remove(&rec.id);
                    changed = true;
                }
                Err(e) => return Err(Error::io(&self.dir, e)),
            }
        }
        if !clean {
            return Ok(changed);
        }
        let data = self.data_dir();
        let entries = std::fs::read_dir(&data).map_err(|e| Error::io(&data, e))?;
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let known = name
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok())
                .and_then(|id| self.state.nodes.get(&id))
                .is_some_and(|r| r.upper);
            if !known {
                let _ = std::fs::remove_file(e.path());
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "upper files no journal record names were removed");
            File::open(&data)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(&data, e))?;
        }
        Ok(changed)
    }

    /// Nodes with no names left: kept alive by references, or leftovers of a restart.
    pub fn orphans(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .state
            .nodes
            .values()
            .filter(|r| r.nlink == 0)
            .map(|r| r.id)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether the journal has grown enough since the last look to consider compacting.
    pub fn compaction_due(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.len() >= self.next_compaction_check)
    }

    /// Rewrites the journal as a checkpoint when it has grown well past the live state
    /// (checked again only after it grows by a quarter, so the cost is amortized).
    /// Returns whether it did; the new journal is durable when it returns.
    pub fn compact_if_large(&mut self) -> Result<bool> {
        let Some(j) = &self.journal else {
            return Ok(false);
        };
        if j.len() < self.next_compaction_check {
            return Ok(false);
        }
        let records = self.state.checkpoint(self.init.clone());
        let approx: u64 = records.iter().map(approx_size).sum();
        let compact = j.len() > 1 << 20 && j.len() > 4 * approx;
        if compact {
            let new = Journal::create(&self.dir.join("journal"), &records)?;
            self.appended += new.len();
            self.journal = Some(new);
        }
        let len = self.journal.as_ref().map_or(0, Journal::len);
        self.next_compaction_check = len + (len / 4).max(1 << 20);
        Ok(compact)
    }

    /// Journals `records` (as one atomic batch) and applies them. On error nothing changed.
    pub fn commit(&mut self, mut records: Vec<Record>, snap: &Snapshot) -> Result<()> {
        let rec = if records.len() == 1 {
            records.pop().unwrap_or(Record::Batch(vec![]))
        } else {
            Record::Batch(records)
        };
        match &mut self.journal {
            Some(j) => self.appended += j.append(&rec)?,
            None => return Err(Error::Invalid("overlay is read-only".into())),
        }
        self.state.apply(&rec, snap);
        Ok(())
    }

    /// Removes a node and its upper file.
    pub fn drop_node(&mut self, id: u64) -> Result<()> {
        let had_upper = self.state.nodes.get(&id).is_some_and(|r| r.upper);
        let rec = Record::Drop { id };
        if let Some(j) = &mut self.journal {
            self.appended += j.append(&rec)?;
        }
        self.state.gone.insert(id);
        self.state.nodes.remove(&id);
        self.state.dirs.remove(&id);
        self.state.present.remove(&id);
        self.state.xattrs.remove(&id);
        if had_upper {
            let _ = std::fs::remove_file(self.upper_path(id));
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        match &self.journal {
            Some(j) => j.sync(),
            None => Ok(()),
        }
    }

    /// What to sync for everything appended so far: the bytes appended since open and the
    /// journal file (syncing it needs no lock on the overlay).
    pub fn sync_point(&self) -> Option<(u64, Arc<File>)> {
        self.journal.as_ref().map(|j| (self.appended, j.file()))
    }

    /// Journal bytes on disk.
    pub fn journal_len(&self) -> u64 {
        self.journal.as_ref().map_or(0, Journal::len)
    }

    pub fn upper_path(&self, id: u64) -> PathBuf {
        self.dir.join("data").join(format!("{id:016x}"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An ephemeral overlay is deleted (nothing in it outlives the server).
    pub fn is_ephemeral(&self) -> bool {
        self._ephemeral.is_some()
    }

    /// Deletes an ephemeral overlay's directory now (the process may exit without drops).
    pub fn remove_ephemeral(&mut self) {
        if let Some(t) = self._ephemeral.take() {
            self.journal = None;
            if let Err(e) = t.close() {
                tracing::warn!("removing the ephemeral overlay: {e}");
            }
        }
    }

    /// Rewrites the journal as a checkpoint (on clean shutdown).
    pub fn checkpoint(&mut self) -> Result<()> {
        if self.journal.is_some() {
            let records = self.state.checkpoint(self.init.clone());
            let new = Journal::create(&self.dir.join("journal"), &records)?;
            self.appended += new.len();
            self.journal = Some(new);
        }
        Ok(())
    }

    /// Bytes the upper files take on disk now (allocated blocks).
    pub fn upper_bytes_on_disk(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(self.data_dir())
            .map(|it| {
                it.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// A rough encoded size of a checkpoint record (for deciding when to compact).
fn approx_size(r: &Record) -> u64 {
    20 + match r {
        Record::Node(_) => 96,
        Record::Dir { entries, .. } | Record::DirPart { entries, .. } => {
            entries.iter().map(|(n, _)| n.len() as u64 + 10).sum()
        }
        Record::Xattrs { all, .. } => all
            .iter()
            .map(|(n, v)| (n.len() + v.len()) as u64 + 8)
            .sum(),
        _ => 24,
    }
}

fn lock(path: &Path, shared: bool) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(!shared)
        .truncate(false)
        .open(path)
        .or_else(|_| File::open(path))
        .map_err(|e| Error::io(path, e))?;
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(Error::Invalid(format!(
            "{}: overlay is in use by another hexz process (a server or a writable mount: one writer per overlay)",
            path.parent().unwrap_or(path).display()
        )));
    }
    Ok(f)
}

fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::io("/dev/urandom", e))?;
    Ok(id)
}
