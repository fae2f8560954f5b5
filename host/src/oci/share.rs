//! Chunks shared across snapshots in the host cache.
//!
//! Chunks are content-defined and named by their BLAKE3 (docs/FORMAT.md §5), so two
//! snapshots packed independently from similar trees hold mostly the same chunks — but in
//! different frames of different data blobs, so the host cache, which keeps frames by
//! blob, does not see it. This map does: built once per opened blob from the data blobs
//! the host cache already holds (the few most recently used, each with the index blob
//! `link_index` recorded for it), it names for every chunk they hold a frame where it
//! is. A frame whose every chunk is in the map is put together from those frames instead
//! of being fetched: each source frame is read from the cache and checked against its
//! BLAKE3 ids as any cached frame is (so the chunks copied out of it are exactly the
//! ones the frame assembled names), and a damaged or evicted source only means a fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::cache::{DataCache, HostCache};
use crate::snapshot::format::{Chunk, Frame, HEADER_LEN};
use crate::snapshot::reader::{decode_frame_owned, verify_chunks};
use crate::snapshot::Snapshot;

/// Cached data blobs looked into, most recently used first.
const MAX_SOURCES: usize = 4;
/// Source frames kept decoded while frames are put together (consecutive frames of one
/// snapshot mostly come from consecutive frames of another).
const DECODED_KEPT: usize = 8;

/// Where a chunk's bytes are: source, frame, and the chunk's place in the frame.
#[derive(Clone, Copy)]
struct Loc {
    source: u16,
    frame: u32,
    offset: u32,
    len: u32,
}

struct Source {
    data: DataCache,
    /// Whether a frame was taken from it yet (the first marks it used, for eviction:
    /// being looked into is not a use).
    used: std::sync::atomic::AtomicBool,
    frames: Vec<Frame>,
    chunks: Vec<Chunk>,
}

/// (source, frame in it)
type SourceFrame = (u16, u32);

pub struct Shared {
    map: HashMap<[u8; 32], Loc>,
    sources: Vec<Source>,
    /// Source frames kept decoded, by (source, frame), oldest first.
    decoded: Mutex<Vec<(SourceFrame, Arc<Vec<u8>>)>>,
}

impl Shared {
    /// The chunks of the cached blobs not in `skip` (None when there are none). A
    /// snapshot skips its own blob and those of its base chain, whose chunks it names
    /// as external anyway.
    pub fn build(cache: &Arc<HostCache>, skip: &[String]) -> Option<Shared> {
        let mut map = HashMap::new();
        let mut sources = Vec::new();
        for (digest, index_digest) in cache.linked(skip).into_iter().take(MAX_SOURCES) {
            let Some(blob) = cache.blob(&index_digest) else {
                continue;
            };
            let index = match Snapshot::index_of_blob(&blob) {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!("registry cache: index blob {index_digest}: {e}");
                    continue;
                }
            };
            let Some(data) = cache.existing_data(&digest, index.frames.len()) else {
                continue;
            };
            let source = sources.len() as u16;
            for (j, present) in data.present().into_iter().enumerate() {
                let f = &index.frames[j];
                if !present {
                    continue;
                }
                let first = f.first_chunk as usize;
                for c in &index.chunks[first..first + f.chunk_count as usize] {
                    map.entry(c.id).or_insert(Loc {
                        source,
                        frame: j as u32,
                        offset: c.offset,
                        len: c.len,
                    });
                }
            }
            sources.push(Source {
                data,
                used: std::sync::atomic::AtomicBool::new(false),
                frames: index.frames,
                chunks: index.chunks,
            });
        }
        if map.is_empty() {
            return None;
        }
        tracing::debug!(
            "registry cache: {} chunks of {} other snapshots can be shared",
            map.len(),
            sources.len()
        );
        Some(Shared {
            map,
            sources,
            decoded: Mutex::new(Vec::new()),
        })
    }

    /// Whether every chunk of a frame is held by another cached blob.
    pub fn covers(&self, chunks: &[Chunk]) -> bool {
        !chunks.is_empty() && chunks.iter().all(|c| self.map.contains_key(&c.id))
    }

    /// Frame `idx` (`f`, holding `chunks`) put together from other blobs' cached frames,
    /// checked; None if a chunk is not held or a source fails its check.
    pub fn assemble(&self, idx: u32, f: &Frame, chunks: &[Chunk]) -> Option<Vec<u8>> {
        if !self.covers(chunks) {
            return None;
        }
        let mut out = vec![0u8; f.raw_len as usize];
        for c in chunks {
            let loc = self.map.get(&c.id)?;
            if loc.len != c.len {
                // Two indexes disagree on a chunk's length: one of them lies about its
                // id. Fetched, and checked, instead.
                return None;
            }
            let src = self.decoded(loc.source, loc.frame)?;
            let from = src.get(loc.offset as usize..(loc.offset + loc.len) as usize)?;
            out.get_mut(c.offset as usize..(c.offset + c.len) as usize)?
                .copy_from_slice(from);
        }
        // Each chunk was copied from a source frame that passed its check, where a
        // chunk of the same id (its BLAKE3) has the same bytes: the frame is checked by
        // construction. Debug builds check it again.
        debug_assert!(verify_chunks(idx, chunks, &out).is_ok());
        Some(out)
    }

    /// A source frame's verified bytes, from the few kept decoded or the cache.
    fn decoded(&self, source: u16, frame: u32) -> Option<Arc<Vec<u8>>> {
        let key = (source, frame);
        {
            let kept = self.decoded.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, b)) = kept.iter().find(|(k, _)| *k == key) {
                return Some(b.clone());
            }
        }
        let s = &self.sources[source as usize];
        let f = s.frames.get(frame as usize)?;
        let stored = s
            .data
            .read(frame, f.offset - HEADER_LEN as u64, f.stored_len as usize)?;
        let first = f.first_chunk as usize;
        let chunks = &s.chunks[first..first + f.chunk_count as usize];
        let bytes = match decode_frame_owned(frame, f, chunks, stored) {
            Ok(b) => {
                if !s.used.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    s.data.touch();
                }
                Arc::new(b)
            }
            Err(e) => {
                tracing::warn!("registry cache: a frame shared with another snapshot is damaged ({e}); fetching instead");
                s.data.forget(frame);
                return None;
            }
        };
        let mut kept = self.decoded.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= DECODED_KEPT {
            kept.remove(0);
        }
        kept.push((key, bytes.clone()));
        Some(bytes)
    }
}
