//! NBD URIs as libnbd and QEMU write them (the NBD project's
//! `doc/uri.md`):
//!
//! - `nbd://HOST[:PORT][/EXPORT]`: TCP, port 10809 by default;
//! - `nbd+unix:///[EXPORT]?socket=PATH`: a Unix domain socket (a `PATH`
//!   starting with `%00` names a socket in the abstract namespace);
//! - `nbds://…` and `nbds+unix://…`: the same with TLS, and the query
//!   parameters `tls-certificates=DIR` and `tls-hostname=NAME` (libnbd's
//!   names) filling [`TlsConfig`].
//!
//! The export name is the path without its leading `/`, percent-decoded
//! (`nbd://h//disk` names `/disk`; no path, or `/`, the default export).
//! vsock, pre-shared keys (`tls-psk-file`, user names) and turning
//! verification off (`tls-verify-peer=false`) are refused with an error
//! that says so.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::nbd::error::NbdError;
use crate::nbd::proto::{DEFAULT_PORT, MAX_STRING};
use crate::nbd::tls::TlsConfig;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTransport {
    /// TCP to `host` (a name, an IPv4 address or an IPv6 address without
    /// brackets) and `port`.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket; a path whose first byte is NUL names a socket
    /// in the abstract namespace.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: NbdTransport,
    /// The export name; empty for the server's default export.
    pub export: String,
    /// TLS (`nbds` schemes) with the URI's own settings; `None` for
    /// plaintext.
    pub tls: Option<TlsConfig>,
}

/// Whether `s` is meant as an NBD URI (its scheme is `nbd`, `nbds` or
/// `nbd+...`/`nbds+...`), so a tool can route it here rather than open a
/// file; [`NbdUri::parse`] then accepts it or says why not.
pub fn is_nbd_uri(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once(':') else {
        return false;
    };
    let scheme = scheme.to_ascii_lowercase();
    scheme == "nbd" || scheme == "nbds" || scheme.starts_with("nbd+") || scheme.starts_with("nbds+")
}

impl NbdUri {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<NbdUri, NbdError> {
        let err = |reason: &str| NbdError::Uri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(err("no scheme (expected nbd:// or nbd+unix://)"));
        };
        let (unix, tls) =
            match scheme.to_ascii_lowercase().as_str() {
                "nbd" | "nbd+tcp" => (false, false),
                "nbd+unix" => (true, false),
                "nbds" | "nbds+tcp" => (false, true),
                "nbds+unix" => (true, true),
                "nbd+vsock" | "nbds+vsock" => return Err(err("vsock transport is not supported")),
                _ => return Err(err(
                    "unsupported scheme (expected nbd://, nbd+unix://, nbds:// or nbds+unix://)",
                )),
            };
        if rest.contains('#') {
            return Err(err("fragments (#...) are not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.strip_prefix("//") {
            Some(after) => match after.find('/') {
                Some(i) => (Some(&after[..i]), &after[i..]),
                None => (Some(after), ""),
            },
            None => (None, before_query),
        };
        if !path.is_empty() && !path.starts_with('/') {
            return Err(err("the export name must follow a '/'"));
        }
        let export_bytes = percent_decode(path.get(1..).unwrap_or(""))
            .ok_or_else(|| err("bad percent-encoding in the export name"))?;
        let export =
            String::from_utf8(export_bytes).map_err(|_| err("the export name is not UTF-8"))?;
        if export.contains('\0') || export.len() > MAX_STRING {
            return Err(err(
                "the export name must have no NUL and at most 4096 bytes",
            ));
        }

        let mut socket: Option<Vec<u8>> = None;
        let mut tls_config = TlsConfig::default();
        for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = percent_decode(key).ok_or_else(|| err("bad percent-encoding"))?;
            let value = percent_decode(value).ok_or_else(|| err("bad percent-encoding"))?;
            match key.as_slice() {
                b"socket" if unix => {
                    if socket.replace(value).is_some() {
                        return Err(err("more than one socket parameter"));
                    }
                }
                b"socket" => return Err(err("socket= is only for nbd+unix:// URIs")),
                k if k.starts_with(b"tls") && !tls => {
                    return Err(err("TLS parameters are only for nbds:// URIs"));
                }
                b"tls-certificates" => {
                    if value.is_empty() {
                        return Err(err("empty tls-certificates directory"));
                    }
                    let dir = PathBuf::from(OsStr::from_bytes(&value));
                    if tls_config.certs_dir.replace(dir).is_some() {
                        return Err(err("more than one tls-certificates parameter"));
                    }
                }
                b"tls-hostname" => {
                    let name =
                        String::from_utf8(value).map_err(|_| err("tls-hostname is not UTF-8"))?;
                    if name.is_empty() {
                        return Err(err("empty tls-hostname"));
                    }
                    if tls_config.hostname.replace(name).is_some() {
                        return Err(err("more than one tls-hostname parameter"));
                    }
                }
                b"tls-psk-file" | b"tls-username" => {
                    return Err(err(
                        "TLS pre-shared keys are not supported (only x509 certificates)",
                    ));
                }
                b"tls-verify-peer" if value.as_slice() != b"true" => {
                    return Err(err(
                        "the server's certificate is always verified (tls-verify-peer=false is not supported)",
                    ));
                }
                b"tls-verify-peer" => {}
                k => {
                    return Err(err(&format!(
                        "unknown query parameter {:?}",
                        String::from_utf8_lossy(k)
                    )));
                }
            }
        }

        let transport = if unix {
            if authority.is_some_and(|a| !a.is_empty()) {
                return Err(err(
                    "nbd+unix:// URIs take no host (write nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let socket = socket.ok_or_else(|| err("nbd+unix:// needs ?socket=PATH"))?;
            if socket.is_empty() {
                return Err(err("empty socket path"));
            }
            NbdTransport::Unix {
                socket: PathBuf::from(OsStr::from_bytes(&socket)),
            }
        } else {
            let authority = authority.ok_or_else(|| err("nbd:// needs a host"))?;
            let (host, port) = parse_authority(authority).map_err(|r| err(&r))?;
            NbdTransport::Tcp { host, port }
        };
        Ok(NbdUri {
            transport,
            export,
            tls: tls.then_some(tls_config),
        })
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn parse_authority(a: &str) -> Result<(String, u16), String> {
    if a.contains('@') {
        return Err("user names are only for TLS pre-shared keys, which are not supported".into());
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '[' in the host")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?),
            ),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    let host = String::from_utf8(percent_decode(host).ok_or("bad percent-encoding in the host")?)
        .map_err(|_| "the host is not UTF-8")?;
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host, port))
}

/// Decodes `%XX` escapes; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Encodes every byte but RFC 3986's unreserved ones and those in `keep`.
fn percent_encode(b: &[u8], keep: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || keep.contains(&c) {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<NbdUri, NbdError> {
        NbdUri::parse(s)
    }
}

/// The canonical URI, which [`NbdUri::parse`] reads back as the same value.
impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(self.export.as_bytes(), b"/:@!$&'()*+,;=");
        let s = if self.tls.is_some() { "s" } else { "" };
        // The TLS parameters, after the socket's.
        let mut params = String::new();
        if let Some(t) = &self.tls {
            if let Some(dir) = &t.certs_dir {
                params.push_str("&tls-certificates=");
                params.push_str(&percent_encode(dir.as_os_str().as_bytes(), b"/"));
            }
            if let Some(h) = &t.hostname {
                params.push_str("&tls-hostname=");
                params.push_str(&percent_encode(h.as_bytes(), b""));
            }
        }
        match &self.transport {
            NbdTransport::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    percent_encode(host.as_bytes(), b"")
                };
                write!(f, "nbd{s}://{host}")?;
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
                if !export.is_empty() || !params.is_empty() {
                    write!(f, "/{export}")?;
                }
                if let Some(p) = params.strip_prefix('&') {
                    write!(f, "?{p}")?;
                }
                Ok(())
            }
            NbdTransport::Unix { socket } => write!(
                f,
                "nbd{s}+unix:///{export}?socket={}{params}",
                percent_encode(socket.as_os_str().as_bytes(), b"/")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorClass};

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            transport: NbdTransport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    fn unix(socket: &str, export: &str) -> NbdUri {
        NbdUri {
            transport: NbdTransport::Unix {
                socket: socket.into(),
            },
            export: export.into(),
            tls: None,
        }
    }

    fn tls(mut u: NbdUri, dir: Option<&str>, hostname: Option<&str>) -> NbdUri {
        u.tls = Some(TlsConfig {
            certs_dir: dir.map(PathBuf::from),
            hostname: hostname.map(String::from),
        });
        u
    }

    #[test]
    fn tls_uris() {
        let p = |s: &str| NbdUri::parse(s).unwrap();
        assert_eq!(p("nbds://h/d"), tls(tcp("h", 10809, "d"), None, None));
        assert_eq!(
            p("nbds://127.0.0.1:1234/d?tls-certificates=/etc/pki/x"),
            tls(tcp("127.0.0.1", 1234, "d"), Some("/etc/pki/x"), None)
        );
        assert_eq!(
            p("nbds+unix:///d?socket=/s&tls-certificates=c%20d&tls-hostname=vm1.example"),
            tls(unix("/s", "d"), Some("c d"), Some("vm1.example"))
        );
        assert_eq!(
            p("nbds+unix:///?socket=/s&tls-verify-peer=true"),
            tls(unix("/s", ""), None, None)
        );
        assert_eq!(p("NBDS+TCP://h"), tls(tcp("h", 10809, ""), None, None));
    }

    #[test]
    fn tcp_uris() {
        let p = |s: &str| NbdUri::parse(s).unwrap();
        assert_eq!(p("nbd://example.com"), tcp("example.com", 10809, ""));
        assert_eq!(p("nbd://example.com/"), tcp("example.com", 10809, ""));
        assert_eq!(
            p("nbd://example.com/disk"),
            tcp("example.com", 10809, "disk")
        );
        assert_eq!(
            p("nbd://example.com//disk"),
            tcp("example.com", 10809, "/disk")
        );
        assert_eq!(
            p("nbd://example.com/hello%20world"),
            tcp("example.com", 10809, "hello world")
        );
        assert_eq!(p("nbd://127.0.0.1:1234/a/b"), tcp("127.0.0.1", 1234, "a/b"));
        assert_eq!(p("NBD://[::1]:99"), tcp("::1", 99, ""));
        assert_eq!(p("nbd://[::1]/x"), tcp("::1", 10809, "x"));
        assert_eq!(p("nbd+tcp://h/x"), tcp("h", 10809, "x"));
    }

    #[test]
    fn unix_uris() {
        let p = |s: &str| NbdUri::parse(s).unwrap();
        assert_eq!(p("nbd+unix:///?socket=/tmp/s"), unix("/tmp/s", ""));
        assert_eq!(p("nbd+unix://?socket=/tmp/s"), unix("/tmp/s", ""));
        assert_eq!(p("nbd+unix:///disk?socket=sock"), unix("sock", "disk"));
        assert_eq!(
            p("nbd+unix:///my%2Fdisk?socket=/run/a%20b.sock"),
            unix("/run/a b.sock", "my/disk")
        );
        assert_eq!(p("nbd+unix:/disk?socket=s"), unix("s", "disk"));
        let abs = p("nbd+unix:///?socket=%00/abstract");
        match abs.transport {
            NbdTransport::Unix { socket } => assert_eq!(socket.as_os_str().as_bytes()[0], 0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused() {
        for (s, needle) in [
            ("nbds://h/x?tls-psk-file=/k", "pre-shared keys"),
            ("nbds://h/x?tls-username=u", "pre-shared keys"),
            ("nbds://u@h/x", "pre-shared keys"),
            ("nbds://h/x?tls-verify-peer=false", "always verified"),
            ("nbds://h/x?tls-certificates=", "empty tls-certificates"),
            (
                "nbds://h/x?tls-certificates=a&tls-certificates=b",
                "more than one",
            ),
            ("nbds://h/x?tls-hostname=", "empty tls-hostname"),
            ("nbds+unix:///x", "socket=PATH"),
            ("nbd+vsock://1:10809", "vsock"),
            ("nbd+foo://x", "unsupported scheme"),
            ("http://x", "unsupported scheme"),
            ("nbd", "no scheme"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix://host/x?socket=s", "no host"),
            ("nbd://host/x?socket=s", "only for nbd+unix"),
            ("nbd://host/x?tls-certificates=/c", "only for nbds"),
            ("nbd://host/x?foo=1", "unknown query parameter"),
            ("nbd://", "needs a host"),
            ("nbd:x", "follow a '/'"),
            ("nbd:/x", "needs a host"),
            ("nbd://h:0", "bad port"),
            ("nbd://h:99999", "bad port"),
            ("nbd://h:+1", "bad port"),
            ("nbd://user@h", "user names"),
            ("nbd://[::1", "unclosed"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/x#frag", "fragments"),
            ("nbd+unix:///?socket=a&socket=b", "more than one"),
            ("nbd+unix:///?socket=", "empty socket"),
        ] {
            let e = NbdUri::parse(s).expect_err(s);
            assert!(e.to_string().contains(needle), "{s}: {e}");
            assert_eq!(e.class(), ErrorClass::Usage, "{s}");
        }
    }

    #[test]
    fn routing() {
        for s in [
            "nbd://h",
            "NBD://h",
            "nbd+unix:///?socket=x",
            "nbds://h",
            "nbd+vsock://1",
            "nbd:h",
        ] {
            assert!(is_nbd_uri(s), "{s}");
        }
        for s in [
            "disk.qcow2",
            "/tmp/nbd.img",
            "nbdx://h",
            "./nbd:x",
            "file:x",
        ] {
            assert!(!is_nbd_uri(s), "{s}");
        }
    }

    #[test]
    fn display_round_trips() {
        for u in [
            tcp("example.com", 10809, ""),
            tcp("example.com", 1234, "a b/c"),
            tcp("::1", 10809, "x"),
            unix("/tmp/a b.sock", ""),
            unix("/tmp/s", "disk?1"),
            tls(tcp("h", 10809, ""), None, None),
            tls(tcp("h", 99, ""), Some("/c d"), Some("n")),
            tls(unix("/tmp/s", "x"), Some("/c"), None),
            tls(unix("/tmp/s", ""), None, Some("n")),
        ] {
            let s = u.to_string();
            assert_eq!(NbdUri::parse(&s).unwrap(), u, "{s}");
        }
        assert_eq!(unix("/tmp/s", "").to_string(), "nbd+unix:///?socket=/tmp/s");
        assert_eq!(tcp("h", 10809, "d").to_string(), "nbd://h/d");
    }
}
