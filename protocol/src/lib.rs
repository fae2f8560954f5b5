//! The hexz guest/host protocol, version 1: framing, CBOR messages, limits and the
//! errno table. Pure functions over bytes (plus thin blocking/tokio adapters); both the
//! guest daemon and the host server use this crate, and nothing else defines wire types.
//! The contract is docs/PROTOCOL.md.

pub mod addr;
pub mod cbor;
pub mod client;
pub mod errno;
pub mod exec;
pub mod frame;
pub mod hello;
pub mod message;
pub mod name;

pub use cbor::{check_canonical, CborError, CborErrorKind};
pub use errno::Errno;
pub use frame::{decode_reply, decode_request, encode_frame, BadRequest, FrameError};
pub use hello::{accept_hello, check_hello_reply, Limits, VERSION};
pub use message::*;
pub use name::{check_name, NameError};
pub use serde_bytes::ByteBuf;
