//! [`NbdError`]: everything that can go wrong talking to an NBD server, and
//! its [`ErrorClass`].

use std::io;
use std::time::Duration;

use crate::error::{Classify, ErrorClass};
use crate::nbd::proto;

/// An NBD failure. Each variant is named after what failed; its message is
/// one line and says the cause once.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The string is not an NBD URI qbackup can use.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The socket could not be connected.
    #[error("cannot connect to {target}: {}", crate::error::io_text(.source))]
    Connect {
        /// The server, as a URI.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// The server does not speak the part of the protocol qbackup needs
    /// (an oldstyle server, no fixed newstyle negotiation).
    #[error("NBD handshake failed: {what}")]
    Handshake {
        /// What the server lacks.
        what: String,
    },
    /// The server answered an option with an error reply.
    #[error("NBD server refused {option}: {}{}", proto::rep_name(*.reply), message_suffix(.message))]
    OptionRefused {
        /// The option (`NBD_OPT_GO`, ...).
        option: &'static str,
        /// The error reply type (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// A metadata context asked for in [`crate::nbd::ConnectOptions`] is not
    /// offered by the server (for `qemu:dirty-bitmap:NAME`: no such bitmap
    /// is exported).
    #[error("NBD server does not offer metadata context {name:?}")]
    ContextRefused {
        /// The context's name.
        name: String,
    },
    /// A metadata context was asked of a server without structured
    /// replies, which has none (it refused `NBD_OPT_STRUCTURED_REPLY`).
    #[error("NBD server does not offer metadata context {name:?}: it has no structured replies, so no block status")]
    NoStructuredReplies {
        /// The context's name.
        name: String,
    },
    /// The server reported an error for one request.
    #[error("NBD server failed {command} of {len} bytes at offset {offset}: {}{}", proto::errno_name(*.errno), message_suffix(.message))]
    Request {
        /// `read` or `block status`.
        command: &'static str,
        /// Where the request started.
        offset: u64,
        /// Its length.
        len: u64,
        /// The NBD error value (errno-like, `NBD_EIO` = 5).
        errno: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("NBD protocol violation by the server: {what}")]
    Protocol {
        /// What it sent.
        what: String,
    },
    /// The server did not answer in time; the connection is closed.
    #[error("NBD server did not answer within {}ms while {doing}", .after.as_millis())]
    Timeout {
        /// What the client was waiting for.
        doing: &'static str,
        /// The configured timeout.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("NBD server closed the connection while {doing}")]
    Disconnected {
        /// What the client was doing.
        doing: &'static str,
    },
    /// A socket read or write failed.
    #[error("NBD socket error while {doing}: {}", crate::error::io_text(.source))]
    Io {
        /// What the client was doing.
        doing: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The caller asked for something the connection cannot do (a range
    /// past the end of the export, a context that was not negotiated).
    #[error("invalid NBD request: {what}")]
    InvalidRequest {
        /// What is wrong.
        what: String,
    },
    /// An `nbds` URI without a certificates directory.
    #[error("TLS needs a certificates directory with ca-cert.pem (and client-cert.pem, client-key.pem for a server that verifies clients); none was given")]
    TlsNoCertificates,
    /// The certificates directory cannot be used.
    #[error("cannot use the TLS certificates in {}: {what}", .dir.display())]
    TlsSetup {
        /// The directory.
        dir: std::path::PathBuf,
        /// What is wrong (names the file).
        what: String,
    },
    /// An `nbds` server that does not offer TLS (`NBD_OPT_STARTTLS`
    /// refused): never continued in plaintext.
    #[error("NBD server does not offer TLS (NBD_OPT_STARTTLS: {}{}); not continuing without it", proto::rep_name(*.reply), message_suffix(.message))]
    TlsNotOffered {
        /// The error reply type.
        reply: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// A plaintext connection to a server that requires TLS
    /// (`NBD_REP_ERR_TLS_REQD`).
    #[error("NBD server requires TLS (NBD_REP_ERR_TLS_REQD) and the URI is plaintext")]
    TlsRequired,
    /// The TLS handshake or session failed: the server's certificate did
    /// not verify, the server refused the client, or TLS broke.
    #[error("TLS with the NBD server failed while {doing}: {what}")]
    Tls {
        /// What the client was doing.
        doing: &'static str,
        /// The cause, in words.
        what: String,
        /// Whether the cause is a certificate (the server's or the
        /// client's): a setup problem rather than a transport one.
        certificate: bool,
    },
    /// An earlier timeout, disconnection or protocol violation left the
    /// connection unusable.
    #[error("NBD connection is unusable after an earlier error")]
    Unusable,
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

impl Classify for NbdError {
    fn class(&self) -> ErrorClass {
        match self {
            NbdError::Uri { .. }
            | NbdError::InvalidRequest { .. }
            | NbdError::TlsNoCertificates
            | NbdError::TlsSetup { .. }
            | NbdError::TlsRequired
            | NbdError::Tls {
                certificate: true, ..
            } => ErrorClass::Usage,
            NbdError::TlsNotOffered { .. } => ErrorClass::Unsupported,
            NbdError::Tls { .. } => ErrorClass::Io,
            // A missing socket or a refused permission is the user's to fix.
            NbdError::Connect { source, .. } => ErrorClass::of_io(source),
            NbdError::Handshake { .. }
            | NbdError::ContextRefused { .. }
            | NbdError::NoStructuredReplies { .. } => ErrorClass::Unsupported,
            NbdError::OptionRefused { option, reply, .. } => match *reply {
                // No such export: the URI names something that is not there.
                proto::REP_ERR_UNKNOWN => ErrorClass::Usage,
                proto::REP_ERR_SHUTDOWN => ErrorClass::Io,
                _ if *option == proto::opt_name(proto::OPT_STRUCTURED_REPLY)
                    || *option == proto::opt_name(proto::OPT_SET_META_CONTEXT) =>
                {
                    ErrorClass::Unsupported
                }
                proto::REP_ERR_INVALID => ErrorClass::Io,
                _ => ErrorClass::Unsupported,
            },
            NbdError::Request { .. }
            | NbdError::Protocol { .. }
            | NbdError::Timeout { .. }
            | NbdError::Disconnected { .. }
            | NbdError::Io { .. }
            | NbdError::Unusable => ErrorClass::Io,
        }
    }

    fn remedy(&self) -> Option<crate::Remedy> {
        match self {
            NbdError::TlsRequired => Some(crate::Remedy::UseTls),
            NbdError::TlsNoCertificates => Some(crate::Remedy::TlsCertificates),
            _ => None,
        }
    }
}

impl NbdError {
    /// True when a later attempt of the same request may succeed: the
    /// server failed it with EIO or ENOMEM, or the connection broke (a new
    /// one is opened for the next request when the server allows several).
    pub fn is_transient(&self) -> bool {
        match self {
            NbdError::Request { errno, .. } => matches!(*errno, proto::EIO | proto::ENOMEM),
            NbdError::Timeout { .. } | NbdError::Disconnected { .. } | NbdError::Io { .. } => true,
            _ => false,
        }
    }

    /// A protocol violation described by `what`.
    pub(crate) fn protocol(what: impl Into<String>) -> NbdError {
        NbdError::Protocol { what: what.into() }
    }

    /// Whether the connection can go on after this error (the server
    /// answered; the stream is still in step).
    pub(crate) fn keeps_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Request { .. } | NbdError::InvalidRequest { .. }
        )
    }

    /// Whether a metadata context asked for is not offered (by this
    /// server, or by any server without structured replies).
    pub fn is_context_refused(&self) -> bool {
        matches!(
            self,
            NbdError::ContextRefused { .. } | NbdError::NoStructuredReplies { .. }
        )
    }

    /// A copy of an error that closed a connection, for each of the
    /// requests it failed (`io::Error` is not `Clone`: its kind and message
    /// are kept). Errors that do not close a connection become
    /// [`NbdError::Unusable`].
    pub(crate) fn duplicate(&self) -> NbdError {
        match self {
            NbdError::Protocol { what } => NbdError::Protocol { what: what.clone() },
            NbdError::Timeout { doing, after } => NbdError::Timeout {
                doing,
                after: *after,
            },
            NbdError::Disconnected { doing } => NbdError::Disconnected { doing },
            NbdError::Tls {
                doing,
                what,
                certificate,
            } => NbdError::Tls {
                doing,
                what: what.clone(),
                certificate: *certificate,
            },
            NbdError::Io { doing, source } => NbdError::Io {
                doing,
                source: io::Error::new(source.kind(), crate::error::io_text(source).to_string()),
            },
            _ => NbdError::Unusable,
        }
    }

    /// Maps a socket error met while `doing` something.
    pub(crate) fn from_io(e: io::Error, doing: &'static str, timeout: Duration) -> NbdError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::nbd::client::TlsFailure>());
        if let Some(f) = tls {
            return NbdError::Tls {
                doing,
                what: f.to_string(),
                certificate: matches!(
                    f.error,
                    rustls::Error::InvalidCertificate(_) | rustls::Error::AlertReceived(_)
                ),
            };
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::Timeout {
                doing,
                after: timeout,
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => NbdError::Disconnected { doing },
            _ => NbdError::Io { doing, source: e },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let uri = NbdError::Uri {
            uri: "nbds://x".into(),
            reason: "TLS".into(),
        };
        assert_eq!(uri.class(), ErrorClass::Usage);
        let missing = NbdError::Connect {
            target: "nbd+unix:///?socket=/nope".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(missing.class(), ErrorClass::Usage);
        let refused = NbdError::Connect {
            target: "nbd://localhost".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(refused.class(), ErrorClass::Io);
        let ctx = NbdError::ContextRefused {
            name: "qemu:dirty-bitmap:x".into(),
        };
        assert_eq!(ctx.class(), ErrorClass::Unsupported);
        let sr = NbdError::OptionRefused {
            option: proto::opt_name(proto::OPT_STRUCTURED_REPLY),
            reply: proto::REP_ERR_INVALID,
            message: String::new(),
        };
        assert_eq!(sr.class(), ErrorClass::Unsupported);
        let unknown = NbdError::OptionRefused {
            option: proto::opt_name(proto::OPT_GO),
            reply: proto::REP_ERR_UNKNOWN,
            message: "export 'x' not present".into(),
        };
        assert_eq!(unknown.class(), ErrorClass::Usage);
        assert_eq!(
            unknown.to_string(),
            "NBD server refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN (export 'x' not present)"
        );
        let t = NbdError::Timeout {
            doing: "reading a reply",
            after: Duration::from_millis(200),
        };
        assert_eq!(t.class(), ErrorClass::Io);
        assert_eq!(
            t.to_string(),
            "NBD server did not answer within 200ms while reading a reply"
        );
        let r = NbdError::Request {
            command: "read",
            offset: 4096,
            len: 512,
            errno: proto::EIO,
            message: String::new(),
        };
        assert_eq!(
            r.to_string(),
            "NBD server failed read of 512 bytes at offset 4096: EIO (input/output error)"
        );
        assert_eq!(r.class(), ErrorClass::Io);
    }

    #[test]
    fn io_mapping() {
        let d = Duration::from_secs(1);
        assert!(matches!(
            NbdError::from_io(io::ErrorKind::WouldBlock.into(), "x", d),
            NbdError::Timeout { .. }
        ));
        assert!(matches!(
            NbdError::from_io(io::ErrorKind::UnexpectedEof.into(), "x", d),
            NbdError::Disconnected { .. }
        ));
        assert!(matches!(
            NbdError::from_io(io::ErrorKind::Other.into(), "x", d),
            NbdError::Io { .. }
        ));
    }

    #[test]
    fn duplicates() {
        let t = NbdError::Timeout {
            doing: "waiting for a reply",
            after: Duration::from_millis(200),
        };
        assert_eq!(t.duplicate().to_string(), t.to_string());
        let io = NbdError::Io {
            doing: "sending requests",
            source: io::Error::new(io::ErrorKind::PermissionDenied, "nope"),
        };
        let d = io.duplicate();
        assert_eq!(d.to_string(), io.to_string());
        assert!(
            matches!(d, NbdError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
        );
        let p = NbdError::protocol("bad magic");
        assert_eq!(p.duplicate().to_string(), p.to_string());
        let d = NbdError::Disconnected { doing: "x" };
        assert_eq!(d.duplicate().to_string(), d.to_string());
        assert!(matches!(NbdError::Unusable.duplicate(), NbdError::Unusable));
    }
}
