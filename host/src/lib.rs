//! hexz host side: the snapshot format and the commands that build and inspect snapshots.

pub mod error;
pub mod extract;
pub mod pack;
pub mod snapshot;

pub use error::{Error, Result};
