//! Block devices: a fixed-size byte array with the operations a disk offers. The NBD
//! server (and later a FUSE raw-stream file) serves any `BlockDevice`; it knows nothing of
//! snapshots. Implementations: a snapshot stream (read-only) and a copy-on-write overlay
//! over any lower device.

pub mod cow;
mod stream;

pub use cow::CowDevice;
pub use stream::{missing_stream, StreamDevice};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::snapshot::Snapshot;

/// The block overlay of `stream` in an overlay directory: `<dir>/<stream>.cow` (what
/// `run --disk`, `nbd --rw` and `mount --rw` write and `commit` folds).
pub fn cow_path(dir: &Path, stream: &str) -> PathBuf {
    dir.join(format!("{stream}.cow"))
}

/// Stream `name` of `snap` under the block overlay at `cow` (created if missing; an
/// existing one must belong to this snapshot and stream).
pub fn open_cow(snap: &Arc<Snapshot>, name: &str, cow: &Path) -> Result<CowDevice<StreamDevice>> {
    let owner = cow::Owner {
        snapshot_id: snap.id(),
        stream: name.to_string(),
    };
    CowDevice::open(cow, StreamDevice::open(snap.clone(), name)?, &owner)
}

/// Stream `name` of `snap`, through the block overlay at `cow` when given.
pub fn open_stream(
    snap: &Arc<Snapshot>,
    name: &str,
    cow: Option<&Path>,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(match cow {
        Some(path) => Arc::new(open_cow(snap, name, path)?),
        None => Arc::new(StreamDevice::open(snap.clone(), name)?),
    })
}

/// Size constraints a client must (minimum) or should (preferred) respect, and the
/// largest payload one request may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// One run of the allocation map: `len` bytes that are all data, or all hole.
/// A hole always reads as zeros (`zero` is then true); data may also be known zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

/// A fixed-size, randomly addressable device. Callers keep `offset + len <= size()`;
/// implementations may assume it (and return `Error::Invalid` if it does not hold).
/// Methods take `&self` and may be called from many threads at once; overlapping
/// concurrent writes land in some order, as on a disk.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn block_sizes(&self) -> BlockSizes;
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`; durable once `flush` returns (or at once with `fua`).
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Makes every write completed before this call durable.
    fn flush(&self) -> Result<()>;
    /// The range's contents become unspecified (this crate's devices: zeros), its space
    /// may be freed.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// The range reads as zeros afterwards; with `may_trim`, its space may be freed.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()>;
    /// The allocation map of `offset..offset + len`, in order, covering at least the
    /// first byte and at most the range. Runs need not be merged.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// Checks `offset..offset + len` lies inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::Invalid(format!(
            "range {offset}+{len} is outside the {size}-byte device"
        ))),
    }
}

/// Appends a run to `out`, merging it with the previous one when they agree.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}
