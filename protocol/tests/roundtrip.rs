//! Every message type survives encode → frame → decode unchanged; hostile bytes never
//! panic the decoder nor make it allocate past the frame limit.

mod common;

use hexz_protocol::frame::{body_len, read_frame, write_frame, PREFIX_LEN};
use hexz_protocol::*;
use proptest::prelude::*;

const MAX: u32 = 1 << 20;

fn frame_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, MAX, &mut out).unwrap();
    out
}

/// The body ciborium writes for `msg`. The codec moved from ciborium to cbor4ii; the
/// bytes on the wire must not have changed with it.
fn ciborium_body<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_request_round_trips(id in any::<u64>(), op in common::op()) {
        let req = Request { id, op };
        let f = frame_of(&req);
        let len = body_len(f[..PREFIX_LEN].try_into().unwrap(), MAX).unwrap();
        prop_assert_eq!(len, f.len() - PREFIX_LEN);
        // What the encoder writes obeys the encoding rules the decoder enforces.
        prop_assert_eq!(check_canonical(&f[PREFIX_LEN..]), Ok(()));
        prop_assert_eq!(&f[PREFIX_LEN..], &ciborium_body(&req)[..]);
        prop_assert_eq!(cbor_key(&f[PREFIX_LEN..], "op"), req.op.name());
        prop_assert!(Op::NAMES.contains(&req.op.name()));
        prop_assert_eq!(decode_request(&f[PREFIX_LEN..]).unwrap(), req);
    }

    #[test]
    fn every_reply_round_trips(id in any::<u64>(), r in common::reply_body()) {
        let rep = Reply { id, r };
        let f = frame_of(&rep);
        prop_assert_eq!(check_canonical(&f[PREFIX_LEN..]), Ok(()));
        prop_assert_eq!(&f[PREFIX_LEN..], &ciborium_body(&rep)[..]);
        prop_assert_eq!(cbor_key(&f[PREFIX_LEN..], "r"), rep.r.name());
        prop_assert!(ReplyBody::NAMES.contains(&rep.r.name()));
        prop_assert_eq!(decode_reply(&f[PREFIX_LEN..]).unwrap(), rep);
    }

    #[test]
    fn a_timespec_with_nsec_of_a_second_or_more_is_einval(
        id in any::<u64>(),
        sec in any::<i64>(),
        nsec in 1_000_000_000u32..,
        which in any::<bool>(),
    ) {
        let t = Some(SetTime::At(Timespec(sec, nsec)));
        let (atime, mtime) = if which { (t, None) } else { (None, t) };
        let req = Request {
            id,
            op: Op::Setattr { node: 2, fh: None, mode: None, uid: None, gid: None, size: None, atime, mtime },
        };
        let bad = decode_request(&frame_of(&req)[PREFIX_LEN..]).unwrap_err();
        prop_assert_eq!((bad.id, bad.errno), (Some(id), Errno::EINVAL));
        // The same in a reply's attributes: the reply does not decode.
        let attr = Attr { mtime: Timespec(sec, nsec), ..Attr::default() };
        let rep = Reply { id, r: ReplyBody::Attr { attr, attr_ttl_ms: 1 } };
        prop_assert!(decode_reply(&frame_of(&rep)[PREFIX_LEN..]).is_err());
    }

    #[test]
    fn random_bytes_never_panic_the_decoders(body in common::bytes(512)) {
        let _ = decode_request(&body);
        let _ = decode_reply(&body);
    }

    #[test]
    fn mutated_valid_requests_decode_or_fail_cleanly(
        id in any::<u64>(),
        op in common::op(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut body = frame_of(&Request { id, op })[PREFIX_LEN..].to_vec();
        for (at, v) in flips {
            let i = at.index(body.len());
            body[i] ^= v;
        }
        if truncate {
            body.truncate(cut.index(body.len()));
        }
        match decode_request(&body) {
            Ok(req) => {
                // Whatever decoded must re-encode to a message that decodes the same.
                let again = frame_of(&req);
                prop_assert_eq!(decode_request(&again[PREFIX_LEN..]).unwrap(), req);
            }
            Err(bad) => prop_assert!(bad.errno == Errno::EBADMSG || bad.id.is_some()),
        }
    }

    #[test]
    fn stream_reader_never_allocates_past_the_limit(stream in common::bytes(4096), max in 1u32..2048) {
        let mut r = std::io::Cursor::new(stream);
        let mut buf = Vec::new();
        for _ in 0..64 {
            match read_frame(&mut r, max, &mut buf) {
                Ok(()) => prop_assert!(buf.len() <= max as usize && !buf.is_empty()),
                Err(_) => break,
            }
        }
    }
}

/// The only key of the map under `outer` in a top-level map: the opcode or reply name.
fn cbor_key(body: &[u8], outer: &str) -> String {
    let v: ciborium::Value = ciborium::from_reader(body).unwrap();
    let top = v.as_map().unwrap();
    let (_, inner) = top
        .iter()
        .find(|(k, _)| k.as_text() == Some(outer))
        .unwrap();
    let inner = inner.as_map().unwrap();
    assert_eq!(inner.len(), 1);
    inner[0].0.as_text().unwrap().to_string()
}

#[test]
fn oversized_length_prefix_is_refused_before_allocation() {
    let mut stream = std::io::Cursor::new([0xff, 0xff, 0xff, 0xff, 1, 2, 3].to_vec());
    let mut buf = Vec::new();
    match read_frame(&mut stream, 4096, &mut buf) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!((len, max), (0xffff_ffff, 4096));
            assert_eq!(buf.capacity(), 0);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(body_len([0, 0, 0, 0], 10), Err(FrameError::Empty)));
}

#[test]
fn eof_between_frames_is_closed_and_inside_a_frame_is_truncated() {
    let mut out = Vec::new();
    let req = Request {
        id: 1,
        op: Op::Statfs { node: 1 },
    };
    write_frame(&mut out, &req, MAX).unwrap();
    let mut buf = Vec::new();
    let mut r = std::io::Cursor::new(out.clone());
    read_frame(&mut r, MAX, &mut buf).unwrap();
    assert!(matches!(
        read_frame(&mut r, MAX, &mut buf),
        Err(FrameError::Closed)
    ));
    let mut r = std::io::Cursor::new(out[..out.len() - 1].to_vec());
    assert!(matches!(
        read_frame(&mut r, MAX, &mut buf),
        Err(FrameError::Truncated)
    ));
    let mut r = std::io::Cursor::new(out[..2].to_vec());
    assert!(matches!(
        read_frame(&mut r, MAX, &mut buf),
        Err(FrameError::Truncated)
    ));
}

#[test]
fn encoding_past_the_limit_fails_and_writes_nothing() {
    let req = Request {
        id: 1,
        op: Op::Write {
            fh: 1,
            offset: 0,
            data: vec![7; 5000],
        },
    };
    let mut out = vec![1, 2, 3];
    assert!(matches!(
        encode_frame(&req, 4096, &mut out),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(out, vec![1, 2, 3]);
}

#[test]
fn unknown_opcode_is_enosys_with_the_id_and_bad_fields_are_einval() {
    // {"id": 9, "op": {"frobnicate": {}}}
    let mut body = Vec::new();
    let v = ciborium::Value::Map(vec![
        (
            ciborium::Value::Text("id".into()),
            ciborium::Value::Integer(9.into()),
        ),
        (
            ciborium::Value::Text("op".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("frobnicate".into()),
                ciborium::Value::Map(vec![]),
            )]),
        ),
    ]);
    ciborium::into_writer(&v, &mut body).unwrap();
    let bad = decode_request(&body).unwrap_err();
    assert_eq!((bad.id, bad.errno), (Some(9), Errno::ENOSYS));

    // {"id": 10, "op": {"read": {"fh": "x", "offset": 0, "size": 1}}}
    let v = ciborium::Value::Map(vec![
        (
            ciborium::Value::Text("id".into()),
            ciborium::Value::Integer(10.into()),
        ),
        (
            ciborium::Value::Text("op".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("read".into()),
                ciborium::Value::Map(vec![
                    (
                        ciborium::Value::Text("fh".into()),
                        ciborium::Value::Text("x".into()),
                    ),
                    (
                        ciborium::Value::Text("offset".into()),
                        ciborium::Value::Integer(0.into()),
                    ),
                    (
                        ciborium::Value::Text("size".into()),
                        ciborium::Value::Integer(1.into()),
                    ),
                ]),
            )]),
        ),
    ]);
    let mut body = Vec::new();
    ciborium::into_writer(&v, &mut body).unwrap();
    let bad = decode_request(&body).unwrap_err();
    assert_eq!((bad.id, bad.errno), (Some(10), Errno::EINVAL));

    // Not CBOR at all: no id to answer.
    let bad = decode_request(&[0xff, 0x00, 0x13]).unwrap_err();
    assert_eq!((bad.id, bad.errno), (None, Errno::EBADMSG));

    // Trailing garbage after a valid request.
    let mut f = frame_of(&Request {
        id: 3,
        op: Op::Statfs { node: 1 },
    })[PREFIX_LEN..]
        .to_vec();
    f.push(0);
    assert_eq!(decode_request(&f).unwrap_err().id, Some(3));
}

#[test]
fn deeply_nested_cbor_is_refused_not_a_stack_overflow() {
    // 100k nested arrays under "op".
    let mut body = vec![0xa2, 0x62, b'i', b'd', 0x01, 0x62, b'o', b'p'];
    body.extend(std::iter::repeat_n(0x81, 100_000));
    body.push(0x00);
    let bad = decode_request(&body).unwrap_err();
    assert_ne!(bad.errno, Errno::ENOSYS);
}

#[tokio::test]
async fn tokio_codec_reads_what_the_blocking_codec_writes() {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let reqs: Vec<Request> = (0..50)
        .map(|i| Request {
            id: i,
            op: Op::Read {
                fh: 3,
                offset: i * 4096,
                size: 4096,
            },
        })
        .collect();
    let sent = reqs.clone();
    let writer = tokio::spawn(async move {
        for r in &sent {
            hexz_protocol::frame::tokio_io::write_frame(&mut a, r, MAX)
                .await
                .unwrap();
        }
    });
    let mut buf = Vec::new();
    for want in &reqs {
        hexz_protocol::frame::tokio_io::read_frame(&mut b, MAX, &mut buf)
            .await
            .unwrap();
        assert_eq!(&decode_request(&buf).unwrap(), want);
    }
    writer.await.unwrap();
    assert!(matches!(
        hexz_protocol::frame::tokio_io::read_frame(&mut b, MAX, &mut buf).await,
        Err(FrameError::Closed)
    ));
}
