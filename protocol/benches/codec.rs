//! Encode + decode throughput of typical messages (docs/BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hexz_protocol::frame::PREFIX_LEN;
use hexz_protocol::*;

fn attr() -> Attr {
    Attr {
        ino: 42,
        mode: 0o100644,
        nlink: 1,
        uid: 1000,
        gid: 1000,
        size: 12345,
        blocks: 32,
        blksize: 4096,
        ..Attr::default()
    }
}

fn entry() -> Entry {
    Entry {
        node: 42,
        generation: 0,
        attr: attr(),
        entry_ttl_ms: 3_600_000,
        attr_ttl_ms: 3_600_000,
        dir_attr: None,
    }
}

fn round_trip_request(req: &Request, buf: &mut Vec<u8>) -> Request {
    buf.clear();
    encode_frame(req, 1 << 24, buf).unwrap();
    decode_request(&buf[PREFIX_LEN..]).unwrap()
}

fn round_trip_reply(rep: &Reply, buf: &mut Vec<u8>) -> Reply {
    buf.clear();
    encode_frame(rep, 1 << 24, buf).unwrap();
    decode_reply(&buf[PREFIX_LEN..]).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode+decode");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(1 << 20);

    let read = Request {
        id: 77,
        op: Op::Read {
            fh: 5,
            offset: 1 << 30,
            size: 4096,
        },
    };
    let data = Reply {
        id: 77,
        r: ReplyBody::Data(vec![0x5a; 4096]),
    };
    g.bench_function("read 4KiB (request + reply)", |b| {
        b.iter(|| {
            round_trip_request(&read, &mut buf);
            round_trip_reply(&data, &mut buf)
        })
    });

    let lookup = Request {
        id: 78,
        op: Op::Lookup {
            parent: 1,
            name: b"Cargo.toml".to_vec(),
        },
    };
    let found = Reply {
        id: 78,
        r: ReplyBody::Entry(entry()),
    };
    g.bench_function("lookup (request + reply)", |b| {
        b.iter(|| {
            round_trip_request(&lookup, &mut buf);
            round_trip_reply(&found, &mut buf)
        })
    });

    let rdp = Request {
        id: 79,
        op: Op::Readdirplus {
            fh: 9,
            cookie: 0,
            max_entries: 100,
        },
    };
    let entries = (0..100)
        .map(|i| DirEntryPlus {
            name: format!("file-{i:04}.rs").into_bytes(),
            cookie: i + 1,
            entry: entry(),
        })
        .collect();
    let listing = Reply {
        id: 79,
        r: ReplyBody::DirPlus {
            entries,
            eof: false,
        },
    };
    g.bench_function("readdirplus 100 entries (request + reply)", |b| {
        b.iter(|| {
            round_trip_request(&rdp, &mut buf);
            round_trip_reply(&listing, &mut buf)
        })
    });
    g.finish();

    // The encoding check alone (it runs inside every decode above).
    let mut g = c.benchmark_group("check_canonical");
    let mut body = Vec::new();
    encode_frame(&listing, 1 << 24, &mut body).unwrap();
    let body = body[PREFIX_LEN..].to_vec();
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("readdirplus 100 entries reply", |b| {
        b.iter(|| check_canonical(std::hint::black_box(&body)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
