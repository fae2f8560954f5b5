//! Snapshots in a real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! registry, on loopback with filesystem storage): push, pull and lazy `oci://` opening
//! of a packed tree and of a 3-deep commit chain, byte-exact through `extract` and
//! through `serve` + the guest FUSE mount; pushes of commits upload only new blobs
//! (counted in the registry's storage); `skopeo inspect` reads the manifest; a registry
//! that stops mid-read gives EIO and reads resume when it is back; a corrupted blob is a
//! clear integrity error; processes share the chunk cache; basic auth from
//! ~/.docker/config.json; Bearer tokens from a token service the registry trusts, with
//! a credential helper, anonymously for public pulls, and renewed by a long-lived mount
//! when the registry stops accepting them; a pull cut short resumes; the cache stays
//! within its bound.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hexz_e2e::mount_suite::{fuse_available, is_mounted, skip};
use hexz_e2e::proto::*;
use hexz_e2e::{bin, pseudo_random};

/// A registry process on a loopback port, with its storage; stopped by PID on drop.
struct Registry {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

fn registry_available() -> bool {
    Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || skip("docker-registry is not installed (apt-get install docker-registry)")
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_with(dir, htpasswd, "")
    }

    /// With `auth` (YAML of the `auth:` section) when it is not empty.
    fn start_with(dir: &Path, htpasswd: Option<(&str, &str)>, auth_yaml: &str) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        fs::create_dir_all(dir).unwrap();
        let mut auth = auth_yaml.to_string();
        if let Some((user, pass)) = htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the basic-auth registry");
            fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: hexz-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            child: None,
            dir: dir.to_path_buf(),
            port,
        };
        r.resume();
        r
    }

    /// Starts (again) on the same port and storage.
    fn resume(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("data/docker/registry/v2/blobs/sha256")
    }

    /// Blobs in the registry's storage.
    fn blob_count(&self) -> usize {
        let Ok(rd) = fs::read_dir(self.blobs_dir()) else {
            return 0;
        };
        rd.flatten()
            .map(|d| fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0))
            .sum()
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let h = digest.strip_prefix("sha256:").unwrap();
        self.blobs_dir().join(&h[..2]).join(h).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `hexz-host` with its own cache directory and no prefetch unless asked.
fn hexz(cache: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    hexz_env(cache, &[], args)
}

/// As [`hexz`], with `env` set last (over those defaults).
fn hexz_env(
    cache: &Path,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> Output {
    Command::new(bin("hexz-host"))
        .args(args)
        .env("HEXZ_CACHE_DIR", cache)
        .env("HEXZ_OCI_PREFETCH", "0")
        .env("DOCKER_CONFIG", cache.join("no-docker-config"))
        .envs(env.iter().copied())
        .output()
        .expect("run hexz-host")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file (and symlink target) of a tree, by relative path.
fn tree_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
                out.insert(format!("{rel}/"), Vec::new());
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path()).unwrap();
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else {
                out.insert(rel, fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// A tree with many small files, two large random ones (several frames each) and a link.
fn workspace(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for i in 0..40 {
        let d = src.join(format!("pkg{}", i % 5));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("mod{i}.rs")),
            format!("// module {i}\npub fn f{i}() -> u32 {{ {i} }}\n").repeat(20 + i),
        )
        .unwrap();
    }
    fs::write(src.join("a.bin"), pseudo_random(1_500_000, 1)).unwrap();
    fs::write(src.join("b.bin"), pseudo_random(1_500_000, 2)).unwrap();
    std::os::unix::fs::symlink("pkg0/mod0.rs", src.join("link")).unwrap();
    src
}

/// A registry with the workspace's snapshot pushed as `team/ws:v1`.
struct Pushed {
    reg: Registry,
    cache: PathBuf,
    src: PathBuf,
    /// `HOST/team/ws:v1`
    dest: String,
    /// `oci://HOST/team/ws@sha256:…`, as `push` printed it.
    pinned: String,
}

fn pushed(dir: &Path) -> Pushed {
    let src = workspace(dir);
    push_tree(dir, src, "team/ws")
}

/// Starts a registry in `dir/reg`, packs `src` (host cache `dir/cache`) and pushes it as
/// `REPO:v1`.
fn push_tree(dir: &Path, src: PathBuf, repo: &str) -> Pushed {
    let reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    let snap = dir.join("ws.hxz");
    pack(&cache, &src, &snap);
    let dest = format!("{}/{repo}:v1", reg.host());
    let out = ok(&hexz(&cache, &[&"push", &snap, &dest]), "push");
    let pinned = out
        .split_whitespace()
        .find(|w| w.starts_with("oci://"))
        .expect("push names the pinned reference")
        .to_string();
    Pushed {
        reg,
        cache,
        src,
        dest,
        pinned,
    }
}

fn pack(cache: &Path, src: &Path, out: &Path) {
    ok(&hexz(cache, &[&"pack", &src, &"-o", &out]), "pack");
}

/// A tree in `dir/src` of the files `files` (name, bytes).
fn tree_of_files(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    for (name, bytes) in files {
        fs::write(src.join(name), bytes).unwrap();
    }
    src
}

/// From a log at info level: the bytes and the range requests fetched from a data blob
/// ("fetched N bytes in M requests from data blob …", logged when it is closed).
fn fetch_counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains(" requests from data blob"))
        .unwrap_or_else(|| panic!("no fetch counts in the log: {log}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count after '{w}' in: {line}"))
    };
    (after("fetched"), after("in"))
}

#[test]
fn a_packed_tree_pushes_pulls_and_opens_lazily_byte_exact() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    let src = workspace(dir);
    let snap = dir.join("ws.hxz");
    pack(&cache, &src, &snap);
    let dest = format!("{}/team/ws:v1", reg.host());
    let pushed = ok(&hexz(&cache, &[&"push", &snap, &dest]), "push");
    assert!(pushed.contains("3 blobs uploaded"), "{pushed}");
    // The registry stores manifests as blobs too.
    assert_eq!(
        reg.blob_count(),
        4,
        "index, data, the empty config and the manifest"
    );
    // Again: nothing is sent.
    let out = ok(&hexz(&cache, &[&"push", &snap, &dest]), "push again");
    assert!(out.contains("0 blobs uploaded"), "{out}");
    assert!(out.contains("3 already there"), "{out}");

    // skopeo sees a valid OCI manifest with the hexz artifact type.
    let image = format!("docker://{dest}");
    match Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &image])
        .output()
    {
        Ok(o) => {
            let raw = ok(&o, "skopeo inspect --raw");
            let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
            assert_eq!(m["artifactType"], "application/vnd.hexz.snapshot.v1");
            assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
            assert_eq!(m["layers"].as_array().unwrap().len(), 2);
            // skopeo copies the artifact (checking every blob's digest) unchanged: the
            // manifest keeps its digest in an OCI layout.
            let layout = dir.join("layout");
            let o = Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false", &image])
                .arg(format!("oci:{}:v1", layout.display()))
                .output()
                .unwrap();
            ok(&o, "skopeo copy");
            let index: serde_json::Value =
                serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
            let digest = index["manifests"][0]["digest"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(pushed.contains(&digest), "{pushed} vs {digest}");
        }
        Err(_) => {
            skip("skopeo is not installed (apt-get install skopeo)");
        }
    }

    // Lazy: ls, cat, info, verify, extract straight from the registry.
    let r = format!("oci://{dest}");
    let ls = ok(&hexz(&cache, &[&"ls", &r, &"/pkg1"]), "ls");
    assert!(ls.contains("mod1.rs"), "{ls}");
    let cat = hexz(&cache, &[&"cat", &r, &"b.bin"]);
    ok(&cat, "cat");
    assert!(
        cat.stdout == fs::read(src.join("b.bin")).unwrap(),
        "cat b.bin differs"
    );
    let info = ok(&hexz(&cache, &[&"info", &r]), "info");
    assert!(
        info.contains("@sha256:"),
        "info names the pinned manifest: {info}"
    );
    ok(&hexz(&cache, &[&"verify", &r]), "verify");
    let x = dir.join("x");
    ok(&hexz(&cache, &[&"extract", &r, &x]), "extract");
    assert!(
        tree_of(&x) == tree_of(&src),
        "extract from the registry differs"
    );

    // Pull: the same file, byte for byte.
    let pulled = dir.join("pulled.hxz");
    ok(&hexz(&cache, &[&"pull", &dest, &"-o", &pulled]), "pull");
    assert!(fs::read(&pulled).unwrap() == fs::read(&snap).unwrap());

    // What is not a hexz artifact, or not there, is one clear line.
    let e = hexz(
        &cache,
        &[&"ls", &format!("oci://{}/team/none:v1", reg.host())],
    );
    assert!(!e.status.success());
    assert!(err(&e).contains("404"), "{}", err(&e));
    assert_eq!(err(&e).trim().lines().count(), 1, "{}", err(&e));
    let e = hexz(&cache, &[&"pull", &"not a reference", &"-o", &pulled]);
    assert!(
        err(&e).contains("is not a registry reference"),
        "{}",
        err(&e)
    );
}

/// Edits through `serve` on `base`, committed to `next`.
fn commit_level(
    cache: &Path,
    dir: &Path,
    base: &str,
    next: &Path,
    level: u64,
) -> (String, Vec<u8>) {
    let ov = dir.join(format!("ov{level}"));
    let sock = dir.join("s.sock");
    let _ = fs::remove_file(&sock);
    let child = Command::new(bin("hexz-host"))
        .args(["serve", base, "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--overlay")
        .arg(&ov)
        .env("HEXZ_CACHE_DIR", cache)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        socket: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = server.connect();
    let name = format!("level{level}.dat");
    let data = pseudo_random(200_000, level + 10);
    let (_, fh) = c
        .create(ROOT_NODE, &name, 0o644, libc::O_RDWR | libc::O_CREAT)
        .unwrap();
    c.write(fh, 0, &data).unwrap();
    c.ok(Op::Release { fh }).unwrap();
    drop(c);
    assert!(server.stop().success());
    ok(
        &hexz(cache, &[&"commit", &base, &"--overlay", &ov, &"-o", &next]),
        "commit",
    );
    (name, data)
}

#[test]
fn a_three_deep_commit_chain_uploads_only_new_blobs_and_reads_back_exactly() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    let src = workspace(dir);
    let mut model = tree_of(&src);
    let s0 = dir.join("s0.hxz");
    pack(&cache, &src, &s0);
    let repo = format!("{}/chain/ws", reg.host());
    ok(
        &hexz(&cache, &[&"push", &s0, &format!("{repo}:v0")]),
        "push v0",
    );
    let mut blobs = reg.blob_count();
    for level in 1..=3u64 {
        let base = dir.join(format!("s{}.hxz", level - 1));
        let next = dir.join(format!("s{level}.hxz"));
        let (name, data) = commit_level(&cache, dir, base.to_str().unwrap(), &next, level);
        model.insert(name, data);
        let out = ok(
            &hexz(&cache, &[&"push", &next, &format!("{repo}:v{level}")]),
            "push",
        );
        assert!(out.contains(&format!("({} snapshots)", level + 1)), "{out}");
        assert!(out.contains("2 blobs uploaded"), "level {level}: {out}");
        let now = reg.blob_count();
        assert_eq!(
            now - blobs,
            3,
            "level {level}: only the new index and data blobs, and the new manifest"
        );
        blobs = now;
    }
    // Lazily, from a cold cache: the whole chain reads back exactly.
    let cold = dir.join("cold-cache");
    let x = dir.join("x");
    ok(
        &hexz(&cold, &[&"extract", &format!("oci://{repo}:v3"), &x]),
        "extract v3",
    );
    assert!(tree_of(&x) == model, "lazy v3 differs from the model");
    // Pulled: four files beside each other, the top one opening its chain.
    let p = dir.join("pulled");
    fs::create_dir(&p).unwrap();
    let out = ok(
        &hexz(
            &cold,
            &[&"pull", &format!("{repo}:v3"), &"-o", &p.join("top.hxz")],
        ),
        "pull",
    );
    for n in ["top.hxz", "s2.hxz", "s1.hxz", "s0.hxz"] {
        assert!(p.join(n).exists(), "{n} missing after pull: {out}");
    }
    let x2 = dir.join("x2");
    ok(
        &hexz(&cold, &[&"extract", &p.join("top.hxz"), &x2]),
        "extract pulled",
    );
    assert!(tree_of(&x2) == model);
    // A commit on a lazily opened snapshot names its base by pinned reference, and
    // pushing it links the chain instead of uploading it again.
    let next = dir.join("s4.hxz");
    let (name, data) = commit_level(&cold, dir, &format!("oci://{repo}:v3"), &next, 4);
    model.insert(name, data);
    let info = ok(&hexz(&cold, &[&"info", &next]), "info");
    assert!(info.contains("oci://"), "base by reference: {info}");
    let out = ok(
        &hexz(
            &cold,
            &[&"push", &next, &format!("{}/other/ws:v4", reg.host())],
        ),
        "push to another repository",
    );
    // New: its index and data blobs, and the 2-byte empty config in the new repository.
    assert!(out.contains("3 blobs uploaded"), "{out}");
    assert!(out.contains("8 linked from other repositories"), "{out}");
    let x3 = dir.join("x3");
    ok(
        &hexz(
            &dir.join("cache3"),
            &[
                &"extract",
                &format!("oci://{}/other/ws:v4", reg.host()),
                &x3,
            ],
        ),
        "extract v4",
    );
    assert!(tree_of(&x3) == model);
}

#[test]
fn serve_of_a_registry_snapshot_through_the_guest_mount_is_byte_exact() {
    if !registry_available() || !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        // Kept (not `_`): the registry must live as long as the test.
        reg: _registry,
        cache,
        src,
        dest,
        ..
    } = pushed(dir);
    let sock = dir.join("s.sock");
    let child = Command::new(bin("hexz-host"))
        .args(["serve", &format!("oci://{dest}"), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--overlay")
        .arg(dir.join("ov"))
        .env("HEXZ_CACHE_DIR", &cache)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        socket: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut guest = Command::new(bin("hexz-guestfused"))
        .arg(&mnt)
        .arg("--connect")
        .arg(format!("unix:{}", sock.display()))
        .env("RUST_LOG", "warn,fuser::mnt=error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "guest mount did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let same = tree_of(&mnt) == tree_of(&src);
    fs::write(mnt.join("new.txt"), b"written in the overlay\n").unwrap();
    let back = fs::read(mnt.join("new.txt")).unwrap();
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let _ = guest.wait();
    assert!(server.stop().success());
    assert!(
        same,
        "the guest mount of oci:// differs from the source tree"
    );
    assert_eq!(back, b"written in the overlay\n");
}

/// A `hexz-host mount --daemon`, unmounted (and waited for) when stopped or dropped, so a
/// failing test leaves no mount behind.
struct DaemonMount {
    mnt: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
}

impl DaemonMount {
    /// Mounts `r` at `mnt` with `env` set; the log is `dir/NAME.log`.
    fn start(
        r: &str,
        mnt: &Path,
        dir: &Path,
        name: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> DaemonMount {
        fs::create_dir_all(mnt).unwrap();
        let m = DaemonMount {
            mnt: mnt.to_path_buf(),
            pid_file: dir.join(format!("{name}.pid")),
            log: dir.join(format!("{name}.log")),
        };
        let mut c = Command::new(bin("hexz-host"));
        c.args(["mount", r])
            .arg(mnt)
            .arg("--daemon")
            .arg("--log")
            .arg(&m.log)
            .arg("--pid-file")
            .arg(&m.pid_file)
            .env("RUST_LOG", "hexz_host=info");
        for (k, v) in env {
            c.env(k, v);
        }
        ok(&c.output().unwrap(), "mount");
        assert!(is_mounted(mnt));
        m
    }

    /// Unmounts and waits until the daemon has exited (its pid file is gone).
    fn stop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DaemonMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

#[test]
fn a_registry_that_stops_mid_read_gives_eio_and_reads_resume_when_it_is_back() {
    if !registry_available() || !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        mut reg,
        cache,
        src,
        dest,
        ..
    } = pushed(dir);
    let mnt = dir.join("mnt");
    let mut m = DaemonMount::start(
        &format!("oci://{dest}"),
        &mnt,
        dir,
        "mount",
        &[
            ("HEXZ_CACHE_DIR", cache.as_os_str()),
            ("HEXZ_OCI_PREFETCH", "0".as_ref()),
        ],
    );
    let a = fs::read(mnt.join("a.bin"));
    reg.stop();
    let during = {
        let mut f = fs::File::open(mnt.join("b.bin")).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
    };
    reg.resume();
    let after = fs::read(mnt.join("b.bin"));
    m.stop();
    assert!(!is_mounted(&mnt), "unmounted");
    let log = m.log.clone();
    assert!(a.unwrap() == fs::read(src.join("a.bin")).unwrap());
    let e = during.expect_err("a read while the registry is down must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        after.unwrap() == fs::read(src.join("b.bin")).unwrap(),
        "the read after the registry came back differs"
    );
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("registry read failed, returning EIO") && text.contains(&reg.host()),
        "the mount log says what failed: {text}"
    );
}

#[test]
fn a_corrupted_blob_in_the_registry_is_a_clear_integrity_error() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        reg,
        cache: _,
        src,
        dest,
        ..
    } = pushed(dir);
    let raw = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{dest}"),
        ])
        .output();
    let manifest: serde_json::Value = match raw {
        Ok(o) => serde_json::from_str(&ok(&o, "skopeo")).unwrap(),
        Err(_) => {
            skip("skopeo is not installed");
            return;
        }
    };
    let data = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let index = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // Flip one byte in the middle of the data blob, where b.bin's frames are.
    let p = reg.blob_path(&data);
    let mut bytes = fs::read(&p).unwrap();
    let at = bytes.len() - 200_000;
    bytes[at] ^= 0x55;
    fs::write(&p, &bytes).unwrap();
    let r = format!("oci://{dest}");
    let v = hexz(&dir.join("c1"), &[&"verify", &r]);
    assert!(!v.status.success(), "verify must fail");
    let text = String::from_utf8_lossy(&v.stdout).to_string() + &err(&v);
    assert!(
        text.contains("BLAKE3") || text.contains("corrupt") || text.contains("decompress"),
        "{text}"
    );
    // Reading the damaged file fails; nothing wrong is written.
    let c = hexz(&dir.join("c2"), &[&"cat", &r, &"b.bin"]);
    assert!(!c.status.success());
    let good = fs::read(src.join("b.bin")).unwrap();
    assert!(
        good.starts_with(&c.stdout),
        "cat wrote bytes that are not the file's"
    );
    assert!(err(&c).contains("corrupt snapshot"), "{}", err(&c));
    // A damaged index blob is refused on open, naming the digest check.
    let p = reg.blob_path(&index);
    let mut bytes = fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    fs::write(&p, &bytes).unwrap();
    let o = hexz(&dir.join("c3"), &[&"ls", &r]);
    assert!(!o.status.success());
    assert!(err(&o).contains("arrived with digest"), "{}", err(&o));
}

#[test]
fn a_large_file_streams_through_windows_fetched_ahead_and_a_damaged_one_fails_cleanly() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 48 MiB stored raw: the read-ahead window grows to its largest (after ~16 MiB) and
    // later windows are fetched and checked on other threads, two ahead of the reader,
    // but not past the file's end: the 16 MiB file after it in pack order is not
    // fetched. Compressible files follow.
    let big = pseudo_random(48 << 20, 7);
    let c_bin = pseudo_random(16 << 20, 8);
    let texts: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let text = format!("line {i} of a compressible file\n").repeat(40_000);
            (format!("z{i}.txt"), text.into_bytes())
        })
        .collect();
    let mut files: Vec<(&str, &[u8])> = vec![("big.bin", &big), ("c.bin", &c_bin)];
    files.extend(texts.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
    let src = tree_of_files(dir, &files);
    let Pushed { reg, dest, .. } = push_tree(dir, src.clone(), "team/big");
    let r = format!("oci://{dest}");
    let c = hexz_env(
        &dir.join("c1"),
        &[("RUST_LOG", "hexz_host=info".as_ref())],
        &[&"cat", &r, &"big.bin"],
    );
    ok(&c, "cat big.bin");
    assert!(
        c.stdout == big,
        "big.bin read lazily differs from the source"
    );
    let (fetched, requests) = fetch_counts(&err(&c));
    assert!(
        (48 << 20..(48 << 20) + (2 << 20)).contains(&fetched),
        "reading big.bin fetched {fetched} bytes: it is 48 MiB and what follows it should not be fetched ahead"
    );
    // Once the stream reads whole windows, they come off one range request that runs on
    // to the file's end, not one request each.
    assert!(
        requests <= REQUESTS_TO_STREAM + 1,
        "reading big.bin took {requests} range requests"
    );
    let z = hexz(&dir.join("c1"), &[&"cat", &r, &"z7.txt"]);
    assert_eq!(
        ok(&z, "cat z7.txt").as_bytes(),
        &fs::read(src.join("z7.txt")).unwrap()[..]
    );

    // Damage one byte 40 MiB into the file, inside a window fetched ahead: the read
    // stops with an integrity error at that frame, and nothing after it is written.
    let manifest: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(reg.blob_path(&manifest_digest(&reg.dir, "team/big"))).unwrap(),
    )
    .unwrap();
    let data = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = reg.blob_path(&data);
    let mut bytes = fs::read(&p).unwrap();
    let probe = &big[40 << 20..(40 << 20) + 64];
    let at = bytes
        .windows(64)
        .position(|w| w == probe)
        .expect("the raw frames hold the file's bytes");
    bytes[at + 10] ^= 0x55;
    fs::write(&p, &bytes).unwrap();
    let c = hexz(&dir.join("c2"), &[&"cat", &r, &"big.bin"]);
    assert!(!c.status.success(), "a damaged frame must fail the read");
    assert!(err(&c).contains("corrupt snapshot"), "{}", err(&c));
    assert!(
        big.starts_with(&c.stdout) && c.stdout.len() <= (40 << 20) + 10,
        "cat wrote {} bytes, some of them not the file's or past the damage",
        c.stdout.len()
    );
    assert!(
        c.stdout.len() >= 16 << 20,
        "the frames before the damage were written"
    );
}

/// Range requests a cold read of a large file makes before it reads whole windows (the
/// first frame, then a window doubling from 256 KiB to 8 MiB).
const REQUESTS_TO_STREAM: u64 = 7;

#[test]
fn a_read_ahead_cut_mid_response_is_fetched_again_and_streams_read_byte_exact() {
    if !registry_available() || !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let big = pseudo_random(64 << 20, 11);
    let big2 = pseudo_random(40 << 20, 12);
    let src = tree_of_files(dir, &[("big.bin", &big), ("big2.bin", &big2)]);
    let Pushed { reg, .. } = push_tree(dir, src, "team/big");
    // Every connection is cut after 12 MiB: the long range request a stream reads its
    // windows from breaks in the middle of one, more than once. Each broken window is
    // fetched again by itself (8 MiB fit in a fresh connection), the stream goes on
    // with a new request, and the bytes are the file's.
    let relay = Relay::cutting_each(reg.port, 12 << 20);
    let c = hexz_env(
        &dir.join("c1"),
        &[("RUST_LOG", "hexz_host=debug".as_ref())],
        &[
            &"cat",
            &format!("oci://{}/team/big:v1", relay.host()),
            &"big.bin",
        ],
    );
    ok(&c, "cat big.bin through connections cut after 12 MiB");
    assert!(
        c.stdout == big,
        "big.bin read through cut connections differs"
    );
    assert!(
        err(&c).contains("cut short in a read ahead"),
        "no read ahead was cut, so nothing was tested: {}",
        err(&c)
    );

    // Two streams at once through a mount (each with its own range request, both cut
    // as above), with a cold cache: both files read back exactly.
    let mnt = dir.join("mnt");
    let mut m = DaemonMount::start(
        &format!("oci://{}/team/big:v1", relay.host()),
        &mnt,
        dir,
        "mount",
        &[
            ("HEXZ_CACHE_DIR", dir.join("c2").as_os_str()),
            ("HEXZ_OCI_PREFETCH", "0".as_ref()),
        ],
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| fs::read(mnt.join("big.bin")));
        let b = s.spawn(|| fs::read(mnt.join("big2.bin")));
        (a.join().unwrap(), b.join().unwrap())
    });
    m.stop();
    assert!(a.unwrap() == big, "big.bin read beside big2.bin differs");
    assert!(b.unwrap() == big2, "big2.bin read beside big.bin differs");
}

#[test]
fn a_tag_moved_to_another_snapshot_opens_the_new_one() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        reg,
        cache,
        src,
        dest,
        ..
    } = pushed(dir);
    let r = format!("oci://{dest}");
    // The open by tag remembers which manifest the tag named...
    let old = ok(&hexz(&cache, &[&"cat", &r, &"pkg0/mod0.rs"]), "cat v1");
    assert_eq!(
        old.as_bytes(),
        &fs::read(src.join("pkg0/mod0.rs")).unwrap()[..]
    );
    // ...and the tag then moves to another snapshot: the next open must show that one,
    // although the snapshot the tag named before is opened from the cache meanwhile.
    fs::write(src.join("pkg0/mod0.rs"), b"// moved tag\n").unwrap();
    let snap2 = dir.join("ws2.hxz");
    pack(&cache, &src, &snap2);
    ok(&hexz(&cache, &[&"push", &snap2, &dest]), "push v1 again");
    for _ in 0..2 {
        let now = ok(
            &hexz(&cache, &[&"cat", &r, &"pkg0/mod0.rs"]),
            "cat moved v1",
        );
        assert_eq!(now, "// moved tag\n");
    }
    drop(reg);
}

#[test]
fn processes_share_the_host_cache_and_a_digest_reference_opens_offline() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        mut reg,
        cache,
        src,
        pinned,
        ..
    } = pushed(dir);
    let want = fs::read(src.join("a.bin")).unwrap();
    // Two processes read the same file from a cold cache at once.
    let spawn = || {
        Command::new(bin("hexz-host"))
            .args(["cat", &pinned, "a.bin"])
            .env("HEXZ_CACHE_DIR", &cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2) = (spawn(), spawn());
    for p in [p1, p2] {
        let o = p.wait_with_output().unwrap();
        ok(&o, "concurrent cat");
        assert!(o.stdout == want);
    }
    // A third process, with the registry gone, reads it from the shared cache alone.
    reg.stop();
    let o = hexz(&cache, &[&"cat", &pinned, &"a.bin"]);
    ok(&o, "cat from the cache with the registry stopped");
    assert!(o.stdout == want);
    // What was never read is not there: a clear error, not zeros.
    let o = hexz(&cache, &[&"cat", &pinned, &"b.bin"]);
    assert!(!o.status.success());
    assert!(err(&o).contains(&reg.host()), "{}", err(&o));
    // A damaged cache entry is detected and fetched again.
    reg.resume();
    let data = fs::read_dir(cache.join("oci/data"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_none())
        .unwrap();
    let mut b = fs::read(&data).unwrap();
    let at = b.iter().position(|&x| x != 0).unwrap() + 1000;
    b[at] ^= 1;
    fs::write(&data, &b).unwrap();
    let o = hexz(&cache, &[&"cat", &pinned, &"a.bin"]);
    ok(&o, "cat with a damaged cache entry");
    assert!(o.stdout == want);
    assert!(
        err(&o).contains("is damaged"),
        "the damage is reported: {}",
        err(&o)
    );
}

#[test]
fn a_registry_with_basic_auth_takes_credentials_from_the_docker_config() {
    if !registry_available() {
        return;
    }
    if Command::new("htpasswd").arg("-h").output().is_err() {
        skip("htpasswd is not installed (apt-get install apache2-utils)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(&dir.join("reg"), Some(("ci", "s3cret-pw")));
    let cache = dir.join("cache");
    let src = workspace(dir);
    let snap = dir.join("ws.hxz");
    pack(&cache, &src, &snap);
    let dest = format!("{}/private/ws:v1", reg.host());
    let o = hexz(&cache, &[&"push", &snap, &dest]);
    assert!(!o.status.success(), "push without credentials");
    assert!(err(&o).contains("docker login"), "{}", err(&o));
    let docker = dir.join("docker");
    fs::create_dir(&docker).unwrap();
    fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"Y2k6czNjcmV0LXB3"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let with = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        Command::new(bin("hexz-host"))
            .args(args)
            .env("HEXZ_CACHE_DIR", &cache)
            .env("DOCKER_CONFIG", &docker)
            .output()
            .unwrap()
    };
    ok(&with(&[&"push", &snap, &dest]), "push with credentials");
    let o = with(&[&"cat", &format!("oci://{dest}"), &"b.bin"]);
    ok(&o, "lazy cat with credentials");
    assert!(o.stdout == fs::read(src.join("b.bin")).unwrap());
    let p = dir.join("p.hxz");
    ok(&with(&[&"pull", &dest, &"-o", &p]), "pull with credentials");
    assert!(fs::read(&p).unwrap() == fs::read(&snap).unwrap());
    // Wrong credentials: refused with the same hint.
    fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"username":"ci","password":"wrong"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let o = with(&[&"ls", &format!("oci://{dest}")]);
    assert!(!o.status.success());
    assert!(err(&o).contains("401"), "{}", err(&o));
}

#[test]
fn the_cache_stays_within_its_bound_evicting_the_least_recently_used_blob() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    let src = workspace(dir);
    // Two snapshots of the tree with different data blobs (zstd and lz4 frames).
    let (za, lz) = (dir.join("z.hxz"), dir.join("l.hxz"));
    pack(&cache, &src, &za);
    ok(
        &hexz(
            &cache,
            &[&"pack", &src, &"-o", &lz, &"--compression", &"lz4"],
        ),
        "pack lz4",
    );
    let (ra, rb) = (
        format!("{}/team/z:v1", reg.host()),
        format!("{}/team/l:v1", reg.host()),
    );
    ok(&hexz(&cache, &[&"push", &za, &ra]), "push z");
    ok(&hexz(&cache, &[&"push", &lz, &rb]), "push l");
    let bound = 4_500_000u64;
    // The two snapshots hold the same chunks: without HEXZ_OCI_SHARE=0 the second would
    // be read out of the first's cached frames, and nothing would need evicting.
    let env = |c: &mut Command| {
        c.env("HEXZ_CACHE_DIR", &cache)
            .env("HEXZ_OCI_CACHE_BYTES", bound.to_string())
            .env("HEXZ_OCI_PREFETCH", "0")
            .env("HEXZ_OCI_SHARE", "0");
    };
    for r in [&ra, &rb] {
        let x = dir.join(format!("x-{}", r.len() + r.find('z').unwrap_or(0)));
        let _ = fs::remove_dir_all(&x);
        let mut c = Command::new(bin("hexz-host"));
        c.args(["extract", &format!("oci://{r}")]).arg(&x);
        env(&mut c);
        ok(&c.output().unwrap(), "extract");
        assert!(tree_of(&x) == tree_of(&src));
        fs::remove_dir_all(&x).unwrap();
    }
    let mut c = Command::new(bin("hexz-host"));
    c.args(["cache", "info", "--json"]);
    env(&mut c);
    let v: serde_json::Value = serde_json::from_str(&ok(&c.output().unwrap(), "info")).unwrap();
    let held = v["data_bytes"].as_u64().unwrap() + v["blob_bytes"].as_u64().unwrap();
    assert!(
        held <= bound,
        "the cache holds {held} bytes, over its {bound}-byte bound"
    );
    assert_eq!(v["data_blobs"].as_u64(), Some(1), "{v}");
    // The one kept is the one read last: it reads with the registry gone, the other not.
    reg.stop();
    let read = |r: &str| {
        let mut c = Command::new(bin("hexz-host"));
        c.args(["cat", &format!("oci://{r}"), "b.bin"]);
        env(&mut c);
        c.output().unwrap()
    };
    let b = read(&rb.replace(
        ":v1",
        &format!("@{}", manifest_digest(&dir.join("reg"), "team/l")),
    ));
    ok(&b, "cat of the recently used snapshot from the cache");
    assert!(b.stdout == fs::read(src.join("b.bin")).unwrap());
    let a = read(&ra.replace(
        ":v1",
        &format!("@{}", manifest_digest(&dir.join("reg"), "team/z")),
    ));
    assert!(
        !a.status.success(),
        "the evicted snapshot needs the registry"
    );
    let mut c = Command::new(bin("hexz-host"));
    c.args(["cache", "prune", "--max", "0"]);
    env(&mut c);
    ok(&c.output().unwrap(), "prune");
    let o = hexz(&cache, &[&"cache", &"info", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o, "cache info")).unwrap();
    assert_eq!(v["data_bytes"].as_u64(), Some(0));
}

/// The digest the registry's storage records for `repo:v1`.
fn manifest_digest(reg_dir: &Path, repo: &str) -> String {
    let link = reg_dir.join(format!(
        "data/docker/registry/v2/repositories/{repo}/_manifests/tags/v1/current/link"
    ));
    fs::read_to_string(link).unwrap().trim().to_string()
}

#[test]
fn the_frames_a_run_read_are_prefetched_by_the_next_open() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Pushed {
        mut reg,
        cache,
        src,
        pinned,
        ..
    } = pushed(dir);
    let run = |args: &[&str], prefetch: &str| {
        Command::new(bin("hexz-host"))
            .args(args)
            .env("HEXZ_CACHE_DIR", &cache)
            .env("HEXZ_OCI_PREFETCH", prefetch)
            .env("RUST_LOG", "hexz_host=info")
            .output()
            .unwrap()
    };
    // A run reads two files; the cache then loses their frames (as after eviction).
    for f in ["pkg3/mod3.rs", "a.bin"] {
        ok(&run(&["cat", &pinned, f], "0"), "first run");
    }
    fs::remove_dir_all(cache.join("oci/data")).unwrap();
    fs::create_dir(cache.join("oci/data")).unwrap();
    // The next open fetches them in the background: a mount, left up for the prefetch.
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    if fuse_available() {
        let mut m = DaemonMount::start(
            &pinned,
            &mnt,
            dir,
            "m",
            &[("HEXZ_CACHE_DIR", cache.as_os_str())],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(&m.log)
            .unwrap_or_default()
            .contains("prefetched")
        {
            assert!(Instant::now() < deadline, "no prefetch logged");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The daemon has written what it fetched once it has exited.
        m.stop();
        assert!(!m.pid_file.exists(), "the mount did not exit");
        // Without the registry, both files read from what the prefetch fetched.
        reg.stop();
        for f in ["pkg3/mod3.rs", "a.bin"] {
            let o = run(&["cat", &pinned, f], "0");
            ok(&o, "cat after the prefetch, registry stopped");
            assert!(o.stdout == fs::read(src.join(f)).unwrap(), "{f}");
        }
        let o = run(&["cat", &pinned, "b.bin"], "0");
        assert!(
            !o.status.success(),
            "b.bin was never read, so never prefetched"
        );
    }
}

/// A TCP relay on loopback in front of a registry, counting the bytes the registry sends;
/// with a budget, it cuts every connection once that many have passed and refuses new
/// ones (a registry that goes away mid-download).
struct Relay {
    port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    fn start(to: u16, budget: Option<u64>) -> Relay {
        Relay::spawn(to, budget, None)
    }

    /// A relay that cuts each connection once `each` bytes have passed on it (new
    /// connections are taken): responses longer than that never arrive whole.
    fn cutting_each(to: u16, each: u64) -> Relay {
        Relay::spawn(to, None, Some(each))
    }

    fn spawn(to: u16, budget: Option<u64>, each: Option<u64>) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let total = sent.clone();
        let over = move |n: u64| budget.is_some_and(|b| n >= b);
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { return };
                if over(total.load(Ordering::Relaxed)) {
                    continue; // dropped: refused
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let total = total.clone();
                std::thread::spawn(move || {
                    use std::io::Write;
                    let (mut server, mut client) = (server, client);
                    let mut buf = vec![0u8; 16 << 10];
                    let mut here = 0u64;
                    loop {
                        let mut n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(each) = each {
                            n = n.min((each - here) as usize);
                        }
                        here += n as u64;
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if over(total.fetch_add(n as u64, Ordering::Relaxed) + n as u64)
                            || each.is_some_and(|e| here >= e)
                        {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay { port, sent }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn a_pull_cut_short_resumes_where_it_stopped_and_starts_over_if_what_it_kept_is_damaged() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    let src = workspace(dir);
    // Incompressible, so the data blob is ~25 MiB.
    fs::write(src.join("big.bin"), pseudo_random(24 << 20, 9)).unwrap();
    let snap = dir.join("ws.hxz");
    pack(&cache, &src, &snap);
    let snap_len = fs::metadata(&snap).unwrap().len();
    ok(
        &hexz(
            &cache,
            &[&"push", &snap, &format!("{}/team/ws:v1", reg.host())],
        ),
        "push",
    );
    let out = dir.join("out");
    fs::create_dir(&out).unwrap();
    let pulled = out.join("ws.hxz");
    let part = || {
        fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".part"))
    };
    let pull_through = |relay: &Relay| {
        hexz(
            &cache,
            &[
                &"pull",
                &format!("{}/team/ws:v1", relay.host()),
                &"-o",
                &pulled,
            ],
        )
    };

    // The registry goes away after ~10 MiB: the pull fails, says how to resume, and
    // keeps what arrived.
    let cut = Relay::start(reg.port, Some(10 << 20));
    let o = pull_through(&cut);
    assert!(!o.status.success(), "a pull cut short must fail");
    assert!(
        err(&o).contains("run the same pull again to resume"),
        "{}",
        err(&o)
    );
    assert!(!pulled.exists(), "no snapshot file from a failed pull");
    let kept = fs::metadata(part().expect("the partial download is kept"))
        .unwrap()
        .len();
    assert!(kept > 4 << 20, "only {kept} bytes kept");

    // Again, whole: only the rest of the blob is fetched, and the file is exact.
    let whole = Relay::start(reg.port, None);
    ok(&pull_through(&whole), "resumed pull");
    assert!(
        fs::read(&pulled).unwrap() == fs::read(&snap).unwrap(),
        "resumed pull differs"
    );
    assert!(part().is_none(), "the partial file is gone");
    assert!(
        whole.sent() < snap_len - kept + (1 << 20),
        "the resumed pull fetched {} bytes; {kept} of {snap_len} were kept",
        whole.sent()
    );

    // Cut short again, then a byte of what was kept is damaged: the next pull notices
    // (the digest covers every byte) and starts over.
    fs::remove_file(&pulled).unwrap();
    let cut = Relay::start(reg.port, Some(10 << 20));
    assert!(!pull_through(&cut).status.success());
    let p = part().expect("the partial download is kept");
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xff\x00\xff", 1 << 20).unwrap();
    drop(f);
    let whole = Relay::start(reg.port, None);
    let o = pull_through(&whole);
    ok(&o, "pull after damage");
    assert!(err(&o).contains("damaged"), "{}", err(&o));
    assert!(
        fs::read(&pulled).unwrap() == fs::read(&snap).unwrap(),
        "pull after damage differs"
    );
    assert!(
        whole.sent() > snap_len - (1 << 20),
        "started over: {} bytes",
        whole.sent()
    );
}

/// A token service as the distribution spec's Bearer scheme has it (the part of Docker
/// Hub, GHCR or Harbor that hands out tokens): `GET /token?service=…&scope=…`, with Basic
/// credentials or none, answers a JWT signed (RS256, `openssl dgst`) with a key whose
/// self-signed certificate the registry trusts. Users get what they ask for; anonymous
/// callers get `pull` on `public/*` only. The key can be replaced (`rotate`), which makes
/// the registry refuse every token issued before, as when tokens expire.
struct TokenServer {
    port: u16,
    dir: PathBuf,
    /// Tokens issued.
    issued: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const TOKEN_SERVICE: &str = "hexz-test-registry";
const TOKEN_ISSUER: &str = "hexz-test-issuer";

impl TokenServer {
    fn start(dir: &Path, user: (&'static str, &'static str)) -> TokenServer {
        use std::sync::atomic::{AtomicU64, Ordering};
        fs::create_dir_all(dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = TokenServer {
            port: l.local_addr().unwrap().port(),
            dir: dir.to_path_buf(),
            issued: std::sync::Arc::new(AtomicU64::new(0)),
        };
        t.rotate();
        let (dir, issued) = (t.dir.clone(), t.issued.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    match c.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let (status, body) = match token_reply(&head, &dir, user) {
                    Ok(tok) => {
                        issued.fetch_add(1, Ordering::Relaxed);
                        ("200 OK", format!(r#"{{"token":"{tok}","expires_in":300}}"#))
                    }
                    Err(why) => ("401 Unauthorized", format!(r#"{{"details":"{why}"}}"#)),
                };
                use std::io::Write;
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        t
    }

    /// A new signing key and certificate (the registry reads the certificate when it starts).
    fn rotate(&self) {
        let o = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=hexz-test-token"])
            .arg("-keyout")
            .arg(self.dir.join("key.pem"))
            .arg("-out")
            .arg(self.dir.join("cert.pem"))
            .output()
            .expect("openssl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.port,
            self.dir.join("cert.pem").display()
        )
    }

    fn issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The token for one request head, or why none.
fn token_reply(head: &str, dir: &Path, user: (&str, &str)) -> Result<String, String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let target = head.split_whitespace().nth(1).ok_or("no request line")?;
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut service = String::new();
    let mut scopes = Vec::new();
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "service" => service = percent_decode(v),
            "scope" => scopes.push(percent_decode(v)),
            _ => {}
        }
    }
    let basic = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        (k.eq_ignore_ascii_case("authorization") && v.starts_with("Basic "))
            .then(|| String::from_utf8(b64.decode(&v[6..]).ok()?).ok())
            .flatten()
    });
    let who = match basic {
        Some(b) if b == format!("{}:{}", user.0, user.1) => Some(user.0),
        Some(_) => return Err("wrong user name or password".into()),
        None => None,
    };
    let mut access = Vec::new();
    for scope in &scopes {
        for one in scope.split(' ') {
            let mut parts = one.rsplitn(2, ':');
            let (Some(actions), Some(rest)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(("repository", name)) = rest.split_once(':') else {
                continue;
            };
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| who.is_some() || (*a == "pull" && name.starts_with("public/")))
                .collect();
            access
                .push(serde_json::json!({"type": "repository", "name": name, "actions": granted}));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cert = fs::read_to_string(dir.join("cert.pem")).map_err(|e| e.to_string())?;
    let der: String = cert.lines().filter(|l| !l.starts_with("-----")).collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": who.unwrap_or(""), "aud": service,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        url.encode(header.to_string()),
        url.encode(claims.to_string())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("key.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(signing_input.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let sig = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(format!("{signing_input}.{}", url.encode(sig.stdout)))
}

#[test]
fn a_registry_with_bearer_tokens_is_used_with_credentials_from_a_helper_anonymously_for_public_pulls_and_across_a_key_rotation(
) {
    if !registry_available() {
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        skip("openssl is not installed (apt-get install openssl)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tokens = TokenServer::start(&dir.join("tokens"), ("ci", "t0ken-pw"));
    let mut reg = Registry::start_with(&dir.join("reg"), None, &tokens.auth_yaml());
    let cache = dir.join("cache");
    let src = workspace(dir);
    let snap = dir.join("ws.hxz");
    pack(&cache, &src, &snap);
    let private = format!("{}/private/ws:v1", reg.host());
    let public = format!("{}/public/ws:v1", reg.host());

    // No credentials: refused with the hint to log in.
    let o = hexz(&cache, &[&"push", &snap, &private]);
    assert!(!o.status.success(), "push without credentials");
    assert!(err(&o).contains("docker login"), "{}", err(&o));

    // Credentials from a credential helper (`credHelpers`), as `docker login` with a
    // helper leaves them: a program on PATH answering `get` with JSON.
    let docker = dir.join("docker");
    let helpers = dir.join("helpers");
    fs::create_dir_all(&docker).unwrap();
    fs::create_dir_all(&helpers).unwrap();
    fs::write(
        docker.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"hexztest"}}}}"#, reg.host()),
    )
    .unwrap();
    let helper = helpers.join("docker-credential-hexztest");
    fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread host\n[ \"$host\" = \"{}\" ] || exit 1\necho '{{\"ServerURL\":\"'$host'\",\"Username\":\"ci\",\"Secret\":\"t0ken-pw\"}}'\n",
            reg.host()
        ),
    )
    .unwrap();
    fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        helpers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let with = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        hexz_env(
            &cache,
            &[
                ("DOCKER_CONFIG", docker.as_os_str()),
                ("PATH", path.as_ref()),
            ],
            args,
        )
    };
    ok(
        &with(&[&"push", &snap, &private]),
        "push with a helper's credentials",
    );
    ok(&with(&[&"push", &snap, &public]), "push of the public copy");
    let o = with(&[&"cat", &format!("oci://{private}"), &"b.bin"]);
    ok(&o, "lazy cat with a token");
    assert!(o.stdout == fs::read(src.join("b.bin")).unwrap());
    let p = dir.join("p.hxz");
    ok(&with(&[&"pull", &private, &"-o", &p]), "pull with a token");
    assert!(fs::read(&p).unwrap() == fs::read(&snap).unwrap());

    // Anonymously: a public repository opens and reads (an anonymous token), a
    // private one does not, and nothing can be pushed.
    let anon_cache = dir.join("anon-cache");
    let o = hexz(&anon_cache, &[&"cat", &format!("oci://{public}"), &"a.bin"]);
    ok(&o, "anonymous lazy cat of a public repository");
    assert!(o.stdout == fs::read(src.join("a.bin")).unwrap());
    let o = hexz(&anon_cache, &[&"ls", &format!("oci://{private}")]);
    assert!(
        !o.status.success(),
        "anonymous read of a private repository"
    );
    assert!(err(&o).contains("docker login"), "{}", err(&o));
    let o = hexz(
        &anon_cache,
        &[&"push", &snap, &format!("{}/public/other:v1", reg.host())],
    );
    assert!(!o.status.success(), "anonymous push");

    // A long-lived reader across a key rotation: every token it holds is refused from
    // then on (as when they expire), and it must get new ones by itself.
    if !fuse_available() {
        return;
    }
    let mnt = dir.join("mnt");
    let mount_cache = dir.join("mount-cache");
    let mut m = DaemonMount::start(
        &format!("oci://{private}"),
        &mnt,
        dir,
        "mount",
        &[
            ("HEXZ_CACHE_DIR", mount_cache.as_os_str()),
            ("HEXZ_OCI_PREFETCH", "0".as_ref()),
            ("DOCKER_CONFIG", docker.as_os_str()),
            ("PATH", path.as_ref()),
        ],
    );
    let a = fs::read(mnt.join("a.bin"));
    let before = tokens.issued();
    reg.stop();
    tokens.rotate();
    reg.resume();
    let b = fs::read(mnt.join("b.bin"));
    m.stop();
    assert!(a.unwrap() == fs::read(src.join("a.bin")).unwrap());
    assert!(
        b.unwrap() == fs::read(src.join("b.bin")).unwrap(),
        "a read after the key rotation differs"
    );
    assert!(
        tokens.issued() > before,
        "no new token was asked for after the rotation"
    );
}

/// Copies a directory tree (the host cache, to run the same read from the same state).
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_snapshot_packed_independently_reads_the_chunks_it_shares_from_the_cache_of_another() {
    if !registry_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = Registry::start(&dir.join("reg"), None);
    let cache = dir.join("cache");
    // Two trees that differ in a few files, packed separately: their frames differ,
    // most of their chunks do not.
    let v1 = workspace(dir);
    let v2 = dir.join("v2");
    copy_tree(&v1, &v2);
    fs::write(v2.join("aaa-new.bin"), pseudo_random(400_000, 77)).unwrap();
    fs::write(v2.join("pkg0/mod0.rs"), "changed\n".repeat(500)).unwrap();
    fs::remove_file(v2.join("pkg1/mod1.rs")).unwrap();
    for (src, tag) in [(&v1, "v1"), (&v2, "v2")] {
        let snap = dir.join(format!("{tag}.hxz"));
        pack(&cache, src, &snap);
        ok(
            &hexz(
                &cache,
                &[&"push", &snap, &format!("{}/team/ws:{tag}", reg.host())],
            ),
            "push",
        );
    }
    let v2_data = fs::metadata(dir.join("v2.hxz")).unwrap().len();
    // v1 read whole into the host cache.
    let x1 = dir.join("x1");
    ok(
        &hexz(
            &cache,
            &[&"extract", &format!("oci://{}/team/ws:v1", reg.host()), &x1],
        ),
        "extract v1",
    );
    assert!(tree_of(&x1) == tree_of(&v1));
    // v2, through a relay that counts what the registry sends: with sharing, and (from
    // a copy of the same cache) without.
    let read_v2_prefetching = |cache: &Path, share: &str, prefetch: &str, to: &Path| {
        let relay = Relay::start(reg.port, None);
        let o = hexz_env(
            cache,
            &[
                ("HEXZ_OCI_SHARE", share.as_ref()),
                ("HEXZ_OCI_PREFETCH", prefetch.as_ref()),
            ],
            &[
                &"extract",
                &format!("oci://{}/team/ws:v2", relay.host()),
                &to,
            ],
        );
        ok(&o, "extract v2");
        assert!(tree_of(to) == tree_of(&v2), "v2 read back differs");
        relay.sent()
    };
    let read_v2 = |cache: &Path, share: &str, to: &Path| read_v2_prefetching(cache, share, "0", to);
    let (plain, damaged) = (dir.join("cache-plain"), dir.join("cache-damaged"));
    copy_tree(&cache, &plain);
    copy_tree(&cache, &damaged);
    let shared = read_v2(&cache, "1", &dir.join("x2"));
    // Read again with prefetch on: the frames the first run read and put together from
    // v1 are not fetched ahead either (they were never v2's to cache).
    let again = read_v2_prefetching(&cache, "1", "1", &dir.join("x2-again"));
    assert!(
        again < v2_data / 10,
        "the second read of v2, prefetching, fetched {again} of {v2_data} bytes"
    );
    let unshared = read_v2(&plain, "0", &dir.join("x2-plain"));
    eprintln!(
        "v2 ({v2_data} bytes): {shared} fetched with v1 cached, {again} when read again \
         prefetching, {unshared} without sharing"
    );
    assert!(
        unshared > v2_data * 9 / 10,
        "without sharing all of v2 is fetched: {unshared} of {v2_data} bytes"
    );
    assert!(
        shared < v2_data * 3 / 10,
        "with v1 cached, v2 fetched {shared} of {v2_data} bytes (without sharing: {unshared})"
    );
    // v1's cached frames damaged: v2 still reads exactly (what fails its check is fetched).
    let data_dir = damaged.join("oci/data");
    for e in fs::read_dir(&data_dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none() {
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            let len = f.metadata().unwrap().len();
            for at in (0..len).step_by(200_000) {
                std::os::unix::fs::FileExt::write_all_at(&f, b"\x00\xffdamage", at).unwrap();
            }
        }
    }
    let after_damage = read_v2(&damaged, "1", &dir.join("x2-damaged"));
    assert!(
        after_damage > shared,
        "damaged sources were fetched instead"
    );
}
