//! Reads: checked, split into requests ([`plan_read`]), and each request's
//! reply reassembled from chunks, every chunk checked against its request
//! ([`PendingRead`]). [`Connection::read`] pipelines the requests itself;
//! [`SharedConnection`](super::SharedConnection) shares the same pieces.

use crate::nbd::client::reply::{check_echo, check_none, unknown_cookie, Rx, Step};
use crate::nbd::client::{
    request_error, round_up, Connection, Session, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES,
};
use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, ReplyHeader, Request};

/// Refuses a read of `len` bytes at `offset` that leaves the export.
pub(super) fn check_read(s: &Session, offset: u64, len: usize) -> Result<(), NbdError> {
    let len = len as u64;
    if offset.checked_add(len).is_none_or(|end| end > s.size) {
        return Err(NbdError::InvalidRequest {
            what: format!(
                "read of {len} bytes at offset {offset} goes past the end of the export ({} bytes)",
                s.size
            ),
        });
    }
    Ok(())
}

/// One read request of a call: `len` bytes at export offset `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) offset: u64,
    pub(super) len: u64,
    /// Where the bytes go in the caller's buffer.
    pub(super) at: usize,
    /// For an unaligned edge, read as whole blocks into a bounce buffer:
    /// `(skip, n)`, the `n` bytes at `skip` in it are the caller's.
    pub(super) bounce: Option<(usize, usize)>,
}

impl Piece {
    /// The buffer a bounced piece is read into (empty for the others).
    pub(super) fn bounce_buffer(&self) -> Vec<u8> {
        match self.bounce {
            Some(_) => vec![0; self.len as usize],
            None => Vec::new(),
        }
    }

    /// Where the piece's data lands: in `buf`, or in `bounce`.
    fn dst<'a>(&self, buf: &'a mut [u8], bounce: &'a mut [u8]) -> &'a mut [u8] {
        match self.bounce {
            Some(_) => bounce,
            None => &mut buf[self.at..self.at + self.len as usize],
        }
    }

    /// Copies a bounced piece's bytes to the caller's buffer.
    pub(super) fn unbounce(&self, bounce: &[u8], buf: &mut [u8]) {
        if let Some((skip, n)) = self.bounce {
            buf[self.at..self.at + n].copy_from_slice(&bounce[skip..skip + n]);
        }
    }
}

/// The length of each read request: the maximum block size, capped at
/// 32 MiB, in whole minimum blocks.
fn request_len(s: &Session) -> u64 {
    let min = u64::from(s.min_block);
    let max = u64::from(s.max_block.min(proto::DEFAULT_MAX_BLOCK));
    (max - max % min).max(min)
}

/// Splits a read of `len` (> 0) bytes at `offset` (checked) into requests
/// that respect the block size constraints: requests of at most
/// [`request_len`] bytes, and unaligned edges (when the minimum block size
/// is above 1) read as whole blocks through a bounce buffer.
pub(super) fn plan_read(s: &Session, offset: u64, len: usize) -> Vec<Piece> {
    let min = u64::from(s.min_block);
    let end = offset + len as u64;
    // The export's last bytes count as aligned, even if its size is not.
    let aligned = |x: u64| x % min == 0 || x == s.size;
    let head_end = if aligned(offset) {
        offset
    } else {
        round_up(offset, min).min(end)
    };
    let tail_start = if aligned(end) {
        end
    } else {
        (end - end % min).max(head_end)
    };
    let bounced = |from: u64, to: u64| {
        let start = from - from % min;
        let stop = round_up(to, min).min(s.size);
        Piece {
            offset: start,
            len: stop - start,
            at: (from - offset) as usize,
            bounce: Some(((from - start) as usize, (to - from) as usize)),
        }
    };
    let mut out = Vec::new();
    if head_end > offset {
        out.push(bounced(offset, head_end));
    }
    let step = request_len(s);
    let mut at = head_end;
    while at < tail_start {
        let n = step.min(tail_start - at);
        out.push(Piece {
            offset: at,
            len: n,
            at: (at - offset) as usize,
            bounce: None,
        });
        at += n;
    }
    if end > tail_start {
        out.push(bounced(tail_start, end));
    }
    out
}

/// One read request in flight.
#[derive(Debug)]
pub(super) struct PendingRead {
    offset: u64,
    len: u64,
    /// Byte ranges (relative to `offset`) that chunks have filled, sorted.
    covered: Vec<(u64, u64)>,
    covered_bytes: u64,
    /// The server's first error for this request.
    error: Option<NbdError>,
}

impl PendingRead {
    pub(super) fn new(piece: &Piece) -> PendingRead {
        PendingRead {
            offset: piece.offset,
            len: piece.len,
            covered: Vec::new(),
            covered_bytes: 0,
            error: None,
        }
    }

    /// Records the `n` bytes at export offset `off` as filled and returns
    /// where they start in the request: `Err` if they leave the request,
    /// are empty, or overlap an earlier chunk.
    fn cover(&mut self, off: u64, n: u64) -> Result<u64, NbdError> {
        let start = off.checked_sub(self.offset);
        let (start, end) = match start.and_then(|s| Some((s, s.checked_add(n)?))) {
            Some((s, e)) if n > 0 && e <= self.len => (s, e),
            _ => {
                return Err(NbdError::protocol(format!(
                    "chunk for {n} bytes at offset {off} outside the read of {} bytes at offset {}",
                    self.len, self.offset
                )))
            }
        };
        let i = self.covered.partition_point(|r| r.0 < start);
        let overlaps = (i > 0 && self.covered[i - 1].1 > start)
            || (i < self.covered.len() && self.covered[i].0 < end);
        if overlaps {
            return Err(NbdError::protocol(format!(
                "overlapping chunks at offset {} in the reply to a read",
                self.offset + start
            )));
        }
        self.covered.insert(i, (start, end));
        self.covered_bytes += end - start;
        Ok(start)
    }

    /// Takes one message of the reply (a simple reply, or one chunk) whose
    /// `header` was just read, its data going to `dst` (the request's
    /// `len` bytes). `Err` is a protocol violation or a transport failure.
    pub(super) fn on_message(
        &mut self,
        rx: &mut Rx,
        s: &Session,
        header: ReplyHeader,
        dst: &mut [u8],
    ) -> Result<Step<()>, NbdError> {
        debug_assert_eq!(dst.len() as u64, self.len);
        let chunk = match header {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    let e = request_error("read", self.offset, self.len, error, "");
                    return Ok(Step::Done(Err(e)));
                }
                if s.structured {
                    return Err(NbdError::protocol(
                        "simple reply with data to a read despite structured replies",
                    ));
                }
                rx.recv(dst, "reading read data")?;
                return Ok(Step::Done(Ok(())));
            }
            ReplyHeader::Chunk(c) => c,
        };
        check_echo(&chunk, self.offset)?;
        match chunk.kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                if chunk.len < 9 || chunk.len - 8 > self.len {
                    return Err(NbdError::protocol(format!(
                        "NBD_REPLY_TYPE_OFFSET_DATA of {} bytes for a read of {}",
                        chunk.len, self.len
                    )));
                }
                let mut b8 = [0u8; 8];
                rx.recv(&mut b8, "reading a reply")?;
                let n = chunk.len - 8;
                let at = self.cover(proto::decode_data_offset(&b8), n)? as usize;
                rx.recv(&mut dst[at..at + n as usize], "reading read data")?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let payload = rx.recv_vec(chunk.len, 12, "NBD_REPLY_TYPE_OFFSET_HOLE")?;
                let (off, n) = proto::decode_offset_hole(&payload)?;
                let at = self.cover(off, u64::from(n))? as usize;
                dst[at..at + n as usize].fill(0);
            }
            proto::REPLY_TYPE_NONE => check_none(&chunk)?,
            k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                let e = rx.error_chunk(&chunk, "read", self.offset, self.len)?;
                self.error.get_or_insert(e);
            }
            k => {
                return Err(NbdError::protocol(format!(
                    "chunk type {k} in the reply to a read"
                )))
            }
        }
        if !chunk.done() {
            return Ok(Step::More);
        }
        if let Some(e) = self.error.take() {
            return Ok(Step::Done(Err(e)));
        }
        if self.covered_bytes != self.len {
            return Err(NbdError::protocol(format!(
                "the reply to a read of {} bytes at offset {} covers only {} bytes",
                self.len, self.offset, self.covered_bytes
            )));
        }
        Ok(Step::Done(Ok(())))
    }
}

impl Connection {
    /// Reads `buf.len()` bytes at `offset`. The range must lie inside the
    /// export. Requests are split at the maximum block size (capped at
    /// 32 MiB) and pipelined; unaligned edges (when the server has a
    /// minimum block size above 1) are read through a small bounce buffer.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_ready()?;
        check_read(&self.s, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let pieces = plan_read(&self.s, offset, buf.len());
        let r = self.read_pieces(&pieces, buf);
        r.map_err(|e| self.fail(e))
    }

    /// Reads `pieces`: pipelined requests, replies matched by cookie.
    /// After a server error no new requests are sent, the others are
    /// drained, and the first error is returned.
    fn read_pieces(&mut self, pieces: &[Piece], buf: &mut [u8]) -> Result<(), NbdError> {
        let mut bounces: Vec<Vec<u8>> = pieces.iter().map(Piece::bounce_buffer).collect();
        // (cookie, index in `pieces`, state)
        let mut pending: Vec<(u64, usize, PendingRead)> = Vec::new();
        let mut next = 0usize;
        let mut first_err: Option<NbdError> = None;
        loop {
            let mut batch = Vec::new();
            let mut in_flight: u64 = pending.iter().map(|(_, i, _)| pieces[*i].len).sum();
            while next < pieces.len() && first_err.is_none() && pending.len() < MAX_IN_FLIGHT {
                let piece = &pieces[next];
                if !pending.is_empty() && in_flight + piece.len > MAX_IN_FLIGHT_BYTES {
                    break;
                }
                let req = Request {
                    flags: 0,
                    command: proto::CMD_READ,
                    cookie: self.cookie(),
                    offset: piece.offset,
                    len: piece.len,
                };
                batch.extend_from_slice(&req.encode(self.s.extended)?);
                pending.push((req.cookie, next, PendingRead::new(piece)));
                in_flight += piece.len;
                next += 1;
            }
            if !batch.is_empty() {
                self.send(&batch, "sending read requests")?;
            }
            if pending.is_empty() {
                break;
            }
            let (header, cookie) = self.rx.reply_header(&self.s)?;
            let idx = pending
                .iter()
                .position(|p| p.0 == cookie)
                .ok_or_else(|| unknown_cookie(cookie))?;
            let (_, i, p) = &mut pending[idx];
            let dst = pieces[*i].dst(buf, &mut bounces[*i]);
            if let Step::Done(r) = p.on_message(&mut self.rx, &self.s, header, dst)? {
                pending.remove(idx);
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        for (piece, bounce) in pieces.iter().zip(&bounces) {
            piece.unbounce(bounce, buf);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pending_coverage() {
        let mut p = PendingRead::new(&Piece {
            offset: 1000,
            len: 100,
            at: 0,
            bounce: None,
        });
        assert_eq!(p.cover(1050, 50).unwrap(), 50);
        assert_eq!(p.cover(1000, 10).unwrap(), 0);
        assert!(p.cover(1005, 15).is_err());
        assert!(p.cover(1040, 20).is_err());
        assert!(p.cover(1090, 11).is_err());
        assert!(p.cover(1020, 0).is_err());
        assert!(p.cover(999, 1).is_err());
        assert!(p.cover(u64::MAX, 2).is_err());
        assert_eq!(p.cover(1010, 40).unwrap(), 10);
        assert_eq!(p.covered_bytes, 100);
    }

    fn session(min: u32, max: u32, size: u64) -> Session {
        Session {
            timeout: Duration::from_secs(1),
            size,
            flags: 0,
            min_block: min,
            preferred_block: 4096,
            max_block: max,
            contexts: Vec::new(),
            structured: true,
            extended: false,
        }
    }

    #[test]
    fn planning() {
        let piece = |offset, len, at, bounce| Piece {
            offset,
            len,
            at,
            bounce,
        };
        let s = session(512, 4096, 10_000);
        // Head and tail bounced, the middle split at the maximum.
        assert_eq!(
            plan_read(&s, 100, 9000),
            vec![
                piece(0, 512, 0, Some((100, 412))),
                piece(512, 4096, 412, None),
                piece(4608, 4096, 4508, None),
                piece(8704, 512, 8604, Some((0, 396))),
            ]
        );
        // Inside one block; and at the unaligned end of the export.
        assert_eq!(
            plan_read(&s, 513, 10),
            vec![piece(512, 512, 0, Some((1, 10)))]
        );
        assert_eq!(
            plan_read(&s, 9990, 10),
            vec![piece(9728, 272, 0, Some((262, 10)))]
        );
        assert_eq!(plan_read(&s, 9728, 272), vec![piece(9728, 272, 0, None)]);
        // No minimum: never bounced; the maximum is capped at 32 MiB.
        let s = session(1, u32::MAX, 1 << 30);
        let p = plan_read(&s, 7, 64 << 20);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.bounce.is_none() && p.len == 32 << 20));
    }
}
