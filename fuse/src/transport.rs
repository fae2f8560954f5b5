//! What the FUSE adapter needs from whatever carries its requests to the VFS.

use hexz_protocol::{Errno, Limits, Op, ReplyBody};

/// Why a call did not get a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// The server answered with an errno.
    Errno(Errno),
    /// The connection dropped after the request was sent: its outcome is unknown.
    Lost,
    /// Not sent: the connection changed under it, or the request names a handle of an
    /// earlier connection (reopen and retry).
    Stale,
}

/// What [`Transport::call_then`] hands a reply to, with the epoch that answered it.
pub type Then = Box<dyn FnOnce(Result<(ReplyBody, u64), CallError>) + Send>;

/// Carries protocol operations to the VFS and back.
///
/// Epochs: a transport that can lose its server numbers each connection; a handle is
/// valid only in the epoch whose reply carried it. A transport that cannot lose it (in
/// process) stays in one epoch forever.
///
/// References (docs/PROTOCOL.md §5): the server adds one per `entry`/`created` reply and
/// per `dir_plus` entry other than `.`/`..`; the adapter gives them back only through
/// [`Transport::forget`], never by sending `Forget` itself, so a transport that retakes
/// references after a reconnect can keep an exact count.
pub trait Transport: Send + Sync + 'static {
    /// Sends `op` and waits for its reply; also says in which epoch it was answered.
    fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError>;

    /// As [`Transport::call_epoch`], but only in `epoch` (the one whose handle `op`
    /// names): in any other nothing is sent and the answer is [`CallError::Stale`].
    fn call_on(&self, epoch: u64, op: Op) -> Result<ReplyBody, CallError>;

    /// Sends `op` and hands its reply to `then` instead of waiting for it. Where
    /// [`Transport::replies_later`] says so, `then` runs later on the thread that reads
    /// replies, and must neither send nor wait there (work that does goes to another
    /// thread); otherwise it runs before this returns.
    fn call_then(&self, op: Op, then: Then) {
        then(self.call_epoch(op))
    }

    /// Whether [`Transport::call_then`] returns before the reply arrives.
    fn replies_later(&self) -> bool {
        false
    }

    /// Sends `op` without waiting for its reply, in `epoch` only (the release of a handle
    /// opened there); in another epoch it is dropped.
    fn post_on(&self, epoch: u64, op: Op);

    /// Gives back references (the kernel forgot nodes, or entries never reached it),
    /// never more than the server holds for this client.
    fn forget(&self, items: &[(u64, u64)]);

    /// The limits agreed with the server.
    fn limits(&self) -> Limits;

    /// The current epoch.
    fn epoch(&self) -> u64;

    /// Whether the server agreed capability `cap` in the hello.
    fn has_cap(&self, _cap: &str) -> bool {
        false
    }
}
