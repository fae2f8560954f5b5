//! What keeps a node alive after its last name is gone: the lookup references each owner
//! holds (one per entry handed out, less forgets) and open handles. A node with no names
//! and no references is removed. References are taken under the same state lock as the
//! lookup that finds the node, so an unlink can never slip in between.

use std::collections::HashMap;

use super::{Vfs, VfsResult};

#[derive(Default)]
pub(super) struct Refs {
    /// Lookup references per owner: owner -> node -> count.
    by_owner: HashMap<u64, HashMap<u64, u64>>,
    /// Everything that keeps a node alive (lookup references + handles).
    pins: HashMap<u64, u64>,
}

impl Refs {
    pub(super) fn take(&mut self, owner: u64, node: u64, n: u64) {
        let held = self
            .by_owner
            .entry(owner)
            .or_default()
            .entry(node)
            .or_default();
        *held = held.saturating_add(n);
        self.pin(node, n);
    }

    /// Releases up to `n` of `owner`'s references; true when the node is now unpinned.
    pub(super) fn forget(&mut self, owner: u64, node: u64, n: u64) -> bool {
        let Some(mine) = self.by_owner.get_mut(&owner) else {
            return false;
        };
        let Some(held) = mine.get_mut(&node) else {
            return false;
        };
        let k = n.min(*held);
        *held -= k;
        if *held == 0 {
            mine.remove(&node);
            if mine.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
        k > 0 && self.unpin(node, k)
    }

    /// Every node `owner` references, with its count (removed from the table).
    pub(super) fn take_owner(&mut self, owner: u64) -> Vec<(u64, u64)> {
        self.by_owner
            .remove(&owner)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default()
    }

    pub(super) fn pin(&mut self, node: u64, n: u64) {
        let c = self.pins.entry(node).or_default();
        *c = c.saturating_add(n);
    }

    /// True when this released the node's last pin.
    pub(super) fn unpin(&mut self, node: u64, n: u64) -> bool {
        let Some(c) = self.pins.get_mut(&node) else {
            return false;
        };
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.pins.remove(&node);
            true
        } else {
            false
        }
    }

    pub(super) fn pinned(&self, node: u64) -> bool {
        self.pins.contains_key(&node)
    }

    pub(super) fn live_nodes(&self) -> usize {
        self.pins.len()
    }
}

impl Vfs {
    /// Releases `n` of `owner`'s references to `node` (FUSE forget).
    pub fn forget(&self, owner: u64, node: u64, n: u64) {
        if self.refs().forget(owner, node, n) {
            self.remove_if_orphan(node);
        }
    }

    /// Takes `n` references to `node` again (a client that reconnected); false when the
    /// node no longer exists.
    pub fn retain(&self, owner: u64, node: u64, n: u64) -> bool {
        let inner = self.state();
        if self.rec(&inner, node).is_err() {
            return false;
        }
        self.refs().take(owner, node, n);
        true
    }

    /// Closes every handle and drops every reference `owner` holds (it went away).
    /// Nameless nodes it kept alive are not removed at once: its client may reconnect and
    /// `retain` them; `collect_orphans` removes them once the grace period has passed.
    /// Returns (handles closed, nodes released).
    pub fn release_owner(&self, owner: u64) -> (usize, usize) {
        let fhs = self.handles().owned_by(owner);
        let mut unpinned = Vec::new();
        for &(fh, dir) in &fhs {
            if let Ok(h) = self.handles().remove(owner, fh, dir) {
                if self.refs().unpin(h.node, 1) {
                    unpinned.push(h.node);
                }
            }
        }
        let refs = self.refs().take_owner(owner);
        for &(node, n) in &refs {
            if self.refs().unpin(node, n) {
                unpinned.push(node);
            }
        }
        if !unpinned.is_empty() {
            let now = std::time::Instant::now();
            let mut since = self.orphan_since();
            for node in unpinned {
                since.insert(node, now);
            }
        }
        (fhs.len(), refs.len())
    }

    /// Removes `node` if it has no names and nothing references it.
    pub(super) fn remove_if_orphan(&self, node: u64) {
        if self.read_only {
            return;
        }
        // Most forgotten nodes still have names: tell that under the shared lock.
        let nameless = |inner: &super::Inner| {
            inner
                .overlay
                .state
                .nodes
                .get(&node)
                .is_some_and(|r| r.nlink == 0)
        };
        if !nameless(&self.state()) {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if nameless(&inner) && !self.refs().pinned(node) {
            if let Err(e) = self.drop_node(&mut inner, node) {
                tracing::warn!(node, "removing an unreferenced node: {e}");
            }
        }
    }

    /// Removes the nameless nodes nobody has referenced for `grace`: those a previous
    /// server kept for its clients, and those a closed connection held. Reconnecting
    /// clients have that long to `retain` them.
    pub fn collect_orphans(&self, grace: std::time::Duration) -> VfsResult<usize> {
        if self.read_only {
            return Ok(0);
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for id in inner.overlay.orphans() {
            if self.refs().pinned(id) {
                continue;
            }
            let waited = self
                .orphan_since()
                .get(&id)
                .is_none_or(|t| t.elapsed() >= grace);
            if waited {
                self.orphan_since().remove(&id);
                self.drop_node(&mut inner, id)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
