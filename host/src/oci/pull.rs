//! `pull`: copy a snapshot (and its chain of bases) down from a registry into local
//! `.hxz` files, each checked against its digests and written atomically.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
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

/// Writes one snapshot file from its two blobs: header, data, index. The data is
/// downloaded into `.hexz-pull-<digest>.part` beside the target, which a failed pull
/// leaves behind: the next pull of the same blob into the same directory resumes after
/// the bytes it holds (re-hashing them, so the digest still covers every byte), and
/// starts over if they turn out damaged.
fn write_snapshot(repo: &Repo, layer: &Layer, target: &Path) -> Result<()> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
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
    let digest = &layer.data.digest;
    let size = layer.data.size;
    let part = dir.join(format!(
        ".hexz-pull-{}.part",
        digest.trim_start_matches("sha256:")
    ));
    let io = |e| Error::io(&part, e);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(io)?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Invalid(format!(
            "{}: another `hexz-host pull` is downloading this blob; wait for it to finish",
            part.display()
        )));
    }
    let data_at = HEADER_LEN as u64;
    let mut kept = f
        .metadata()
        .map_err(io)?
        .len()
        .saturating_sub(data_at)
        .min(size);
    let mut hasher = sha2::Sha256::new();
    if kept > 0 {
        hash_prefix(&f, data_at, kept, &mut hasher).map_err(io)?;
        tracing::info!(
            "resuming the download of blob {} after {kept} of {size} bytes ({})",
            short(digest),
            part.display()
        );
    }
    f.write_all_at(&index[..HEADER_LEN], 0).map_err(io)?;
    let resumed = kept > 0;
    let got = loop {
        let got = download_from(repo, digest, size, &f, data_at, kept, hasher).map_err(|e| {
            let have = f.metadata().map_or(0, |m| m.len().saturating_sub(data_at).min(size));
            match e {
                Error::Remote(msg) if have > 0 => Error::Remote(format!(
                    "{msg}; {have} of {size} bytes are kept in {}: run the same pull again to resume",
                    part.display()
                )),
                e => e,
            }
        })?;
        if got == *digest || kept == 0 {
            break got;
        }
        // The bytes kept from before were not the blob's (a crash while they were
        // written, or a damaged disk): once more from the start.
        tracing::warn!(
            "the partial download {} was damaged; downloading blob {} again from the start",
            part.display(),
            short(digest)
        );
        f.set_len(data_at).map_err(io)?;
        kept = 0;
        hasher = sha2::Sha256::new();
    };
    if got != *digest {
        let _ = std::fs::remove_file(&part);
        return Err(Error::corrupt(format!(
            "data blob {} arrived with digest {}{}",
            short(digest),
            short(&got),
            if resumed {
                " (after starting over)"
            } else {
                ""
            }
        )));
    }
    f.write_all_at(&index[HEADER_LEN..], data_at + size)
        .map_err(io)?;
    f.set_len(data_at + size + (index.len() - HEADER_LEN) as u64)
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&part, target).map_err(|e| Error::io(target, e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Feeds `len` bytes of `file` from `offset` to `hasher`.
fn hash_prefix(
    file: &File,
    offset: u64,
    len: u64,
    hasher: &mut sha2::Sha256,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        file.read_exact_at(&mut buf[..want], offset + done)?;
        hasher.update(&buf[..want]);
        done += want as u64;
    }
    Ok(())
}

/// Streams a blob into `file` at `offset`; returns the digest of what arrived.
pub fn download(repo: &Repo, digest: &str, size: u64, file: &File, offset: u64) -> Result<String> {
    download_from(repo, digest, size, file, offset, 0, sha2::Sha256::new())
}

/// Streams a blob from byte `from` into `file` at `offset + from`, `hasher` having seen
/// the bytes before `from`; returns the digest of the whole blob. A body cut short is
/// asked for again from where it stopped (by a range request), with backoff, as long as
/// each try brings bytes; else it is an error naming the registry.
fn download_from(
    repo: &Repo,
    digest: &str,
    size: u64,
    file: &File,
    offset: u64,
    from: u64,
    mut hasher: sha2::Sha256,
) -> Result<String> {
    let retry = Retry::COMMAND;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = from;
    let mut failures = 0;
    let mut delay = retry.first_delay;
    while done < size {
        let mut reader = repo.blob_from(digest, done)?;
        let before = done;
        let cut = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Some(e.to_string()),
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
        };
        if done == size {
            break;
        }
        if done > before {
            failures = 0;
            delay = retry.first_delay;
        }
        failures += 1;
        let why = cut.unwrap_or_else(|| "the body ended early".into());
        if failures >= retry.attempts {
            return Err(Error::Remote(format!(
                "registry {}: blob {} cut short after {done} of {size} bytes: {why}",
                repo.reg.host(),
                short(digest)
            )));
        }
        tracing::debug!(
            "registry {}: blob {} cut short after {done} of {size} bytes ({why}); asking for the rest in {delay:?}",
            repo.reg.host(),
            short(digest)
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(retry.max_delay);
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}
