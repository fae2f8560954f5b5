//! Version and limit negotiation: both sides call the same function, so they agree.

use crate::message::{Hello, HelloReply, NodeId};
use crate::Errno;

pub const VERSION: u32 = 1;
/// Largest body either side accepts before the hello exchange has set the limits.
pub const PRE_HELLO_MAX_FRAME: u32 = 64 << 10;
/// No negotiation may go above these.
pub const MAX_FRAME_CEILING: u32 = (16 << 20) + (64 << 10);
pub const MAX_IO_CEILING: u32 = 16 << 20;
pub const MAX_IN_FLIGHT_CEILING: u32 = 4096;
/// Room for the envelope around the largest read or write payload.
pub const FRAME_OVERHEAD: u32 = 64 << 10;
/// The smallest `max_read` / `max_write` a hello may agree on.
pub const MIN_IO: u32 = 4096;
/// The smallest `max_frame` a hello may agree on: a `MIN_IO` read or write with its
/// envelope, and so also any getxattr value, listxattr list of a node within the xattr
/// limits, readlink target and one readdir(plus) entry.
pub const MIN_MAX_FRAME: u32 = FRAME_OVERHEAD + MIN_IO;
// A frame a client pipelines before the hello reply always fits the agreed limit.
const _: () = assert!(MIN_MAX_FRAME > PRE_HELLO_MAX_FRAME);

/// Other fixed bounds a server enforces on request fields.
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 << 10;
pub const MAX_SYMLINK_TARGET: usize = 4095;
pub const MAX_READDIR_ENTRIES: u32 = 4096;
/// Most items in one `batch_forget` or `retain`.
pub const MAX_BATCH_FORGET: usize = 4096;
/// Most xattrs on one node, and most bytes of their names and values together; past
/// either a setxattr gets ENOSPC.
pub const MAX_XATTRS_PER_NODE: usize = 1024;
pub const MAX_XATTR_TOTAL: usize = 256 << 10;

/// One side's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frame: u32,
    pub max_read: u32,
    pub max_write: u32,
    pub max_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: (1 << 20) + FRAME_OVERHEAD,
            max_read: 1 << 20,
            max_write: 1 << 20,
            max_in_flight: 256,
        }
    }
}

impl Limits {
    /// The limits both sides use: the smaller of each, clamped to the ceilings, with
    /// `max_frame` large enough for a full read or write.
    pub fn meet(&self, other: &Limits) -> Result<Limits, Errno> {
        let max_frame = self.max_frame.min(other.max_frame).min(MAX_FRAME_CEILING);
        // A full read or write plus its envelope must fit in one frame.
        let io_cap = max_frame.saturating_sub(FRAME_OVERHEAD).min(MAX_IO_CEILING);
        let max_read = self.max_read.min(other.max_read).min(io_cap);
        let max_write = self.max_write.min(other.max_write).min(io_cap);
        let max_in_flight = self
            .max_in_flight
            .min(other.max_in_flight)
            .min(MAX_IN_FLIGHT_CEILING);
        if max_frame < MIN_MAX_FRAME
            || max_read < MIN_IO
            || max_write < MIN_IO
            || max_in_flight == 0
        {
            return Err(Errno::EINVAL);
        }
        Ok(Limits {
            max_frame,
            max_read,
            max_write,
            max_in_flight,
        })
    }
}

/// The server's half of the exchange: the reply to send, or the errno to refuse with.
pub fn accept_hello(
    hello: &Hello,
    server: &Limits,
    server_caps: &[&str],
    root: NodeId,
    fs_id: Vec<u8>,
    server_name: &str,
) -> Result<(HelloReply, Limits), Errno> {
    if !hello.versions.contains(&VERSION) {
        return Err(Errno::EPROTONOSUPPORT);
    }
    let client = Limits {
        max_frame: hello.max_frame,
        max_read: hello.max_read,
        max_write: hello.max_write,
        max_in_flight: hello.max_in_flight,
    };
    let agreed = server.meet(&client)?;
    let caps = server_caps
        .iter()
        .filter(|c| hello.caps.iter().any(|h| h == *c))
        .map(|c| c.to_string())
        .collect();
    Ok((
        HelloReply {
            version: VERSION,
            max_frame: agreed.max_frame,
            max_read: agreed.max_read,
            max_write: agreed.max_write,
            max_in_flight: agreed.max_in_flight,
            caps,
            root,
            fs_id,
            server: server_name.to_string(),
        },
        agreed,
    ))
}

/// The client's check of the server's reply: the limits must not exceed what it offered.
pub fn check_hello_reply(offered: &Hello, reply: &HelloReply) -> Result<Limits, Errno> {
    if !offered.versions.contains(&reply.version) {
        return Err(Errno::EPROTONOSUPPORT);
    }
    let got = Limits {
        max_frame: reply.max_frame,
        max_read: reply.max_read,
        max_write: reply.max_write,
        max_in_flight: reply.max_in_flight,
    };
    let mine = Limits {
        max_frame: offered.max_frame,
        max_read: offered.max_read,
        max_write: offered.max_write,
        max_in_flight: offered.max_in_flight,
    };
    if got.meet(&mine)? != got {
        return Err(Errno::EPROTO);
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(versions: Vec<u32>, limits: Limits) -> Hello {
        Hello {
            versions,
            max_frame: limits.max_frame,
            max_read: limits.max_read,
            max_write: limits.max_write,
            max_in_flight: limits.max_in_flight,
            caps: vec!["readdirplus".into(), "future-thing".into()],
            client: "test".into(),
        }
    }

    #[test]
    fn negotiation_takes_the_smaller_limits_and_common_caps() {
        let small = Limits {
            max_frame: 200 << 10,
            max_read: 128 << 10,
            max_write: 64 << 10,
            max_in_flight: 8,
        };
        let (reply, agreed) = accept_hello(
            &hello(vec![1, 7], small),
            &Limits::default(),
            &["readdirplus", "xattr"],
            1,
            vec![1],
            "s",
        )
        .unwrap();
        assert_eq!(agreed, small);
        assert_eq!(reply.caps, vec!["readdirplus".to_string()]);
        assert_eq!(
            check_hello_reply(&hello(vec![1, 7], small), &reply).unwrap(),
            small
        );
    }

    #[test]
    fn no_common_version_or_silly_limits_are_refused() {
        let d = Limits::default();
        assert_eq!(
            accept_hello(&hello(vec![2, 3], d), &d, &[], 1, vec![], "s").unwrap_err(),
            Errno::EPROTONOSUPPORT
        );
        let tiny = Limits { max_read: 10, ..d };
        assert_eq!(
            accept_hello(&hello(vec![1], tiny), &d, &[], 1, vec![], "s").unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn max_frame_has_a_floor_that_fits_a_minimal_read() {
        let d = Limits::default();
        let floor = Limits {
            max_frame: MIN_MAX_FRAME,
            ..d
        };
        let got = floor.meet(&d).unwrap();
        assert_eq!(
            (got.max_frame, got.max_read, got.max_write),
            (69_632, 4096, 4096)
        );
        let below = Limits {
            max_frame: MIN_MAX_FRAME - 1,
            ..d
        };
        assert_eq!(below.meet(&d).unwrap_err(), Errno::EINVAL);
    }

    #[test]
    fn huge_offers_are_clamped_to_the_ceilings() {
        let huge = Limits {
            max_frame: u32::MAX,
            max_read: u32::MAX,
            max_write: u32::MAX,
            max_in_flight: u32::MAX,
        };
        let got = huge.meet(&huge).unwrap();
        assert_eq!(got.max_frame, MAX_FRAME_CEILING);
        assert!(got.max_read + FRAME_OVERHEAD <= got.max_frame);
        assert_eq!(got.max_in_flight, MAX_IN_FLIGHT_CEILING);
    }

    #[test]
    fn a_reply_granting_more_than_offered_is_a_protocol_error() {
        let d = Limits::default();
        let offered = hello(vec![1], d);
        let (mut reply, _) = accept_hello(&offered, &d, &[], 1, vec![], "s").unwrap();
        reply.max_write *= 2;
        assert_eq!(
            check_hello_reply(&offered, &reply).unwrap_err(),
            Errno::EPROTO
        );
    }
}
