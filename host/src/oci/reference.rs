//! Registry references: `[oci://]HOST[:PORT]/REPO[:TAG | @sha256:HEX]`.

use std::fmt;

use crate::error::{Error, Result};

/// The scheme prefix that makes any snapshot argument a registry reference.
pub const SCHEME: &str = "oci://";

/// What a reference points at inside its repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tag(String),
    Digest(String),
}

/// A parsed registry reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`, as written (lowercased).
    pub registry: String,
    /// The repository name, `a/b/c`.
    pub repo: String,
    pub target: Target,
}

impl Reference {
    /// Parses `HOST[:PORT]/REPO[:TAG|@sha256:HEX]`, with or without `oci://`. The tag
    /// defaults to `latest`.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "'{s}' is not a registry reference ({why}); write HOST[:PORT]/REPO[:TAG] or HOST/REPO@sha256:DIGEST"
            ))
        };
        let rest = s.strip_prefix(SCHEME).unwrap_or(s);
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
        if registry.is_empty() || !registry.contains(['.', ':']) && registry != "localhost" {
            return Err(bad(
                "the first component must be a registry host, such as localhost:5000 or ghcr.io",
            ));
        }
        if !registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        {
            return Err(bad("bad registry host"));
        }
        let (path, target) = if let Some((p, d)) = path.split_once('@') {
            check_digest(d).map_err(|_| bad("bad digest"))?;
            (p, Target::Digest(d.to_string()))
        } else {
            // A tag is after the last ':' of the last path component.
            let last = path.rfind('/').map_or(0, |i| i + 1);
            match path[last..].rfind(':') {
                Some(i) => {
                    let tag = &path[last + i + 1..];
                    if !valid_tag(tag) {
                        return Err(bad("bad tag"));
                    }
                    (&path[..last + i], Target::Tag(tag.to_string()))
                }
                None => (path, Target::Tag("latest".into())),
            }
        };
        if !valid_repo(path) {
            return Err(bad(
                "a repository is lowercase letters, digits and separators ._- between /",
            ));
        }
        Ok(Reference {
            registry: registry.to_ascii_lowercase(),
            repo: path.to_string(),
            target,
        })
    }

    /// True for a string that should be opened from a registry.
    pub fn is_remote(s: &str) -> bool {
        s.starts_with(SCHEME)
    }

    /// The tag or digest as it goes into a `/manifests/` URL.
    pub fn target_str(&self) -> &str {
        match &self.target {
            Target::Tag(t) | Target::Digest(t) => t,
        }
    }

    /// The same repository at a fixed manifest digest.
    pub fn pinned(&self, digest: &str) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            target: Target::Digest(digest.to_string()),
        }
    }

    /// Whether the registry is this machine (plain HTTP is allowed there).
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => &self.registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host.starts_with("127.")
            || host == "::1"
            || host.ends_with(".localhost")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Tag(t) => write!(f, "{SCHEME}{}/{}:{t}", self.registry, self.repo),
            Target::Digest(d) => write!(f, "{SCHEME}{}/{}@{d}", self.registry, self.repo),
        }
    }
}

/// Checks `sha256:<64 lowercase hex>`.
pub fn check_digest(d: &str) -> Result<()> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(())
        }
        _ => Err(Error::Invalid(format!(
            "'{d}' is not a sha256 digest (sha256: and 64 lowercase hex digits)"
        ))),
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

fn valid_repo(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|comp| {
            let b = comp.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || b"._-".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = Reference::parse("oci://localhost:5000/team/ws:v1").expect("parse");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repo, "team/ws");
        assert_eq!(r.target, Target::Tag("v1".into()));
        assert!(r.is_loopback());
        let r = Reference::parse("ghcr.io/a/b").expect("parse");
        assert_eq!(r.target, Target::Tag("latest".into()));
        assert!(!r.is_loopback());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("127.0.0.1:5000/x@{d}")).expect("parse");
        assert_eq!(r.target, Target::Digest(d.clone()));
        assert_eq!(r.to_string(), format!("oci://127.0.0.1:5000/x@{d}"));
    }

    #[test]
    fn refuses_what_is_not_a_reference() {
        for bad in [
            "oci://",
            "oci://localhost:5000",
            "oci://ws:v1",
            "oci://localhost:5000/UPPER:v1",
            "oci://localhost:5000/a//b",
            "oci://localhost:5000/a:bad tag",
            "oci://localhost:5000/a@sha256:short",
            "oci://localhost:5000/a@md5:00",
        ] {
            let e = Reference::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("is not a registry reference"), "{bad}: {e}");
        }
    }
}
