//! Snapshots in OCI registries: `push`, `pull`, and lazy opening of `oci://` references
//! through a host-wide cache of blobs (by digest). Layout in docs/FORMAT.md §9.

pub mod auth;
pub mod cache;
pub mod client;
pub mod lazy;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod reference;
pub mod share;

pub use reference::Reference;

/// A snapshot argument made absolute, unless it is a registry reference.
pub fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    match p.to_str() {
        Some(s) if Reference::is_remote(s) => p.to_path_buf(),
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}
