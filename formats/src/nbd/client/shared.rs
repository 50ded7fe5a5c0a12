//! [`SharedConnection`]: one NBD connection used by many threads at once,
//! their requests in flight together.
//!
//! Design:
//! - A caller checks and splits its call exactly as [`Connection`] does
//!   ([`plan_read`], [`PendingStatus::new`]), registers each request in
//!   the pending table (cookie → the request's reply state and where its
//!   data goes), then sends the encoded requests in one write under the
//!   writer mutex, and waits on the condition variable until every request
//!   of its call is complete.
//! - One reader thread owns the receiving side: it reads each reply
//!   header, takes the entry with that cookie out of the table, lets the
//!   entry's state ([`PendingRead`], [`PendingStatus`]: the same code as
//!   [`Connection`]) read and check the message, then puts the entry back
//!   or, when the reply is complete, records its result in the call and
//!   wakes the waiters.
//! - Read data goes straight from the socket into the caller's buffer (or
//!   the bounce buffer of an unaligned edge): no copy. The caller lends the
//!   buffer as a raw pointer ([`Dst`]) and does not return until the reader
//!   is done with it (see [`Registered`]).
//! - At most [`MAX_IN_FLIGHT`] requests are in flight; callers wait for
//!   room. A call's requests complete without its caller's help, so a
//!   caller waiting for room cannot block the others.
//! - A server error for one request fails that request's call only. Any
//!   other failure (transport error, protocol violation, unknown cookie,
//!   no reply within the timeout while requests are in flight) breaks the
//!   connection: the cause goes to every waiting call, later calls fail
//!   with [`NbdError::Unusable`], the socket is shut down and the reader
//!   thread exits. Callers wait until their requests are complete or the
//!   reader thread has exited, which it always does within one timeout of
//!   the socket (or at once, when the socket is shut down).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crate::nbd::client::read::{check_read, plan_read, PendingRead, Piece};
use crate::nbd::client::reply::{unknown_cookie, PendingStatus, Rx, Step};
use crate::nbd::client::{disc_request, Connection, Session, Stream};
use crate::nbd::error::NbdError;
use crate::nbd::proto::{self, Request};

/// At most this many requests, from all threads, are in flight at once.
const MAX_IN_FLIGHT: usize = 64;

/// One NBD connection shared by many threads: requests from all of them
/// are in flight together, their replies matched by cookie by a reader
/// thread.
///
/// Use it when the server does not allow several connections
/// ([`Connection::can_multi_conn`] is false, e.g. `qemu-nbd` without
/// `-e`): threads then overlap their requests instead of waiting for each
/// other's round trips.
///
/// Calls behave as [`Connection`]'s (same checks, same splitting, same
/// validation of replies). A server error for a request
/// ([`NbdError::Request`]) fails only that call; a timeout, a
/// disconnection or a protocol violation fails every call in flight with
/// that cause and later calls with [`NbdError::Unusable`]
/// ([`SharedConnection::is_usable`] turns false). Dropping it sends
/// `NBD_CMD_DISC`, shuts the socket down and joins the reader thread.
pub struct SharedConnection {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

struct Shared {
    s: Session,
    state: Mutex<State>,
    /// Signalled when a request completes (its call may be done, and there
    /// is room for another) and when the connection breaks or the reader
    /// exits.
    cv: Condvar,
    /// The sending side (`None` if the connection could not be shared):
    /// one thread at a time writes whole requests.
    writer: Mutex<Option<Stream>>,
}

struct State {
    /// Requests sent (or about to be) whose replies are not complete, by
    /// cookie. The reader takes an entry out while it reads one of its
    /// messages.
    pending: HashMap<u64, Entry>,
    /// Requests whose replies are not complete (in `pending` or being read).
    in_flight: usize,
    /// When `in_flight` last became nonzero: the server owes a reply since.
    busy_since: Instant,
    /// Calls waiting for their requests, by id.
    calls: HashMap<u64, Call>,
    next_call: u64,
    next_cookie: u64,
    /// Why the connection broke.
    broken: Option<NbdError>,
    reader_alive: bool,
    /// Set by `drop`: the end of the stream is expected.
    closing: bool,
}

/// A request in flight.
struct Entry {
    call: u64,
    what: What,
}

enum What {
    Read(PendingRead, Dst),
    Status(PendingStatus),
}

/// What the requests of one call came to.
#[derive(Default)]
struct Call {
    /// Requests not complete yet.
    remaining: usize,
    /// The server's first error for one of them.
    error: Option<NbdError>,
    /// A block status call's descriptors.
    status: Option<Vec<(u64, u32)>>,
}

/// The part of a caller's buffer (or of its bounce buffer) that one read
/// request fills.
///
/// Only the reader thread writes through it, into a region no other
/// request has, while the caller waits in [`SharedConnection::call`]: the
/// caller does not touch the buffer until every request of its call is
/// complete (after which the reader drops the entry and never uses the
/// pointer again) or the reader thread has exited; [`Registered`]'s drop
/// waits for that even when the caller unwinds. So the memory is valid and
/// not aliased whenever it is written through.
struct Dst {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: see `Dst`: the pointer is used by one thread at a time, while
// the memory it points to is lent to it.
unsafe impl Send for Dst {}

/// A request to send for a call.
struct Submit {
    command: u16,
    offset: u64,
    len: u64,
    what: What,
}

/// A call registered in the table. Dropping it waits until none of its
/// requests can be written to any more (all complete, or the reader gone),
/// then forgets the call.
struct Registered<'a> {
    sh: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut st = self.sh.wait_for_call(self.sh.lock(), self.id);
        st.calls.remove(&self.id);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(st).unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until call `id` has no request in flight or the reader is
    /// gone.
    fn wait_for_call<'a>(&self, mut st: MutexGuard<'a, State>, id: u64) -> MutexGuard<'a, State> {
        while st.reader_alive && st.calls.get(&id).is_some_and(|c| c.remaining > 0) {
            st = self.wait(st);
        }
        st
    }

    /// Records why the connection broke (the first cause wins) and wakes
    /// everyone.
    fn break_with(&self, st: &mut State, e: NbdError) {
        st.broken.get_or_insert(e);
        self.cv.notify_all();
    }

    fn usable(st: &State) -> bool {
        st.broken.is_none() && st.reader_alive && !st.closing
    }

    /// Sends encoded requests; a failure breaks the connection (a request
    /// may be half sent) and returns false.
    fn send(&self, wire: &[u8]) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stream) = w.as_mut() else {
            return false;
        };
        let Err(e) = stream.write_all(wire) else {
            return true;
        };
        let e = NbdError::from_io(e, "sending requests", self.s.timeout);
        self.break_with(&mut self.lock(), e);
        stream.shutdown(Shutdown::Both);
        false
    }
}

impl SharedConnection {
    /// Takes over `conn` (in the transmission phase, nothing in flight) and
    /// starts its reader thread. If `conn` is unusable, or the socket
    /// cannot be duplicated or the thread started, the result is unusable
    /// from the start: every call fails.
    pub fn new(conn: Connection) -> SharedConnection {
        let s = conn.session().clone();
        let (parts, broken) = match conn.detach() {
            Ok(parts) => (Some(parts), None),
            Err(e) => (None, Some(e)),
        };
        let shared = Arc::new(Shared {
            s,
            state: Mutex::new(State {
                pending: HashMap::new(),
                in_flight: 0,
                busy_since: Instant::now(),
                calls: HashMap::new(),
                next_call: 0,
                next_cookie: parts.as_ref().map_or(1, |p| p.2),
                broken,
                reader_alive: parts.is_some(),
                closing: false,
            }),
            cv: Condvar::new(),
            writer: Mutex::new(None),
        });
        let mut reader = None;
        if let Some((rx, writer, _)) = parts {
            *shared.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
            let sh = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name("nbd-reader".into())
                .spawn(move || reader_thread(&sh, rx));
            match spawned {
                Ok(h) => reader = Some(h),
                Err(source) => {
                    let mut st = shared.lock();
                    st.reader_alive = false;
                    let e = NbdError::Io {
                        doing: "starting the reader thread",
                        source,
                    };
                    shared.break_with(&mut st, e);
                }
            }
        }
        SharedConnection { shared, reader }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.s.size
    }

    /// Whether the server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.shared.s.read_only()
    }

    /// Whether several connections to this export may be used at once
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn can_multi_conn(&self) -> bool {
        self.shared.s.can_multi_conn()
    }

    /// Whether metadata context `name` was negotiated.
    pub fn has_context(&self, name: &str) -> bool {
        self.shared.s.has_context(name)
    }

    /// Block size constraints (minimum, preferred, maximum); see
    /// [`Connection::block_size`].
    pub fn block_size(&self) -> (u32, u32, u32) {
        self.shared.s.block_size()
    }

    /// False once the connection broke: every later call fails with
    /// [`NbdError::Unusable`].
    pub fn is_usable(&self) -> bool {
        Shared::usable(&self.shared.lock())
    }

    fn check_usable(&self) -> Result<(), NbdError> {
        if self.is_usable() {
            Ok(())
        } else {
            Err(NbdError::Unusable)
        }
    }

    /// Reads `buf.len()` bytes at `offset`, as [`Connection::read`] does:
    /// the range must lie inside the export; requests are split at the
    /// maximum block size, unaligned edges read through a bounce buffer,
    /// and all of them pipelined with the other threads' requests.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_usable()?;
        check_read(&self.shared.s, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let pieces = plan_read(&self.shared.s, offset, buf.len());
        let mut bounces: Vec<Vec<u8>> = pieces.iter().map(Piece::bounce_buffer).collect();
        let base = buf.as_mut_ptr();
        let reqs = pieces
            .iter()
            .zip(bounces.iter_mut())
            .map(|(p, bounce)| {
                let dst = match p.bounce {
                    Some(_) => Dst {
                        ptr: bounce.as_mut_ptr(),
                        len: bounce.len(),
                    },
                    None => Dst {
                        ptr: base.wrapping_add(p.at),
                        len: p.len as usize,
                    },
                };
                Submit {
                    command: proto::CMD_READ,
                    offset: p.offset,
                    len: p.len,
                    what: What::Read(PendingRead::new(p), dst),
                }
            })
            .collect();
        self.call(reqs)?;
        for (piece, bounce) in pieces.iter().zip(&bounces) {
            piece.unbounce(bounce, buf);
        }
        Ok(())
    }

    /// Block status of metadata context `context` for up to `len` bytes at
    /// `offset`, as [`Connection::block_status`] does.
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        self.check_usable()?;
        let p = PendingStatus::new(&self.shared.s, context, offset, len)?;
        let submit = Submit {
            command: proto::CMD_BLOCK_STATUS,
            offset: p.offset,
            len: p.wire_len,
            what: What::Status(p),
        };
        let call = self.call(vec![submit])?;
        call.status
            .ok_or_else(|| NbdError::protocol("block status reply without descriptors"))
    }

    /// Registers and sends `reqs` as one call (waiting for room as needed)
    /// and waits for all their replies. After a server error for one of
    /// them, the rest are not sent.
    fn call(&self, reqs: Vec<Submit>) -> Result<Call, NbdError> {
        let sh = &*self.shared;
        let id = {
            let mut st = sh.lock();
            if !Shared::usable(&st) {
                return Err(NbdError::Unusable);
            }
            let id = st.next_call;
            st.next_call += 1;
            st.calls.insert(id, Call::default());
            id
        };
        // Once requests are registered the reader may write into the
        // caller's buffers: `registered` waits for it to be done, whatever
        // happens (declared before `st`, so that it is dropped after it).
        let registered = Registered { sh, id };
        let mut st = sh.lock();
        let mut reqs = reqs.into_iter().peekable();
        while reqs.peek().is_some() {
            while st.in_flight >= MAX_IN_FLIGHT && st.broken.is_none() && st.reader_alive {
                st = sh.wait(st);
            }
            if !Shared::usable(&st) || st.calls[&id].error.is_some() {
                break;
            }
            if st.in_flight == 0 {
                st.busy_since = Instant::now();
            }
            let mut wire = Vec::new();
            for r in reqs.by_ref().take(MAX_IN_FLIGHT - st.in_flight) {
                let cookie = st.next_cookie;
                st.next_cookie = cookie.wrapping_add(1);
                let req = Request {
                    flags: 0,
                    command: r.command,
                    cookie,
                    offset: r.offset,
                    len: r.len,
                };
                let call = st.calls.get_mut(&id).expect("registered above");
                match req.encode(sh.s.extended) {
                    Ok(bytes) => wire.extend_from_slice(&bytes),
                    Err(e) => {
                        call.error.get_or_insert(e);
                        break;
                    }
                }
                call.remaining += 1;
                st.in_flight += 1;
                st.pending.insert(
                    cookie,
                    Entry {
                        call: id,
                        what: r.what,
                    },
                );
            }
            drop(st);
            let sent = sh.send(&wire);
            st = sh.lock();
            if !sent {
                break;
            }
        }
        let unsent = reqs.peek().is_some();
        st = sh.wait_for_call(st, id);
        let call = st.calls.remove(&id).expect("registered above");
        let broken = st.broken.as_ref().map(NbdError::duplicate);
        drop(st);
        drop(registered);
        if call.remaining > 0 {
            // The reader is gone: the connection broke.
            return Err(broken.unwrap_or(NbdError::Unusable));
        }
        match call.error {
            Some(e) => Err(e),
            // The connection broke before the rest could be sent.
            None if unsent => Err(broken.unwrap_or(NbdError::Unusable)),
            None => Ok(call),
        }
    }
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("size", &self.shared.s.size)
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

impl Drop for SharedConnection {
    fn drop(&mut self) {
        let sh = &*self.shared;
        let (healthy, cookie) = {
            let mut st = sh.lock();
            let healthy = Shared::usable(&st);
            st.closing = true;
            (healthy, st.next_cookie)
        };
        let mut w = sh.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = w.as_mut() {
            if healthy {
                let _ = stream.write_all(&disc_request(cookie, sh.s.extended));
            }
            // Ends the reader's wait at once.
            stream.shutdown(Shutdown::Both);
        }
        drop(w);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// Marks the reader gone when its thread ends, however it ends.
struct ReaderExit<'a>(&'a Shared);

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.reader_alive = false;
        if !st.closing {
            // Only a panic gets here without a cause.
            self.0.break_with(&mut st, NbdError::Unusable);
        }
        self.0.cv.notify_all();
    }
}

fn reader_thread(sh: &Shared, mut rx: Rx) {
    let _exit = ReaderExit(sh);
    if let Err(e) = receive(sh, &mut rx) {
        sh.break_with(&mut sh.lock(), e);
    }
    rx.io.get_ref().shutdown(Shutdown::Both);
}

/// Reads replies and hands each to its request until the connection
/// breaks (`Err`: the cause) or closes (`Ok`).
fn receive(sh: &Shared, rx: &mut Rx) -> Result<(), NbdError> {
    let doing = "waiting for a reply";
    let timeout = sh.s.timeout;
    loop {
        let ready = rx.wait_readable();
        if !matches!(ready, Ok(true)) {
            let st = sh.lock();
            if st.broken.is_some() || st.closing {
                return Ok(());
            }
            match ready {
                Ok(_) => return Err(NbdError::Disconnected { doing }),
                // The socket waited a whole timeout: the server is late if
                // it owed a reply for that long.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if st.in_flight > 0 && st.busy_since.elapsed() >= timeout {
                        return Err(NbdError::Timeout {
                            doing,
                            after: timeout,
                        });
                    }
                    continue;
                }
                Err(e) => return Err(NbdError::from_io(e, doing, timeout)),
            }
        }
        let (header, cookie) = rx.reply_header(&sh.s)?;
        let entry = sh.lock().pending.remove(&cookie);
        let mut entry = entry.ok_or_else(|| unknown_cookie(cookie))?;
        let step = match &mut entry.what {
            What::Read(p, dst) => {
                // SAFETY: see `Dst`: the caller waits, lending this region
                // of its buffer to this thread alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr, dst.len) };
                p.on_message(rx, &sh.s, header, dst)?.map(|()| None)
            }
            What::Status(p) => p.on_message(rx, &sh.s, header)?.map(Some),
        };
        let mut st = sh.lock();
        match step {
            Step::More => {
                st.pending.insert(cookie, entry);
            }
            Step::Done(r) => {
                st.in_flight -= 1;
                if let Some(call) = st.calls.get_mut(&entry.call) {
                    call.remaining -= 1;
                    match r {
                        Ok(Some(descs)) => call.status = Some(descs),
                        Ok(None) => {}
                        Err(e) => {
                            call.error.get_or_insert(e);
                        }
                    }
                }
                drop(entry);
                sh.cv.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_connection_is_send_and_sync() {
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<SharedConnection>();
    }
}
