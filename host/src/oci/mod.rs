//! Snapshots in OCI registries: `push`, `pull`, and lazy opening of `oci://` references
//! through a host-wide, content-addressed chunk cache. Layout in docs/FORMAT.md §9.

pub mod auth;
pub mod cache;
pub mod client;
pub mod lazy;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod reference;

pub use reference::Reference;
