//! Listing directories ahead of a tree walk. `find`, `tar`, `du`, `git status` list a
//! directory, then descend into its subdirectories one by one, and each first listing is
//! a round trip the walk waits for. When the kernel lists a directory whose parent it
//! listed too (a walk going down), the adapter asks the host for the first page of that
//! directory's subdirectories and of its siblings not listed yet, in the background (many
//! whole listings per `list_dirs` request where the host offers it), and answers the
//! kernel's first READDIRPLUS of each from that page.
//!
//! A page is used only if no attribute or name changed through this mount since it was
//! asked for (the count of changes the attribute cache keeps, `attrs.rs`), and
//! only on the connection that answered it; any other page is given back (its entries'
//! references forgotten, its host handle, if any, released). Bounded: [`MAX_AHEAD`] pages asked
//! for or waiting at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hexz_protocol::DirEntryPlus;

use crate::workers::{Job, Workers};

/// Pages asked for and not yet used, at most.
pub const MAX_AHEAD: usize = 256;
/// Directories remembered (listed by the kernel, or seen as a subdirectory).
const MAX_KNOWN: usize = 1 << 16;
/// A walk goes down when the kernel lists a directory whose parent was among its last
/// this many listings, or whose parent is an ancestor of the directory it listed last
/// (a depth-first walk back from a deep subtree).
const RECENT: u64 = 64;
/// How many levels up from the directory listed last an ancestor is looked for.
const MAX_DEPTH: usize = 64;
/// How long the kernel's listing waits for a page already asked for.
const WAIT: Duration = Duration::from_secs(5);

/// A directory's first listing page, read ahead.
pub struct Page<H> {
    pub entries: Vec<DirEntryPlus>,
    pub eof: bool,
    /// The host handle the listing continues on (none for a whole listing).
    pub host: H,
    /// The connection that answered it.
    pub epoch: u64,
    /// The count of changes made through the mount when the page was asked for
    /// (`AttrCache::changes`).
    pub since: u64,
}

struct State<H> {
    ready: HashMap<u64, Page<H>>,
    order: VecDeque<u64>,
    /// Directories asked for, by request number.
    pending: HashMap<u64, u64>,
    next: u64,
    /// Directories the kernel listed from the start, with the count of such listings
    /// then.
    listed: HashMap<u64, u64>,
    listings: u64,
    /// The directory the kernel last listed from the start.
    last: Option<u64>,
    /// Subdirectories seen in listings, and their parents.
    subdirs: HashMap<u64, Vec<u64>>,
    parent: HashMap<u64, u64>,
    /// Per parent, how far its subdirectories were considered as siblings to list
    /// ahead (each is looked at once: a wide directory costs linear work, not square).
    sibling_cursor: HashMap<u64, usize>,
}

impl<H> State<H> {
    /// Whether the directory last listed is `dir` or below it (within [`MAX_DEPTH`]).
    fn last_below(&self, dir: u64) -> bool {
        let mut at = self.last;
        for _ in 0..MAX_DEPTH {
            match at {
                Some(d) if d == dir => return true,
                Some(d) => at = self.parent.get(&d).copied(),
                None => return false,
            }
        }
        false
    }
}

pub struct Prelist<H> {
    state: Mutex<State<H>>,
    arrived: Condvar,
    workers: Arc<Workers>,
}

impl<H: Send + 'static> Prelist<H> {
    /// Requests are sent by `workers`.
    pub fn start(workers: Arc<Workers>) -> Arc<Prelist<H>> {
        Arc::new(Prelist {
            state: Mutex::new(State {
                ready: HashMap::new(),
                order: VecDeque::new(),
                pending: HashMap::new(),
                next: 0,
                listed: HashMap::new(),
                listings: 0,
                last: None,
                subdirs: HashMap::new(),
                parent: HashMap::new(),
                sibling_cursor: HashMap::new(),
            }),
            arrived: Condvar::new(),
            workers,
        })
    }

    fn state(&self) -> MutexGuard<'_, State<H>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A page of `dir`'s listing reached the kernel (`first`: from its start), naming
    /// `subdirs`, when the attribute cache's version was `now`. Returns the directories
    /// to list ahead now, each with its request number (pass it to [`Prelist::arrived`]
    /// or [`Prelist::failed`]), and pages read ahead before a change (to give back: they
    /// are asked for again).
    pub fn kernel_listed(
        &self,
        dir: u64,
        first: bool,
        subdirs: &[u64],
        now: u64,
    ) -> (Vec<(u64, u64)>, Vec<Page<H>>) {
        let mut s = self.state();
        if s.listed.len() >= MAX_KNOWN || s.parent.len() >= MAX_KNOWN {
            s.listed.clear();
            s.subdirs.clear();
            s.parent.clear();
            s.sibling_cursor.clear();
        }
        // A walk going down: the kernel listed this directory's parent too, lately or
        // as the last listing's ancestor (a parent listed long ago, as the root by an
        // earlier walk, says nothing of what comes next). Judged before this listing
        // counts.
        let parent = s.parent.get(&dir).copied();
        let count = s.listings + u64::from(first);
        let walking = parent.is_some_and(|p| {
            s.listed
                .get(&p)
                .is_some_and(|&at| at + RECENT >= count || s.last_below(p))
        });
        if first {
            s.listings += 1;
            let at = s.listings;
            s.listed.insert(dir, at);
            s.subdirs.insert(dir, Vec::new());
            s.sibling_cursor.remove(&dir);
            s.last = Some(dir);
        }
        for &d in subdirs {
            s.parent.insert(d, dir);
        }
        let known = s.subdirs.entry(dir).or_default();
        if known.len() < MAX_KNOWN {
            known.extend_from_slice(subdirs);
        }
        if !walking {
            return (Vec::new(), Vec::new());
        }
        let mut want: Vec<u64> = subdirs.to_vec();
        if let (true, Some(&p)) = (first, s.parent.get(&dir)) {
            // The siblings not yet considered, as many as there is room for.
            let room = MAX_AHEAD.saturating_sub(s.ready.len() + s.pending.len());
            let from = s.sibling_cursor.get(&p).copied().unwrap_or(0);
            let sibs = s
                .subdirs
                .get(&p)
                .map_or(&[][..], |v| &v[from.min(v.len())..]);
            let mut taken = 0;
            let mut seen = 0;
            for &d in sibs {
                if taken >= room {
                    break;
                }
                seen += 1;
                if !s.listed.contains_key(&d) && !s.pending.contains_key(&d) {
                    want.push(d);
                    taken += 1;
                }
            }
            s.sibling_cursor.insert(p, from + seen);
        }
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for d in want {
            if s.ready.get(&d).is_some_and(|p| p.since != now) {
                stale.extend(s.ready.remove(&d));
                s.order.retain(|&x| x != d);
            }
            if s.ready.len() + s.pending.len() >= MAX_AHEAD {
                break;
            }
            if d == dir
                || s.listed.contains_key(&d)
                || s.ready.contains_key(&d)
                || s.pending.contains_key(&d)
            {
                continue;
            }
            s.next += 1;
            let n = s.next;
            s.pending.insert(d, n);
            out.push((d, n));
        }
        (out, stale)
    }

    /// The page of `dir` read ahead (if kept) names `subdirs`: the ones to list ahead
    /// too, one level further, within the bound.
    pub fn deeper(&self, dir: u64, subdirs: &[u64]) -> Vec<(u64, u64)> {
        let mut s = self.state();
        if !s.ready.contains_key(&dir) {
            return Vec::new();
        }
        for &d in subdirs {
            s.parent.insert(d, dir);
        }
        s.subdirs.insert(dir, subdirs.to_vec());
        let mut out = Vec::new();
        for &d in subdirs {
            if s.ready.len() + s.pending.len() >= MAX_AHEAD {
                break;
            }
            if s.listed.contains_key(&d) || s.ready.contains_key(&d) || s.pending.contains_key(&d) {
                continue;
            }
            s.next += 1;
            let n = s.next;
            s.pending.insert(d, n);
            out.push((d, n));
        }
        out
    }

    /// Runs `job` on a read-ahead thread.
    pub fn spawn(&self, job: Job) {
        self.workers.run(job);
    }

    /// The page asked for as request `n` arrived: kept unless `dir` changed or was
    /// forgotten meanwhile. Returns the pages to give back (this one if not kept, or the
    /// oldest if over the bound).
    pub fn arrived(&self, dir: u64, n: u64, page: Page<H>) -> Vec<Page<H>> {
        let mut s = self.state();
        let mut back = Vec::new();
        if s.pending.get(&dir) == Some(&n) {
            s.pending.remove(&dir);
            if let Some(old) = s.ready.insert(dir, page) {
                back.push(old);
            } else {
                s.order.push_back(dir);
            }
            while s.ready.len() > MAX_AHEAD {
                let Some(d) = s.order.pop_front() else { break };
                back.extend(s.ready.remove(&d));
            }
        } else {
            back.push(page);
        }
        drop(s);
        self.arrived.notify_all();
        back
    }

    /// Request `n` for `dir` got no page.
    pub fn failed(&self, dir: u64, n: u64) {
        let mut s = self.state();
        if s.pending.get(&dir) == Some(&n) {
            s.pending.remove(&dir);
        }
        drop(s);
        self.arrived.notify_all();
    }

    /// The page read ahead for `dir`, waiting for one asked for; `None` if there is none.
    pub fn take(&self, dir: u64) -> Option<Page<H>> {
        let mut s = self.state();
        while s.pending.contains_key(&dir) {
            let (next, t) = self
                .arrived
                .wait_timeout(s, WAIT)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
            if t.timed_out() {
                // Not waited for again: the page, should it come, is given back.
                s.pending.remove(&dir);
                break;
            }
        }
        let page = s.ready.remove(&dir)?;
        s.order.retain(|&d| d != dir);
        Some(page)
    }

    /// `dir` changed, or the kernel forgot it: no page asked for before is used. Returns
    /// the page to give back, if one was waiting.
    pub fn forget(&self, dir: u64) -> Option<Page<H>> {
        let mut s = self.state();
        s.pending.remove(&dir);
        s.listed.remove(&dir);
        let page = s.ready.remove(&dir);
        if page.is_some() {
            s.order.retain(|&d| d != dir);
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(out: &[(u64, u64)]) -> Vec<u64> {
        out.iter().map(|&(d, _)| d).collect()
    }

    #[test]
    fn a_depth_first_walk_back_from_a_deep_subtree_still_lists_ahead() {
        let pl: Arc<Prelist<()>> = Prelist::start(Workers::start(0));
        // The root holds `wide` (1000), whose first child (100) holds more
        // subdirectories than RECENT listings, each with one of its own.
        pl.kernel_listed(1, true, &[1000], 0);
        pl.kernel_listed(1000, true, &[100, 101], 0);
        let subs: Vec<u64> = (0..RECENT + 10).map(|k| 10_000 + k).collect();
        pl.kernel_listed(100, true, &subs, 0);
        for &d in &subs {
            pl.kernel_listed(d, true, &[d + 100_000], 0);
            pl.kernel_listed(d + 100_000, true, &[], 0);
        }
        // Back up to `wide` and down into its next child: `wide` was listed long ago,
        // but the walk is still below it, so 101's subdirectory is listed ahead.
        let (out, _) = pl.kernel_listed(101, true, &[20_000], 0);
        assert!(
            asked(&out).contains(&20_000),
            "nothing listed ahead for the walk's next subtree: {out:?}"
        );
    }

    #[test]
    fn a_listing_elsewhere_after_a_walk_is_not_a_walk() {
        let pl: Arc<Prelist<()>> = Prelist::start(Workers::start(0));
        pl.kernel_listed(1, true, &[2, 3], 0);
        pl.kernel_listed(2, true, &[], 0);
        // Many listings of unrelated directories (another walk, elsewhere), then 3: its
        // parent was listed long ago and the last listing is not below it.
        for d in 0..(RECENT + 10) {
            pl.kernel_listed(50_000 + d, true, &[], 0);
        }
        let (out, _) = pl.kernel_listed(3, true, &[4], 0);
        assert!(out.is_empty(), "listed ahead without a walk: {out:?}");
    }
}
