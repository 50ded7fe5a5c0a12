//! [`Connection`]: one synchronous connection to an NBD export.

mod handshake;
mod read;
mod stream;

use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, ChunkHeader, ReplyHeader, Request};
use crate::nbd::uri::{NbdTransport, NbdUri};
use stream::{connect_tcp, connect_unix, Stream};

/// At most this many requests are in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// At most this many bytes of reads are in flight at once (at least one
/// request is always allowed).
const MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;
/// Block status chunks with more descriptors than this are refused rather
/// than allocated.
const MAX_DESCRIPTORS: u64 = 1 << 20;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Metadata contexts to select for [`Connection::block_status`], e.g.
    /// `base:allocation` or `qemu:dirty-bitmap:NAME`. Each must be offered
    /// by the server, or connecting fails with
    /// [`NbdError::ContextRefused`].
    pub meta_contexts: Vec<String>,
    /// How long to wait for the server to accept the connection, and for
    /// each read or write on the socket to make progress; a server that
    /// stops answering makes the call fail with [`NbdError::Timeout`].
    /// Must be nonzero.
    pub timeout: Duration,
    /// Ask for extended headers (`NBD_OPT_EXTENDED_HEADERS`); servers that
    /// lack them get structured replies instead.
    pub extended_headers: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
            extended_headers: true,
        }
    }
}

/// A connection to one NBD export, in the transmission phase.
///
/// One thread uses it at a time (it is `Send`, not `Sync`): give each
/// worker its own connection when [`Connection::can_multi_conn`] says the
/// server allows it, or share one behind a mutex.
///
/// A server error for a request ([`NbdError::Request`]) leaves the
/// connection usable; a timeout, a disconnection or a protocol violation
/// closes it, and later calls fail with [`NbdError::Unusable`].
#[derive(Debug)]
pub struct Connection {
    /// Reads are buffered; writes go to the stream inside.
    io: BufReader<Stream>,
    timeout: Duration,
    size: u64,
    flags: u16,
    min_block: u32,
    preferred_block: u32,
    max_block: u32,
    /// Negotiated metadata contexts: (id, name).
    contexts: Vec<(u32, String)>,
    structured: bool,
    extended: bool,
    next_cookie: u64,
    /// In transmission phase, the stream in step with the server.
    ready: bool,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Connection {
    /// Connects to `uri`, negotiates (fixed newstyle, extended headers or
    /// structured replies, the metadata contexts of `opts`, `NBD_OPT_GO`
    /// with block size constraints) and enters the transmission phase.
    pub fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Connection, NbdError> {
        Connection::check_request(&uri.export, opts)?;
        let target = uri.to_string();
        let connect_err = |source| NbdError::Connect {
            target: target.clone(),
            source,
        };
        let stream = match &uri.transport {
            NbdTransport::Unix { socket } => {
                Stream::Unix(connect_unix(socket).map_err(connect_err)?)
            }
            NbdTransport::Tcp { host, port } => {
                let s = connect_tcp(host, *port, opts.timeout).map_err(connect_err)?;
                // Requests are small; do not let Nagle hold them back
                // (proto.md "Protocol phases").
                s.set_nodelay(true).map_err(connect_err)?;
                Stream::Tcp(s)
            }
        };
        stream.set_timeouts(opts.timeout).map_err(connect_err)?;
        let mut conn = Connection {
            io: BufReader::with_capacity(64 * 1024, stream),
            timeout: opts.timeout,
            size: 0,
            flags: 0,
            min_block: proto::DEFAULT_MIN_BLOCK,
            preferred_block: proto::DEFAULT_PREFERRED_BLOCK,
            max_block: proto::DEFAULT_MAX_BLOCK,
            contexts: Vec::new(),
            structured: false,
            extended: false,
            next_cookie: 1,
            ready: false,
        };
        match conn.negotiate(&uri.export, opts) {
            Ok(()) => {
                conn.ready = true;
                Ok(conn)
            }
            Err(e) => {
                conn.io.get_ref().shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & proto::FLAG_READ_ONLY != 0
    }

    /// Whether several connections to this export may be used at once
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.flags & proto::FLAG_CAN_MULTI_CONN != 0
    }

    /// Block size constraints (minimum, preferred, maximum) as advertised,
    /// or the protocol's defaults (1, 4096, 32 MiB) when the server sent
    /// none.
    pub fn block_size(&self) -> (u32, u32, u32) {
        (self.min_block, self.preferred_block, self.max_block)
    }

    /// Whether metadata context `name` was negotiated.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == name)
    }

    /// The transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Whether structured replies are in use (always with extended
    /// headers).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    // -- socket helpers ----------------------------------------------------

    fn recv(&mut self, buf: &mut [u8], doing: &'static str) -> Result<(), NbdError> {
        self.io
            .read_exact(buf)
            .map_err(|e| NbdError::from_io(e, doing, self.timeout))
    }

    fn send(&mut self, buf: &[u8], doing: &'static str) -> Result<(), NbdError> {
        self.io
            .get_mut()
            .write_all(buf)
            .map_err(|e| NbdError::from_io(e, doing, self.timeout))
    }

    /// Reads `len` bytes into a new vector, refusing more than `cap`.
    fn recv_vec(&mut self, len: u64, cap: u64, what: &str) -> Result<Vec<u8>, NbdError> {
        if len > cap {
            return Err(NbdError::protocol(format!(
                "{what} of {len} bytes (at most {cap} expected)"
            )));
        }
        let mut v = vec![0; len as usize];
        self.recv(&mut v, "reading a reply")?;
        Ok(v)
    }

    /// Marks the connection dead unless `e` leaves it in step.
    fn fail(&mut self, e: NbdError) -> NbdError {
        if !e.keeps_connection() && self.ready {
            self.ready = false;
            self.io.get_ref().shutdown(Shutdown::Both);
        }
        e
    }

    fn check_ready(&self) -> Result<(), NbdError> {
        if self.ready {
            Ok(())
        } else {
            Err(NbdError::Unusable)
        }
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// Reads a reply header whose cookie `find` knows; returns it with
    /// what `find` returned.
    fn reply_header(
        &mut self,
        find: impl Fn(u64) -> Option<usize>,
    ) -> Result<(ReplyHeader, usize), NbdError> {
        let mut b4 = [0u8; 4];
        self.recv(&mut b4, "waiting for a reply")?;
        let magic = u32::from_be_bytes(b4);
        let expected = match magic {
            proto::SIMPLE_REPLY_MAGIC => !self.extended,
            proto::STRUCTURED_REPLY_MAGIC => self.structured && !self.extended,
            proto::EXTENDED_REPLY_MAGIC => self.extended,
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
        let idx = find(cookie).ok_or_else(|| {
            NbdError::protocol(format!(
                "reply with cookie {cookie:#x}, which no request has"
            ))
        })?;
        Ok((header, idx))
    }

    /// Extended replies echo the request's offset.
    fn check_echo(&self, chunk: &ChunkHeader, offset: u64) -> Result<(), NbdError> {
        match chunk.offset {
            Some(o) if o != offset => Err(NbdError::protocol(format!(
                "reply echoes offset {o} for a request at {offset}"
            ))),
            _ => Ok(()),
        }
    }

    fn check_none(&self, chunk: &ChunkHeader) -> Result<(), NbdError> {
        if chunk.len != 0 || !chunk.done() {
            return Err(NbdError::protocol(
                "NBD_REPLY_TYPE_NONE with a payload or without NBD_REPLY_FLAG_DONE",
            ));
        }
        Ok(())
    }

    /// Reads an error chunk's payload as a request error.
    fn error_chunk(
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

    /// Block status of metadata context `context` (negotiated at connect)
    /// for up to `len` bytes at `offset`: one `NBD_CMD_BLOCK_STATUS`
    /// request, returning that context's descriptors as (length, flags).
    ///
    /// There is at least one descriptor, the first starts at `offset`, and
    /// together they never go past `offset + len` (a final descriptor the
    /// server stretched beyond is cut) but may cover less: ask again from
    /// where they end. `len` is capped at the export's end and, without
    /// extended headers, at 4 GiB. `offset` must be a multiple of the
    /// minimum block size. For `base:allocation`, flags are
    /// [`proto::STATE_HOLE`] and [`proto::STATE_ZERO`].
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        self.check_ready()?;
        let Some(&(id, _)) = self.contexts.iter().find(|(_, n)| n == context) else {
            return Err(NbdError::InvalidRequest {
                what: format!("metadata context {context:?} was not negotiated"),
            });
        };
        let min = u64::from(self.min_block);
        if len == 0 || offset >= self.size || offset % min != 0 {
            return Err(NbdError::InvalidRequest {
                what: format!(
                    "block status of {len} bytes at offset {offset} (export of {} bytes, minimum block {min})",
                    self.size
                ),
            });
        }
        let mut len = len.min(self.size - offset);
        if !self.extended {
            len = len.min(u64::from(u32::MAX) - u64::from(u32::MAX) % min);
        }
        // Ask for whole blocks, up to the export's end.
        let wire_len = round_up(offset + len, min).min(self.size) - offset;
        let r = self.block_status_checked(id, offset, len, wire_len);
        r.map_err(|e| self.fail(e))
    }

    fn block_status_checked(
        &mut self,
        id: u32,
        offset: u64,
        len: u64,
        wire_len: u64,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        let req = Request {
            flags: 0,
            command: proto::CMD_BLOCK_STATUS,
            cookie: self.cookie(),
            offset,
            len: wire_len,
        };
        self.send(
            &req.encode(self.extended)?,
            "sending a block status request",
        )?;
        let cmd = "block status";
        let mut seen: Vec<u32> = Vec::new();
        let mut ours: Option<Vec<(u64, u64)>> = None;
        let mut error = None;
        loop {
            let (header, _) = self.reply_header(|c| (c == req.cookie).then_some(0))?;
            let chunk = match header {
                ReplyHeader::Simple { error: 0, .. } => {
                    return Err(NbdError::protocol(
                        "simple reply without block status to NBD_CMD_BLOCK_STATUS",
                    ))
                }
                ReplyHeader::Simple { error, .. } => {
                    return Err(request_error(cmd, offset, wire_len, error, ""))
                }
                ReplyHeader::Chunk(c) => c,
            };
            self.check_echo(&chunk, offset)?;
            let want = if self.extended {
                proto::REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                proto::REPLY_TYPE_BLOCK_STATUS
            };
            match chunk.kind {
                k if k == want => {
                    let each = if self.extended { 16 } else { 8 };
                    let cap = 8 + each * MAX_DESCRIPTORS;
                    let payload = self.recv_vec(chunk.len, cap, "block status chunk")?;
                    let (cid, descs) = proto::decode_block_status(self.extended, &payload)?;
                    if !self.contexts.iter().any(|(i, _)| *i == cid) || seen.contains(&cid) {
                        return Err(NbdError::protocol(format!(
                            "block status for context id {cid}, unknown or given twice"
                        )));
                    }
                    seen.push(cid);
                    if cid == id {
                        ours = Some(descs);
                    }
                }
                proto::REPLY_TYPE_NONE => self.check_none(&chunk)?,
                k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.error_chunk(&chunk, cmd, offset, wire_len)?;
                    error.get_or_insert(e);
                }
                k => {
                    return Err(NbdError::protocol(format!(
                        "chunk type {k} in the reply to a block status request"
                    )))
                }
            }
            if chunk.done() {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let descs = ours.ok_or_else(|| {
            NbdError::protocol("the reply to a block status request lacks the asked context")
        })?;
        clip_descriptors(&descs, wire_len, len)
    }

    /// Ends the session: sends `NBD_CMD_DISC` and closes the socket.
    /// Dropping a connection does the same, ignoring errors.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.send_disc()
    }

    fn send_disc(&mut self) -> Result<(), NbdError> {
        if !self.ready {
            return Ok(());
        }
        self.ready = false;
        let req = Request {
            flags: 0,
            command: proto::CMD_DISC,
            cookie: self.cookie(),
            offset: 0,
            len: 0,
        };
        let r = self.send(&req.encode(self.extended)?, "disconnecting");
        self.io.get_ref().shutdown(Shutdown::Both);
        r
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.send_disc();
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

fn request_error(command: &'static str, offset: u64, len: u64, errno: u32, msg: &str) -> NbdError {
    NbdError::Request {
        command,
        offset,
        len,
        errno,
        message: msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Connection>();
    }

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
