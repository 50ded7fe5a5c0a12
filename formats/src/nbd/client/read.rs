//! Reads: split, pipelined, reassembled from chunks, every chunk checked
//! against its request.

use crate::nbd::client::{request_error, round_up, Connection, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, ReplyHeader, Request};

/// One read request in flight.
struct PendingRead {
    cookie: u64,
    offset: u64,
    len: u64,
    /// Where its data goes in the caller's buffer.
    buf_start: usize,
    /// Byte ranges (relative to `offset`) that chunks have filled, sorted.
    covered: Vec<(u64, u64)>,
    covered_bytes: u64,
    errored: bool,
}

impl PendingRead {
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
}

impl Connection {
    /// Reads `buf.len()` bytes at `offset`. The range must lie inside the
    /// export. Requests are split at the maximum block size (capped at
    /// 32 MiB) and pipelined; unaligned edges (when the server has a
    /// minimum block size above 1) are read through a small bounce buffer.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_ready()?;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(NbdError::InvalidRequest {
                what: format!(
                    "read of {len} bytes at offset {offset} goes past the end of the export ({} bytes)",
                    self.size
                ),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let r = self.read_checked(offset, buf);
        r.map_err(|e| self.fail(e))
    }

    fn read_checked(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let min = u64::from(self.min_block);
        let end = offset + buf.len() as u64;
        // The export's last bytes count as aligned, even if its size is not.
        let aligned = |x: u64| x % min == 0 || x == self.size;
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
        if head_end > offset {
            self.read_bounced(offset, &mut buf[..(head_end - offset) as usize])?;
        }
        if tail_start > head_end {
            let (a, b) = ((head_end - offset) as usize, (tail_start - offset) as usize);
            self.read_aligned(head_end, &mut buf[a..b])?;
        }
        if end > tail_start {
            self.read_bounced(tail_start, &mut buf[(tail_start - offset) as usize..])?;
        }
        Ok(())
    }

    /// Reads a range inside one minimum block through a bounce buffer.
    fn read_bounced(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let min = u64::from(self.min_block);
        let start = offset - offset % min;
        let end = round_up(offset + buf.len() as u64, min).min(self.size);
        let mut bounce = vec![0u8; (end - start) as usize];
        self.read_aligned(start, &mut bounce)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        Ok(())
    }

    /// The length of each read request.
    fn request_len(&self) -> u64 {
        let min = u64::from(self.min_block);
        let max = u64::from(self.max_block.min(proto::DEFAULT_MAX_BLOCK));
        (max - max % min).max(min)
    }

    /// Reads an aligned range: pipelined requests, replies matched by
    /// cookie. After a server error no new requests are sent, the others
    /// are drained, and the first error is returned.
    fn read_aligned(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let step = self.request_len();
        let mut pending: Vec<PendingRead> = Vec::new();
        let mut next = 0usize;
        let mut first_err: Option<NbdError> = None;
        loop {
            let mut batch = Vec::new();
            let mut in_flight: u64 = pending.iter().map(|p| p.len).sum();
            while next < buf.len() && first_err.is_none() && pending.len() < MAX_IN_FLIGHT {
                let n = step.min((buf.len() - next) as u64);
                if !pending.is_empty() && in_flight + n > MAX_IN_FLIGHT_BYTES {
                    break;
                }
                let req = Request {
                    flags: 0,
                    command: proto::CMD_READ,
                    cookie: self.cookie(),
                    offset: offset + next as u64,
                    len: n,
                };
                batch.extend_from_slice(&req.encode(self.extended)?);
                pending.push(PendingRead {
                    cookie: req.cookie,
                    offset: req.offset,
                    len: n,
                    buf_start: next,
                    covered: Vec::new(),
                    covered_bytes: 0,
                    errored: false,
                });
                in_flight += n;
                next += n as usize;
            }
            if !batch.is_empty() {
                self.send(&batch, "sending read requests")?;
            }
            if pending.is_empty() {
                break;
            }
            if let Some(e) = self.read_reply(&mut pending, buf)? {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads one reply message (a simple reply or one chunk) for one of
    /// `pending`. `Ok(Some(e))` is a server error for a request, which
    /// keeps the stream in step; `Err` is fatal.
    fn read_reply(
        &mut self,
        pending: &mut Vec<PendingRead>,
        buf: &mut [u8],
    ) -> Result<Option<NbdError>, NbdError> {
        let (header, idx) = self.reply_header(|c| pending.iter().position(|p| p.cookie == c))?;
        let p = &mut pending[idx];
        let chunk = match header {
            ReplyHeader::Simple { error, .. } => {
                let p = pending.remove(idx);
                if error != 0 {
                    return Ok(Some(request_error("read", p.offset, p.len, error, "")));
                }
                if self.structured {
                    return Err(NbdError::protocol(
                        "simple reply with data to a read despite structured replies",
                    ));
                }
                let dst = &mut buf[p.buf_start..p.buf_start + p.len as usize];
                self.recv(dst, "reading read data")?;
                return Ok(None);
            }
            ReplyHeader::Chunk(c) => c,
        };
        self.check_echo(&chunk, p.offset)?;
        let mut result = None;
        match chunk.kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                if chunk.len < 9 || chunk.len - 8 > p.len {
                    return Err(NbdError::protocol(format!(
                        "NBD_REPLY_TYPE_OFFSET_DATA of {} bytes for a read of {}",
                        chunk.len, p.len
                    )));
                }
                let mut b8 = [0u8; 8];
                self.recv(&mut b8, "reading a reply")?;
                let n = chunk.len - 8;
                let start = p.cover(proto::decode_data_offset(&b8), n)?;
                let at = p.buf_start + start as usize;
                self.recv(&mut buf[at..at + n as usize], "reading read data")?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let payload = self.recv_vec(chunk.len, 12, "NBD_REPLY_TYPE_OFFSET_HOLE")?;
                let (off, n) = proto::decode_offset_hole(&payload)?;
                let start = p.cover(off, u64::from(n))?;
                let at = p.buf_start + start as usize;
                buf[at..at + n as usize].fill(0);
            }
            proto::REPLY_TYPE_NONE => self.check_none(&chunk)?,
            k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                let e = self.error_chunk(&chunk, "read", p.offset, p.len)?;
                p.errored = true;
                result = Some(e);
            }
            k => {
                return Err(NbdError::protocol(format!(
                    "chunk type {k} in the reply to a read"
                )))
            }
        }
        if chunk.done() {
            let p = pending.remove(idx);
            if !p.errored && p.covered_bytes != p.len {
                return Err(NbdError::protocol(format!(
                    "the reply to a read of {} bytes at offset {} covers only {} bytes",
                    p.len, p.offset, p.covered_bytes
                )));
            }
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_coverage() {
        let mut p = PendingRead {
            cookie: 1,
            offset: 1000,
            len: 100,
            buf_start: 0,
            covered: Vec::new(),
            covered_bytes: 0,
            errored: false,
        };
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
}
