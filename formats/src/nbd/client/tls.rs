//! [`TlsStream`]: a TLS session on a connection's socket, readable by one
//! handle and writable by others at the same time (a
//! [`SharedConnection`](super::SharedConnection)'s reader thread and its
//! senders).
//!
//! Design: the rustls session sits behind a mutex that is never held
//! across socket I/O. A reader takes ciphertext from its own socket handle
//! and feeds it to the session; a writer encrypts under the session lock,
//! then writes the records under the write lock, which it took first: so
//! records reach the socket in the order they were sealed (TLS sequence
//! numbers). Lock order: write lock, then session.
//!
//! Invariant: a failed TLS operation is reported as an `io::Error` of kind
//! `InvalidData` wrapping [`TlsFailure`], so the connection layer can tell
//! it from a socket error and name the cause.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ClientConnection;

use super::stream::Stream;
use crate::nbd::tls::TlsClient;

/// A rustls error met on the connection, and whether a client certificate
/// was offered (to say why a server refused).
#[derive(Debug)]
pub(crate) struct TlsFailure {
    pub(crate) error: rustls::Error,
    pub(crate) has_client_cert: bool,
    pub(crate) cert_requested: bool,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::nbd::tls::describe(
            &self.error,
            self.has_client_cert,
            self.cert_requested,
        ))
    }
}

impl std::error::Error for TlsFailure {}

struct Session {
    conn: Mutex<ClientConnection>,
    /// Held while sealed records are written to the socket.
    write: Mutex<()>,
    /// What the session was made with (says whether a client certificate
    /// was offered, and asked for).
    client: TlsClient,
}

/// One handle on a TLS session (see the module docs).
pub(super) struct TlsStream {
    session: Arc<Session>,
    /// This handle's duplicate of the socket.
    sock: Box<Stream>,
    /// Ciphertext read from the socket (allocated at the first read);
    /// `pending[pos..end]` is what the session has not taken yet.
    pending: Vec<u8>,
    pos: usize,
    end: usize,
}

/// How much ciphertext one socket read takes at most.
const READ_BUF: usize = 64 * 1024;

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TlsStream {
    /// Runs the TLS handshake as a client on `sock` (nothing of the server
    /// buffered yet), with the socket's timeouts.
    pub(super) fn handshake(sock: Stream, client: &TlsClient) -> io::Result<TlsStream> {
        let mut conn =
            ClientConnection::new(Arc::clone(&client.config), client.server_name.clone())
                .map_err(|e| failure(e, client))?;
        // Requests are sealed as they are written.
        conn.set_buffer_limit(None);
        let mut s = TlsStream {
            session: Arc::new(Session {
                conn: Mutex::new(conn),
                write: Mutex::new(()),
                client: client.clone(),
            }),
            sock: Box::new(sock),
            pending: Vec::new(),
            pos: 0,
            end: 0,
        };
        loop {
            s.flush_tls()?;
            if !lock(&s.session.conn).is_handshaking() {
                return Ok(s);
            }
            if !s.receive()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection in the TLS handshake",
                ));
            }
        }
    }

    pub(super) fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.sock.set_timeouts(t)
    }

    /// Another handle on the same session and socket.
    pub(super) fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            session: Arc::clone(&self.session),
            sock: Box::new(self.sock.try_clone()?),
            pending: Vec::new(),
            pos: 0,
            end: 0,
        })
    }

    pub(super) fn shutdown(&self, how: Shutdown) {
        self.sock.shutdown(how);
    }

    /// Writes every record the session has sealed (and not yet written).
    fn flush_tls(&mut self) -> io::Result<()> {
        let _w = lock(&self.session.write);
        write_sealed(&self.session, &mut self.sock)
    }

    /// Feeds the session more ciphertext: what is pending, else one read
    /// from the socket (its timeout applies); `Ok(false)` when the socket
    /// has ended. Then writes what the session wants to send back (an
    /// alert, a key update), unless a writer is busy: that writer sends it
    /// with its own records.
    fn receive(&mut self) -> io::Result<bool> {
        let mut open = true;
        if self.pos == self.end {
            self.pending.resize(READ_BUF, 0);
            let n = loop {
                match self.sock.read(&mut self.pending) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            };
            (self.pos, self.end) = (0, n?);
            open = self.end > 0;
        }
        let processed = {
            let mut conn = lock(&self.session.conn);
            let mut input = &self.pending[self.pos..self.end];
            self.pos += conn.read_tls(&mut input)?;
            conn.process_new_packets().map(|_| ())
        };
        if let Ok(_w) = self.session.write.try_lock() {
            // Best effort after a failure: the failure is the cause.
            let flushed = write_sealed(&self.session, &mut self.sock);
            if processed.is_ok() {
                flushed?;
            }
        }
        processed.map_err(|e| failure(e, &self.session.client))?;
        Ok(open)
    }
}

/// Drains the session's sealed records to the socket; the caller holds
/// the write lock.
fn write_sealed(session: &Session, sock: &mut Stream) -> io::Result<()> {
    let mut out = Vec::new();
    {
        let mut conn = lock(&session.conn);
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
    }
    sock.write_all(&out)
}

fn failure(error: rustls::Error, client: &TlsClient) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        TlsFailure {
            error,
            has_client_cert: client.has_client_cert,
            cert_requested: client.client_cert_requested(),
        },
    )
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = lock(&self.session.conn);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // At the socket's end rustls has been told, and the read
            // above says whether the end was clean (`Ok(0)`) or not.
            self.receive()?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _w = lock(&self.session.write);
        lock(&self.session.conn).writer().write_all(buf)?;
        write_sealed(&self.session, &mut self.sock)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
