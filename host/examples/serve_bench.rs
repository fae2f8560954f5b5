//! Benchmark client for `hexz-host serve` over a Unix socket (see bench/serve.sh).
//!
//! serve_bench latency <SOCKET> <FILE> [OPS]  — lookup / getattr / 4 KiB read, 1 and 16 in flight
//! serve_bench cow <SOCKET> <FILE>            — first 4 KiB write into a large snapshot file
//! serve_bench walk <SOCKET>                  — readdirplus over the whole tree (for server RSS)
//! serve_bench echo-server <SOCKET> / echo <SOCKET> — bare socket ping-pong: the floor

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{bail, Context};
use hexz_protocol::client::{default_hello, Client};
use hexz_protocol::{Op, ReplyBody, ROOT_NODE};

fn connect(sock: &str) -> anyhow::Result<Client<UnixStream>> {
    let s = UnixStream::connect(sock).with_context(|| format!("connect {sock}"))?;
    Ok(Client::new(s, default_hello("serve_bench"))?)
}

fn walk(c: &mut Client<UnixStream>, path: &str) -> anyhow::Result<(u64, u64)> {
    let mut node = ROOT_NODE;
    let mut size = 0;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        match c.call(Op::Lookup {
            parent: node,
            name: part.as_bytes().to_vec(),
        })? {
            ReplyBody::Entry(e) => {
                node = e.node;
                size = e.attr.size;
            }
            other => bail!("lookup {part}: {other:?}"),
        }
    }
    Ok((node, size))
}

fn open(c: &mut Client<UnixStream>, node: u64, flags: i32) -> anyhow::Result<u64> {
    match c.call(Op::Open {
        node,
        flags: flags as u32,
        read: None,
    })? {
        ReplyBody::Opened { fh, .. } => Ok(fh),
        other => bail!("open: {other:?}"),
    }
}

/// Runs `ops` requests from `make`, keeping `depth` in flight; returns latencies in µs and ops/s.
fn run(
    c: &mut Client<UnixStream>,
    depth: usize,
    ops: usize,
    make: &mut dyn FnMut(usize) -> Op,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(ops);
    let start = Instant::now();
    let mut next = 0;
    while lat.len() < ops {
        while next < ops && sent.len() < depth {
            let id = c.send(make(next))?;
            sent.insert(id, Instant::now());
            next += 1;
        }
        let r = c.recv()?;
        if let ReplyBody::Err(e) = r.r {
            bail!("request failed: {e}");
        }
        let t = sent.remove(&r.id).context("reply to an unknown id")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((lat, ops as f64 / secs))
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let sock = args
        .get(2)
        .context("usage: serve_bench latency|cow|walk|echo-server|echo <SOCKET> [FILE] [OPS]")?;
    if mode == "echo-server" || mode == "echo" {
        return echo(mode == "echo-server", sock);
    }
    let mut c = connect(sock)?;
    match mode {
        "latency" => {
            let file = args.get(3).context("FILE")?;
            let ops: usize = args.get(4).map_or(Ok(20_000), |s| s.parse())?;
            let (node, size) = walk(&mut c, file)?;
            let (parent, _) = walk(&mut c, file.rsplit_once('/').map_or("", |(d, _)| d))?;
            let name = file.rsplit('/').next().unwrap_or(file).as_bytes().to_vec();
            let fh = open(&mut c, node, 0)?;
            let blocks = (size / 4096).max(1);
            println!("| op | in flight | ops/s | p50 µs | p99 µs |");
            println!("|---|---|---|---|---|");
            for depth in [1, 16] {
                let mut rng = 0x2545F4914F6CDD1Du64;
                let mut lookup = |_: usize| Op::Lookup {
                    parent,
                    name: name.clone(),
                };
                let mut getattr = |_: usize| Op::Getattr { node, fh: None };
                let mut read = |_: usize| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    Op::Read {
                        fh,
                        offset: (rng % blocks) * 4096,
                        size: 4096,
                    }
                };
                let cases: [(&str, &mut dyn FnMut(usize) -> Op); 3] = [
                    ("lookup", &mut lookup),
                    ("getattr", &mut getattr),
                    ("read 4 KiB", &mut read),
                ];
                for (what, make) in cases {
                    run(&mut c, depth, ops / 10, make)?; // warm-up
                    let (lat, rate) = run(&mut c, depth, ops, make)?;
                    println!(
                        "| {what} | {depth} | {rate:.0} | {:.1} | {:.1} |",
                        pct(&lat, 0.5),
                        pct(&lat, 0.99)
                    );
                }
            }
        }
        "cow" => {
            let file = args.get(3).context("FILE")?;
            let (node, size) = walk(&mut c, file)?;
            let fh = open(&mut c, node, libc::O_RDWR)?;
            let t = Instant::now();
            match c.call(Op::Write {
                fh,
                offset: size / 2,
                data: vec![0xAB; 4096],
            })? {
                ReplyBody::Written { size: 4096, .. } => {}
                other => bail!("write: {other:?}"),
            }
            let first = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            c.call(Op::Fsync {
                fh,
                datasync: false,
            })?;
            let fsync = t.elapsed().as_secs_f64() * 1e6;
            println!("first 4 KiB write into a {} MiB snapshot file: {first:.0} µs (fsync after it: {fsync:.0} µs)", size >> 20);
        }
        "walk" => {
            let mut queue = VecDeque::from([ROOT_NODE]);
            let (mut files, mut dirs) = (0u64, 0u64);
            let t = Instant::now();
            while let Some(dir) = queue.pop_front() {
                let fh = open_dir(&mut c, dir)?;
                let mut cookie = 0;
                loop {
                    let (entries, eof) = match c.call(Op::Readdirplus {
                        fh,
                        cookie,
                        max_entries: 1024,
                    })? {
                        ReplyBody::DirPlus { entries, eof } => (entries, eof),
                        other => bail!("readdirplus: {other:?}"),
                    };
                    for e in &entries {
                        cookie = e.cookie;
                        if e.name == b"." || e.name == b".." {
                            continue;
                        }
                        if e.entry.attr.mode & libc::S_IFMT == libc::S_IFDIR {
                            dirs += 1;
                            queue.push_back(e.entry.node);
                        } else {
                            files += 1;
                        }
                    }
                    if eof || entries.is_empty() {
                        break;
                    }
                }
                c.call(Op::Releasedir { fh })?;
            }
            println!(
                "walked {files} files and {dirs} directories with readdirplus in {:.2} s",
                t.elapsed().as_secs_f64()
            );
        }
        _ => bail!("usage: serve_bench latency|cow|walk <SOCKET> [FILE] [OPS]"),
    }
    Ok(())
}

fn open_dir(c: &mut Client<UnixStream>, node: u64) -> anyhow::Result<u64> {
    match c.call(Op::Opendir { node, list: None })? {
        ReplyBody::Opened { fh, .. } => Ok(fh),
        other => bail!("opendir: {other:?}"),
    }
}

/// 64-byte ping-pong over a Unix socket between two processes: what any request/reply
/// costs on this machine before the server does anything.
fn echo(server: bool, sock: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut b = [0u8; 64];
    if server {
        let _ = std::fs::remove_file(sock);
        let l = std::os::unix::net::UnixListener::bind(sock)?;
        let (mut s, _) = l.accept()?;
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        return Ok(());
    }
    let mut s = UnixStream::connect(sock)?;
    let mut lat = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "| bare socket ping-pong (floor) | 1 | {:.0} | {:.1} | {:.1} |",
        1e6 / pct(&lat, 0.5),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    Ok(())
}
