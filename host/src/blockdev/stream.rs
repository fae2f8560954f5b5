//! A snapshot stream (`disk`, `memory`) as a read-only block device.

use std::sync::Arc;

use super::{check_range, push_extent, BlockDevice, BlockSizes, Extent};
use crate::error::{Error, Result};
use crate::snapshot::{FileData, Snapshot};

/// Most runs one `extents` call returns; the caller asks again for the rest.
const MAX_RUNS: usize = 1 << 16;
/// Reads of at least two parts this size are split over threads.
const PARALLEL_PART: usize = 1 << 20;

/// One stream of an open snapshot. Reads are verified like every snapshot read; the
/// stream's holes and all-zero chunks are reported as holes.
pub struct StreamDevice {
    snap: Arc<Snapshot>,
    name: String,
    data: FileData,
}

/// The error for a stream `snap` does not have: what it has instead.
pub fn missing_stream(snap: &Snapshot, name: &str) -> Error {
    let have: Vec<&str> = snap
        .index()
        .streams
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let what = if have.is_empty() {
        "it holds only a file tree, no streams (pack with --disk/--memory)".to_string()
    } else {
        format!("it has: {}", have.join(", "))
    };
    Error::Invalid(format!(
        "no stream '{name}' in {}: {what}",
        snap.path().display()
    ))
}

impl StreamDevice {
    /// The stream `name` of `snap`; a clear error when the snapshot has no such stream.
    pub fn open(snap: Arc<Snapshot>, name: &str) -> Result<StreamDevice> {
        let data = match snap.stream(name) {
            Some(s) => s.data.clone(),
            None => return Err(missing_stream(&snap, name)),
        };
        Ok(StreamDevice {
            snap,
            name: name.to_string(),
            data,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }
}

impl StreamDevice {
    /// A big read in parts on a few threads, so its frames decompress in parallel.
    fn read_parallel(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(8);
        let parts: Vec<(u64, &mut [u8])> = buf
            .chunks_mut(PARALLEL_PART)
            .enumerate()
            .map(|(i, p)| (offset + (i * PARALLEL_PART) as u64, p))
            .collect();
        let per = parts.len().div_ceil(threads);
        let mut groups: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
        let mut it = parts.into_iter();
        loop {
            let g: Vec<_> = it.by_ref().take(per).collect();
            if g.is_empty() {
                break;
            }
            groups.push(g);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        for (off, part) in g {
                            let n = self.snap.read_at(&self.data, off, part)?;
                            if n != part.len() {
                                return Err(Error::corrupt(format!(
                                    "stream '{}' ended early at {}",
                                    self.name,
                                    off + n as u64
                                )));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("reader thread panicked".into())))
            })
        })
    }
}

impl BlockDevice for StreamDevice {
    fn size(&self) -> u64 {
        self.data.size
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        if buf.len() >= 2 * PARALLEL_PART {
            return self.read_parallel(offset, buf);
        }
        let n = self.snap.read_at(&self.data, offset, buf)?;
        if n != buf.len() {
            return Err(Error::corrupt(format!(
                "stream '{}' ended early at {}",
                self.name,
                offset + n as u64
            )));
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool, _fua: bool) -> Result<()> {
        Err(read_only())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size(), offset, len)?;
        let end = offset + len;
        let chunks = &self.snap.index().chunks;
        let exts = &self.data.extents;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut i = exts
            .partition_point(|e| e.offset <= offset)
            .saturating_sub(1);
        while pos < end && out.len() < MAX_RUNS {
            match exts.get(i) {
                Some(e) if e.offset <= pos => {
                    let e_end = e.offset + chunks[e.chunk as usize].len as u64;
                    if e_end > pos {
                        let n = e_end.min(end) - pos;
                        push_extent(
                            &mut out,
                            Extent {
                                len: n,
                                hole: false,
                                zero: false,
                            },
                        );
                        pos += n;
                    }
                    i += 1;
                }
                next => {
                    let stop = next.map_or(self.data.size, |e| e.offset).min(end);
                    push_extent(
                        &mut out,
                        Extent {
                            len: stop - pos,
                            hole: true,
                            zero: true,
                        },
                    );
                    pos = stop;
                }
            }
        }
        Ok(out)
    }
}

fn read_only() -> Error {
    Error::Invalid("a snapshot stream is read-only".into())
}
