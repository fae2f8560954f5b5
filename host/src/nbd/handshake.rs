//! The fixed-newstyle handshake: options until the client picks the export (GO or
//! EXPORT_NAME) or leaves. Protocol violations end the connection with an error saying why.

use std::io::{self, Read, Write};

use super::wire::*;
use super::Export;

/// Longest option payload read into memory; longer ones are skipped with ERR_TOO_BIG.
const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest option payload skipped at all; past it the client is not a client.
const MAX_SKIP_LEN: u32 = 1 << 20;
/// Options per connection before the client is deemed to be looping.
const MAX_OPTIONS: usize = 1024;

/// What the client negotiated for the transmission phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Session {
    pub structured: bool,
    pub base_allocation: bool,
}

fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Runs the handshake. `Ok(None)`: the client aborted or left cleanly.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &Export) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    let mut sess = Session::default();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if be64(&h[0..8]) != IHAVEOPT {
            return Err(violation("option without the IHAVEOPT magic"));
        }
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            if len > MAX_SKIP_LEN || opt == OPT_EXPORT_NAME {
                return Err(violation(format!("option {opt} with a {len}-byte payload")));
            }
            io::copy(&mut Read::by_ref(s).take(len as u64), &mut io::sink())?;
            s.write_all(&option_reply(
                opt,
                REP_ERR_TOO_BIG,
                b"option payload too large",
            ))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, d: &[u8]| s.write_all(&option_reply(opt, kind, d));
        match opt {
            OPT_EXPORT_NAME => {
                if !export.answers_to(&data) {
                    return Err(violation(format!(
                        "EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&export.device.size().to_be_bytes());
                v.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                return Ok(Some(sess));
            }
            OPT_ABORT => {
                let _ = reply(s, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut d = Vec::new();
                d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                d.extend_from_slice(export.name.as_bytes());
                d.extend_from_slice(export.description.as_bytes());
                reply(s, REP_SERVER, &d)?;
                reply(s, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info(&data) else {
                    reply(s, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if !export.answers_to(name) {
                    reply(s, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&export.device.size().to_be_bytes());
                d.extend_from_slice(&export.transmission_flags().to_be_bytes());
                reply(s, REP_INFO, &d)?;
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(s, REP_INFO, &d)?;
                }
                if infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(s, REP_INFO, &d)?;
                }
                let bs = export.device.block_sizes();
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [bs.minimum, bs.preferred, bs.maximum] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                reply(s, REP_INFO, &d)?;
                reply(s, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(sess));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                sess.structured = true;
                reply(s, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !sess.structured {
                    reply(
                        s,
                        REP_ERR_INVALID,
                        b"SET_META_CONTEXT needs structured replies",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    reply(s, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if !export.answers_to(name) {
                    reply(s, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let matches = if set {
                    queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
                };
                if set {
                    sess.base_allocation = matches;
                }
                if matches {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(s, REP_META_CONTEXT, &d)?;
                }
                reply(s, REP_ACK, &[])?;
            }
            _ => reply(s, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(violation("too many options"))
}

/// INFO/GO payload: u32 name length, name, u16 count, count × u16.
fn parse_info(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = be32(d.get(0..4)?) as usize;
    let name = d.get(4..4 + nlen)?;
    let rest = d.get(4 + nlen..)?;
    let n = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let items = rest.get(2..)?;
    if items.len() != n * 2 {
        return None;
    }
    Some((
        name,
        items
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Meta context payload: u32 name length, name, u32 count, count × (u32 length, query).
fn parse_meta(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let nlen = be32(d.get(0..4)?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let mut at = 4 + nlen;
    let n = be32(d.get(at..at + 4)?) as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = be32(d.get(at..at + 4)?) as usize;
        at += 4;
        queries.push(d.get(at..at.checked_add(qlen)?)?);
        at += qlen;
    }
    (at == d.len()).then_some((name, queries))
}
