//! The names the adapter has seen, so that two things need no round trip:
//!
//! - **Which node a removal hit.** `unlink`, `rmdir` and `rename` name their victim by
//!   parent and name; knowing its node, the adapter drops only the attributes that
//!   changed (the parents', the victim's, the moved node's) instead of all it remembers.
//! - **That a name does not exist.** For a directory this mount created (and so saw every
//!   name of since), or whose whole listing it got while nothing changed through it, a
//!   lookup of a name it does not hold is answered ENOENT at once — the lookup before
//!   every create (build outputs, git objects, lock files) and a compiler's or make's
//!   search for files that are not there — and a create there can be answered early
//!   (`behind.rs`).
//!
//! Why this is exact: the overlay has one writer, this mount, and every name it adds or
//! removes passes through here (entries of lookups, creates, links and listings are
//! recorded; removals and renames drop or move them). A directory stays "complete" only
//! while that holds for it: a rename of a node whose old name was never seen, or the
//! table starting over when full, ends its completeness (its lookups go to the host).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// Names remembered at most; beyond it the table starts over.
const MAX_NAMES: usize = 1 << 16;

#[derive(Default)]
struct State {
    names: HashMap<(u64, Vec<u8>), u64>,
    /// Directories whose every name is in `names`.
    complete: HashSet<u64>,
}

#[derive(Default)]
pub struct Names {
    state: Mutex<State>,
}

impl Names {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `dir` has `name`, naming `node`.
    pub fn seen(&self, dir: u64, name: &[u8], node: u64) {
        if name == b"." || name == b".." {
            return;
        }
        let mut s = self.state();
        if s.names.len() >= MAX_NAMES {
            s.names.clear();
            s.complete.clear();
        }
        s.names.insert((dir, name.to_vec()), node);
    }

    /// `dir`'s whole listing, asked for when nothing changed through the mount until
    /// its reply came: every name it has, so from now on (every name it gets or loses
    /// passing through here) a name not held is certainly absent. Not marked complete if
    /// the listing does not fit the table.
    pub fn listed<'a>(&self, dir: u64, entries: impl IntoIterator<Item = (&'a [u8], u64)>) {
        let entries: Vec<(&[u8], u64)> = entries
            .into_iter()
            .filter(|(n, _)| *n != b"." && *n != b"..")
            .collect();
        let mut s = self.state();
        if s.names.len() + entries.len() > MAX_NAMES {
            s.names.clear();
            s.complete.clear();
            if entries.len() > MAX_NAMES {
                return;
            }
        }
        for (n, node) in entries {
            s.names.insert((dir, n.to_vec()), node);
        }
        s.complete.insert(dir);
    }

    /// `dir` was just created by this mount: it is empty, and every name it will get
    /// passes through here.
    pub fn new_dir(&self, dir: u64) {
        self.state().complete.insert(dir);
    }

    /// True if `dir` certainly has no `name`.
    pub fn absent(&self, dir: u64, name: &[u8]) -> bool {
        if name == b"." || name == b".." {
            return false;
        }
        let s = self.state();
        s.complete.contains(&dir) && !s.names.contains_key(&(dir, name.to_vec()))
    }

    /// The node `name` in `dir` names, if known.
    pub fn get(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.state().names.get(&(dir, name.to_vec())).copied()
    }

    /// `name` left `dir`; returns the node it named, if known.
    pub fn removed(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.state().names.remove(&(dir, name.to_vec()))
    }

    /// The directory `dir` itself was removed.
    pub fn dir_gone(&self, dir: u64) {
        self.not_complete(dir);
    }

    /// What this mount saw of `dir`'s names may no longer be all of them (a change
    /// answered early failed on the host): its lookups go to the host again.
    pub fn not_complete(&self, dir: u64) {
        self.state().complete.remove(&dir);
    }

    /// A rename (`exchange`: both names stay, their nodes swapped). Returns the nodes
    /// named before by the source and the target, where known.
    pub fn renamed(
        &self,
        from: (u64, &[u8]),
        to: (u64, &[u8]),
        exchange: bool,
    ) -> (Option<u64>, Option<u64>) {
        let mut s = self.state();
        let a = s.names.remove(&(from.0, from.1.to_vec()));
        let b = s.names.remove(&(to.0, to.1.to_vec()));
        match a {
            Some(n) => {
                s.names.insert((to.0, to.1.to_vec()), n);
            }
            None => {
                s.complete.remove(&to.0);
            }
        }
        if exchange {
            match b {
                Some(n) => {
                    s.names.insert((from.0, from.1.to_vec()), n);
                }
                None => {
                    s.complete.remove(&from.0);
                }
            }
        }
        (a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_complete_directory_answers_absent() {
        let n = Names::default();
        n.seen(1, b"a", 5);
        assert!(!n.absent(1, b"b"), "the root was not created here");
        n.new_dir(9);
        assert!(n.absent(9, b"x"));
        n.seen(9, b"x", 10);
        assert!(!n.absent(9, b"x"));
        assert_eq!(n.removed(9, b"x"), Some(10));
        assert!(n.absent(9, b"x"));
    }

    #[test]
    fn a_whole_listing_makes_a_directory_complete() {
        let n = Names::default();
        n.listed(4, [(&b"."[..], 4), (&b".."[..], 1), (&b"a"[..], 7)]);
        assert!(n.absent(4, b"b") && !n.absent(4, b"a"));
        assert!(!n.absent(4, b"."), ". and .. are never absent");
        assert_eq!(n.get(4, b"a"), Some(7));
        n.seen(4, b"b", 8);
        assert!(!n.absent(4, b"b"));
        // A listing that does not fit the table leaves the directory incomplete.
        let names: Vec<Vec<u8>> = (0..=MAX_NAMES)
            .map(|i| i.to_string().into_bytes())
            .collect();
        n.listed(5, names.iter().map(|v| (&v[..], 9)));
        assert!(
            !n.absent(5, b"x") && !n.absent(4, b"zz"),
            "the table started over"
        );
    }

    #[test]
    fn renames_move_names_and_an_unknown_source_ends_completeness() {
        let n = Names::default();
        n.new_dir(9);
        n.new_dir(8);
        n.seen(9, b"a", 10);
        assert_eq!(n.renamed((9, b"a"), (8, b"b"), false), (Some(10), None));
        assert!(n.absent(9, b"a") && !n.absent(8, b"b"));
        // A node whose old name was never seen arrives in 8: 8 is no longer complete.
        n.renamed((1, b"zz"), (8, b"c"), false);
        assert!(!n.absent(8, b"other"));
        // Exchange swaps.
        n.seen(9, b"p", 20);
        n.seen(9, b"q", 21);
        assert_eq!(n.renamed((9, b"p"), (9, b"q"), true), (Some(20), Some(21)));
        assert_eq!(n.removed(9, b"p"), Some(21));
    }
}
