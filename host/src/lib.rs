//! hexz host side: the snapshot format and the commands that build and inspect snapshots.

pub mod blockdev;
pub mod bufpool;
pub mod commit;
pub mod diff;
pub mod error;
pub mod extract;
pub mod mount;
pub mod nbd;
pub mod oci;
pub mod overlay;
pub mod pack;
pub mod server;
pub mod snapshot;
pub mod vfs;
pub mod vm;

pub use error::{Error, Result};
