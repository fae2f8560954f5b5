//! What the adapter remembers of nodes' attributes, so that a GETATTR the kernel sends
//! only because it invalidated its own copy costs no round trip to the host.
//!
//! Why the kernel asks although nothing changed: after every read of a file or listing
//! of a directory it marks the inode's atime stale (on any writable mount), so the next
//! `stat` of that node goes to the daemon. The host never changes a node's attributes
//! behind this mount's back (the snapshot is immutable and an overlay has one writer),
//! and it does not update atime on reads, so the attributes it last sent are still the
//! answer, for as long as the TTL it gave.
//!
//! The rule that keeps this exact: every operation that can change a node's attributes
//! on the host either replaces the cached copy with the one in its reply, or drops it
//! (writes, xattr changes, and the parents of created or removed names); a removal or
//! rename, whose victim the adapter cannot name, drops everything.
//!
//! The same holds for one extended attribute: the kernel asks for `security.capability`
//! before every write (to clear file capabilities). Its absence is remembered per node
//! until that node's xattrs change.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hexz_protocol::Attr;

/// The attribute name the kernel checks before every write.
pub const CAPS_XATTR: &[u8] = b"security.capability";

/// Nodes remembered at most; beyond it the cache starts over (the kernel's own inode
/// cache still holds what it needs).
const MAX_NODES: usize = 1 << 16;

#[derive(Default)]
struct State {
    attrs: HashMap<u64, (Attr, Instant)>,
    /// Counts invalidations: a reply is cached only if none happened since its request
    /// was sent (it may describe the node as it was before).
    version: u64,
    /// Counts every change made through this mount that is known (a superset of the
    /// invalidations: also changes whose replies were cached, as a setattr's): what a
    /// listing read ahead is checked against (`prelist.rs`).
    changes: u64,
    /// Nodes known to have no `security.capability`.
    no_caps: HashSet<u64>,
}

impl State {
    /// Caches `attr` of `node` for `ttl` (the cache starts over when full).
    fn insert(&mut self, node: u64, attr: &Attr, ttl: Duration) {
        if self.attrs.len() >= MAX_NODES && !self.attrs.contains_key(&node) {
            self.attrs.clear();
        }
        self.attrs.insert(node, (*attr, Instant::now() + ttl));
    }

    fn add_no_caps(&mut self, node: u64) {
        if self.no_caps.len() >= MAX_NODES {
            self.no_caps.clear();
        }
        self.no_caps.insert(node);
    }
}

#[derive(Default)]
pub struct AttrCache {
    state: Mutex<State>,
}

impl AttrCache {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take before sending a request whose reply may be cached: see [`AttrCache::put`].
    pub fn since(&self) -> u64 {
        self.state().version
    }

    /// Remembers `attr` of `node` for `ttl_ms` (what the host allowed), from a reply to a
    /// request sent when [`AttrCache::since`] said `since`; if anything was invalidated
    /// in between, the reply may be older than that change, and `node` is forgotten.
    pub fn put(&self, node: u64, attr: &Attr, ttl_ms: u32, since: u64) {
        let mut s = self.state();
        if ttl_ms == 0 || s.version != since {
            s.attrs.remove(&node);
            return;
        }
        s.insert(node, attr, Duration::from_millis(ttl_ms as u64));
    }

    /// As [`AttrCache::put`], for the reply to a change that the caller followed by
    /// exactly `own` invalidations of its own (made between the reply and this call):
    /// any other invalidation since `since` still refuses the reply.
    pub fn put_after_own(&self, node: u64, attr: &Attr, ttl_ms: u32, since: u64, own: u64) {
        self.put(node, attr, ttl_ms, since + own)
    }

    /// `node`'s attributes changed through this mount and are now `attr`, for `ttl`: as
    /// [`AttrCache::invalidate`] (a reply to a request sent before is not cached), then
    /// `attr` is cached.
    pub fn replace(&self, node: u64, attr: &Attr, ttl: Duration) {
        let mut s = self.state();
        s.version += 1;
        s.changes += 1;
        s.insert(node, attr, ttl);
    }

    /// The attributes of `node` and how much longer they may be used, if still valid.
    pub fn get(&self, node: u64) -> Option<(Attr, Duration)> {
        let s = self.state();
        let (a, until) = s.attrs.get(&node)?;
        let left = until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some((*a, left))
    }

    /// `node`'s attributes changed on the host.
    pub fn invalidate(&self, node: u64) {
        let mut s = self.state();
        s.attrs.remove(&node);
        s.version += 1;
        s.changes += 1;
    }

    /// Something changed through this mount (attributes or names), whatever the cache
    /// keeps of it.
    pub fn note_change(&self) {
        self.state().changes += 1;
    }

    /// The count of changes so far ([`AttrCache::note_change`]).
    pub fn changes(&self) -> u64 {
        self.state().changes
    }

    /// Some node's attributes changed on the host, and which is not known.
    pub fn invalidate_all(&self) {
        let mut s = self.state();
        s.attrs.clear();
        s.version += 1;
        s.changes += 1;
    }

    /// The kernel forgot `node`.
    pub fn forget(&self, node: u64) {
        let mut s = self.state();
        s.attrs.remove(&node);
        s.no_caps.remove(&node);
    }

    /// `node` has no `security.capability`, as a reply to a request sent at version
    /// `since` said: remembered only if nothing changed since (a setxattr may have
    /// completed in between, and the absence would then be stale). Checked and set
    /// under one lock.
    pub fn set_no_caps_since(&self, node: u64, since: u64) {
        let mut s = self.state();
        if s.version == since {
            s.add_no_caps(node);
        }
    }

    /// `node` has no `security.capability` (it was created just now).
    pub fn set_no_caps(&self, node: u64) {
        self.state().add_no_caps(node);
    }

    pub fn has_no_caps(&self, node: u64) -> bool {
        self.state().no_caps.contains(&node)
    }

    /// `node`'s extended attributes changed (and with them its ctime).
    pub fn xattrs_changed(&self, node: u64) {
        let mut s = self.state();
        s.attrs.remove(&node);
        s.no_caps.remove(&node);
        s.version += 1;
        s.changes += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_live_for_their_ttl_and_go_when_invalidated() {
        let c = AttrCache::default();
        let a = Attr {
            ino: 5,
            size: 7,
            ..Attr::default()
        };
        c.put(5, &a, 60_000, c.since());
        let (got, left) = c.get(5).unwrap();
        assert_eq!((got.size, left <= Duration::from_secs(60)), (7, true));
        c.invalidate(5);
        assert!(c.get(5).is_none());
        c.put(5, &a, 0, c.since());
        assert!(c.get(5).is_none(), "a zero TTL is not cached");
        c.put(5, &a, 60_000, c.since());
        c.put(6, &a, 60_000, c.since());
        c.invalidate_all();
        assert!(c.get(5).is_none() && c.get(6).is_none());
    }

    #[test]
    fn a_reply_older_than_an_invalidation_is_not_cached() {
        let c = AttrCache::default();
        let a = Attr::default();
        c.put(1, &a, 60_000, c.since());
        let since = c.since(); // a getattr of node 2 is sent...
        c.invalidate(2); // ...a write to node 2 completes...
        c.put(2, &a, 60_000, since); // ...and the getattr's (older) reply arrives
        assert!(c.get(2).is_none());
        c.put(1, &a, 60_000, since);
        assert!(
            c.get(1).is_none(),
            "a refused reply also drops what was cached"
        );
    }

    #[test]
    fn a_replacement_refuses_older_replies_and_is_kept_for_its_own_ttl() {
        let c = AttrCache::default();
        let since = c.since(); // a getattr is sent...
        let a = Attr {
            size: 9,
            ..Attr::default()
        };
        c.replace(4, &a, Duration::from_secs(1)); // ...a write is answered here...
        c.put(4, &Attr::default(), 60_000, since); // ...and the older reply arrives
        assert!(
            c.get(4).is_none(),
            "the older reply is refused and drops it"
        );
        c.replace(4, &a, Duration::from_secs(1));
        let (got, left) = c.get(4).unwrap();
        assert_eq!((got.size, left <= Duration::from_secs(1)), (9, true));
    }

    #[test]
    fn capability_absence_is_forgotten_with_the_xattrs() {
        let c = AttrCache::default();
        c.set_no_caps(3);
        assert!(c.has_no_caps(3));
        c.xattrs_changed(3);
        assert!(!c.has_no_caps(3));
        c.set_no_caps(3);
        c.forget(3);
        assert!(!c.has_no_caps(3));
        // A getxattr answered "absent", but a setxattr finished before that answer was
        // recorded: it is not.
        let since = c.since();
        c.xattrs_changed(3);
        c.set_no_caps_since(3, since);
        assert!(!c.has_no_caps(3));
    }
}
