#![no_main]
//! Any records in an overlay journal (framed with valid checksums by the harness, or
//! raw): `Journal::open` and the overlay's replay never panic and never allocate past
//! what the input justifies; a journal that opens can be served (the tree walked, every
//! attribute read, every file's first bytes read) without a panic.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hexz_host::overlay::journal::{Journal, Record};
use hexz_host::snapshot::Snapshot;
use hexz_host::vfs::Vfs;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    snap: Arc<Snapshot>,
    init: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("hexz-fuzz-journal-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("temp dir");
        let snap =
            Arc::new(Snapshot::open(hexz_host_fuzz::small_snapshot(dir.path())).expect("open"));
        let init = bincode::encode_to_vec(
            &Record::Init {
                snapshot: snap.id(),
                overlay: [5; 16],
            },
            bincode::config::standard(),
        )
        .expect("encode");
        Fixture {
            root: dir.path().to_path_buf(),
            _dir: dir,
            snap,
            init,
        }
    })
}

fn walk(vfs: &Vfs) {
    const OWNER: u64 = 1;
    let mut todo = vec![1u64];
    let mut seen = 0;
    while let Some(node) = todo.pop() {
        seen += 1;
        if seen > 256 {
            break;
        }
        let Ok(attr) = vfs.getattr(OWNER, node, None) else {
            continue;
        };
        match attr.mode & libc_s_ifmt() {
            0o040000 => {
                let Ok(fh) = vfs.opendir(OWNER, node) else {
                    continue;
                };
                if let Ok(items) = vfs.readdir(OWNER, fh, 0, 64) {
                    for it in items {
                        if it.name != b"." && it.name != b".." {
                            if let Ok(a) = vfs.lookup(OWNER, node, &it.name) {
                                todo.push(a.ino);
                            }
                        }
                    }
                }
                let _ = vfs.releasedir(OWNER, fh);
            }
            0o100000 => {
                if let Ok(fh) = vfs.open(OWNER, node, 0) {
                    let _ = vfs.read(OWNER, fh, 0, 4096);
                    let _ = vfs.read(OWNER, fh, attr.size.saturating_sub(1), 4096);
                    let _ = vfs.release(OWNER, fh);
                }
            }
            0o120000 => {
                let _ = vfs.readlink(node);
            }
            _ => {}
        }
        let _ = vfs.listxattr(node);
    }
}

fn libc_s_ifmt() -> u32 {
    0o170000
}

fuzz_target!(|input: &[u8]| {
    let f = fixture();
    let flags = input.first().copied().unwrap_or(0);
    let bytes = hexz_host_fuzz::journal_file(input, &f.init);
    let ov = f.root.join("overlay");
    let _ = std::fs::remove_dir_all(&ov);
    std::fs::create_dir_all(ov.join("data")).expect("mkdir");
    std::fs::write(ov.join("journal"), &bytes).expect("write");
    let read_only = flags & 2 != 0;
    if flags & 1 != 0 {
        // Raw mode: the journal reader alone.
        let _ = Journal::open(&ov.join("journal"), !read_only);
        return;
    }
    if flags & 4 == 0 {
        let _ = hexz_host::overlay::Overlay::open(&f.snap, Some(&ov), read_only);
        return;
    }
    if let Ok(vfs) = Vfs::new(f.snap.clone(), Some(&ov), read_only) {
        walk(&vfs);
    }
});
