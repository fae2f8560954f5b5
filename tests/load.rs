//! Load: 64 concurrent clients (one connection each) run mixed operations against one
//! real `hexz-host serve` for `HEXZ_LOAD_SECS` seconds (default 10; the recorded run in
//! docs/RELIABILITY.md used 60): lookups and getattrs of snapshot files, reads of
//! snapshot data checked against the source, creates, writes, read-backs, renames,
//! fsyncs, listings and unlinks in each client's own directory, checked against a model.
//!
//! Asserted: 0 errors (every reply is the expected success, every byte read is right),
//! and the server's RSS after warm-up stays within a bound of its warm-up level. Printed:
//! operations, p50/p99/max latency per kind, VmRSS samples.

use hexz_e2e::Rng;
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hexz_e2e::proto::*;
use hexz_e2e::{hexz_host, pseudo_random};

const CLIENTS: usize = 64;
/// RSS may not grow past its warm-up level by more than this.
const RSS_GROWTH_BOUND_KIB: u64 = 64 << 10;

fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Lat(BTreeMap<&'static str, Vec<u32>>);

impl Lat {
    fn time<T>(&mut self, kind: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.0
            .entry(kind)
            .or_default()
            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        r
    }
}

fn expect_ok(what: &str, r: Result<(), Errno>) {
    r.unwrap_or_else(|e| panic!("{what}: {e:?}"));
}

/// One client's session; returns its latencies.
fn client(
    socket: PathBuf,
    id: usize,
    snap_files: Arc<Vec<(String, Vec<u8>)>>,
    stop: Arc<AtomicBool>,
) -> Lat {
    let mut c = Client::connect(&socket);
    let mut lat = Lat::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let dir = c.mkdir(ROOT_NODE, &format!("client{id}")).unwrap().node;
    // name -> (node, bytes); references this client holds per node (like a kernel,
    // it forgets a node once unlinked, so unlinked files do not live on as orphans).
    let mut model: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
    let mut refs: std::collections::HashMap<u64, u64> = Default::default();
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match rng.index(10) {
            0 | 1 => {
                // Lookups down a snapshot path, then getattr.
                let (path, want) = &snap_files[rng.index(snap_files.len())];
                let mut node = ROOT_NODE;
                for part in path.split('/') {
                    node = lat
                        .time("lookup", || c.lookup(node, part))
                        .unwrap_or_else(|e| panic!("lookup {path}: {e:?}"))
                        .node;
                }
                let a = lat.time("getattr", || c.getattr(node)).unwrap();
                assert_eq!(a.size, want.len() as u64, "{path}");
            }
            2 | 3 => {
                // A random range of a snapshot file.
                let (path, want) = &snap_files[rng.index(snap_files.len())];
                let node = c.walk(path).unwrap().node;
                let fh = c.open(node, libc::O_RDONLY).unwrap();
                let off = rng.index(want.len());
                let size = 1 + rng.index(256 << 10) as u32;
                let got = lat.time("read", || c.read(fh, off as u64, size)).unwrap();
                let end = (off + size as usize).min(want.len());
                assert!(
                    got[..] == want[off..end],
                    "{path} at {off}+{size}: wrong bytes"
                );
                expect_ok("release", c.ok(Op::Release { fh }));
            }
            4 | 5 => {
                // Create and write a file of our own, sometimes fsync it.
                let name = format!("f{next}");
                next += 1;
                let data = pseudo_random(1 + rng.index(64 << 10), rng.next_u64());
                let (e, fh) = lat
                    .time("create", || {
                        c.create(dir, &name, 0o644, libc::O_RDWR | libc::O_EXCL)
                    })
                    .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
                let n = lat.time("write", || c.write(fh, 0, &data)).unwrap();
                assert_eq!(n as usize, data.len());
                if rng.index(4) == 0 {
                    expect_ok(
                        "fsync",
                        lat.time("fsync", || {
                            c.ok(Op::Fsync {
                                fh,
                                datasync: false,
                            })
                        }),
                    );
                }
                expect_ok("release", c.ok(Op::Release { fh }));
                *refs.entry(e.node).or_default() += 1;
                model.insert(name, (e.node, data));
            }
            6 if !model.is_empty() => {
                // Read one back.
                let k = model.keys().nth(rng.index(model.len())).unwrap().clone();
                let node = c.lookup(dir, &k).unwrap().node;
                *refs.entry(node).or_default() += 1;
                assert_eq!(node, model[&k].0, "{k}: node id changed");
                let got = lat.time("read_file", || c.read_all(node)).unwrap();
                assert!(got == model[&k].1, "{k}: wrong bytes read back");
            }
            7 if !model.is_empty() => {
                // Rename one (sometimes over another).
                let k = model.keys().nth(rng.index(model.len())).unwrap().clone();
                let to = if rng.index(3) == 0 && model.len() > 1 {
                    model.keys().nth(rng.index(model.len())).unwrap().clone()
                } else {
                    next += 1;
                    format!("r{next}")
                };
                expect_ok(
                    "rename",
                    lat.time("rename", || {
                        c.ok(Op::Rename {
                            parent: dir,
                            name: k.clone().into_bytes(),
                            new_parent: dir,
                            new_name: to.clone().into_bytes(),
                            flags: 0,
                        })
                    }),
                );
                let v = model.remove(&k).unwrap();
                if let Some((old, _)) = model.insert(to, v) {
                    forget(&mut c, &mut refs, old);
                }
            }
            8 => {
                // List our directory; it must match the model.
                let plus = rng.index(2) == 0;
                let names = lat.time("readdir", || c.list(dir, plus)).unwrap();
                if plus {
                    for (n, node) in &names {
                        if n != "." && n != ".." {
                            *refs.entry(*node).or_default() += 1;
                        }
                    }
                }
                let mut got: Vec<String> = names
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| n != "." && n != "..")
                    .collect();
                got.sort();
                let want: Vec<String> = model.keys().cloned().collect();
                assert_eq!(got, want, "client {id}: listing differs from the model");
            }
            _ if model.len() > 16 => {
                let k = model.keys().nth(rng.index(model.len())).unwrap().clone();
                expect_ok(
                    "unlink",
                    lat.time("unlink", || {
                        c.ok(Op::Unlink {
                            parent: dir,
                            name: k.clone().into_bytes(),
                        })
                    }),
                );
                if let Some((old, _)) = model.remove(&k) {
                    forget(&mut c, &mut refs, old);
                }
            }
            _ => {
                lat.time("statfs", || c.call(Op::Statfs { node: dir }));
            }
        }
    }
    lat
}

fn forget(c: &mut Client, refs: &mut std::collections::HashMap<u64, u64>, node: u64) {
    if let Some(n) = refs.remove(&node) {
        expect_ok("forget", c.ok(Op::Forget { node, nlookup: n }));
    }
}

fn pct(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn sixty_four_clients_mixed_operations_no_errors_and_flat_memory() {
    let secs: u64 = std::env::var("HEXZ_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let src = dir.join("src");
    let mut snap_files = Vec::new();
    for i in 0..40u64 {
        let rel = format!("pkg{}/file{i}.dat", i % 5);
        let data = if i % 3 == 0 {
            pseudo_random(200_000 + i as usize * 1000, i)
        } else {
            format!("line {i} of some source text\n")
                .repeat(100 + i as usize * 50)
                .into_bytes()
        };
        fs::create_dir_all(src.join(format!("pkg{}", i % 5))).unwrap();
        fs::write(src.join(&rel), &data).unwrap();
        snap_files.push((rel, data));
    }
    let snap = dir.join("ws.hxz");
    let r = hexz_host(&[&"pack", &src, &"-o", &snap]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let ov = dir.join("ov");
    let mut server = Server::start(
        &snap,
        &dir.join("s.sock"),
        &["--overlay", ov.to_str().unwrap()],
    );
    let pid = server.child.id();
    let snap_files = Arc::new(snap_files);
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (stop, samples) = (stop.clone(), samples.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                samples
                    .lock()
                    .unwrap()
                    .push((t0.elapsed().as_secs_f64(), vm_rss_kib(pid)));
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (socket, files, stop) = (server.socket.clone(), snap_files.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("client{i}"))
                .spawn(move || client(socket, i, files, stop))
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all: BTreeMap<&'static str, Vec<u32>> = BTreeMap::new();
    let mut panicked = 0;
    for t in threads {
        match t.join() {
            Ok(lat) => {
                for (k, v) in lat.0 {
                    all.entry(k).or_default().extend(v);
                }
            }
            Err(_) => panicked += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    sampler.join().unwrap();
    assert_eq!(panicked, 0, "{panicked} clients saw an error (see above)");
    assert!(server.is_running(), "the server died under load");

    let mut total = 0usize;
    let mut every: Vec<u32> = Vec::new();
    println!("load: {CLIENTS} clients for {elapsed:.1} s");
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9}",
        "op", "count", "p50 us", "p99 us", "max us"
    );
    for (k, v) in all.iter_mut() {
        v.sort_unstable();
        total += v.len();
        every.extend_from_slice(v);
        println!(
            "  {k:<10} {:>9} {:>9} {:>9} {:>9}",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or(0)
        );
    }
    every.sort_unstable();
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9}   ({:.0} ops/s, 0 errors)",
        "all",
        total,
        pct(&every, 0.5),
        pct(&every, 0.99),
        every.last().copied().unwrap_or(0),
        total as f64 / elapsed
    );
    let samples = samples.lock().unwrap().clone();
    // Warm-up: the first quarter of the run (caches fill, threads start).
    let warm_end = secs as f64 / 4.0;
    let warm = samples
        .iter()
        .filter(|(t, _)| *t <= warm_end)
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t > warm_end)
        .map(|s| s.1)
        .collect();
    let (lo, hi) = (
        after.iter().copied().min().unwrap_or(0),
        after.iter().copied().max().unwrap_or(0),
    );
    let last = after.last().copied().unwrap_or(0);
    let series: Vec<String> = samples
        .iter()
        .step_by((samples.len() / 12).max(1))
        .map(|(t, kib)| format!("{t:.0}s:{}M", kib >> 10))
        .collect();
    println!("  VmRSS series: {}", series.join(" "));
    println!(
        "  VmRSS: {warm} KiB at end of warm-up ({warm_end:.1} s); after: min {lo} KiB, max {hi} KiB, last {last} KiB ({} samples)",
        after.len()
    );
    assert!(
        hi <= warm + RSS_GROWTH_BOUND_KIB,
        "RSS grew from {warm} KiB to {hi} KiB after warm-up"
    );
    let mut c = server.connect();
    assert!(c.getattr(ROOT_NODE).is_ok());
    server.stop();
}
