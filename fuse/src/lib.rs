//! One FUSE adapter, two transports: [`HexzFs`] translates kernel FUSE requests into
//! hexz protocol operations ([`hexz_protocol::Op`]) and hands them to a [`Transport`].
//! The guest daemon's transport is a socket to `hexz-host serve`; the host mount's calls
//! the server's dispatch in the same process. Filesystem semantics live behind either.

mod ahead;
mod attrs;
mod behind;
mod dirlook;
mod fs;
mod names;
mod prelist;
mod transport;
mod workers;

pub use fs::{HexzFs, Options, MAX_NODE_HANDLES};
pub use transport::{CallError, Then, Transport};
