//! A synchronous NBD (Network Block Device) client, so qbackup can back up
//! a disk that a running VM exports (QEMU's `nbd-server-add`, `qemu-nbd`):
//! reading it through the server is the only consistent way to read a disk
//! QEMU has open, and the server's block status (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`) tells which ranges hold data and which
//! changed since the last backup.
//!
//! - [`uri`]: `nbd://HOST[:PORT][/EXPORT]` and
//!   `nbd+unix:///[EXPORT]?socket=PATH` (and their `nbds` forms with TLS),
//!   and [`is_nbd_uri`] to route names.
//! - [`tls`]: [`TlsConfig`] (certificates in QEMU's `tls-creds-x509`
//!   layout, the name to verify), made into a rustls client; the session
//!   is started by `NBD_OPT_STARTTLS` before any other option.
//! - [`proto`]: the wire format, pure encode/decode, each item citing its
//!   section of the NBD protocol document (`doc/proto.md`).
//! - [`Connection`]: fixed newstyle handshake, extended headers when the
//!   server has them (else structured replies, else simple replies for
//!   reads), metadata contexts, `NBD_OPT_GO` with block sizes; then
//!   [`Connection::read`] and [`Connection::block_status`].
//! - [`SharedConnection`]: a connected [`Connection`] shared by many
//!   threads (`Sync`), their requests pipelined together and the replies
//!   dispatched by cookie by a reader thread, for servers that take a
//!   single client (no `NBD_FLAG_CAN_MULTI_CONN`).
//!
//! Invariants:
//! - Nothing the server sends is trusted: every length is checked against
//!   the request it answers before anything is allocated or read into the
//!   caller's buffer; chunks outside a request, overlapping chunks, a reply
//!   that claims success without covering its request, an unknown cookie or
//!   magic are protocol errors, never panics.
//! - No call can hang: every socket read and write has the timeout of
//!   [`ConnectOptions::timeout`].
//! - A server error for one request ([`NbdError::Request`]) leaves the
//!   connection usable; anything that may have put the client out of step
//!   with the server (timeout, disconnection, protocol violation) closes it
//!   (and fails every call waiting on a [`SharedConnection`]).
//! - At most 16 requests (64 MiB of reads) of a [`Connection`] and 64 of a
//!   [`SharedConnection`] are in flight, and requests respect the server's
//!   block size constraints (at most 32 MiB).
//!
//! Not implemented: TLS with pre-shared keys, writes, `NBD_CMD_FLAG_DF`,
//! `NBD_OPT_LIST`.

mod client;
mod error;
pub mod proto;
pub mod tls;
pub mod uri;

#[cfg(test)]
mod tests;

pub use client::{ConnectOptions, Connection, SharedConnection};
pub use error::NbdError;
pub use tls::TlsConfig;
pub use uri::{is_nbd_uri, NbdTransport, NbdUri};
