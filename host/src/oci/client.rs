//! A blocking client for the OCI distribution API: manifests, blobs (whole or by byte
//! range), uploads and cross-repository mounts, with Basic and Bearer-token auth and
//! retries with backoff on 5xx, 429 and transport errors.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Duration;

use super::auth::{self, Challenge, Credentials};
use super::reference::Reference;
use crate::error::{Error, Result};

/// How often and how patiently a request is retried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Retry {
    /// For commands (push, pull, open): about 15 s of patience.
    pub const COMMAND: Retry = Retry {
        attempts: 6,
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(5),
    };
    /// For a read a program is waiting on: about 2 s, then EIO (the next read tries again).
    pub const READ: Retry = Retry {
        attempts: 4,
        first_delay: Duration::from_millis(150),
        max_delay: Duration::from_secs(1),
    };
}

/// A request body that can be sent again on retry.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of `file` from `offset`.
    File {
        file: &'a File,
        offset: u64,
        len: u64,
    },
}

/// One registry (scheme + host), shared by every request to it.
pub struct Registry {
    agent: ureq::Agent,
    /// `http://host:port` or `https://host`.
    base: String,
    host: String,
    creds: Option<Credentials>,
    /// Authorization header values by scope ("" for Basic, which covers every scope).
    tokens: Mutex<HashMap<String, String>>,
}

/// A response's status and what a caller needs of it.
pub struct Reply {
    pub status: u16,
    pub resp: ureq::Response,
}

impl Registry {
    /// A client for `reference`'s registry: https, or plain http when the registry is on
    /// loopback or `plain_http` is set (`--plain-http`, or `HEXZ_PLAIN_HTTP=1`).
    pub fn new(reference: &Reference, plain_http: bool) -> Registry {
        let plain = plain_http
            || reference.is_loopback()
            || std::env::var("HEXZ_PLAIN_HTTP").is_ok_and(|v| v == "1");
        let scheme = if plain { "http" } else { "https" };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(30))
            .timeout_write(Duration::from_secs(60))
            .max_idle_connections_per_host(8)
            .user_agent(concat!("hexz/", env!("CARGO_PKG_VERSION")))
            .build();
        Registry {
            agent,
            base: format!("{scheme}://{}", reference.registry),
            host: reference.registry.clone(),
            creds: auth::lookup(&reference.registry),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Sends a request with auth and retries. Statuses in `ok` are returned; 401 is
    /// answered once with credentials; 5xx/429/transport errors are retried; anything
    /// else is an error naming the registry's own message.
    #[allow(clippy::too_many_arguments)] // one HTTP request, spelled out at each call
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &Body,
        scope: &str,
        ok: &[u16],
        retry: Retry,
    ) -> Result<Reply> {
        let url = self.url(path);
        let what = || format!("{method} {}", path_of(&url));
        let mut delay = retry.first_delay;
        let mut authed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.agent.request(method, &url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(h) = self.auth_header(scope) {
                req = req.set("Authorization", &h);
            }
            let res = match body {
                Body::Empty => req.call(),
                Body::Bytes(b) => req
                    .set("Content-Length", &b.len().to_string())
                    .send_bytes(b),
                Body::File { file, offset, len } => {
                    req.set("Content-Length", &len.to_string()).send(FileRange {
                        file,
                        pos: *offset,
                        end: offset + len,
                    })
                }
            };
            let failure = match res {
                Ok(resp) if ok.contains(&resp.status()) => {
                    return Ok(Reply {
                        status: resp.status(),
                        resp,
                    })
                }
                Ok(resp) => {
                    let status = resp.status();
                    return Err(self.refused(&what(), status, resp));
                }
                Err(ureq::Error::Status(status, resp)) if ok.contains(&status) => {
                    return Ok(Reply { status, resp })
                }
                Err(ureq::Error::Status(401, resp)) if !authed => {
                    authed = true;
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
                    self.authenticate(&challenge, scope)?;
                    attempt -= 1;
                    continue;
                }
                Err(ureq::Error::Status(status, resp)) if status >= 500 || status == 429 => {
                    let retry_after = resp
                        .header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    if let Some(ra) = retry_after {
                        delay = delay.max(ra.min(retry.max_delay));
                    }
                    format!("{status} {}", registry_message(resp))
                }
                Err(ureq::Error::Status(status, resp)) => {
                    return Err(self.refused(&what(), status, resp))
                }
                Err(ureq::Error::Transport(t)) => transport_message(&t),
            };
            if attempt >= retry.attempts {
                return Err(Error::Remote(format!(
                    "registry {}: {} failed after {attempt} attempts: {failure}",
                    self.host,
                    what()
                )));
            }
            tracing::debug!(
                "registry {}: {} failed ({failure}); retrying in {delay:?}",
                self.host,
                what()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(retry.max_delay);
        }
    }

    fn refused(&self, what: &str, status: u16, resp: ureq::Response) -> Error {
        let msg = registry_message(resp);
        let hint = match status {
            401 | 403 => format!(
                "; log in with `docker login {}` (hexz reads ~/.docker/config.json)",
                self.host
            ),
            404 => "; check the repository, tag or digest".to_string(),
            _ => String::new(),
        };
        Error::Remote(format!(
            "registry {}: {what}: {status} {msg}{hint}",
            self.host
        ))
    }

    fn auth_header(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.get(scope).or_else(|| tokens.get("")).cloned()
    }

    /// Answers a 401 challenge: Basic with the stored credentials, or a Bearer token from
    /// the realm (anonymously when there are no credentials).
    fn authenticate(&self, challenge: &str, scope: &str) -> Result<()> {
        let login = || {
            Error::Remote(format!(
                "registry {} requires credentials; log in with `docker login {}` (hexz reads ~/.docker/config.json)",
                self.host, self.host
            ))
        };
        match auth::parse_challenge(challenge) {
            Some(Challenge::Bearer {
                realm,
                service,
                scope: challenged,
            }) => {
                let want = challenged.unwrap_or_else(|| scope.to_string());
                let mut req = self.agent.get(&realm);
                if let Some(s) = &service {
                    req = req.query("service", s);
                }
                for s in want.split(' ').filter(|s| !s.is_empty()) {
                    req = req.query("scope", s);
                }
                if let Some(c) = &self.creds {
                    req = req.set("Authorization", &c.basic_header());
                }
                let resp = req.call().map_err(|e| match e {
                    ureq::Error::Status(401 | 403, _) => login(),
                    other => Error::Remote(format!(
                        "registry {}: token service {}: {}",
                        self.host,
                        path_of(&realm),
                        match other {
                            ureq::Error::Status(s, r) => format!("{s} {}", registry_message(r)),
                            ureq::Error::Transport(t) => transport_message(&t),
                        }
                    )),
                })?;
                let mut text = String::new();
                let _ = resp.into_reader().take(1 << 20).read_to_string(&mut text);
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    Error::Remote(format!(
                        "registry {}: token service answered no JSON: {e}",
                        self.host
                    ))
                })?;
                let token = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        Error::Remote(format!(
                            "registry {}: token service answered no token",
                            self.host
                        ))
                    })?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(scope.to_string(), format!("Bearer {token}"));
                Ok(())
            }
            // Basic, or a challenge hexz does not know: the stored user and password.
            Some(Challenge::Basic) | None => {
                let creds = self.creds.as_ref().ok_or_else(login)?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(String::new(), creds.basic_header());
                Ok(())
            }
        }
    }
}

/// The registry's `{"errors":[{"code","message"}]}`, in one line.
fn registry_message(resp: ureq::Response) -> String {
    let mut text = String::new();
    let _ = resp.into_reader().take(4096).read_to_string(&mut text);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        if let Some(errs) = v.get("errors").and_then(|e| e.as_array()) {
            let parts: Vec<String> = errs
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.get("code").and_then(|c| c.as_str()).unwrap_or("ERROR"),
                        e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                    )
                })
                .collect();
            if !parts.is_empty() {
                return parts.join("; ");
            }
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn transport_message(t: &ureq::Transport) -> String {
    let mut s = t.to_string();
    s = s.replace('\n', " ");
    s
}

/// The path and query of a URL, for messages.
fn path_of(url: &str) -> &str {
    url.split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or(url)
}

/// Reads `pos..end` of a file without moving a shared cursor.
struct FileRange<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being uploaded",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The distribution API calls hexz makes, for one repository.
pub struct Repo<'a> {
    pub reg: &'a Registry,
    pub name: String,
    pull: String,
    push: String,
}

/// A manifest as fetched: its bytes, digest and media type.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub digest: String,
}

/// Manifests larger than this are refused (hexz's are a few KiB).
pub const MAX_MANIFEST: u64 = 4 << 20;

impl<'a> Repo<'a> {
    pub fn new(reg: &'a Registry, name: &str) -> Repo<'a> {
        Repo {
            reg,
            name: name.to_string(),
            pull: format!("repository:{name}:pull"),
            push: format!("repository:{name}:pull,push"),
        }
    }

    /// The manifest at a tag or digest; a digest reference is checked against the bytes.
    pub fn manifest(&self, target: &str, retry: Retry) -> Result<Fetched> {
        let r = self.reg.send(
            "GET",
            &format!("/v2/{}/manifests/{target}", self.name),
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )],
            &Body::Empty,
            &self.pull,
            &[200],
            retry,
        )?;
        let mut bytes = Vec::new();
        r.resp
            .into_reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.read_err("manifest", e))?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(Error::Remote(format!(
                "registry {}: manifest {}:{target} is larger than 4 MiB; not a hexz snapshot",
                self.reg.host, self.name
            )));
        }
        let digest = sha256_digest(&bytes);
        if target.starts_with("sha256:") && target != digest {
            return Err(Error::corrupt(format!(
                "registry {} sent a manifest for {target} whose digest is {digest}",
                self.reg.host
            )));
        }
        Ok(Fetched { bytes, digest })
    }

    pub fn put_manifest(&self, tag: &str, bytes: &[u8], media_type: &str) -> Result<()> {
        self.reg.send(
            "PUT",
            &format!("/v2/{}/manifests/{tag}", self.name),
            &[("Content-Type", media_type)],
            &Body::Bytes(bytes),
            &self.push,
            &[200, 201, 202],
            Retry::COMMAND,
        )?;
        Ok(())
    }

    /// The blob's size if the repository has it.
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        let r = self.reg.send(
            "HEAD",
            &format!("/v2/{}/blobs/{digest}", self.name),
            &[],
            &Body::Empty,
            &self.pull,
            &[200, 404],
            Retry::COMMAND,
        )?;
        if r.status == 404 {
            return Ok(None);
        }
        Ok(r.resp.header("content-length").and_then(|v| v.parse().ok()))
    }

    /// The blob from byte `offset` to its end, as a stream (a range request when
    /// `offset` is not 0; a registry that ignores it sends the whole blob, and the bytes
    /// before `offset` are skipped here).
    pub fn blob_from(&self, digest: &str, offset: u64) -> Result<Box<dyn Read + Send + Sync>> {
        let range = format!("bytes={offset}-");
        let headers: &[(&str, &str)] = if offset == 0 {
            &[]
        } else {
            &[("Range", &range)]
        };
        let r = self.reg.send(
            "GET",
            &format!("/v2/{}/blobs/{digest}", self.name),
            headers,
            &Body::Empty,
            &self.pull,
            &[200, 206],
            Retry::COMMAND,
        )?;
        let mut reader = r.resp.into_reader();
        if r.status == 200 && offset != 0 {
            let skipped = std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
                .map_err(|e| self.read_err("blob", e))?;
            if skipped != offset {
                return Err(Error::Remote(format!(
                    "registry {}: blob {} ended after {skipped} bytes, before byte {offset}",
                    self.reg.host,
                    short(digest)
                )));
            }
        }
        Ok(reader)
    }

    /// Exactly `len` bytes of a blob from `offset`, by an HTTP range request.
    pub fn blob_range(&self, digest: &str, offset: u64, len: u64, retry: Retry) -> Result<Vec<u8>> {
        let mut delay = retry.first_delay;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_range(digest, offset, len, retry)? {
                Ok(b) => return Ok(b),
                // A body cut short is retried like a failed request.
                Err(short_body) if attempt < retry.attempts => {
                    tracing::debug!("{short_body}; retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(retry.max_delay);
                }
                Err(short_body) => return Err(Error::Remote(short_body)),
            }
        }
    }

    /// One ranged GET: the bytes, or (inner `Err`) what cut the body short.
    fn try_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        retry: Retry,
    ) -> Result<Result<Vec<u8>, String>> {
        if len == 0 {
            return Ok(Ok(Vec::new()));
        }
        let mut body = self.blob_stream(digest, offset, len, retry)?;
        let mut buf = crate::bufpool::take(len as usize);
        Ok(match body.read_exact(&mut buf) {
            Ok(()) => Ok(buf),
            Err(e) => Err(format!(
                "registry {}: blob {} bytes {offset}+{len} cut short: {e}",
                self.reg.host,
                short(digest)
            )),
        })
    }

    /// The body of one ranged GET of `len` (> 0) bytes of a blob from `offset`, to be
    /// read as it arrives. A reader may stop early: the connection is then closed, not
    /// reused.
    pub fn blob_stream(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        retry: Retry,
    ) -> Result<Box<dyn Read + Send + Sync>> {
        let range = format!("bytes={}-{}", offset, offset + len.max(1) - 1);
        let r = self.reg.send(
            "GET",
            &format!("/v2/{}/blobs/{digest}", self.name),
            &[("Range", &range)],
            &Body::Empty,
            &self.pull,
            &[200, 206],
            retry,
        )?;
        if r.status == 200 && offset != 0 {
            return Err(Error::Remote(format!(
                "registry {} ignores HTTP range requests; `hexz-host pull` the snapshot instead of opening it lazily",
                self.reg.host
            )));
        }
        Ok(r.resp.into_reader())
    }

    /// Asks the registry to link a blob from repository `from` (same registry) instead
    /// of uploading it. True when it did.
    pub fn mount_blob(&self, digest: &str, from: &str) -> Result<bool> {
        let scope = format!("{} repository:{from}:pull", self.push);
        let r = self.reg.send(
            "POST",
            &format!(
                "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
                self.name
            ),
            &[],
            &Body::Empty,
            &scope,
            &[201, 202],
            Retry::COMMAND,
        )?;
        if r.status == 202 {
            // Not mounted: the registry opened an upload session instead; abandon it.
            if let Some(loc) = r.resp.header("location").map(str::to_string) {
                let _ = self.reg.send(
                    "DELETE",
                    &loc,
                    &[],
                    &Body::Empty,
                    &self.push,
                    &[200, 202, 204, 404],
                    Retry::COMMAND,
                );
            }
        }
        Ok(r.status == 201)
    }

    /// Uploads a blob: POST to open a session, then one PUT with the bytes and digest.
    pub fn upload_blob(&self, digest: &str, body: &Body) -> Result<()> {
        let r = self.reg.send(
            "POST",
            &format!("/v2/{}/blobs/uploads/", self.name),
            &[],
            &Body::Empty,
            &self.push,
            &[202],
            Retry::COMMAND,
        )?;
        let loc = r
            .resp
            .header("location")
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Remote(format!(
                    "registry {}: upload started without a Location",
                    self.reg.host
                ))
            })?;
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.reg.send(
            "PUT",
            &format!("{loc}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            body,
            &self.push,
            &[201, 204],
            Retry::COMMAND,
        )?;
        Ok(())
    }

    fn read_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::Remote(format!(
            "registry {}: reading the {what} of {}: {e}",
            self.reg.host, self.name
        ))
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        crate::snapshot::reader::hex(&sha2::Sha256::digest(bytes))
    )
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(digest: &str) -> &str {
    let h = digest.strip_prefix("sha256:").unwrap_or(digest);
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_digests_never_split_a_character() {
        assert_eq!(super::short("sha256:0123456789abcdef"), "0123456789ab");
        // Byte 12 falls inside a character: the whole string, not a panic.
        assert_eq!(super::short("sha256:aéééééé"), "aéééééé");
        assert_eq!(super::short("x"), "x");
    }
}
