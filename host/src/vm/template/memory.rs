//! The template's memory file: zero pages punched out after the save, and one BLAKE3
//! over its data extents (holes cost nothing) that every restore checks.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::tmpl_err;
use crate::error::{Error, Result};

const PAGE: usize = 4096;

/// BLAKE3 over the data extents of `file` (offset, length, bytes of each), so holes
/// cost nothing; returns the hash and the bytes hashed.
pub(super) fn hash_extents(file: &File) -> Result<(String, u64)> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(|e| Error::io("memory", e))?.len();
    let fd = file.as_raw_fd();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    let mut data_bytes = 0;
    while pos < len {
        let off = i64::try_from(pos).map_err(|_| tmpl_err("memory file too large"))?;
        // SAFETY: lseek has no memory-safety preconditions.
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let (start, end) = (start as u64, (end.max(start) as u64).min(len));
        h.update(&start.to_le_bytes());
        h.update(&(end - start).to_le_bytes());
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io("memory", e))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        data_bytes += end - start;
        pos = end.max(pos + 1);
    }
    h.update(&len.to_le_bytes());
    Ok((h.finalize().to_hex().to_string(), data_bytes))
}

/// Turns zero pages of `file` into holes, so the template costs what the guest used.
pub(super) fn punch_zero_pages(file: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = file.metadata().map_err(|e| Error::io("memory", e))?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let punch = |from: u64, to: u64| -> Result<()> {
        if to <= from {
            return Ok(());
        }
        // SAFETY: fallocate has no memory-safety preconditions.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                (to - from) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(Error::io("memory", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let mut zero_from: Option<u64> = None;
    while at < len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io("memory", e))?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let off = at + (i * PAGE) as u64;
            let zero = page.iter().all(|&b| b == 0);
            match (zero, zero_from) {
                (true, None) => zero_from = Some(off),
                (false, Some(from)) => {
                    punch(from, off)?;
                    zero_from = None;
                }
                _ => {}
            }
        }
        at += n as u64;
    }
    if let Some(from) = zero_from {
        punch(from, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_become_holes_and_the_hash_covers_data_and_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("memory");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.set_len(64 * PAGE as u64).expect("len");
        f.write_all_at(&[0u8; 8 * PAGE], 0).expect("zeros");
        f.write_all_at(b"guest", 10 * PAGE as u64).expect("data");
        punch_zero_pages(&f).expect("punch");
        let (h1, data) = hash_extents(&f).expect("hash");
        assert!(
            data < 64 * PAGE as u64,
            "nothing was punched ({data} bytes)"
        );
        assert!(data >= PAGE as u64);
        f.write_all_at(b"Guest", 10 * PAGE as u64).expect("flip");
        let (h2, _) = hash_extents(&f).expect("hash");
        assert_ne!(h1, h2, "a changed byte must change the hash");
    }
}
