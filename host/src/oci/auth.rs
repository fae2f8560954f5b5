//! Registry credentials, as Docker keeps them, and the distribution spec's challenges.
//!
//! Credentials come from `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`):
//! `auths.<host>.auth` (base64 `user:password`) or `username`/`password`, or a
//! credential helper named by `credHelpers.<host>` or `credsStore`
//! (`docker-credential-<name> get`, the host on stdin, JSON on stdout).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;

/// A user name and a secret for one registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.username)
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

fn config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://host:5000/v1/` and `host:5000` both name `host:5000`.
fn normalise(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_ascii_lowercase()
}

/// The credentials the Docker configuration holds for `registry` (`host[:port]`), if any.
pub fn lookup(registry: &str) -> Option<Credentials> {
    let path = config_path()?;
    let text = std::fs::read_to_string(&path).ok()?;
    let cfg: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("{}: not valid JSON ({e}); ignoring it", path.display());
            return None;
        }
    };
    let want = normalise(registry);
    if let Some(helper) = cfg
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| h.iter().find(|(k, _)| normalise(k) == want))
        .and_then(|(_, v)| v.as_str())
    {
        return from_helper(helper, registry);
    }
    if let Some(auths) = cfg.get("auths").and_then(|a| a.as_object()) {
        for (k, v) in auths {
            if normalise(k) != want {
                continue;
            }
            if let Some(auth) = v
                .get("auth")
                .and_then(|a| a.as_str())
                .filter(|a| !a.is_empty())
            {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok());
                match raw.as_deref().and_then(|r| r.split_once(':')) {
                    Some((u, p)) => {
                        return Some(Credentials {
                            username: u.to_string(),
                            password: p.to_string(),
                        })
                    }
                    None => tracing::warn!(
                        "{}: the auth entry for {k} is not base64 of user:password; ignoring it",
                        path.display()
                    ),
                }
            }
            if let (Some(u), Some(p)) = (
                v.get("username").and_then(|u| u.as_str()),
                v.get("password").and_then(|p| p.as_str()),
            ) {
                return Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                });
            }
        }
    }
    if let Some(store) = cfg.get("credsStore").and_then(|s| s.as_str()) {
        return from_helper(store, registry);
    }
    None
}

/// Runs `docker-credential-<helper> get` for `registry`.
fn from_helper(helper: &str, registry: &str) -> Option<Credentials> {
    if !helper
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return None;
    }
    let prog = format!("docker-credential-{helper}");
    let mut child = Command::new(&prog)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!("credential helper {prog}: {e}"))
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(Credentials {
        username: v.get("Username")?.as_str()?.to_string(),
        password: v.get("Secret")?.as_str()?.to_string(),
    })
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="https://…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    for (k, v) in params(rest) {
        match k.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            "scope" => scope = Some(v),
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

/// `k="v", k2=v2` pairs; quoted values may hold commas and `\"`.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(' ' | ',')) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_string(), val));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge("Basic realm=\"basic-realm\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example/token\",service=\"reg\",scope=\"repository:a/b:pull,push\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn docker_config_entries_are_found_by_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths":{{"https://localhost:5001/v1/":{{"auth":"{auth}"}},"r.example":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .expect("write");
        std::env::set_var("DOCKER_CONFIG", dir.path());
        let c = lookup("localhost:5001").expect("found");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        let c = lookup("R.example").expect("found");
        assert_eq!(c.username, "bob");
        assert!(lookup("localhost:5002").is_none());
        std::env::remove_var("DOCKER_CONFIG");
    }
}
