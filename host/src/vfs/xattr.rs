//! Extended attributes. Bounded per node as ext4 bounds them (a name ≤ 255 bytes: ERANGE;
//! a value ≤ 64 KiB: E2BIG; at most `MAX_XATTRS_PER_NODE` attributes and
//! `MAX_XATTR_BYTES_PER_NODE` bytes of names and values: ENOSPC). Each change journals
//! only that attribute.

use hexz_protocol::hello::{MAX_XATTR_NAME, MAX_XATTR_VALUE};
use hexz_protocol::message::{XATTR_CREATE, XATTR_REPLACE};
use hexz_protocol::Errno;

use super::{now, Inner, Vfs, VfsResult, Xattrs};
use crate::overlay::journal::{NodeRec, Record};

pub use hexz_protocol::hello::{MAX_XATTRS_PER_NODE, MAX_XATTR_TOTAL as MAX_XATTR_BYTES_PER_NODE};

/// ERANGE for a name longer than 255 bytes, EINVAL for an empty one or one with a NUL.
fn check_xattr_name(name: &[u8]) -> VfsResult<()> {
    if name.len() > MAX_XATTR_NAME {
        return Err(Errno::ERANGE);
    }
    if name.is_empty() || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

impl Vfs {
    pub(super) fn xattrs_of(&self, inner: &Inner, rec: &NodeRec) -> Xattrs {
        if let Some(all) = inner.overlay.state.xattrs.get(&rec.id) {
            return all.clone();
        }
        rec.lower
            .and_then(|i| self.snap.node(i))
            .map(|n| {
                n.xattrs
                    .iter()
                    .map(|x| (x.name.clone(), x.value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn getxattr(&self, node: u64, name: &[u8]) -> VfsResult<Vec<u8>> {
        check_xattr_name(name)?;
        let inner = self.state();
        let rec = self.rec(&inner, node)?;
        self.xattrs_of(&inner, &rec)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Errno::ENODATA)
    }

    pub fn listxattr(&self, node: u64) -> VfsResult<Vec<Vec<u8>>> {
        let inner = self.state();
        let rec = self.rec(&inner, node)?;
        Ok(self
            .xattrs_of(&inner, &rec)
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    pub fn setxattr(&self, node: u64, name: &[u8], value: &[u8], flags: u32) -> VfsResult<()> {
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(Errno::E2BIG);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        let all = self.xattrs_of(&inner, &rec);
        let existing = all.binary_search_by(|(n, _)| n.as_slice().cmp(name));
        let old_len = match existing {
            Ok(_) if flags & XATTR_CREATE != 0 => return Err(Errno::EEXIST),
            Err(_) if flags & XATTR_REPLACE != 0 => return Err(Errno::ENODATA),
            Ok(i) => all[i].0.len() + all[i].1.len(),
            Err(_) => 0,
        };
        let count = all.len() + usize::from(existing.is_err());
        let bytes: usize = all.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>() - old_len
            + name.len()
            + value.len();
        if count > MAX_XATTRS_PER_NODE || bytes > MAX_XATTR_BYTES_PER_NODE {
            return Err(Errno::ENOSPC);
        }
        self.check_space((name.len() + value.len() + 64) as u64)?;
        let mut records = Vec::new();
        if !inner.overlay.state.xattrs.contains_key(&node) {
            records.push(Record::Xattrs { id: node, all });
        }
        records.push(Record::Xattr {
            id: node,
            name: name.to_vec(),
            value: Some(value.to_vec()),
        });
        rec.ctime = now();
        records.push(Record::Node(rec));
        self.commit(&mut inner, records)
    }

    pub fn removexattr(&self, node: u64, name: &[u8]) -> VfsResult<()> {
        check_xattr_name(name)?;
        let mut inner = self.write_lock()?;
        let mut rec = self.rec(&inner, node)?;
        let all = self.xattrs_of(&inner, &rec);
        if all
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .is_err()
        {
            return Err(Errno::ENODATA);
        }
        let mut records = Vec::new();
        if !inner.overlay.state.xattrs.contains_key(&node) {
            records.push(Record::Xattrs { id: node, all });
        }
        records.push(Record::Xattr {
            id: node,
            name: name.to_vec(),
            value: None,
        });
        rec.ctime = now();
        records.push(Record::Node(rec));
        self.commit(&mut inner, records)
    }
}
