//! A minimal blocking client over any `Read + Write` stream: hello, then requests and
//! replies, pipelining allowed. For tools, tests and benchmarks; the guest daemon has
//! its own multiplexing client and shares [`hello`] with this one.

use std::io::{Read, Write};

use crate::frame::{read_frame, FrameError};
use crate::hello::{check_hello_reply, Limits, PRE_HELLO_MAX_FRAME, VERSION};
use crate::message::{Hello, HelloReply, Op, Reply, ReplyBody, Request};
use crate::{decode_reply, encode_frame};

pub struct Client<S> {
    stream: S,
    pub hello: HelloReply,
    pub limits: Limits,
    next_id: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// The hello a client sends by default: version 1, default limits, every v1 capability.
pub fn default_hello(client: &str) -> Hello {
    let l = Limits::default();
    Hello {
        versions: vec![VERSION],
        max_frame: l.max_frame,
        max_read: l.max_read,
        max_write: l.max_write,
        max_in_flight: l.max_in_flight,
        caps: crate::message::CAPS.iter().map(|s| s.to_string()).collect(),
        client: client.to_string(),
    }
}

/// The client's half of the hello exchange (docs/PROTOCOL.md §4) on a fresh stream: sends
/// `hello` as request 0, reads the one reply, and checks it against the offer. Returns the
/// server's reply and the limits both sides now use. The one implementation, used by
/// [`Client`] and by the guest daemon.
pub fn hello<S: Read + Write>(
    stream: &mut S,
    hello: &Hello,
) -> Result<(HelloReply, Limits), FrameError> {
    let mut out = Vec::new();
    encode_frame(
        &Request {
            id: 0,
            op: Op::Hello(hello.clone()),
        },
        PRE_HELLO_MAX_FRAME,
        &mut out,
    )?;
    stream.write_all(&out)?;
    stream.flush()?;
    let mut buf = Vec::new();
    read_frame(stream, PRE_HELLO_MAX_FRAME, &mut buf)?;
    let reply = decode_reply(&buf)?;
    if reply.id != 0 {
        return Err(FrameError::Decode(format!(
            "hello answered with id {}, expected 0",
            reply.id
        )));
    }
    let r = match reply.r {
        ReplyBody::Hello(r) => r,
        ReplyBody::Err(e) => return Err(FrameError::Decode(format!("hello refused: {e}"))),
        other => {
            return Err(FrameError::Decode(format!(
                "unexpected hello reply {other:?}"
            )))
        }
    };
    let limits = check_hello_reply(hello, &r)
        .map_err(|e| FrameError::Decode(format!("bad hello reply: {e}")))?;
    Ok((r, limits))
}

impl<S: Read + Write> Client<S> {
    /// Performs the hello exchange on `stream`.
    pub fn new(mut stream: S, offer: Hello) -> Result<Client<S>, FrameError> {
        let (r, limits) = hello(&mut stream, &offer)?;
        Ok(Client {
            stream,
            hello: r,
            limits,
            next_id: 1,
            buf: Vec::new(),
            out: Vec::new(),
        })
    }

    /// Sends a request without waiting; returns its id.
    pub fn send(&mut self, op: Op) -> Result<u64, FrameError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        encode_frame(&Request { id, op }, self.limits.max_frame, &mut self.out)?;
        self.stream.write_all(&self.out)?;
        Ok(id)
    }

    /// The next reply, whichever request it answers.
    pub fn recv(&mut self) -> Result<Reply, FrameError> {
        read_frame(&mut self.stream, self.limits.max_frame, &mut self.buf)?;
        decode_reply(&self.buf)
    }

    /// One request, one reply (nothing else may be in flight).
    pub fn call(&mut self, op: Op) -> Result<ReplyBody, FrameError> {
        let id = self.send(op)?;
        let r = self.recv()?;
        if r.id != id {
            return Err(FrameError::Decode(format!(
                "reply to {} while waiting for {id}",
                r.id
            )));
        }
        Ok(r.r)
    }
}
