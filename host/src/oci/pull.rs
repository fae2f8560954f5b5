//! `pull`: copy a snapshot (and its chain of bases) down from a registry into local
//! `.hxz` files, each checked against its digests and written atomically.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::client::{short, Repo, Retry};
use super::manifest::{Layer, Manifest};
use super::reference::Reference;
use crate::error::{Error, Result};
use crate::snapshot::format::HEADER_LEN;
use crate::snapshot::reader::{hex, pulled_base_name};
use crate::snapshot::Snapshot;

#[derive(Clone, Debug, Default)]
pub struct PullStats {
    pub pinned: String,
    /// Files written, top snapshot first.
    pub written: Vec<PathBuf>,
    /// Bases already present with the right id.
    pub kept: Vec<PathBuf>,
    pub bytes: u64,
}

pub fn pull(src: &str, out: &Path, plain_http: bool) -> Result<PullStats> {
    let r = Reference::parse(src)?;
    let reg = super::client::Registry::new(&r, plain_http);
    let repo = Repo::new(&reg, &r.repo);
    let m = repo.manifest(r.target_str(), Retry::COMMAND)?;
    let pinned = r.pinned(&m.digest);
    let chain = Manifest::parse_chain(&m.bytes, &r.to_string())?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: no such directory; create it or choose another --output",
            dir.display()
        )));
    }
    let mut stats = PullStats {
        pinned: pinned.to_string(),
        ..Default::default()
    };
    let mut at = 0usize;
    let mut target = out.to_path_buf();
    let mut depth = 0;
    loop {
        depth += 1;
        if depth > chain.len() {
            return Err(Error::corrupt("the manifest's chain of snapshots loops"));
        }
        let layer = &chain[at];
        let existing = Snapshot::open_alone(&target).ok();
        let snap = match existing {
            Some(s) if s.id() == layer.id && at != 0 => {
                stats.kept.push(target.clone());
                s
            }
            _ => {
                write_snapshot(&repo, layer, &target)?;
                stats.bytes += layer.index.size + layer.data.size;
                stats.written.push(target.clone());
                Snapshot::open_alone(&target)?
            }
        };
        let Some(base) = snap.index().base.clone() else {
            break;
        };
        at = chain.iter().position(|l| l.id == base.id).ok_or_else(|| {
            Error::Invalid(format!(
                "{pinned}: snapshot {} needs base {} ({}), which the artifact does not include",
                &hex(&layer.id)[..16],
                &hex(&base.id)[..16],
                base.path
            ))
        })?;
        target = match Path::new(&base.path) {
            p if p.is_relative()
                && !Reference::is_remote(&base.path)
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))) =>
            {
                dir.join(p)
            }
            _ => dir.join(pulled_base_name(&base.id)),
        };
    }
    // The whole chain must open: ids and every external chunk are checked.
    Snapshot::open(out)?;
    Ok(stats)
}

/// Writes one snapshot file from its two blobs: header, data, index.
fn write_snapshot(repo: &Repo, layer: &Layer, target: &Path) -> Result<()> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".hexz-pull-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let index = repo.blob_range(&layer.index.digest, 0, layer.index.size, Retry::COMMAND)?;
    let got = super::client::sha256_digest(&index);
    if got != layer.index.digest {
        return Err(Error::corrupt(format!(
            "index blob {} arrived with digest {}",
            short(&layer.index.digest),
            short(&got)
        )));
    }
    if index.len() < HEADER_LEN {
        return Err(Error::NotASnapshot);
    }
    let f = tmp.as_file_mut();
    let io = |e| Error::io(target, e);
    f.write_all_at(&index[..HEADER_LEN], 0).map_err(io)?;
    let got = download(
        repo,
        &layer.data.digest,
        layer.data.size,
        f,
        HEADER_LEN as u64,
    )?;
    if got != layer.data.digest {
        return Err(Error::corrupt(format!(
            "data blob {} arrived with digest {}",
            short(&layer.data.digest),
            short(&got)
        )));
    }
    f.write_all_at(&index[HEADER_LEN..], HEADER_LEN as u64 + layer.data.size)
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    tmp.persist(target)
        .map_err(|e| Error::io(target, e.error))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Streams a blob into `file` at `offset`; returns the digest of what arrived. A body
/// cut short is an error naming the registry.
pub fn download(repo: &Repo, digest: &str, size: u64, file: &File, offset: u64) -> Result<String> {
    let mut reader = repo.blob(digest)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Remote(format!(
                    "registry {}: blob {} cut short after {done} of {size} bytes: {e}",
                    repo.reg.host(),
                    short(digest)
                )))
            }
        };
        if done + n as u64 > size {
            return Err(Error::corrupt(format!(
                "blob {} is larger than the {size} bytes its descriptor says",
                short(digest)
            )));
        }
        file.write_all_at(&buf[..n], offset + done)
            .map_err(|e| Error::io("the pulled file", e))?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    if done != size {
        return Err(Error::Remote(format!(
            "registry {}: blob {} cut short after {done} of {size} bytes",
            repo.reg.host(),
            short(digest)
        )));
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}
