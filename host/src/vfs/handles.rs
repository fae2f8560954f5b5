//! Open files and directories. A handle belongs to the owner (connection or front end)
//! that opened it: any other owner gets EBADF. Handle numbers are unpredictable (a keyed
//! permutation of a counter), so one client cannot guess another's.

use std::collections::HashMap;
use std::sync::Arc;

use hexz_protocol::Errno;

/// Handles one owner may hold at once; more gives EMFILE.
pub const MAX_HANDLES_PER_OWNER: usize = 16_384;
/// Handles all owners together may hold; more gives ENFILE.
pub const MAX_HANDLES: usize = 1 << 20;

/// A changed directory's children: (name, node), sorted by name; shared, never copied.
pub type Entries = Arc<Vec<(Vec<u8>, u64)>>;

/// A directory's children as one opendir (or rewind) saw them, shared by every handle
/// that saw the same version.
#[derive(Clone, Debug)]
pub enum Listing {
    /// An unchanged snapshot directory: read straight from the index (no copy).
    Lower(u32),
    /// A directory the overlay changed: (name, node), sorted by name.
    Upper(Entries),
}

/// A listing in cookie order: each child's cookie is derived from its name
/// ([`entry_cookie`]), so a listing resumed at a cookie continues after that name
/// whatever was added or removed meanwhile, on this handle or any other.
#[derive(Clone, Debug)]
pub struct Keyed {
    pub listing: Listing,
    /// (cookie, index in `listing`), sorted.
    pub order: Arc<Vec<(u64, u32)>>,
}

/// A directory entry's cookie: the first 8 bytes of the BLAKE3 of its name
/// (little-endian), shifted right by one (cookies stay below 2^63, as `off_t` in
/// `getdents`), at least 3 (1 and 2 are `.` and `..`).
pub fn entry_cookie(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(b) >> 1).max(3)
}

#[derive(Clone, Debug)]
pub enum HandleKind {
    File {
        read: bool,
        write: bool,
        append: bool,
    },
    Dir {
        listing: Option<Keyed>,
    },
}

#[derive(Clone, Debug)]
pub struct OpenHandle {
    pub node: u64,
    pub owner: u64,
    pub kind: HandleKind,
}

pub struct Handles {
    map: HashMap<u64, OpenHandle>,
    per_owner: HashMap<u64, usize>,
    counter: u64,
    key: u64,
}

/// A bijection on u64 (splitmix64's finalizer): distinct inputs give distinct handles.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Handles {
    pub fn new(key: u64) -> Handles {
        Handles {
            map: HashMap::new(),
            per_owner: HashMap::new(),
            counter: 0,
            key,
        }
    }

    pub fn insert(&mut self, h: OpenHandle) -> Result<u64, Errno> {
        if self.map.len() >= MAX_HANDLES {
            return Err(Errno::ENFILE);
        }
        let count = self.per_owner.entry(h.owner).or_default();
        if *count >= MAX_HANDLES_PER_OWNER {
            return Err(Errno::EMFILE);
        }
        *count += 1;
        let fh = loop {
            self.counter += 1;
            let fh = mix(self.counter ^ self.key);
            if fh != 0 && !self.map.contains_key(&fh) {
                break fh;
            }
        };
        self.map.insert(fh, h);
        Ok(fh)
    }

    pub fn get(&self, owner: u64, fh: u64) -> Result<&OpenHandle, Errno> {
        self.map
            .get(&fh)
            .filter(|h| h.owner == owner)
            .ok_or(Errno::EBADF)
    }

    pub fn get_mut(&mut self, owner: u64, fh: u64) -> Result<&mut OpenHandle, Errno> {
        self.map
            .get_mut(&fh)
            .filter(|h| h.owner == owner)
            .ok_or(Errno::EBADF)
    }

    /// Removes a handle of the given kind (a directory handle is not released as a file).
    pub fn remove(&mut self, owner: u64, fh: u64, dir: bool) -> Result<OpenHandle, Errno> {
        let h = self.get(owner, fh)?;
        if matches!(h.kind, HandleKind::Dir { .. }) != dir {
            return Err(Errno::EBADF);
        }
        let h = self.map.remove(&fh).ok_or(Errno::EBADF)?;
        if let Some(c) = self.per_owner.get_mut(&h.owner) {
            *c -= 1;
            if *c == 0 {
                self.per_owner.remove(&h.owner);
            }
        }
        Ok(h)
    }

    /// Every handle `owner` holds, as (fh, is a directory).
    pub fn owned_by(&self, owner: u64) -> Vec<(u64, bool)> {
        if !self.per_owner.contains_key(&owner) {
            return Vec::new();
        }
        self.map
            .iter()
            .filter(|(_, h)| h.owner == owner)
            .map(|(&fh, h)| (fh, matches!(h.kind, HandleKind::Dir { .. })))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(owner: u64) -> OpenHandle {
        OpenHandle {
            node: 7,
            owner,
            kind: HandleKind::File {
                read: true,
                write: false,
                append: false,
            },
        }
    }

    #[test]
    fn handles_belong_to_their_owner_and_are_not_a_sequence() {
        let mut h = Handles::new(0x1234_5678);
        let a: Vec<u64> = (0..100).map(|_| h.insert(file(1)).unwrap()).collect();
        assert!(a.windows(2).all(|w| w[1] != w[0] + 1), "{a:?}");
        assert_eq!(h.get(2, a[0]).unwrap_err(), Errno::EBADF);
        assert_eq!(h.remove(2, a[0], false).unwrap_err(), Errno::EBADF);
        assert_eq!(h.remove(1, a[0], true).unwrap_err(), Errno::EBADF);
        assert!(h.remove(1, a[0], false).is_ok());
        assert_eq!(h.get(1, a[0]).unwrap_err(), Errno::EBADF);
    }
}

#[cfg(test)]
mod cookie_tests {
    use super::entry_cookie;

    #[test]
    fn entry_cookies_are_the_documented_function_of_the_name() {
        // docs/PROTOCOL.md §7.7 and its worked example give this value.
        assert_eq!(entry_cookie(b"a.txt"), 6_965_293_208_155_557_254);
        assert!(entry_cookie(b"") >= 3);
        assert!(entry_cookie(b"x") < 1 << 63);
    }
}
