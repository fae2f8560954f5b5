//! Large byte buffers handed back for reuse. A stream of range reads from a registry
//! otherwise takes fresh pages for every 8 MiB window, and faulting those in (zeroing,
//! accounting) cost a third of a cold sequential read's CPU.

use std::sync::Mutex;

/// Buffers smaller than this are not kept.
const KEEP_MIN: usize = 1 << 20;
/// Buffers kept at most (the memory a pool holds is bounded by this × the largest).
const KEEP_MAX: usize = 8;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer that goes back to the pool when dropped.
pub struct PoolBuf(Vec<u8>);

impl From<Vec<u8>> for PoolBuf {
    fn from(v: Vec<u8>) -> PoolBuf {
        PoolBuf(v)
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() >= KEEP_MIN {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < KEEP_MAX {
                pool.push(v);
            }
        }
    }
}

/// A buffer of `len` bytes, from the pool when it holds one large enough (and at most
/// twice as large). Its contents
/// are unspecified (earlier data or zeros): callers overwrite all of it.
pub fn take(len: usize) -> Vec<u8> {
    let reused = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Not much larger than asked: a frame shared from the buffer keeps all of it
        // alive while the frame cache counts only the frame.
        pool.iter()
            .position(|v| v.capacity() >= len && v.capacity() / 2 <= len)
            .map(|i| pool.swap_remove(i))
    };
    match reused {
        Some(mut v) => {
            // Within the capacity: only bytes past the old length are written here.
            v.resize(len, 0);
            v
        }
        None => vec![0u8; len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_and_sized_as_asked() {
        let len = (3 << 20) + 7; // larger than any buffer other unit tests give back
        let v = take(len);
        assert_eq!(v.len(), len);
        let ptr = v.as_ptr();
        drop(PoolBuf::from(v));
        let w = take(len - 5);
        assert_eq!(w.len(), len - 5);
        assert_eq!(w.as_ptr(), ptr, "the buffer given back is reused");
        drop(PoolBuf::from(w));
        let small = take(len / 4);
        assert_ne!(
            small.as_ptr(),
            ptr,
            "a buffer four times too large is not used"
        );
        drop(PoolBuf::from(vec![1u8; 10])); // too small to keep
        assert!(POOL
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.capacity() >= KEEP_MIN));
    }
}
