//! A tiny protocol client for the demo: `demo_client <SOCKET> put <NAME> <TEXT>` writes a
//! file at the top of the served tree (fsynced); `demo_client <SOCKET> ls` lists the top.

use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};
use hexz_protocol::client::{default_hello, Client};
use hexz_protocol::{Op, ReplyBody, ROOT_NODE};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sock = args
        .get(1)
        .context("usage: demo_client <SOCKET> put <NAME> <TEXT> | ls")?;
    let mut c = Client::new(
        UnixStream::connect(sock).with_context(|| format!("connect {sock}"))?,
        default_hello("demo"),
    )?;
    match args.get(2).map(String::as_str) {
        Some("put") => {
            let name = args.get(3).context("NAME")?;
            let text = args.get(4).context("TEXT")?;
            let flags = (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32;
            let op = Op::Create {
                parent: ROOT_NODE,
                name: name.as_bytes().to_vec(),
                mode: 0o644,
                flags,
                uid: 0,
                gid: 0,
            };
            let fh = match c.call(op)? {
                ReplyBody::Created { fh, .. } => fh,
                other => bail!("create {name}: {other:?}"),
            };
            match c.call(Op::Write {
                fh,
                offset: 0,
                data: text.as_bytes().to_vec(),
            })? {
                ReplyBody::Written { .. } => {}
                other => bail!("write: {other:?}"),
            }
            for op in [
                Op::Fsync {
                    fh,
                    datasync: false,
                },
                Op::Release { fh },
            ] {
                if let ReplyBody::Err(e) = c.call(op)? {
                    bail!("{e}");
                }
            }
            println!("wrote {name} ({} bytes) through the protocol", text.len());
        }
        Some("ls") => {
            let fh = match c.call(Op::Opendir {
                node: ROOT_NODE,
                list: None,
            })? {
                ReplyBody::Opened { fh, .. } => fh,
                other => bail!("opendir: {other:?}"),
            };
            let mut cookie = 0;
            loop {
                let (entries, eof) = match c.call(Op::Readdirplus {
                    fh,
                    cookie,
                    max_entries: 256,
                })? {
                    ReplyBody::DirPlus { entries, eof } => (entries, eof),
                    other => bail!("readdirplus: {other:?}"),
                };
                for e in &entries {
                    cookie = e.cookie;
                    println!(
                        "{:>8o} {:>8} {}",
                        e.entry.attr.mode,
                        e.entry.attr.size,
                        String::from_utf8_lossy(&e.name)
                    );
                }
                if eof || entries.is_empty() {
                    break;
                }
            }
            c.call(Op::Releasedir { fh })?;
        }
        _ => bail!("usage: demo_client <SOCKET> put <NAME> <TEXT> | ls"),
    }
    Ok(())
}
