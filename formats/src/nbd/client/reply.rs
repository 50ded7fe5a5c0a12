//! The receiving side of a connection ([`Rx`]) and what both
//! [`Connection`](super::Connection) and
//! [`SharedConnection`](super::SharedConnection) do with replies: read a
//! header, then hand the message to the state of the request it answers
//! ([`PendingStatus`] here, `PendingRead` in `read.rs`), which checks it
//! against that request.

use std::io::{self, BufRead, BufReader, Read};
use std::time::Duration;

use crate::nbd::client::{request_error, round_up, Session, Stream};
use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, ChunkHeader, ReplyHeader, Request};

/// Block status chunks with more descriptors than this are refused rather
/// than allocated.
const MAX_DESCRIPTORS: u64 = 1 << 20;

/// Buffered reads from the socket, each with the connection's timeout.
#[derive(Debug)]
pub(super) struct Rx {
    pub(super) io: BufReader<Stream>,
    pub(super) timeout: Duration,
}

/// Where a request stands after one message of its reply.
#[derive(Debug)]
pub(super) enum Step<T> {
    /// More chunks follow.
    More,
    /// The reply is complete: the result, or the server's error for this
    /// request (which leaves the connection in step).
    Done(Result<T, NbdError>),
}

impl<T> Step<T> {
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::More => Step::More,
            Step::Done(r) => Step::Done(r.map(f)),
        }
    }
}

impl Rx {
    pub(super) fn recv(&mut self, buf: &mut [u8], doing: &'static str) -> Result<(), NbdError> {
        self.io
            .read_exact(buf)
            .map_err(|e| NbdError::from_io(e, doing, self.timeout))
    }

    /// Reads `len` bytes into a new vector, refusing more than `cap`.
    pub(super) fn recv_vec(&mut self, len: u64, cap: u64, what: &str) -> Result<Vec<u8>, NbdError> {
        if len > cap {
            return Err(NbdError::protocol(format!(
                "{what} of {len} bytes (at most {cap} expected)"
            )));
        }
        let mut v = vec![0; len as usize];
        self.recv(&mut v, "reading a reply")?;
        Ok(v)
    }

    /// Waits for the start of the next message: `Ok(true)` once some of it
    /// is buffered, `Ok(false)` if the stream ended first. A timeout is
    /// returned as the socket's error, so that a connection with nothing
    /// in flight can go on waiting.
    pub(super) fn wait_readable(&mut self) -> io::Result<bool> {
        loop {
            match self.io.fill_buf() {
                Ok(b) => return Ok(!b.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a reply header (a simple reply, or a chunk's header) and
    /// returns it with its cookie. Its magic must be one `s` negotiated.
    pub(super) fn reply_header(&mut self, s: &Session) -> Result<(ReplyHeader, u64), NbdError> {
        let mut b4 = [0u8; 4];
        self.recv(&mut b4, "waiting for a reply")?;
        let magic = u32::from_be_bytes(b4);
        let expected = match magic {
            proto::SIMPLE_REPLY_MAGIC => !s.extended,
            proto::STRUCTURED_REPLY_MAGIC => s.structured && !s.extended,
            proto::EXTENDED_REPLY_MAGIC => s.extended,
            _ => false,
        };
        if !expected {
            return Err(NbdError::protocol(format!(
                "reply magic {magic:#010x} (out of step, or a header the client did not negotiate)"
            )));
        }
        let mut rest = [0u8; 28];
        let rest = &mut rest[..proto::reply_rest_len(magic).expect("known magic")];
        self.recv(rest, "reading a reply")?;
        let header = proto::decode_reply_header(magic, rest)?;
        let cookie = match header {
            ReplyHeader::Simple { cookie, .. } => cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        };
        Ok((header, cookie))
    }

    /// Reads an error chunk's payload as a request error.
    pub(super) fn error_chunk(
        &mut self,
        chunk: &ChunkHeader,
        command: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<NbdError, NbdError> {
        let payload = self.recv_vec(chunk.len, proto::MAX_ERROR_PAYLOAD, "error chunk")?;
        let e = proto::decode_error_chunk(chunk.kind, &payload)?;
        let message = match e.offset {
            Some(o) if o < offset || o - offset >= len => {
                return Err(NbdError::protocol(format!(
                    "error offset {o} outside the request at {offset} of {len} bytes"
                )))
            }
            Some(o) if e.message.is_empty() => format!("at offset {o}"),
            Some(o) => format!("at offset {o}: {}", e.message),
            None => e.message,
        };
        Ok(request_error(command, offset, len, e.errno, &message))
    }
}

/// A reply whose cookie no request in flight has.
pub(super) fn unknown_cookie(cookie: u64) -> NbdError {
    NbdError::protocol(format!(
        "reply with cookie {cookie:#x}, which no request has"
    ))
}

/// Extended replies echo the request's offset.
pub(super) fn check_echo(chunk: &ChunkHeader, offset: u64) -> Result<(), NbdError> {
    match chunk.offset {
        Some(o) if o != offset => Err(NbdError::protocol(format!(
            "reply echoes offset {o} for a request at {offset}"
        ))),
        _ => Ok(()),
    }
}

pub(super) fn check_none(chunk: &ChunkHeader) -> Result<(), NbdError> {
    if chunk.len != 0 || !chunk.done() {
        return Err(NbdError::protocol(
            "NBD_REPLY_TYPE_NONE with a payload or without NBD_REPLY_FLAG_DONE",
        ));
    }
    Ok(())
}

/// One block status request, from its validation to its reply.
#[derive(Debug)]
pub(super) struct PendingStatus {
    /// The asked context's id.
    id: u32,
    pub(super) offset: u64,
    /// What the caller gets at most.
    len: u64,
    /// What was asked of the server: `len` rounded up to whole blocks.
    pub(super) wire_len: u64,
    /// Context ids answered so far.
    seen: Vec<u32>,
    ours: Option<Vec<(u64, u64)>>,
    error: Option<NbdError>,
}

impl PendingStatus {
    /// Checks a block status call (see
    /// [`Connection::block_status`](super::Connection::block_status)) and
    /// plans its request.
    pub(super) fn new(
        s: &Session,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<PendingStatus, NbdError> {
        let Some(&(id, _)) = s.contexts.iter().find(|(_, n)| n == context) else {
            return Err(NbdError::InvalidRequest {
                what: format!("metadata context {context:?} was not negotiated"),
            });
        };
        let min = u64::from(s.min_block);
        if len == 0 || offset >= s.size || offset % min != 0 {
            return Err(NbdError::InvalidRequest {
                what: format!(
                    "block status of {len} bytes at offset {offset} (export of {} bytes, minimum block {min})",
                    s.size
                ),
            });
        }
        let mut len = len.min(s.size - offset);
        if !s.extended {
            // Whole 4 KiB pages below 4 GiB: nbdkit 1.32 aborts on a length
            // of exactly u32::MAX.
            let cap = u64::from(u32::MAX) & !0xfff;
            len = len.min(cap - cap % min);
        }
        // Ask for whole blocks, up to the export's end.
        let wire_len = round_up(offset + len, min).min(s.size) - offset;
        Ok(PendingStatus {
            id,
            offset,
            len,
            wire_len,
            seen: Vec::new(),
            ours: None,
            error: None,
        })
    }

    pub(super) fn request(&self, cookie: u64) -> Request {
        Request {
            flags: 0,
            command: proto::CMD_BLOCK_STATUS,
            cookie,
            offset: self.offset,
            len: self.wire_len,
        }
    }

    /// Takes one message of the reply, whose `header` was just read: the
    /// descriptors of the asked context when it is complete. `Err` is a
    /// protocol violation or a transport failure.
    pub(super) fn on_message(
        &mut self,
        rx: &mut Rx,
        s: &Session,
        header: ReplyHeader,
    ) -> Result<Step<Vec<(u64, u32)>>, NbdError> {
        let cmd = "block status";
        let chunk = match header {
            ReplyHeader::Simple { error: 0, .. } => {
                return Err(NbdError::protocol(
                    "simple reply without block status to NBD_CMD_BLOCK_STATUS",
                ))
            }
            ReplyHeader::Simple { error, .. } => {
                let e = request_error(cmd, self.offset, self.wire_len, error, "");
                return Ok(Step::Done(Err(e)));
            }
            ReplyHeader::Chunk(c) => c,
        };
        check_echo(&chunk, self.offset)?;
        let want = if s.extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        match chunk.kind {
            k if k == want => {
                let each = if s.extended { 16 } else { 8 };
                let cap = 8 + each * MAX_DESCRIPTORS;
                let payload = rx.recv_vec(chunk.len, cap, "block status chunk")?;
                let (cid, descs) = proto::decode_block_status(s.extended, &payload)?;
                if !s.contexts.iter().any(|(i, _)| *i == cid) || self.seen.contains(&cid) {
                    return Err(NbdError::protocol(format!(
                        "block status for context id {cid}, unknown or given twice"
                    )));
                }
                self.seen.push(cid);
                if cid == self.id {
                    self.ours = Some(descs);
                }
            }
            proto::REPLY_TYPE_NONE => check_none(&chunk)?,
            k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                let e = rx.error_chunk(&chunk, cmd, self.offset, self.wire_len)?;
                self.error.get_or_insert(e);
            }
            k => {
                return Err(NbdError::protocol(format!(
                    "chunk type {k} in the reply to a block status request"
                )))
            }
        }
        if !chunk.done() {
            return Ok(Step::More);
        }
        if let Some(e) = self.error.take() {
            return Ok(Step::Done(Err(e)));
        }
        let descs = self.ours.take().ok_or_else(|| {
            NbdError::protocol("the reply to a block status request lacks the asked context")
        })?;
        clip_descriptors(&descs, self.wire_len, self.len).map(|d| Step::Done(Ok(d)))
    }
}

/// Checks a context's descriptors against a request of `wire_len` bytes
/// (all but the last must end inside it: proto.md "Structured reply
/// types", `NBD_REPLY_TYPE_BLOCK_STATUS`) and cuts them to `len` bytes,
/// with flags narrowed to 32 bits.
fn clip_descriptors(
    descs: &[(u64, u64)],
    wire_len: u64,
    len: u64,
) -> Result<Vec<(u64, u32)>, NbdError> {
    let mut out = Vec::with_capacity(descs.len());
    let mut pos = 0u64;
    for (i, &(l, flags)) in descs.iter().enumerate() {
        if pos >= wire_len {
            return Err(NbdError::protocol(format!(
                "block status descriptor {i} starts past the {wire_len} bytes asked"
            )));
        }
        let flags = u32::try_from(flags).map_err(|_| {
            NbdError::protocol(format!("block status flags {flags:#x} do not fit 32 bits"))
        })?;
        if pos < len {
            out.push((l.min(len - pos), flags));
        }
        pos = pos.saturating_add(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping() {
        assert_eq!(
            clip_descriptors(&[(4096, 3), (8192, 0)], 10000, 10000).unwrap(),
            vec![(4096, 3), (5904, 0)]
        );
        assert_eq!(
            clip_descriptors(&[(512, 1)], 4096, 100).unwrap(),
            vec![(100, 1)]
        );
        // The server asked for 4096 (rounded up) but the caller for 100.
        assert_eq!(
            clip_descriptors(&[(100, 1), (3996, 0)], 4096, 100).unwrap(),
            vec![(100, 1)]
        );
        assert!(clip_descriptors(&[(4096, 0), (1, 0)], 4096, 4096).is_err());
        assert!(clip_descriptors(&[(1, 1 << 40)], 4096, 4096).is_err());
    }
}
