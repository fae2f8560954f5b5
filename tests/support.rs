//! Helpers for end-to-end tests: find the real binaries, run them, build sample trees.

pub mod mount_suite;
pub mod vm_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary built in the same profile as this test
/// (`cargo build --workspace` first; the README's test command does).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// Deterministic bytes for test files (xorshift), the same for the same seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small deterministic generator for test workloads (xorshift64; seed must not be 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-enough in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index into a collection of `n` items.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub struct Run {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `hexz-host` with `args`; never panics on a non-zero exit (tests assert on it).
pub fn hexz_host(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Run {
    let out: Output = Command::new(bin("hexz-host"))
        .args(args.iter().map(|a| a.as_ref()))
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn hexz-host");
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A small project-like tree: sources, a nested directory, a symlink, a hard link.
pub fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("src/bin")).unwrap();
    std::fs::write(root.join("README.md"), "# sample\n").unwrap();
    std::fs::write(
        root.join("src/main.rs"),
        "fn main() { println!(\"hi\"); }\n".repeat(50),
    )
    .unwrap();
    std::fs::write(root.join("src/bin/tool.rs"), b"// tool\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("blob.bin"), big).unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("main-link")).unwrap();
    std::fs::hard_link(root.join("README.md"), root.join("src/README-again.md")).unwrap();
}

pub mod proto {
    //! A protocol client for tests: blocking, over a Unix socket, pipelining allowed.

    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub use hexz_protocol::*;

    pub fn default_hello() -> Hello {
        client::default_hello("hexz-e2e")
    }

    /// The protocol crate's client plus helpers that turn replies into `Result`s.
    pub struct Client {
        pub inner: client::Client<UnixStream>,
        pub hello: HelloReply,
    }

    impl Client {
        pub fn connect(path: &Path) -> Client {
            let stream = UnixStream::connect(path)
                .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let inner = client::Client::new(stream, default_hello()).expect("hello");
            let hello = inner.hello.clone();
            Client { inner, hello }
        }

        pub fn send(&mut self, op: Op) -> u64 {
            self.inner.send(op).expect("send")
        }

        pub fn recv(&mut self) -> Reply {
            self.inner.recv().expect("recv")
        }

        pub fn call(&mut self, op: Op) -> ReplyBody {
            self.inner.call(op).expect("call")
        }

        pub fn entry(&mut self, op: Op) -> Result<Entry, Errno> {
            match self.call(op) {
                ReplyBody::Entry(e) => Ok(e),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected entry, got {other:?}"),
            }
        }

        pub fn ok(&mut self, op: Op) -> Result<(), Errno> {
            match self.call(op) {
                ReplyBody::Ok { .. } => Ok(()),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected ok, got {other:?}"),
            }
        }

        pub fn lookup(&mut self, parent: u64, name: &str) -> Result<Entry, Errno> {
            self.entry(Op::Lookup {
                parent,
                name: name.as_bytes().to_vec(),
            })
        }

        /// Walks a `/`-separated path with lookups.
        pub fn walk(&mut self, path: &str) -> Result<Entry, Errno> {
            let mut cur = self.lookup_root();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                cur = self.lookup(cur.node, part)?;
            }
            Ok(cur)
        }

        pub fn lookup_root(&mut self) -> Entry {
            match self.call(Op::Getattr {
                node: ROOT_NODE,
                fh: None,
            }) {
                ReplyBody::Attr { attr, .. } => Entry {
                    node: ROOT_NODE,
                    generation: 0,
                    attr,
                    entry_ttl_ms: 0,
                    attr_ttl_ms: 0,
                    dir_attr: None,
                },
                other => panic!("getattr root: {other:?}"),
            }
        }

        pub fn getattr(&mut self, node: u64) -> Result<Attr, Errno> {
            match self.call(Op::Getattr { node, fh: None }) {
                ReplyBody::Attr { attr, .. } => Ok(attr),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected attr, got {other:?}"),
            }
        }

        pub fn open(&mut self, node: u64, flags: i32) -> Result<u64, Errno> {
            match self.call(Op::Open {
                node,
                flags: flags as u32,
                read: None,
            }) {
                ReplyBody::Opened { fh, .. } => Ok(fh),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected opened, got {other:?}"),
            }
        }

        pub fn create(
            &mut self,
            parent: u64,
            name: &str,
            mode: u32,
            flags: i32,
        ) -> Result<(Entry, u64), Errno> {
            let op = Op::Create {
                parent,
                name: name.as_bytes().to_vec(),
                mode,
                flags: flags as u32,
                uid: 0,
                gid: 0,
            };
            match self.call(op) {
                ReplyBody::Created { entry, fh } => Ok((entry, fh)),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected created, got {other:?}"),
            }
        }

        pub fn read(&mut self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
            match self.call(Op::Read { fh, offset, size }) {
                ReplyBody::Data(d) => Ok(d),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected data, got {other:?}"),
            }
        }

        /// Reads a whole file through a fresh handle.
        pub fn read_all(&mut self, node: u64) -> Result<Vec<u8>, Errno> {
            let fh = self.open(node, libc::O_RDONLY)?;
            let mut out = Vec::new();
            loop {
                let d = self.read(fh, out.len() as u64, 1 << 20)?;
                if d.is_empty() {
                    break;
                }
                out.extend_from_slice(&d);
            }
            self.ok(Op::Release { fh })?;
            Ok(out)
        }

        pub fn read_path(&mut self, path: &str) -> Result<Vec<u8>, Errno> {
            let node = self.walk(path)?.node;
            self.read_all(node)
        }

        pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
            match self.call(Op::Write {
                fh,
                offset,
                data: data.to_vec(),
            }) {
                ReplyBody::Written { size, .. } => Ok(size),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected written, got {other:?}"),
            }
        }

        pub fn mkdir(&mut self, parent: u64, name: &str) -> Result<Entry, Errno> {
            self.entry(Op::Mkdir {
                parent,
                name: name.as_bytes().to_vec(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            })
        }

        pub fn opendir(&mut self, node: u64) -> Result<u64, Errno> {
            match self.call(Op::Opendir { node, list: None }) {
                ReplyBody::Opened { fh, .. } => Ok(fh),
                ReplyBody::Err(e) => Err(e),
                other => panic!("expected opened, got {other:?}"),
            }
        }

        /// All names of a directory via readdir paging.
        pub fn list(&mut self, node: u64, plus: bool) -> Result<Vec<(String, u64)>, Errno> {
            let fh = self.opendir(node)?;
            let mut out = Vec::new();
            let mut cookie = 0;
            loop {
                let op = if plus {
                    Op::Readdirplus {
                        fh,
                        cookie,
                        max_entries: 7,
                    }
                } else {
                    Op::Readdir {
                        fh,
                        cookie,
                        max_entries: 7,
                    }
                };
                let (page, eof): (Vec<(String, u64, u64)>, bool) = match self.call(op) {
                    ReplyBody::Dir { entries, eof } => (
                        entries
                            .into_iter()
                            .map(|e| {
                                (
                                    String::from_utf8_lossy(&e.name).into_owned(),
                                    e.ino,
                                    e.cookie,
                                )
                            })
                            .collect(),
                        eof,
                    ),
                    ReplyBody::DirPlus { entries, eof } => (
                        entries
                            .into_iter()
                            .map(|e| {
                                (
                                    String::from_utf8_lossy(&e.name).into_owned(),
                                    e.entry.node,
                                    e.cookie,
                                )
                            })
                            .collect(),
                        eof,
                    ),
                    ReplyBody::Err(e) => return Err(e),
                    other => panic!("{other:?}"),
                };
                if let Some(last) = page.last() {
                    cookie = last.2;
                }
                let empty = page.is_empty();
                out.extend(page.into_iter().map(|(n, i, _)| (n, i)));
                if eof || empty {
                    break;
                }
            }
            self.ok(Op::Releasedir { fh })?;
            Ok(out)
        }
    }

    /// A running `hexz-host serve` on a Unix socket; killed (SIGKILL) when dropped.
    pub struct Server {
        pub child: Child,
        pub socket: PathBuf,
    }

    impl Server {
        pub fn start(snapshot: &Path, socket: &Path, extra: &[&str]) -> Server {
            let _ = std::fs::remove_file(socket);
            let child = Command::new(super::bin("hexz-host"))
                .arg("serve")
                .arg(snapshot)
                .arg("--listen")
                .arg(format!("unix:{}", socket.display()))
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn hexz-host serve");
            let mut s = Server {
                child,
                socket: socket.to_path_buf(),
            };
            s.wait_ready();
            s
        }

        fn wait_ready(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if UnixStream::connect(&self.socket).is_ok() {
                    return;
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("server exited before listening: {status}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!(
                "server did not listen on {} within 30 s",
                self.socket.display()
            );
        }

        pub fn connect(&self) -> Client {
            Client::connect(&self.socket)
        }

        pub fn is_running(&mut self) -> bool {
            matches!(self.child.try_wait(), Ok(None))
        }

        pub fn kill9(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// SIGTERM, then wait: a clean shutdown that flushes the overlay.
        pub fn stop(&mut self) -> std::process::ExitStatus {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            self.child.wait().expect("wait")
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.kill9();
        }
    }

    /// Writes raw bytes to a fresh connection (for adversarial tests).
    pub fn raw(path: &Path, bytes: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(bytes).expect("write raw");
        s
    }
}
