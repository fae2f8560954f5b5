//! Open files and directories, each owned by one connection (or front end).

use std::collections::HashMap;
use std::sync::Arc;

use hexz_protocol::Errno;

/// Handles one owner may hold at once; more gives EMFILE.
pub const MAX_HANDLES_PER_OWNER: usize = 16_384;
/// Handles all owners together may hold; more gives ENFILE.
pub const MAX_HANDLES: usize = 1 << 20;

pub type Listing = Arc<Vec<(Vec<u8>, u64)>>;

#[derive(Clone, Debug)]
pub enum HandleKind {
    File {
        append: bool,
        write: bool,
    },
    /// A directory listing captured at opendir (and at each rewind to cookie 0).
    Dir {
        listing: Option<Listing>,
    },
}

#[derive(Clone, Debug)]
pub struct OpenHandle {
    pub node: u64,
    pub owner: u64,
    pub kind: HandleKind,
}

#[derive(Default)]
pub struct Handles {
    map: HashMap<u64, OpenHandle>,
    per_owner: HashMap<u64, usize>,
    next: u64,
}

impl Handles {
    pub fn insert(&mut self, h: OpenHandle) -> Result<u64, Errno> {
        if self.map.len() >= MAX_HANDLES {
            return Err(Errno::ENFILE);
        }
        let count = self.per_owner.entry(h.owner).or_default();
        if *count >= MAX_HANDLES_PER_OWNER {
            return Err(Errno::EMFILE);
        }
        *count += 1;
        self.next += 1;
        self.map.insert(self.next, h);
        Ok(self.next)
    }

    pub fn get(&self, fh: u64) -> Result<&OpenHandle, Errno> {
        self.map.get(&fh).ok_or(Errno::EBADF)
    }

    pub fn get_mut(&mut self, fh: u64) -> Result<&mut OpenHandle, Errno> {
        self.map.get_mut(&fh).ok_or(Errno::EBADF)
    }

    pub fn remove(&mut self, fh: u64) -> Result<OpenHandle, Errno> {
        let h = self.map.remove(&fh).ok_or(Errno::EBADF)?;
        if let Some(c) = self.per_owner.get_mut(&h.owner) {
            *c -= 1;
            if *c == 0 {
                self.per_owner.remove(&h.owner);
            }
        }
        Ok(h)
    }

    pub fn owned_by(&self, owner: u64) -> Vec<u64> {
        self.map
            .iter()
            .filter(|(_, h)| h.owner == owner)
            .map(|(&fh, _)| fh)
            .collect()
    }
}
