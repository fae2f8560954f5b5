//! The in-process transport: each request goes straight to the server's dispatch over
//! the same VFS core, as one owner. No socket, no encoding, no reconnect (one epoch).

use std::sync::Arc;

use hexz_fuse::{CallError, Transport};
use hexz_protocol::{Attr, Limits, Op, ReplyBody};

use crate::server::{dispatch, Session, CAPS};
use crate::vfs::Vfs;

/// The owner id of the host mount's handles and references in the VFS core.
pub const MOUNT_OWNER: u64 = u64::MAX - 1;

/// Owner and group shown for every node instead of the stored ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShownOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

pub struct Local {
    vfs: Arc<Vfs>,
    session: Session,
    shown: ShownOwner,
}

impl Local {
    /// Entries and attributes may be cached by the kernel for `ttl_ms`: nothing but this
    /// mount changes the VFS while it is mounted.
    pub fn new(vfs: Arc<Vfs>, ttl_ms: u32, shown: ShownOwner) -> Local {
        let caps = CAPS.iter().map(|c| c.to_string()).collect();
        Local {
            vfs,
            session: Session::new(MOUNT_OWNER, Limits::default(), ttl_ms, caps),
            shown,
        }
    }

    /// Drops every handle and reference the mount holds (it was unmounted).
    pub fn release(&self) {
        self.vfs.release_owner(MOUNT_OWNER);
    }

    fn show(&self, a: &mut Attr) {
        if let Some(uid) = self.shown.uid {
            a.uid = uid;
        }
        if let Some(gid) = self.shown.gid {
            a.gid = gid;
        }
    }

    fn shown(&self, mut body: ReplyBody) -> ReplyBody {
        if self.shown.uid.is_none() && self.shown.gid.is_none() {
            return body;
        }
        match &mut body {
            ReplyBody::Entry(e) => self.show(&mut e.attr),
            ReplyBody::Created { entry, .. } => self.show(&mut entry.attr),
            ReplyBody::Attr { attr, .. } => self.show(attr),
            ReplyBody::DirPlus { entries, .. }
            | ReplyBody::Opened {
                list: Some(hexz_protocol::DirList { entries, .. }),
                ..
            } => {
                for e in entries {
                    self.show(&mut e.entry.attr);
                }
            }
            ReplyBody::Listings { dirs } => {
                for e in dirs.iter_mut().flat_map(|d| d.entries.iter_mut().flatten()) {
                    self.show(&mut e.entry.attr);
                }
            }
            ReplyBody::Written { attr: Some(a), .. } => self.show(a),
            _ => {}
        }
        body
    }
}

impl Transport for Local {
    fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError> {
        match dispatch(&self.vfs, &self.session, op) {
            ReplyBody::Err(e) => Err(CallError::Errno(e.sanitized())),
            body => Ok((self.shown(body), 1)),
        }
    }

    fn call_on(&self, _epoch: u64, op: Op) -> Result<ReplyBody, CallError> {
        self.call_epoch(op).map(|(b, _)| b)
    }

    fn post_on(&self, _epoch: u64, op: Op) {
        let _ = dispatch(&self.vfs, &self.session, op);
    }

    fn forget(&self, items: &[(u64, u64)]) {
        for &(node, n) in items {
            self.vfs.forget(MOUNT_OWNER, node, n);
        }
    }

    fn limits(&self) -> Limits {
        self.session.limits
    }

    fn epoch(&self) -> u64 {
        1
    }
}
