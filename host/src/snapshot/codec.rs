//! Frame compression: zstd or lz4, falling back to raw when compression does not help.

use std::cell::RefCell;

use super::format::Codec;
use crate::error::{Error, Result};

/// What the writer was asked to use for frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd { level: i32 },
    Lz4,
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

/// A per-thread compressor; zstd contexts are reused across frames.
pub struct Compressor {
    kind: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(kind: Compression) -> Result<Compressor> {
        let zstd = match kind {
            Compression::Zstd { level } => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?,
            ),
            Compression::Lz4 => None,
        };
        Ok(Compressor { kind, zstd })
    }

    /// Compresses `raw`; returns the codec actually used and the stored bytes.
    pub fn compress(&mut self, raw: &[u8]) -> (Codec, Vec<u8>) {
        let packed = match (&self.kind, self.zstd.as_mut()) {
            (Compression::Zstd { .. }, Some(z)) => z.compress(raw).ok().map(|v| (Codec::Zstd, v)),
            _ => Some((Codec::Lz4, lz4_flex::block::compress(raw))),
        };
        match packed {
            Some((codec, v)) if v.len() < raw.len() => (codec, v),
            _ => (Codec::Raw, raw.to_vec()),
        }
    }
}

thread_local! {
    static ZSTD_DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompresses `stored` into exactly `raw_len` bytes, or says why it cannot.
pub fn decompress(codec: Codec, stored: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    let out = match codec {
        Codec::Raw => stored.to_vec(),
        Codec::Lz4 => {
            let mut out = vec![0u8; raw_len];
            let n = lz4_flex::block::decompress_into(stored, &mut out)
                .map_err(|e| Error::corrupt(format!("lz4 data does not decode: {e}")))?;
            out.truncate(n);
            out
        }
        Codec::Zstd => ZSTD_DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| Error::Invalid(format!("zstd decoder: {e}")))?,
                );
            }
            let dctx = slot
                .as_mut()
                .ok_or_else(|| Error::Invalid("zstd decoder".into()))?;
            let mut out = Vec::with_capacity(raw_len);
            dctx.decompress_to_buffer(stored, &mut out)
                .map_err(|e| Error::corrupt(format!("zstd data does not decode: {e}")))?;
            Ok::<_, Error>(out)
        })?,
    };
    if out.len() != raw_len {
        return Err(Error::corrupt(format!(
            "frame decodes to {} bytes, index says {raw_len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_incompressible_data_is_stored_raw() {
        let text: Vec<u8> = b"hello hexz "
            .iter()
            .cycle()
            .take(100_000)
            .copied()
            .collect();
        let noise: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for kind in [Compression::Zstd { level: 3 }, Compression::Lz4] {
            let mut c = Compressor::new(kind).unwrap();
            let (codec, stored) = c.compress(&text);
            assert_ne!(codec, Codec::Raw);
            assert!(stored.len() < text.len() / 10);
            assert_eq!(decompress(codec, &stored, text.len()).unwrap(), text);
            let (codec, stored) = c.compress(&noise);
            assert_eq!(decompress(codec, &stored, noise.len()).unwrap(), noise);
        }
    }

    #[test]
    fn wrong_length_or_garbage_is_an_error_not_bytes() {
        let mut c = Compressor::new(Compression::default()).unwrap();
        let data = vec![42u8; 10_000];
        let (codec, stored) = c.compress(&data);
        assert!(decompress(codec, &stored, 9_999).is_err());
        assert!(decompress(Codec::Zstd, b"not zstd at all", 10).is_err());
        assert!(decompress(Codec::Lz4, &[0xff; 16], 100).is_err());
    }
}
