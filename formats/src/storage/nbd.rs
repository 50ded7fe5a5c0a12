//! [`Storage`] on an NBD export: a live VM's disk served by QEMU (a
//! fleecing snapshot) or an image served by qemu-nbd.
//!
//! Reads go through a pool of connections, as many as the workers need,
//! when the server advertises multi-conn (each connection then sees the
//! same data); otherwise through one connection that all workers share with
//! their requests pipelined ([`SharedConnection`]). Allocation comes from the
//! `base:allocation` meta context; other contexts (a dirty bitmap,
//! `qemu:dirty-bitmap:NAME`) are negotiated at connect time (the opener's
//! [`crate::open::OpenOptions`]) and queried through
//! [`Storage::context_status`], so storage wrappers (retries, faults) apply
//! to them too. What a context means (dirty, allocated) is for the layers
//! above: storage knows only flags. Each reply's extents are cached, so walking
//! a map costs one request per reply rather than one per extent.
//!
//! A server without structured replies (the reference `nbd-server`,
//! `nbdkit --no-sr`) has no block status: everything is reported as data,
//! for the readers' zero detection to find the holes (as qemu-img does),
//! and any other context asked for is refused
//! ([`NbdError::NoStructuredReplies`]), so that callers fall back as for a
//! missing bitmap.
//!
//! `nbds` URIs connect with TLS; settings the URI leaves out come from the
//! opener's defaults ([`NbdStorage::connect_with`]), and every connection
//! of the pool makes its own handshake.
//!
//! Invariants: the export's size is fixed at connect time; a connection
//! that failed (timeout, disconnect, protocol violation) is dropped, never
//! reused; every failure surfaces as an error, never as zeros.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{FileExtent, Padding, Storage, StorageError};
use crate::nbd::proto;
use crate::nbd::{ConnectOptions, Connection, NbdError, NbdUri, SharedConnection, TlsConfig};
use crate::units::HostOffset;

/// The allocation context every NBD server with structured replies offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flags (proto.md "`base:` meta context").
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// Connections opened at most when the server allows several.
const MAX_CONNECTIONS: usize = 16;

/// How long an extra connection may take to be greeted: a server at its
/// client limit (`qemu-nbd -e N`) queues it silently.
const EXTRA_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

struct Pool {
    idle: Vec<Connection>,
    open: usize,
    /// Connections allowed: lowered to what is open when the server does
    /// not greet one more.
    max: usize,
}

/// One extent of a cached block-status reply: start, end, flags.
type CachedExtent = (u64, u64, u32);

/// An NBD export; see the module docs.
pub struct NbdStorage {
    uri: NbdUri,
    name: PathBuf,
    opts: ConnectOptions,
    /// Whether `base:allocation` was negotiated (not without structured
    /// replies).
    allocation: bool,
    size: u64,
    /// Without multi-conn: the one connection every worker shares,
    /// replaced by a new one when it broke (see [`NbdStorage::shared`]).
    shared: Option<Mutex<Arc<SharedConnection>>>,
    pool: Mutex<Pool>,
    returned: Condvar,
    status: Mutex<HashMap<String, Vec<CachedExtent>>>,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("uri", &self.name)
            .finish()
    }
}

fn to_io(e: NbdError) -> io::Error {
    io::Error::other(e)
}

impl NbdStorage {
    /// Connects to the export at `uri` with `base:allocation` (when the
    /// server has structured replies) and the `extra_contexts` (refused
    /// contexts fail the connection).
    pub fn connect(uri: &str, extra_contexts: &[String]) -> Result<NbdStorage, NbdError> {
        NbdStorage::connect_with(uri, extra_contexts, &TlsConfig::default())
    }

    /// [`NbdStorage::connect`], with the TLS settings an `nbds` URI leaves
    /// out taken from `tls` (plain `nbd` URIs ignore them).
    pub fn connect_with(
        uri: &str,
        extra_contexts: &[String],
        tls: &TlsConfig,
    ) -> Result<NbdStorage, NbdError> {
        let given = NbdUri::parse(uri)?;
        let mut parsed = given.clone();
        if let Some(t) = &mut parsed.tls {
            *t = t.or(tls);
        }
        let mut meta_contexts = vec![BASE_ALLOCATION.to_string()];
        meta_contexts.extend(extra_contexts.iter().cloned());
        let mut opts = ConnectOptions {
            meta_contexts,
            ..Default::default()
        };
        let (first, allocation) = match Connection::connect(&parsed, &opts) {
            Ok(c) => (c, true),
            Err(NbdError::OptionRefused { option, reply, .. })
                if option == proto::opt_name(proto::OPT_STRUCTURED_REPLY)
                    && reply != proto::REP_ERR_SHUTDOWN =>
            {
                // Simple replies only: no contexts at all.
                if let Some(name) = extra_contexts.first() {
                    return Err(NbdError::NoStructuredReplies { name: name.clone() });
                }
                opts.meta_contexts.clear();
                (Connection::connect(&parsed, &opts)?, false)
            }
            Err(e) => return Err(e),
        };
        let size = first.size();
        let (shared, idle) = if first.can_multi_conn() {
            (None, vec![first])
        } else {
            (
                Some(Mutex::new(Arc::new(SharedConnection::new(first)))),
                Vec::new(),
            )
        };
        Ok(NbdStorage {
            name: PathBuf::from(qemu_name(&given)),
            uri: parsed,
            allocation,
            size,
            shared,
            pool: Mutex::new(Pool {
                open: idle.len(),
                idle,
                max: MAX_CONNECTIONS,
            }),
            returned: Condvar::new(),
            opts,
            status: Mutex::new(HashMap::new()),
        })
    }

    /// The shared connection (`None` with multi-conn). One that broke (a
    /// timeout, a disconnection: a server that drops the client on a
    /// failed read, as qemu-nbd does) is replaced by a new connection to
    /// the same export, so a retried request can succeed; its size must not
    /// have changed.
    fn shared(&self) -> Option<Result<Arc<SharedConnection>, NbdError>> {
        let slot = self.shared.as_ref()?;
        let mut conn = slot.lock().unwrap_or_else(|e| e.into_inner());
        if !conn.is_usable() {
            let fresh = match Connection::connect(&self.uri, &self.opts) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            if fresh.size() != self.size {
                return Some(Err(NbdError::protocol(format!(
                    "the export's size changed from {} to {} bytes on reconnecting",
                    self.size,
                    fresh.size()
                ))));
            }
            *conn = Arc::new(SharedConnection::new(fresh));
        }
        Some(Ok(Arc::clone(&conn)))
    }

    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on an idle connection, opening one when the server allows
    /// more and waiting for one otherwise. A connection whose request
    /// failed at the transport level is closed, not returned.
    fn with_connection<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, NbdError>,
    ) -> Result<R, NbdError> {
        debug_assert!(self.shared.is_none());
        let mut conn = {
            let mut pool = self.lock_pool();
            loop {
                if let Some(c) = pool.idle.pop() {
                    break c;
                }
                if pool.open < pool.max {
                    pool.open += 1;
                    let extra = pool.open > 1;
                    drop(pool);
                    let opts = ConnectOptions {
                        handshake_timeout: extra.then_some(EXTRA_CONNECTION_TIMEOUT),
                        ..self.opts.clone()
                    };
                    match Connection::connect(&self.uri, &opts) {
                        Ok(c) => break c,
                        Err(e) => {
                            let mut p = self.lock_pool();
                            p.open -= 1;
                            if p.open == 0 {
                                drop(p);
                                self.returned.notify_one();
                                return Err(e);
                            }
                            // The server serves no more clients: use the
                            // connections it has accepted.
                            p.max = p.open;
                            pool = p;
                            continue;
                        }
                    }
                }
                pool = self.returned.wait(pool).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = f(&mut conn);
        let mut pool = self.lock_pool();
        match &result {
            // A server error for one request leaves the connection usable.
            Ok(_) | Err(NbdError::Request { .. }) => pool.idle.push(conn),
            Err(_) => pool.open -= 1,
        }
        drop(pool);
        self.returned.notify_one();
        result
    }

    /// The extent of `context` at `offset`: its flags and length (at most
    /// `max_len`, > 0), from the cache or one block-status request.
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<(u32, u64), NbdError> {
        let cached = |map: &HashMap<String, Vec<CachedExtent>>| {
            let v = map.get(context)?;
            let i = v.partition_point(|e| e.1 <= offset);
            let &(start, end, flags) = v.get(i)?;
            (start <= offset).then(|| (flags, (end - offset).min(max_len)))
        };
        if let Some(hit) = cached(&self.status.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(hit);
        }
        // Ask for more than needed: servers answer with the extents they
        // have, and the rest of the reply serves the next calls.
        let ask = max_len.max(64 << 20).min(self.size.saturating_sub(offset));
        let extents = match self.shared() {
            Some(c) => c?.block_status(context, offset, ask)?,
            None => self.with_connection(|c| c.block_status(context, offset, ask))?,
        };
        let mut entries = Vec::with_capacity(extents.len());
        let mut pos = offset;
        for (len, flags) in extents {
            if len == 0 {
                continue;
            }
            entries.push((pos, pos + len, flags));
            pos += len;
        }
        if entries.is_empty() {
            return Err(NbdError::Protocol {
                what: "block status reply without extents".into(),
            });
        }
        let mut map = self.status.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(context.to_string(), entries);
        Ok(cached(&map).expect("the reply starts at offset"))
    }
}

impl Storage for NbdStorage {
    fn name(&self) -> &Path {
        &self.name
    }

    fn len(&self) -> u64 {
        self.size
    }

    /// As QEMU's NBD driver reports them: zeros without a host offset with
    /// block status, data like the rest without.
    fn padding(&self) -> Padding {
        if self.allocation {
            Padding::Zero
        } else {
            Padding::Data
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset.0)) as usize;
        if n == 0 {
            return Ok(0);
        }
        match self.shared() {
            Some(c) => c.and_then(|c| c.read(offset.0, &mut buf[..n])),
            None => self.with_connection(|c| c.read(offset.0, &mut buf[..n])),
        }
        .map_err(to_io)?;
        Ok(n)
    }

    fn context_status(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> io::Result<(u32, u64)> {
        self.block_status(context, offset.0, max_len).map_err(to_io)
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        if !self.allocation {
            return Ok((FileExtent::Data, max_len));
        }
        let (flags, len) = self
            .block_status(BASE_ALLOCATION, offset.0, max_len)
            .map_err(to_io)?;
        // A hole that is not known to read as zeros must be read.
        let kind = match (flags & STATE_HOLE != 0, flags & STATE_ZERO != 0) {
            (true, true) => FileExtent::Hole,
            (false, true) => FileExtent::ZeroData,
            _ => FileExtent::Data,
        };
        Ok((kind, len))
    }
}

/// The export's name as QEMU prints it (`qemu-img info`, `map`): the
/// canonical URI, except that a Unix socket's default export has no path
/// at all (`nbd+unix://?socket=…`).
fn qemu_name(uri: &NbdUri) -> String {
    let canonical = uri.to_string();
    match (&uri.transport, uri.export.is_empty()) {
        (crate::nbd::NbdTransport::Unix { .. }, true) => canonical
            .replacen("nbd+unix:///?", "nbd+unix://?", 1)
            .replacen("nbds+unix:///?", "nbds+unix://?", 1),
        _ => canonical,
    }
}

/// Opens an NBD URI as storage, with `base:allocation` and the
/// `meta_contexts` (a context the server does not offer fails the open).
pub fn open(uri: &str, meta_contexts: &[String]) -> Result<NbdStorage, StorageError> {
    Ok(NbdStorage::connect(uri, meta_contexts)?)
}

/// [`open`], with the TLS settings an `nbds` URI leaves out taken from
/// `tls`.
pub fn open_with_tls(
    uri: &str,
    meta_contexts: &[String],
    tls: &TlsConfig,
) -> Result<NbdStorage, StorageError> {
    Ok(NbdStorage::connect_with(uri, meta_contexts, tls)?)
}
