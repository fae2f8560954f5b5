//! The transmission phase: one reader decodes requests in order, a few workers run them
//! concurrently against the device, and replies go out (possibly out of order) under one
//! writer lock, each reply written whole.

use std::io::{self, Read, Write};
use std::sync::Mutex;

use tracing::{debug, warn};

use super::handshake::Session;
use super::wire::*;
use super::{Conn, Export, MAX_PAYLOAD};
use crate::blockdev::Extent;
use crate::error::Error;

const KNOWN_FLAGS: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;
/// Most descriptors in one block-status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Serves requests until the client disconnects or breaks the protocol.
pub fn transmit(conn: Conn, export: &Export, sess: Session, workers: usize) -> io::Result<()> {
    let writer = Mutex::new(conn.try_clone()?);
    let (tx, rx) = crossbeam_channel::bounded::<Job>(workers * 4);
    let mut reader = conn;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let rx = rx.clone();
            let writer = &writer;
            scope.spawn(move || {
                let mut buf = Vec::new();
                for job in rx {
                    if let Err(e) = handle(export, sess, &job, &mut buf, writer) {
                        debug!("reply not sent ({e}); closing");
                        if let Ok(w) = writer.lock() {
                            w.shutdown();
                        }
                        break;
                    }
                }
            });
        }
        drop(rx);
        let res = read_requests(&mut reader, &tx);
        drop(tx);
        res
    })
}

fn read_requests(r: &mut Conn, tx: &crossbeam_channel::Sender<Job>) -> io::Result<()> {
    loop {
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                debug!("client left without NBD_CMD_DISC");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let Some(req) = Request::decode(&h) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request with a bad magic, the stream cannot be trusted",
            ));
        };
        let mut payload = Vec::new();
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "write of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                            req.len
                        ),
                    ));
                }
                payload = vec![0u8; req.len as usize];
                r.read_exact(&mut payload)?;
            }
            _ => {}
        }
        if tx.send(Job { req, payload }).is_err() {
            return Ok(());
        }
    }
}

/// The NBD error for a device failure (the one errno mapping of this front end).
fn errno(e: &Error) -> u32 {
    match e {
        Error::NoSpace(_) => ENOSPC,
        Error::Io { err, .. } if err.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
        Error::Invalid(_) => EINVAL,
        _ => EIO,
    }
}

fn in_range(export: &Export, req: &Request) -> bool {
    req.offset
        .checked_add(req.len as u64)
        .is_some_and(|end| end <= export.device.size())
}

fn handle(
    export: &Export,
    sess: Session,
    job: &Job,
    buf: &mut Vec<u8>,
    w: &Mutex<Conn>,
) -> io::Result<()> {
    let req = &job.req;
    let dev = &export.device;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: Result<(), u32>| simple(w, req.cookie, r.err().unwrap_or(0));
    if req.flags & !KNOWN_FLAGS != 0 {
        return fail(w, sess, req, EINVAL);
    }
    let device = |r: crate::Result<()>| {
        r.map_err(|e| {
            let n = errno(&e);
            if n == EIO {
                warn!("{e}");
            }
            n
        })
    };
    match req.kind {
        CMD_READ => {
            if req.len > MAX_PAYLOAD {
                return fail(
                    w,
                    sess,
                    req,
                    if sess.structured { EOVERFLOW } else { EINVAL },
                );
            }
            if req.len == 0 || !in_range(export, req) {
                return fail(w, sess, req, EINVAL);
            }
            let n = req.len as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            if let Err(e) = device(dev.read(req.offset, &mut buf[..n])) {
                return fail(w, sess, req, e);
            }
            let mut w = w.lock().map_err(|_| io::Error::other("writer poisoned"))?;
            if sess.structured {
                let mut h = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.len + 8,
                )
                .to_vec();
                h.extend_from_slice(&req.offset.to_be_bytes());
                w.write_all(&h)?;
            } else {
                w.write_all(&simple_reply(0, req.cookie))?;
            }
            w.write_all(&buf[..n])
        }
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !export.writable => done(Err(EPERM)),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range(export, req) => done(Err(ENOSPC)),
        CMD_TRIM if !in_range(export, req) => done(Err(EINVAL)),
        CMD_WRITE => done(device(dev.write(req.offset, &job.payload, fua))),
        CMD_TRIM => done(device(dev.trim(req.offset, req.len as u64, fua))),
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            done(device(dev.write_zeroes(
                req.offset,
                req.len as u64,
                may_trim,
                fua,
            )))
        }
        CMD_FLUSH => done(device(dev.flush())),
        CMD_BLOCK_STATUS => {
            if !(sess.structured && sess.base_allocation) || req.len == 0 || !in_range(export, req)
            {
                return fail(w, sess, req, EINVAL);
            }
            let exts = match dev.extents(req.offset, req.len as u64) {
                Ok(e) => e,
                Err(e) => return fail(w, sess, req, device(Err(e)).err().unwrap_or(EIO)),
            };
            let descs = descriptors(&exts, req.flags & CMD_FLAG_REQ_ONE != 0);
            if descs.is_empty() {
                return fail(w, sess, req, EIO);
            }
            let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            for (len, flags) in &descs {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            let mut out = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                p.len() as u32,
            )
            .to_vec();
            out.extend_from_slice(&p);
            w.lock()
                .map_err(|_| io::Error::other("writer poisoned"))?
                .write_all(&out)
        }
        other => {
            debug!("unsupported command {other}");
            fail(w, sess, req, EINVAL)
        }
    }
}

/// base:allocation descriptors: (length, flags), lengths fit in u32 and stay 4 KiB aligned.
fn descriptors(exts: &[Extent], one: bool) -> Vec<(u32, u32)> {
    const MAX_LEN: u64 = (u32::MAX as u64) & !4095;
    let mut out = Vec::new();
    for e in exts {
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let mut left = e.len;
        while left > 0 {
            let n = left.min(MAX_LEN);
            out.push((n as u32, flags));
            left -= n;
            if one || out.len() >= MAX_DESCRIPTORS {
                return out;
            }
        }
    }
    out
}

fn simple(w: &Mutex<Conn>, cookie: u64, error: u32) -> io::Result<()> {
    w.lock()
        .map_err(|_| io::Error::other("writer poisoned"))?
        .write_all(&simple_reply(error, cookie))
}

/// An error reply: never followed by data.
fn fail(w: &Mutex<Conn>, sess: Session, req: &Request, error: u32) -> io::Result<()> {
    let structured_cmd = matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS);
    if sess.structured && structured_cmd {
        w.lock()
            .map_err(|_| io::Error::other("writer poisoned"))?
            .write_all(&error_chunk(req.cookie, error))
    } else {
        simple(w, req.cookie, error)
    }
}
