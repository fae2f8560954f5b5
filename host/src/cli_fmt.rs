//! How the CLI prints things: sizes, `ls -l` lines, `info`.

use std::collections::BTreeMap;

use anyhow::bail;
use hexz_host::snapshot::format::{Codec, Node, EXTERNAL};
use hexz_host::snapshot::{NodeIdx, NodeKind, Snapshot, ROOT};
use serde::Serialize;

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Serialize)]
pub struct Info {
    pub path: String,
    pub id: String,
    pub format_version: u32,
    /// The base snapshot this one refers to for shared chunks, if any.
    pub base: Option<String>,
    pub file_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinked_files: u64,
    pub other: u64,
    pub tree_bytes: u64,
    pub streams: BTreeMap<String, u64>,
    /// Distinct chunk bytes stored in this file (before compression).
    pub unique_bytes: u64,
    /// Distinct chunk bytes this snapshot reads from its base.
    pub base_bytes: u64,
    pub chunks: u64,
    pub frames: u64,
    pub frames_by_codec: BTreeMap<String, u64>,
    /// "recorded": the files keep the inode numbers they had when packed (or in the
    /// overlay, for a commit); "sequential": 1, 2, 3... in node order.
    pub inode_numbers: &'static str,
}

impl Info {
    pub fn of(snap: &Snapshot) -> Info {
        let ix = snap.index();
        let mut info = Info {
            path: snap.path().display().to_string(),
            id: snap.id_hex(),
            format_version: snap.format_version(),
            base: snap.index().base.as_ref().map(|b| {
                format!(
                    "{} ({})",
                    b.path,
                    &hexz_host::snapshot::reader::hex(&b.id)[..16]
                )
            }),
            file_bytes: snap.file_len(),
            inode_numbers: if snap.node_ids().table().is_some() {
                "recorded"
            } else {
                "sequential"
            },
            files: 0,
            dirs: 0,
            symlinks: 0,
            hardlinked_files: 0,
            other: 0,
            tree_bytes: 0,
            streams: ix
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.data.size))
                .collect(),
            unique_bytes: ix
                .chunks
                .iter()
                .filter(|c| c.frame != EXTERNAL)
                .map(|c| c.len as u64)
                .sum(),
            base_bytes: ix
                .chunks
                .iter()
                .filter(|c| c.frame == EXTERNAL)
                .map(|c| c.len as u64)
                .sum(),
            chunks: ix.chunks.len() as u64,
            frames: ix.frames.len() as u64,
            frames_by_codec: BTreeMap::new(),
        };
        for n in &ix.nodes {
            match &n.kind {
                NodeKind::Dir(_) => info.dirs += 1,
                NodeKind::File(d) => {
                    info.files += 1;
                    info.tree_bytes += d.size;
                    if n.nlink > 1 {
                        info.hardlinked_files += 1;
                    }
                }
                NodeKind::Symlink(_) => info.symlinks += 1,
                _ => info.other += 1,
            }
        }
        for f in &ix.frames {
            let name = Codec::from_u8(f.codec).map_or("unknown", |c| c.name());
            *info.frames_by_codec.entry(name.to_string()).or_default() += 1;
        }
        info
    }

    pub fn human(&self) -> String {
        let streams = if self.streams.is_empty() {
            "none".to_string()
        } else {
            self.streams
                .iter()
                .map(|(k, v)| format!("{k} ({})", bytes(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let codecs = self
            .frames_by_codec
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let logical = self.tree_bytes + self.streams.values().sum::<u64>();
        format!(
            "snapshot  {}\nid        {}\nformat    v{}{}, inode numbers {}\nsize      {} ({} bytes)\ntree      {} files ({} hard-linked), {} dirs, {} symlinks, {} other; {}\nstreams   {}\ndata      {} logical, {} unique here, {} in the base, {} file ({:.2}x)\nchunks    {} in {} frames ({})\n",
            self.path,
            self.id,
            self.format_version,
            self.base.as_ref().map(|b| format!(", on base {b}")).unwrap_or_default(),
            self.inode_numbers,
            bytes(self.file_bytes),
            self.file_bytes,
            self.files,
            self.hardlinked_files,
            self.dirs,
            self.symlinks,
            self.other,
            bytes(self.tree_bytes),
            streams,
            bytes(logical),
            bytes(self.unique_bytes),
            bytes(self.base_bytes),
            bytes(self.file_bytes),
            logical as f64 / self.file_bytes.max(1) as f64,
            self.chunks,
            self.frames,
            codecs
        )
    }
}

pub fn ls_line(n: &Node, name: &[u8]) -> String {
    let size = match &n.kind {
        NodeKind::File(d) => d.size.to_string(),
        NodeKind::Symlink(t) => t.len().to_string(),
        NodeKind::Device(rdev) => format!(
            "{}, {}",
            libc::major(*rdev as libc::dev_t),
            libc::minor(*rdev as libc::dev_t)
        ),
        _ => "0".to_string(),
    };
    let mut line = format!(
        "{} {:>3} {:>5} {:>5} {:>10} {} {}",
        mode_string(n.mode),
        n.nlink,
        n.uid,
        n.gid,
        size,
        date(n.mtime.sec),
        String::from_utf8_lossy(name)
    );
    if let NodeKind::Symlink(t) = &n.kind {
        line.push_str(" -> ");
        line.push_str(&String::from_utf8_lossy(t));
    }
    line
}

fn mode_string(mode: u32) -> String {
    let t = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut s = String::from(t);
    for (i, special, lower, upper) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> i) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & special != 0, x) {
            (true, true) => lower,
            (true, false) => upper,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM` in UTC (civil-from-days, H. Hinnant).
fn date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Resolves `path` following symlinks inside the snapshot (absolute targets start at
/// the snapshot root; at most 40 links, as the kernel allows).
pub fn resolve_following(snap: &Snapshot, path: &str) -> anyhow::Result<NodeIdx> {
    let mut todo: Vec<Vec<u8>> = components(path.as_bytes());
    todo.reverse();
    let mut cur = ROOT;
    let mut links = 0;
    while let Some(part) = todo.pop() {
        let Some(NodeKind::Dir(d)) = snap.node(cur).map(|n| &n.kind) else {
            bail!("{path}: not a directory")
        };
        if part == b".." {
            cur = d.parent;
            continue;
        }
        let Some(next) = snap.lookup(cur, &part) else {
            bail!("{path}: no such file or directory in snapshot")
        };
        if let Some(NodeKind::Symlink(t)) = snap.node(next).map(|n| &n.kind) {
            links += 1;
            if links > 40 {
                bail!("{path}: too many levels of symbolic links");
            }
            if t.first() == Some(&b'/') {
                cur = ROOT;
            }
            todo.extend(components(t).into_iter().rev());
            continue;
        }
        cur = next;
    }
    Ok(cur)
}

fn components(p: &[u8]) -> Vec<Vec<u8>> {
    p.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// A size such as `4096`, `64K`, `512M`, `10G` or `1T` (binary units; a trailing `B` or
/// `iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("'{s}': unknown unit '{c}' (K, M, G, T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': expected a size such as 512M or 10G"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("'{s}': too large"))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
