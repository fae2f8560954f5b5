//! Lookups answered from whole listings. `git status`, `make` and a compiler's include
//! search look up many names of a directory they never list (or before they list it),
//! each a LOOKUP round trip. On a lookup in a directory it holds nothing for, the adapter
//! asks the host for that directory's whole listing instead (`list_dirs`, if it has at
//! most [`MAX_ENTRIES`] entries), answers from it, and keeps the other entries — each
//! with the host reference the listing gave it — for the lookups that follow; a name the
//! listing does not have is answered "no such name".
//!
//! Exact because the overlay has one writer, this mount: a listing is used only while no
//! change was made through the mount since it was asked for (the attribute cache's count
//! of changes, as for listings read ahead, `prelist.rs`) and only on the connection that
//! answered it; any other is given back (its references forgotten). While changes are
//! being made (a build writing its outputs), lookups go to the host one by one: a
//! listing is asked for only when no change happened since the previous lookup.
//! Bounded: [`MAX_DIRS`] listings held; a directory too long is remembered as such.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use hexz_protocol::DirEntryPlus;

/// Entries a directory may have (`.` and `..` included) to be listed for a lookup.
pub const MAX_ENTRIES: u32 = 128;
/// Listings held at once; beyond, the oldest is given back.
const MAX_DIRS: usize = 64;
/// Directories remembered as too long to list for a lookup.
const MAX_TOO_LONG: usize = 4096;

/// A directory's whole listing, as asked for a lookup.
pub struct Held {
    /// By name: the entry (with its reference) until a lookup took it, then `None` (the
    /// name exists; the next lookup of it goes to the host).
    entries: HashMap<Vec<u8>, Option<DirEntryPlus>>,
    /// The count of changes made through the mount when it was asked for.
    changes: u64,
    /// The attribute cache's version then (`AttrCache::since`).
    pub version: u64,
    epoch: u64,
}

impl Held {
    /// The listing `entries`, asked for when the count of changes was `changes` and the
    /// attribute cache's version `version`, answered on connection `epoch`.
    pub fn new(entries: Vec<DirEntryPlus>, changes: u64, version: u64, epoch: u64) -> Held {
        let entries = entries
            .into_iter()
            .filter(DirEntryPlus::is_referenced)
            .map(|e| (e.name.clone(), Some(e)))
            .collect();
        Held {
            entries,
            changes,
            version,
            epoch,
        }
    }

    /// The entry of `name` (its reference becomes the caller's), if the listing has it
    /// and no lookup took it yet.
    pub fn take(&mut self, name: &[u8]) -> Option<DirEntryPlus> {
        self.entries.get_mut(name)?.take()
    }

    /// The references it still holds (to give back).
    pub fn refs(&self) -> Vec<(u64, u64)> {
        self.entries
            .values()
            .flatten()
            .map(|e| (e.entry.node, 1))
            .collect()
    }
}

/// What to do with a lookup.
pub enum Answer {
    /// The entry, from a listing (its reference is now the kernel's), and the attribute
    /// cache's version when the listing was asked for.
    Entry(Box<DirEntryPlus>, u64),
    /// The listing has no such name.
    Absent,
    /// Ask for the directory's listing.
    List,
    /// Send the lookup itself.
    Host,
}

#[derive(Default)]
struct State {
    dirs: HashMap<u64, Held>,
    order: VecDeque<u64>,
    too_long: HashSet<u64>,
    /// The count of changes at the previous lookup that found no listing.
    last_changes: u64,
}

#[derive(Default)]
pub struct DirLook {
    state: Mutex<State>,
}

impl DirLook {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How to answer a lookup of `name` in `dir` now that the count of changes is
    /// `changes` and the connection is `epoch`; also the listings to give back.
    pub fn lookup(&self, dir: u64, name: &[u8], changes: u64, epoch: u64) -> (Answer, Vec<Held>) {
        let mut s = self.state();
        let mut back = Vec::new();
        if let Some(h) = s.dirs.get_mut(&dir) {
            if h.changes == changes && h.epoch == epoch {
                let version = h.version;
                return match h.entries.get_mut(name) {
                    Some(slot) => match slot.take() {
                        Some(e) => (Answer::Entry(Box::new(e), version), back),
                        None => (Answer::Host, back),
                    },
                    None => (Answer::Absent, back),
                };
            }
            back.extend(s.dirs.remove(&dir));
            s.order.retain(|&d| d != dir);
        }
        let quiet = s.last_changes == changes;
        s.last_changes = changes;
        if !quiet || s.too_long.contains(&dir) {
            return (Answer::Host, back);
        }
        (Answer::List, back)
    }

    /// Holds `dir`'s listing; returns the listings to give back (one replaced, the
    /// oldest beyond the bound).
    pub fn put(&self, dir: u64, held: Held) -> Vec<Held> {
        let mut s = self.state();
        let mut back = Vec::new();
        match s.dirs.insert(dir, held) {
            Some(old) => back.push(old),
            None => s.order.push_back(dir),
        }
        while s.dirs.len() > MAX_DIRS {
            let Some(d) = s.order.pop_front() else { break };
            back.extend(s.dirs.remove(&d));
        }
        back
    }

    /// `dir` has more entries than a lookup lists.
    pub fn too_long(&self, dir: u64) {
        let mut s = self.state();
        if s.too_long.len() >= MAX_TOO_LONG {
            s.too_long.clear();
        }
        s.too_long.insert(dir);
    }

    /// `dir` changed or was forgotten: its listing, if held, to give back.
    pub fn forget(&self, dir: u64) -> Option<Held> {
        let mut s = self.state();
        s.too_long.remove(&dir);
        let h = s.dirs.remove(&dir)?;
        s.order.retain(|&d| d != dir);
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexz_protocol::Entry;

    fn plus(name: &[u8], node: u64) -> DirEntryPlus {
        DirEntryPlus {
            name: name.to_vec(),
            cookie: 3,
            entry: Entry {
                node,
                generation: 0,
                attr: Default::default(),
                entry_ttl_ms: 1000,
                attr_ttl_ms: 1000,
                dir_attr: None,
            },
        }
    }

    #[test]
    fn a_listing_answers_each_name_once_and_absent_names_while_nothing_changed() {
        let d = DirLook::default();
        assert!(matches!(d.lookup(5, b"a", 0, 1).0, Answer::List));
        let h = Held::new(vec![plus(b".", 5), plus(b"..", 1), plus(b"a", 7)], 0, 0, 1);
        assert_eq!(h.refs(), vec![(7, 1)], ". and .. hold no reference");
        assert!(d.put(5, h).is_empty());
        assert!(matches!(d.lookup(5, b"a", 0, 1).0, Answer::Entry(e, 0) if e.entry.node == 7));
        // Taken: the kernel's second lookup of it goes to the host, never "absent".
        assert!(matches!(d.lookup(5, b"a", 0, 1).0, Answer::Host));
        assert!(matches!(d.lookup(5, b"b", 0, 1).0, Answer::Absent));
        // On another connection, or after a change, the listing is given back.
        let (a, back) = d.lookup(5, b"b", 0, 2);
        assert!(matches!(a, Answer::List) && back.len() == 1);
        d.put(5, Held::new(vec![plus(b"a", 7)], 0, 0, 1));
        let (a, back) = d.lookup(5, b"b", 1, 1);
        assert!(
            matches!(a, Answer::Host),
            "a change just happened: one by one"
        );
        assert_eq!(back.len(), 1);
        assert!(
            matches!(d.lookup(5, b"b", 1, 1).0, Answer::List),
            "quiet again"
        );
    }

    #[test]
    fn listings_held_are_bounded_and_too_long_directories_are_not_listed() {
        let d = DirLook::default();
        let mut given_back = 0;
        for dir in 0..(MAX_DIRS as u64 + 3) {
            given_back += d
                .put(dir, Held::new(vec![plus(b"x", 100 + dir)], 0, 0, 1))
                .len();
        }
        assert_eq!(given_back, 3);
        assert!(
            matches!(d.lookup(0, b"x", 0, 1).0, Answer::List),
            "the oldest went"
        );
        d.too_long(9999);
        assert!(matches!(d.lookup(9999, b"x", 0, 1).0, Answer::Host));
        assert!(d.forget(5).is_some() && d.forget(5).is_none());
    }
}
