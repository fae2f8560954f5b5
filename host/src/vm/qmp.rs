//! A small QEMU Machine Protocol client: one Unix socket, one command at a time, events
//! skipped. Enough to save a machine (`migrate`) and restore one (`migrate-incoming`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Longest QMP reply line accepted (QEMU's replies here are a few KiB).
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn qmp_err(what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("QMP: {what}"))
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path` (retrying until `limit`, as QEMU creates it
    /// while starting) and negotiates capabilities. `alive` is asked between attempts so
    /// a QEMU that exited is reported at once.
    pub fn connect(path: &Path, limit: Duration, mut alive: impl FnMut() -> bool) -> Result<Qmp> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if !alive() {
                        return Err(qmp_err("QEMU exited before its QMP socket opened"));
                    }
                    if Instant::now() > deadline {
                        return Err(qmp_err(format!(
                            "{} did not accept within {} s: {e}",
                            path.display(),
                            limit.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        stream
            .set_read_timeout(Some(limit))
            .map_err(|e| Error::io(path, e))?;
        let writer = stream.try_clone().map_err(|e| Error::io(path, e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .map_err(|e| qmp_err(format!("reading: {e}")))?;
            if n == 0 {
                return Err(qmp_err("QEMU closed the QMP connection"));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line)
                .map_err(|e| qmp_err(format!("undecodable message: {e}")));
        }
    }

    /// Runs `command` and returns its `return` value; an `error` reply becomes an error
    /// naming the command and QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| qmp_err(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| qmp_err(format!("sending {command}: {e}")))?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(qmp_err(format!("{command}: {desc}")));
            }
            // An event (`{"event": ...}`): not a reply.
        }
    }

    /// Turns a migration capability on.
    pub fn enable_capability(&mut self, capability: &str) -> Result<()> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": capability, "state": true }] })),
        )
        .map(drop)
    }

    /// Polls `query-migrate` until the migration is over (`completed` → `Ok`, `failed` or
    /// `cancelled` → the error QEMU gives), at most `limit`.
    pub fn wait_migration(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let info = self.execute("query-migrate", None)?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(qmp_err(format!("migration {s}: {why}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(qmp_err(format!(
                    "migration did not finish within {} s",
                    limit.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String> {
        let st = self.execute("query-status", None)?;
        st.get("status")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| qmp_err(format!("query-status answered {st}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A scripted QEMU: greets, then answers each command line with the next reply,
    /// putting an event before the first one.
    fn fake_qemu(replies: Vec<&'static str>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .expect("greet");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            for (i, reply) in replies.into_iter().enumerate() {
                let mut line = String::new();
                if r.read_line(&mut line).expect("read") == 0 {
                    return;
                }
                if i == 1 {
                    s.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                        .expect("event");
                }
                s.write_all(reply.as_bytes()).expect("reply");
                s.write_all(b"\r\n").expect("eol");
            }
            let _ = s.read(&mut [0u8; 1]);
        });
        (dir, path)
    }

    #[test]
    fn replies_skip_events_and_errors_name_the_command() {
        let (_dir, path) = fake_qemu(vec![
            r#"{"return": {}}"#,
            r#"{"return": {"status": "running", "running": true}}"#,
            r#"{"error": {"class": "GenericError", "desc": "State blocked by non-migratable device"}}"#,
            r#"{"return": {"status": "failed", "error-desc": "bad stream"}}"#,
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5), || true).expect("connect");
        assert_eq!(q.status().expect("status"), "running");
        let e = q.execute("migrate", None).unwrap_err().to_string();
        assert!(e.contains("migrate: State blocked"), "{e}");
        let e = q
            .wait_migration(Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("migration failed: bad stream"), "{e}");
    }
}
