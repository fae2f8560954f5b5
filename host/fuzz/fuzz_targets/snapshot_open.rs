#![no_main]
//! Any bytes as a snapshot's header, data area and index (checksums fixed up by the
//! harness unless in raw mode): `Snapshot::open` never panics and never allocates past
//! what the input justifies; a snapshot it accepts can be read everywhere (every frame
//! loaded and checked, the start, middle and end of every file and stream) without a
//! panic, each read either bytes or an error.

use std::sync::OnceLock;

use hexz_host::snapshot::{NodeKind, Snapshot};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("hexz-fuzz-snap-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir")
    })
}

fuzz_target!(|input: &[u8]| {
    let file = hexz_host_fuzz::snapshot_file(input);
    let path = dir().path().join("fuzz.hxz");
    std::fs::write(&path, &file).expect("write the input");
    let Ok(snap) = Snapshot::open_with_cache(&path, 1 << 20) else {
        return;
    };
    let index = snap.index();
    for i in 0..index.frames.len().min(64) {
        let _ = snap.load_frame(i as u32);
    }
    let mut buf = vec![0u8; 4096];
    let datas = index
        .nodes
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::File(d) => Some(d),
            _ => None,
        })
        .chain(index.streams.iter().map(|s| &s.data))
        .take(64);
    for d in datas {
        for off in [
            0,
            d.size / 2,
            d.size.saturating_sub(1),
            d.size,
            u64::MAX - 1,
        ] {
            if let Ok(n) = snap.read_at(d, off, &mut buf) {
                assert!(n <= buf.len());
                assert!(n == 0 || off.saturating_add(n as u64) <= d.size);
            }
        }
    }
    for p in ["", "/", "a/b", "..", "../..", "d/e"] {
        let _ = snap.resolve(p);
    }
});
