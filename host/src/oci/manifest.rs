//! The OCI artifact a snapshot is stored as (docs/FORMAT.md §9).
//!
//! An OCI image manifest with `artifactType` `application/vnd.hexz.snapshot.v1`, the
//! empty config, and two layers per snapshot of the chain, top first:
//! an *index* blob (`application/vnd.hexz.snapshot.index.v1`: the 128-byte header then
//! the stored index, i.e. the file minus its data area) and a *data* blob
//! (`application/vnd.hexz.snapshot.data.v1`: the file's bytes `128..index_offset`, the
//! frames). Each layer carries the snapshot id as `dev.hexz.snapshot.id`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::reference::check_digest;
use crate::error::{Error, Result};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.hexz.snapshot.v1";
pub const INDEX_TYPE: &str = "application/vnd.hexz.snapshot.index.v1";
pub const DATA_TYPE: &str = "application/vnd.hexz.snapshot.data.v1";
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty JSON object `{}`, the OCI "empty descriptor".
pub const EMPTY_JSON: &[u8] = b"{}";
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const ID_ANNOTATION: &str = "dev.hexz.snapshot.id";
/// A snapshot chain longer than this is refused (the reader's own limit is 64 bases).
const MAX_LAYERS: usize = 2 * 65;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Inline content (used for the empty config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One snapshot of a chain: its id and its two blobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub id: [u8; 32],
    pub index: Descriptor,
    pub data: Descriptor,
}

impl Manifest {
    /// The manifest for a chain, top snapshot first.
    pub fn for_chain(chain: &[Layer]) -> Manifest {
        let mut layers = Vec::with_capacity(chain.len() * 2);
        for l in chain {
            layers.push(l.index.clone());
            layers.push(l.data.clone());
        }
        let mut annotations = BTreeMap::new();
        if let Some(top) = chain.first() {
            annotations.insert(ID_ANNOTATION.to_string(), hex32(&top.id));
        }
        Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_TYPE.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: Descriptor {
                media_type: EMPTY_TYPE.into(),
                digest: EMPTY_DIGEST.into(),
                size: 2,
                annotations: BTreeMap::new(),
                data: Some("e30=".into()),
            },
            layers,
            annotations,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a manifest; returns the chain, top first.
    pub fn parse_chain(bytes: &[u8], what: &str) -> Result<Vec<Layer>> {
        let not =
            |why: String| Error::Invalid(format!("{what} is not a hexz snapshot artifact: {why}"));
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            let v: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
            let mt = v
                .as_ref()
                .and_then(|v| v.get("mediaType"))
                .and_then(|m| m.as_str())
                .unwrap_or("?")
                .to_string();
            not(format!(
                "manifest of type {mt} does not parse as an OCI image manifest ({e})"
            ))
        })?;
        if m.schema_version != 2 {
            return Err(not(format!("schemaVersion {}", m.schema_version)));
        }
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(not(format!(
                "artifactType is {}, not {ARTIFACT_TYPE}",
                m.artifact_type.as_deref().unwrap_or("absent")
            )));
        }
        if m.layers.is_empty() || !m.layers.len().is_multiple_of(2) || m.layers.len() > MAX_LAYERS {
            return Err(not(format!(
                "{} layers; a chain has an index and a data layer per snapshot",
                m.layers.len()
            )));
        }
        let mut chain = Vec::new();
        for pair in m.layers.chunks(2) {
            let (index, data) = (&pair[0], &pair[1]);
            if index.media_type != INDEX_TYPE || data.media_type != DATA_TYPE {
                return Err(not(format!(
                    "layers {} and {} are not an index and a data blob",
                    index.media_type, data.media_type
                )));
            }
            for d in [index, data] {
                check_digest(&d.digest).map_err(|e| not(e.to_string()))?;
            }
            let id = index
                .annotations
                .get(ID_ANNOTATION)
                .and_then(|h| parse_hex32(h))
                .ok_or_else(|| not(format!("index layer without a valid {ID_ANNOTATION}")))?;
            if index.size < 128 || index.size > (1 << 30) + 128 {
                return Err(not(format!("index blob of {} bytes", index.size)));
            }
            chain.push(Layer {
                id,
                index: index.clone(),
                data: data.clone(),
            });
        }
        Ok(chain)
    }
}

impl Layer {
    pub fn new(id: [u8; 32], index: (String, u64), data: (String, u64)) -> Layer {
        let ann = BTreeMap::from([(ID_ANNOTATION.to_string(), hex32(&id))]);
        Layer {
            id,
            index: Descriptor {
                media_type: INDEX_TYPE.into(),
                digest: index.0,
                size: index.1,
                annotations: ann.clone(),
                data: None,
            },
            data: Descriptor {
                media_type: DATA_TYPE.into(),
                digest: data.0,
                size: data.1,
                annotations: ann,
                data: None,
            },
        }
    }
}

pub fn hex32(id: &[u8; 32]) -> String {
    crate::snapshot::reader::hex(id)
}

pub fn parse_hex32(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_round_trips_through_its_manifest() {
        let d = |c: char| (format!("sha256:{}", c.to_string().repeat(64)), 1000);
        let chain = vec![
            Layer::new([1; 32], d('a'), d('b')),
            Layer::new([2; 32], d('c'), d('d')),
        ];
        let m = Manifest::for_chain(&chain);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse_chain(&bytes, "t").expect("parse"), chain);
        assert_eq!(crate::oci::client::sha256_digest(EMPTY_JSON), EMPTY_DIGEST);
    }

    #[test]
    fn other_artifacts_are_refused_by_name() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let e = Manifest::parse_chain(m, "oci://r/x:1")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a hexz snapshot artifact"), "{e}");
    }
}
