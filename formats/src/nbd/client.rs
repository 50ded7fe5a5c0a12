//! [`Connection`]: one synchronous connection to an NBD export, and
//! [`SharedConnection`] to use one from many threads at once.

mod handshake;
mod read;
mod reply;
mod shared;
mod stream;
mod tls;

use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::time::Duration;

use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, Request};
use crate::nbd::uri::{NbdTransport, NbdUri};
use reply::{unknown_cookie, PendingStatus, Rx, Step};
use stream::{connect_tcp, connect_unix, Stream};

pub use shared::SharedConnection;
pub(crate) use tls::TlsFailure;

/// At most this many requests of one [`Connection`] are in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// At most this many bytes of reads of one [`Connection`] are in flight at
/// once (at least one request is always allowed).
const MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;

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
    /// A shorter limit for the handshake only (then `timeout` applies): a
    /// server at its client limit keeps an extra connection waiting
    /// without a greeting, and an opener of extra connections wants to
    /// know soon.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
            extended_headers: true,
            handshake_timeout: None,
        }
    }
}

/// What was negotiated: fixed for the life of a connection, and shared by
/// [`Connection`] and [`SharedConnection`].
#[derive(Debug, Clone)]
struct Session {
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
}

impl Session {
    fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == name)
    }

    fn read_only(&self) -> bool {
        self.flags & proto::FLAG_READ_ONLY != 0
    }

    fn can_multi_conn(&self) -> bool {
        self.flags & proto::FLAG_CAN_MULTI_CONN != 0
    }

    fn block_size(&self) -> (u32, u32, u32) {
        (self.min_block, self.preferred_block, self.max_block)
    }
}

/// A connection to one NBD export, in the transmission phase.
///
/// One thread uses it at a time (it is `Send`, not `Sync`): give each
/// worker its own connection when [`Connection::can_multi_conn`] says the
/// server allows it, or share one between threads with
/// [`SharedConnection`].
///
/// A server error for a request ([`NbdError::Request`]) leaves the
/// connection usable; a timeout, a disconnection or a protocol violation
/// closes it, and later calls fail with [`NbdError::Unusable`].
#[derive(Debug)]
pub struct Connection {
    /// Reads are buffered; writes go to the stream inside.
    rx: Rx,
    s: Session,
    next_cookie: u64,
    /// In transmission phase, the stream in step with the server.
    ready: bool,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Connection {
    /// Connects to `uri`, negotiates (fixed newstyle, TLS first for an
    /// `nbds` URI, extended headers or
    /// structured replies, the metadata contexts of `opts`, `NBD_OPT_GO`
    /// with block size constraints) and enters the transmission phase.
    pub fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Connection, NbdError> {
        Connection::check_request(&uri.export, opts)?;
        // Certificates are read before connecting: a bad setup fails
        // without touching the server.
        let tls = match (&uri.tls, &uri.transport) {
            (None, _) => None,
            (Some(t), NbdTransport::Tcp { host, .. }) => Some(t.client(Some(host))?),
            (Some(t), NbdTransport::Unix { .. }) => Some(t.client(None)?),
        };
        // The server, for messages (without the TLS settings).
        let target = NbdUri {
            tls: uri.tls.as_ref().map(|_| crate::nbd::TlsConfig::default()),
            ..uri.clone()
        }
        .to_string();
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
        let handshake_timeout = opts.handshake_timeout.unwrap_or(opts.timeout);
        stream
            .set_timeouts(handshake_timeout)
            .map_err(connect_err)?;
        let mut conn = Connection {
            rx: Rx {
                io: BufReader::with_capacity(64 * 1024, stream),
                timeout: opts.timeout,
            },
            s: Session {
                timeout: opts.timeout,
                size: 0,
                flags: 0,
                min_block: proto::DEFAULT_MIN_BLOCK,
                preferred_block: proto::DEFAULT_PREFERRED_BLOCK,
                max_block: proto::DEFAULT_MAX_BLOCK,
                contexts: Vec::new(),
                structured: false,
                extended: false,
            },
            next_cookie: 1,
            ready: false,
        };
        match conn.negotiate(&uri.export, opts, tls.as_ref()) {
            Ok(()) => {
                conn.rx
                    .io
                    .get_ref()
                    .set_timeouts(opts.timeout)
                    .map_err(connect_err)?;
                conn.ready = true;
                Ok(conn)
            }
            Err(e) => {
                conn.rx.io.get_ref().shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.s.size
    }

    /// Whether the server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.s.read_only()
    }

    /// Whether several connections to this export may be used at once
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.s.can_multi_conn()
    }

    /// Block size constraints (minimum, preferred, maximum) as advertised,
    /// or the protocol's defaults (1, 4096, 32 MiB) when the server sent
    /// none.
    pub fn block_size(&self) -> (u32, u32, u32) {
        self.s.block_size()
    }

    /// Whether metadata context `name` was negotiated.
    pub fn has_context(&self, name: &str) -> bool {
        self.s.has_context(name)
    }

    /// The transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.s.flags
    }

    /// Whether extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.s.extended
    }

    /// Whether structured replies are in use (always with extended
    /// headers).
    pub fn structured_replies(&self) -> bool {
        self.s.structured
    }

    fn session(&self) -> &Session {
        &self.s
    }

    // -- socket helpers ----------------------------------------------------

    fn recv(&mut self, buf: &mut [u8], doing: &'static str) -> Result<(), NbdError> {
        self.rx.recv(buf, doing)
    }

    fn send(&mut self, buf: &[u8], doing: &'static str) -> Result<(), NbdError> {
        self.rx
            .io
            .get_mut()
            .write_all(buf)
            .map_err(|e| NbdError::from_io(e, doing, self.s.timeout))
    }

    fn recv_vec(&mut self, len: u64, cap: u64, what: &str) -> Result<Vec<u8>, NbdError> {
        self.rx.recv_vec(len, cap, what)
    }

    /// Marks the connection dead unless `e` leaves it in step.
    fn fail(&mut self, e: NbdError) -> NbdError {
        if !e.keeps_connection() && self.ready {
            self.ready = false;
            self.rx.io.get_ref().shutdown(Shutdown::Both);
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
        let pending = PendingStatus::new(&self.s, context, offset, len)?;
        let r = self.block_status_checked(pending);
        r.map_err(|e| self.fail(e))
    }

    fn block_status_checked(
        &mut self,
        mut pending: PendingStatus,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        let cookie = self.cookie();
        let req = pending.request(cookie);
        self.send(
            &req.encode(self.s.extended)?,
            "sending a block status request",
        )?;
        loop {
            let (header, c) = self.rx.reply_header(&self.s)?;
            if c != cookie {
                return Err(unknown_cookie(c));
            }
            if let Step::Done(r) = pending.on_message(&mut self.rx, &self.s, header)? {
                return r;
            }
        }
    }

    /// Hands the connection over to a [`SharedConnection`]: its receiving
    /// side (with whatever it has buffered), another handle on the socket
    /// to send on, and the next cookie. On failure the connection is
    /// closed as by `drop`.
    fn detach(mut self) -> Result<(Rx, Stream, u64), NbdError> {
        self.check_ready()?;
        let clone = |doing| {
            self.rx
                .io
                .get_ref()
                .try_clone()
                .map_err(|source| NbdError::Io { doing, source })
        };
        let writer = clone("sharing the connection")?;
        let stand_in = clone("sharing the connection")?;
        let rx = Rx {
            io: std::mem::replace(&mut self.rx.io, BufReader::with_capacity(0, stand_in)),
            timeout: self.s.timeout,
        };
        // `self` now only holds a duplicate handle: dropping it must
        // neither disconnect nor shut the socket down.
        self.ready = false;
        Ok((rx, writer, self.next_cookie))
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
        let cookie = self.cookie();
        let r = self.send(&disc_request(cookie, self.s.extended), "disconnecting");
        self.rx.io.get_ref().shutdown(Shutdown::Both);
        r
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.send_disc();
    }
}

/// The encoded `NBD_CMD_DISC` request (proto.md "Request types").
fn disc_request(cookie: u64, extended: bool) -> Vec<u8> {
    let req = Request {
        flags: 0,
        command: proto::CMD_DISC,
        cookie,
        offset: 0,
        len: 0,
    };
    req.encode(extended).expect("a zero-length request encodes")
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
}
