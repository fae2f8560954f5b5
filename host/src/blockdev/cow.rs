//! A block-granular copy-on-write overlay over any lower device, kept in one sparse file.
//!
//! Layout: a 4 KiB header (owner snapshot id, stream name, size, checksum), then the map
//! (2 bits per 4 KiB block: lower / data here / zero), then the data region, where block
//! `i` lives at `data_offset + i * 4096` (unwritten blocks take no space). Durability:
//! data is written in place at once, the map only on `flush`, after an fsync of the data,
//! so a durable map never points at data that is not durable. Each map entry is 2 bits of
//! one sector, so a torn map write leaves every entry either old or new: both consistent.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{check_range, push_extent, BlockDevice, BlockSizes, Extent};
use crate::error::{Error, Result};

pub const BLOCK: u64 = 4096;
const MAGIC: [u8; 8] = *b"HEXZCOW1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
const MAX_NAME: usize = 255;
/// Where the header's BLAKE3 (over the bytes before it) sits.
const SUM_AT: usize = 4064;
/// Blocks described by one 4 KiB page of the map.
const BLOCKS_PER_PAGE: u64 = HEADER_LEN * 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Lower = 0,
    Data = 1,
    Zero = 2,
}

/// Whom an overlay belongs to: the snapshot id and the stream's name. An overlay opened
/// for another owner is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub snapshot_id: [u8; 32],
    pub stream: String,
}

/// A writable device: reads fall through to `lower` where no block was written.
pub struct CowDevice<L> {
    lower: L,
    file: File,
    path: PathBuf,
    size: u64,
    data_offset: u64,
    map: Vec<AtomicU64>,
    /// Map pages changed since the last flush.
    dirty: Mutex<BTreeSet<u64>>,
    /// Serialises changes (read-modify-write of partial blocks, map updates, flush).
    writer: Mutex<()>,
}

impl<L: BlockDevice> CowDevice<L> {
    /// Opens the overlay at `path`, creating it if missing or empty. An existing overlay
    /// must belong to `owner` and have the lower device's size.
    pub fn open(path: &Path, lower: L, owner: &Owner) -> Result<CowDevice<L>> {
        if owner.stream.len() > MAX_NAME {
            return Err(Error::Invalid("stream name too long for an overlay".into()));
        }
        let io = |e| Error::io(path, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // One writer per overlay: a second server on the same file would corrupt its map.
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let locked = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if locked != 0 {
            return Err(Error::Invalid(format!(
                "overlay {} is in use by another process",
                path.display()
            )));
        }
        let size = lower.size();
        let blocks = size.div_ceil(BLOCK);
        let map_len = (blocks.div_ceil(4)).div_ceil(HEADER_LEN) * HEADER_LEN;
        let data_offset = HEADER_LEN + map_len;
        let words = blocks.div_ceil(32) as usize;
        let map: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let dev = CowDevice {
            lower,
            file,
            path: path.to_path_buf(),
            size,
            data_offset,
            map,
            dirty: Mutex::new(BTreeSet::new()),
            writer: Mutex::new(()),
        };
        if dev.file.metadata().map_err(io)?.len() == 0 {
            dev.create(owner)?;
        } else {
            dev.load(owner, map_len)?;
        }
        Ok(dev)
    }

    fn create(&self, owner: &Owner) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..56].copy_from_slice(&owner.snapshot_id);
        h[56] = owner.stream.len() as u8;
        h[57..57 + owner.stream.len()].copy_from_slice(owner.stream.as_bytes());
        let sum = blake3::hash(&h[..SUM_AT]);
        h[SUM_AT..SUM_AT + 32].copy_from_slice(sum.as_bytes());
        self.file
            .set_len(self.data_offset + self.size.div_ceil(BLOCK) * BLOCK)
            .map_err(io)?;
        self.file.write_all_at(&h, 0).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }

    fn load(&self, owner: &Owner, map_len: u64) -> Result<()> {
        let bad = |what: &str| Error::CorruptOverlay(format!("{}: {what}", self.path.display()));
        let mut h = vec![0u8; HEADER_LEN as usize];
        self.file
            .read_exact_at(&mut h, 0)
            .map_err(|_| bad("shorter than its header (not a block overlay?)"))?;
        if h[..8] != MAGIC {
            return Err(bad("not a hexz block overlay (bad magic)"));
        }
        if blake3::hash(&h[..SUM_AT]).as_bytes() != &h[SUM_AT..SUM_AT + 32] {
            return Err(bad("header checksum mismatch"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        if u32_at(8) != VERSION || u32_at(12) as u64 != BLOCK {
            return Err(bad("unsupported version or block size"));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[16..24]);
        let size = u64::from_le_bytes(size);
        let name_len = (h[56] as usize).min(MAX_NAME);
        let found = Owner {
            snapshot_id: h[24..56].try_into().map_err(|_| bad("header"))?,
            stream: String::from_utf8_lossy(&h[57..57 + name_len]).into_owned(),
        };
        if found != *owner || size != self.size {
            return Err(Error::Invalid(format!(
                "overlay {} belongs to snapshot {} stream '{}' ({size} bytes), not snapshot {} stream '{}' ({} bytes); use a new overlay file",
                self.path.display(),
                &crate::snapshot::reader::hex(&found.snapshot_id)[..16],
                found.stream,
                &crate::snapshot::reader::hex(&owner.snapshot_id)[..16],
                owner.stream,
                self.size
            )));
        }
        let mut raw = vec![0u8; map_len as usize];
        self.file
            .read_exact_at(&mut raw, HEADER_LEN)
            .map_err(|_| bad("truncated inside the map"))?;
        for (w, bytes) in self.map.iter().zip(raw.chunks(8)) {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(bytes);
            let v = u64::from_le_bytes(b);
            // 0b11 in any entry is not a state.
            if v & (v >> 1) & 0x5555_5555_5555_5555 != 0 {
                return Err(bad("map holds an invalid block state"));
            }
            w.store(v, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn lower(&self) -> &L {
        &self.lower
    }

    /// True while no block has been written or zeroed: the device reads as its lower.
    pub fn is_unchanged(&self) -> bool {
        self.map.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    fn state(&self, block: u64) -> State {
        let w = self.map[(block / 32) as usize].load(Ordering::Acquire);
        match (w >> ((block % 32) * 2)) & 3 {
            1 => State::Data,
            2 => State::Zero,
            _ => State::Lower,
        }
    }

    /// Caller holds `writer`.
    fn set_state(&self, first: u64, end: u64, s: State) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        for b in first..end {
            let w = &self.map[(b / 32) as usize];
            let shift = (b % 32) * 2;
            let v = w.load(Ordering::Relaxed);
            w.store(
                (v & !(3 << shift)) | ((s as u64) << shift),
                Ordering::Release,
            );
        }
        for page in first / BLOCKS_PER_PAGE..=(end.max(first + 1) - 1) / BLOCKS_PER_PAGE {
            dirty.insert(page);
        }
    }

    fn block_len(&self, block: u64) -> u64 {
        (self.size - block * BLOCK).min(BLOCK)
    }

    /// Runs of equal state over whole blocks covering `offset..end`: (state, start, end)
    /// in bytes, clipped to the range.
    fn runs(&self, offset: u64, end: u64) -> Vec<(State, u64, u64)> {
        let mut out: Vec<(State, u64, u64)> = Vec::new();
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            let s = self.state(b);
            let start = (b * BLOCK).max(offset);
            let stop = ((b + 1) * BLOCK).min(end);
            match out.last_mut() {
                Some(last) if last.0 == s => last.2 = stop,
                _ => out.push((s, start, stop)),
            }
            b += 1;
        }
        out
    }

    fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, self.data_offset + offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn write_data(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, self.data_offset + offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes part of one block; a block not held here is first copied up whole.
    /// Caller holds `writer`.
    fn write_partial(&self, block: u64, at: usize, data: &[u8]) -> Result<()> {
        let start = block * BLOCK;
        if self.state(block) == State::Data {
            return self.write_data(start + at as u64, data);
        }
        let mut full = vec![0u8; self.block_len(block) as usize];
        self.read(start, &mut full)?;
        full[at..at + data.len()].copy_from_slice(data);
        self.write_data(start, &full)?;
        self.set_state(block, block + 1, State::Data);
        Ok(())
    }

    /// Whole blocks of `offset..end` become zero holes. Caller holds `writer`.
    fn zero_blocks(&self, first: u64, end: u64) -> Result<()> {
        if first >= end {
            return Ok(());
        }
        self.set_state(first, end, State::Zero);
        // Only reclaims space: a Zero block never reads the data region.
        let _ = nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&self.file),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (self.data_offset + first * BLOCK) as i64,
            ((end - first) * BLOCK) as i64,
        );
        Ok(())
    }

    /// First whole block at or after `offset`, and the end of whole blocks before `end`
    /// (the device's last, short block counts as whole when `end` reaches the size).
    fn whole_blocks(&self, offset: u64, end: u64) -> (u64, u64) {
        let first = offset.div_ceil(BLOCK);
        let last = if end == self.size {
            end.div_ceil(BLOCK)
        } else {
            end / BLOCK
        };
        (first, last.max(first))
    }

    fn flush_locked(&self) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        self.file.sync_data().map_err(io)?;
        let pages: Vec<u64> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if pages.is_empty() {
            return Ok(());
        }
        let words_per_page = (HEADER_LEN / 8) as usize;
        for page in pages {
            let first = page as usize * words_per_page;
            let mut buf = Vec::with_capacity(HEADER_LEN as usize);
            for w in self.map.iter().skip(first).take(words_per_page) {
                buf.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
            self.file
                .write_all_at(&buf, HEADER_LEN + page * HEADER_LEN)
                .map_err(io)?;
        }
        self.file.sync_data().map_err(io)
    }
}

impl<L: BlockDevice> BlockDevice for CowDevice<L> {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: BLOCK as u32,
            maximum: self.lower.block_sizes().maximum,
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        check_range(self.size, offset, buf.len() as u64)?;
        for (s, start, stop) in self.runs(offset, end) {
            let part = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            match s {
                State::Lower => self.lower.read(start, part)?,
                State::Data => self.read_data(start, part)?,
                State::Zero => part.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let end = offset + data.len() as u64;
        check_range(self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last) = self.whole_blocks(offset, end);
        let head_end = (first * BLOCK).min(end);
        if offset < head_end {
            let b = offset / BLOCK;
            self.write_partial(
                b,
                (offset - b * BLOCK) as usize,
                &data[..(head_end - offset) as usize],
            )?;
        }
        if first < last {
            let s = first * BLOCK;
            let e = (last * BLOCK).min(self.size);
            self.write_data(s, &data[(s - offset) as usize..(e - offset) as usize])?;
            self.set_state(first, last, State::Data);
        }
        let tail_start = (last * BLOCK).max(head_end);
        if tail_start < end {
            self.write_partial(last, 0, &data[(tail_start - offset) as usize..])?;
        }
        if fua {
            self.flush_locked()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        check_range(self.size, offset, len)?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last) = self.whole_blocks(offset, offset + len);
        self.zero_blocks(first, last)?;
        if fua {
            self.flush_locked()?;
        }
        Ok(())
    }

    /// Whole blocks always become holes, even without `may_trim`: a zero block needs no
    /// space to read as zeros, and NBD's NO_HOLE is only a SHOULD NOT.
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last) = self.whole_blocks(offset, end);
        let head_end = (first * BLOCK).min(end);
        if offset < head_end {
            let b = offset / BLOCK;
            let zeros = vec![0u8; (head_end - offset) as usize];
            self.write_partial(b, (offset - b * BLOCK) as usize, &zeros)?;
        }
        self.zero_blocks(first, last)?;
        let tail_start = (last * BLOCK).max(head_end);
        if tail_start < end {
            self.write_partial(last, 0, &vec![0u8; (end - tail_start) as usize])?;
        }
        if fua {
            self.flush_locked()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, len)?;
        let mut out = Vec::new();
        for (s, start, stop) in self.runs(offset, offset + len) {
            match s {
                State::Data => push_extent(
                    &mut out,
                    Extent {
                        len: stop - start,
                        hole: false,
                        zero: false,
                    },
                ),
                State::Zero => push_extent(
                    &mut out,
                    Extent {
                        len: stop - start,
                        hole: true,
                        zero: true,
                    },
                ),
                State::Lower => {
                    let mut pos = start;
                    while pos < stop {
                        let got = self.lower.extents(pos, stop - pos)?;
                        let n: u64 = got.iter().map(|e| e.len).sum();
                        if n == 0 {
                            return Err(Error::Invalid("lower device reported no extents".into()));
                        }
                        for e in got {
                            push_extent(&mut out, e);
                        }
                        pos += n;
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower device in memory: bytes, with zero blocks reported as holes.
    struct Mem(Vec<u8>);

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn block_sizes(&self) -> BlockSizes {
            BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25,
            }
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
            Err(Error::Invalid("ro".into()))
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<()> {
            Err(Error::Invalid("ro".into()))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<()> {
            Err(Error::Invalid("ro".into()))
        }
        fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < offset + len {
                let stop = ((pos / 4096 + 1) * 4096).min(offset + len);
                let zero = self.0[pos as usize..stop as usize].iter().all(|&b| b == 0);
                push_extent(
                    &mut out,
                    Extent {
                        len: stop - pos,
                        hole: zero,
                        zero,
                    },
                );
                pos = stop;
            }
            Ok(out)
        }
    }

    fn lower() -> Mem {
        // 10 blocks and a short one: 0..4 data (0x11), 4..8 zero, 8.. data (0x22).
        let mut v = vec![0u8; 10 * 4096 + 100];
        v[..4 * 4096].fill(0x11);
        v[8 * 4096..].fill(0x22);
        Mem(v)
    }

    fn owner() -> Owner {
        Owner {
            snapshot_id: [7; 32],
            stream: "disk".into(),
        }
    }

    fn read_all(d: &impl BlockDevice) -> Vec<u8> {
        let mut v = vec![0u8; d.size() as usize];
        d.read(0, &mut v).expect("read");
        v
    }

    #[test]
    fn unwritten_overlay_reads_the_lower_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = CowDevice::open(&dir.path().join("o"), lower(), &owner()).expect("open");
        assert_eq!(read_all(&d), lower().0);
        assert_eq!(d.extents(0, d.size()).expect("extents").len(), 3);
    }

    #[test]
    fn partial_block_write_keeps_the_rest_of_the_lower_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = CowDevice::open(&dir.path().join("o"), lower(), &owner()).expect("open");
        let mut want = lower().0;
        d.write(4000, &[0xaa; 200], false).expect("write");
        want[4000..4200].fill(0xaa);
        d.write(5 * 4096 + 10, &[0xbb; 3 * 4096], false)
            .expect("write");
        want[5 * 4096 + 10..8 * 4096 + 10].fill(0xbb);
        d.write(d.size() - 50, &[0xcc; 50], false)
            .expect("write at the short last block");
        let n = want.len();
        want[n - 50..].fill(0xcc);
        assert_eq!(read_all(&d), want);
    }

    #[test]
    fn write_zeroes_and_trim_make_holes_reported_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = CowDevice::open(&dir.path().join("o"), lower(), &owner()).expect("open");
        let mut want = lower().0;
        d.write_zeroes(100, 2 * 4096, true, false).expect("zeroes");
        want[100..100 + 2 * 4096].fill(0);
        d.trim(8 * 4096, d.size() - 8 * 4096, false)
            .expect("trim to the end");
        let n = want.len();
        want[8 * 4096..n].fill(0);
        assert_eq!(read_all(&d), want);
        let e = d.extents(0, d.size()).expect("extents");
        assert_eq!(
            e[0],
            Extent {
                len: 4096,
                hole: false,
                zero: false
            }
        );
        assert_eq!(
            e[1],
            Extent {
                len: 4096,
                hole: true,
                zero: true
            }
        );
        assert!(e.last().is_some_and(|l| l.hole && l.len > 4096));
    }

    #[test]
    fn flushed_changes_survive_reopen_and_unflushed_map_is_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o");
        let mut want = lower().0;
        {
            let d = CowDevice::open(&p, lower(), &owner()).expect("open");
            d.write(4096, &[0x55; 8192], false).expect("write");
            d.trim(9 * 4096, 4096, false).expect("trim");
            d.flush().expect("flush");
            // Written after the flush and never flushed: may be lost, must not corrupt.
            d.write(0, &[0x66; 4096], false).expect("write");
        }
        want[4096..3 * 4096].fill(0x55);
        want[9 * 4096..10 * 4096].fill(0);
        let d = CowDevice::open(&p, lower(), &owner()).expect("reopen");
        let got = read_all(&d);
        assert_eq!(got[4096..], want[4096..]);
        assert!(got[..4096] == want[..4096] || got[..4096] == [0x66; 4096]);
    }

    #[test]
    fn overlay_of_another_owner_is_refused_with_both_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o");
        drop(CowDevice::open(&p, lower(), &owner()).expect("open"));
        let other = Owner {
            snapshot_id: [9; 32],
            stream: "memory".into(),
        };
        let err = CowDevice::open(&p, lower(), &other)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("belongs to snapshot")
                && err.contains("'disk'")
                && err.contains("'memory'"),
            "{err}"
        );
    }

    #[test]
    fn an_overlay_in_use_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o");
        let _first = CowDevice::open(&p, lower(), &owner()).expect("open");
        let err = CowDevice::open(&p, lower(), &owner())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_an_overlay_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o");
        std::fs::write(&p, b"hello").expect("write");
        let err = CowDevice::open(&p, lower(), &owner())
            .err()
            .expect("refused");
        assert!(matches!(err, Error::CorruptOverlay(_)), "{err}");
    }
}
