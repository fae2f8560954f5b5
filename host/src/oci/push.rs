//! `push`: a snapshot and its chain of bases to a registry, uploading only blobs the
//! repository lacks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::Digest;

use super::client::{sha256_digest, short, Body, Registry, Repo};
use super::manifest::{Layer, Manifest, EMPTY_DIGEST, EMPTY_JSON, MANIFEST_TYPE};
use super::reference::{Reference, Target};
use crate::error::{Error, Result};
use crate::snapshot::format::HEADER_LEN;
use crate::snapshot::Snapshot;

#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Plain HTTP to a registry that is not on loopback.
    pub plain_http: bool,
    /// Repositories of the same registry to link blobs from instead of uploading them.
    pub mount_from: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct PushStats {
    /// `oci://registry/repo@sha256:…` of the pushed manifest.
    pub pinned: String,
    pub snapshots: usize,
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    pub present: usize,
    pub present_bytes: u64,
    pub mounted: usize,
    pub mounted_bytes: u64,
}

/// Where a blob's bytes come from.
enum Source<'a> {
    Bytes(Vec<u8>),
    File {
        file: &'a File,
        offset: u64,
    },
    /// A blob of another repository (maybe another registry).
    Remote {
        reg: Arc<Registry>,
        repo: String,
    },
}

pub fn push(snap: &Snapshot, dest: &str, opts: &PushOptions) -> Result<PushStats> {
    let dst = Reference::parse(dest)?;
    let Target::Tag(tag) = &dst.target else {
        return Err(Error::Invalid(format!(
            "push needs a tag to name the snapshot, not a digest: {dest}"
        )));
    };
    let reg = Registry::new(&dst, opts.plain_http);
    let repo = Repo::new(&reg, &dst.repo);
    let mut stats = PushStats::default();
    let mut chain = Vec::new();
    let mut cur = Some(snap);
    while let Some(s) = cur {
        let (layer, sources) = describe(s)?;
        for (desc, src) in [(&layer.index, sources.0), (&layer.data, sources.1)] {
            send_blob(&repo, &desc.digest, desc.size, src, opts, &mut stats)?;
        }
        chain.push(layer);
        stats.snapshots += 1;
        cur = s.base().map(|b| b.as_ref());
    }
    send_blob(
        &repo,
        EMPTY_DIGEST,
        EMPTY_JSON.len() as u64,
        Source::Bytes(EMPTY_JSON.to_vec()),
        opts,
        &mut stats,
    )?;
    let manifest = Manifest::for_chain(&chain).to_bytes();
    repo.put_manifest(tag, &manifest, MANIFEST_TYPE)?;
    stats.pinned = dst.pinned(&sha256_digest(&manifest)).to_string();
    Ok(stats)
}

/// A snapshot's two blobs: descriptors and where their bytes are.
fn describe(s: &Snapshot) -> Result<(Layer, (Source<'_>, Source<'_>))> {
    if let Some(r) = s.remote() {
        let (idx_digest, idx_size) = r.index_blob();
        let layer = Layer::new(
            s.id(),
            (idx_digest.to_string(), idx_size),
            (r.digest().to_string(), r.size()),
        );
        let src = || Source::Remote {
            reg: r.registry().clone(),
            repo: r.repo().to_string(),
        };
        return Ok((layer, (src(), src())));
    }
    let file = s
        .local_file()
        .ok_or_else(|| Error::Invalid("snapshot has no file to push".into()))?;
    let h = s.header();
    let io = |e| Error::io(s.path(), e);
    // The index blob: header + stored index.
    let mut index = vec![0u8; HEADER_LEN + h.index_len as usize];
    file.read_exact_at(&mut index[..HEADER_LEN], 0)
        .map_err(io)?;
    file.read_exact_at(&mut index[HEADER_LEN..], h.index_offset)
        .map_err(io)?;
    let index_digest = sha256_digest(&index);
    // The data blob: the frames, hashed as they are read.
    let data_len = h.index_offset - HEADER_LEN as u64;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = HEADER_LEN as u64;
    while off < h.index_offset {
        let n = buf.len().min((h.index_offset - off) as usize);
        file.read_exact_at(&mut buf[..n], off).map_err(io)?;
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    let data_digest = format!(
        "sha256:{}",
        crate::snapshot::reader::hex(&hasher.finalize())
    );
    let index_len = index.len() as u64;
    Ok((
        Layer::new(s.id(), (index_digest, index_len), (data_digest, data_len)),
        (
            Source::Bytes(index),
            Source::File {
                file,
                offset: HEADER_LEN as u64,
            },
        ),
    ))
}

fn send_blob(
    repo: &Repo,
    digest: &str,
    size: u64,
    src: Source,
    opts: &PushOptions,
    stats: &mut PushStats,
) -> Result<()> {
    if repo.blob_size(digest)?.is_some() {
        stats.present += 1;
        stats.present_bytes += size;
        return Ok(());
    }
    let mut from: Vec<String> = opts.mount_from.clone();
    if let Source::Remote { reg, repo: r } = &src {
        if reg.host() == repo.reg.host() && !from.contains(r) {
            from.insert(0, r.clone());
        }
    }
    for f in from.iter().filter(|f| **f != repo.name) {
        if repo.mount_blob(digest, f)? {
            tracing::info!("blob {} linked from {f}", short(digest));
            stats.mounted += 1;
            stats.mounted_bytes += size;
            return Ok(());
        }
    }
    match src {
        Source::Bytes(b) => repo.upload_blob(digest, &Body::Bytes(&b))?,
        Source::File { file, offset } => repo.upload_blob(
            digest,
            &Body::File {
                file,
                offset,
                len: size,
            },
        )?,
        Source::Remote { reg, repo: r } => {
            // Another registry: copy through a temporary file, checking the digest.
            let tmp = tempfile::tempfile().map_err(|e| Error::io("temporary file", e))?;
            let got = super::pull::download(&Repo::new(&reg, &r), digest, size, &tmp, 0)?;
            if got != digest {
                return Err(Error::corrupt(format!(
                    "blob {} from {} arrived with digest {}",
                    short(digest),
                    reg.host(),
                    short(&got)
                )));
            }
            repo.upload_blob(
                digest,
                &Body::File {
                    file: &tmp,
                    offset: 0,
                    len: size,
                },
            )?
        }
    }
    stats.uploaded += 1;
    stats.uploaded_bytes += size;
    Ok(())
}
