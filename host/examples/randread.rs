//! Benchmark helper: 4 KiB reads at given offsets of given files, through the snapshot
//! library or through a directory (a mount of a peer), twice: first pass (cold if the
//! caller dropped caches) and second pass (warm).
//!
//! usage: randread snapshot <S.hxz> <LIST> | randread dir <DIR> <LIST>
//! LIST: lines of `<relative path>\t<offset>`.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use hexz_host::snapshot::{NodeKind, Snapshot};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: randread snapshot|dir <PATH> <LIST>"
    );
    let mut list = String::new();
    std::fs::File::open(&args[3])?.read_to_string(&mut list)?;
    let items: Vec<(String, u64)> = list
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, o)| Ok((p.to_string(), o.parse()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut buf = vec![0u8; 4096];
    let mut checksum = 0u64;
    let t_open = Instant::now();
    let snap = if args[1] == "snapshot" {
        Some(Snapshot::open(&args[2])?)
    } else {
        None
    };
    let open_ms = t_open.elapsed().as_secs_f64() * 1e3;
    for pass in ["cold", "warm"] {
        let t = Instant::now();
        for (path, off) in &items {
            let n = match &snap {
                Some(s) => {
                    let idx = s.resolve(path)?;
                    let Some(NodeKind::File(d)) = s.node(idx).map(|n| &n.kind) else {
                        anyhow::bail!("{path}: not a file")
                    };
                    s.read_at(d, *off, &mut buf)?
                }
                None => {
                    std::fs::File::open(format!("{}/{}", args[2], path))?.read_at(&mut buf, *off)?
                }
            };
            checksum = checksum.wrapping_add(buf[..n].iter().map(|&b| b as u64).sum::<u64>());
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{pass}\t{:.0} ops/s\t{:.3} s\t{} reads\tchecksum {checksum}",
            items.len() as f64 / secs,
            secs,
            items.len()
        );
    }
    if snap.is_some() {
        println!("open\t{open_ms:.1} ms");
    }
    Ok(())
}
