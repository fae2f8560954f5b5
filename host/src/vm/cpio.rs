//! A reproducible initramfs: the cpio "newc" format the kernel unpacks, written with
//! entries sorted by path, owner root, mtime 0 and inode numbers by position, so the
//! same contents always give the same bytes.

use std::collections::BTreeMap;

/// What a path in the archive is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Paths (relative, no leading `/`) to entries; a `BTreeMap` keeps them sorted, so a
/// directory always comes before what it holds.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds (or replaces) `path`, and the directories leading to it.
    pub fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = path.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            self.entries
                .entry(up.to_string())
                .or_insert(Entry::Dir { mode: 0o755 });
            parent = up;
        }
        self.entries.insert(path, entry);
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// The archive in newc format, ending with the trailer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Entry::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Entry::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Entry::CharDevice { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) {
                2
            } else {
                1
            };
            write_header(&mut out, i as u32 + 1, mode, nlink, data.len(), rdev, path);
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        write_header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
        out
    }
}

fn write_header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_entries_in_any_order_give_the_same_bytes_and_cpio_reads_them() {
        let mut a = Archive::default();
        a.insert(
            "/bin/busybox",
            Entry::File {
                mode: 0o755,
                data: b"#!bb".to_vec(),
            },
        );
        a.insert(
            "bin/sh",
            Entry::Symlink {
                target: "/bin/busybox".into(),
            },
        );
        a.insert(
            "dev/console",
            Entry::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        let mut b = Archive::default();
        b.insert(
            "dev/console",
            Entry::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        b.insert(
            "bin/sh",
            Entry::Symlink {
                target: "/bin/busybox".into(),
            },
        );
        b.insert(
            "bin/busybox",
            Entry::File {
                mode: 0o755,
                data: b"#!bb".to_vec(),
            },
        );
        let bytes = a.to_bytes();
        assert_eq!(bytes, b.to_bytes());
        assert_eq!(bytes.len() % 4, 0);
        assert!(a.contains("bin"), "parent directories are added");

        // GNU cpio, when present, lists exactly these entries in this order.
        let listed = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(&bytes)?;
                }
                child.wait_with_output()
            });
        if let Ok(out) = listed {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "bin\nbin/busybox\nbin/sh\ndev\ndev/console\n"
            );
        }
    }
}
