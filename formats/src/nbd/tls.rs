//! TLS for `nbds` URIs: the settings ([`TlsConfig`]), the rustls client
//! configuration made from them, and one-line descriptions of what rustls
//! reports.
//!
//! Certificates come in QEMU's `tls-creds-x509` directory layout:
//! `ca-cert.pem` (the CA the server's certificate must chain to; the only
//! trust anchor, no system roots), and optionally `client-cert.pem` with
//! `client-key.pem` for servers that verify their clients. The server's
//! certificate must name the URI's host (an IP address as an IP SAN), or
//! [`TlsConfig::hostname`] when set; a Unix socket has no host, so
//! `localhost` is expected unless a name is given.
//!
//! Invariants: an `nbds` connection either completes a verified TLS
//! handshake or fails; nothing falls back to plaintext. Pre-shared keys are
//! not supported: rustls has no external PSK support.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, SignatureScheme};

use crate::nbd::error::NbdError;

/// The CA certificate's file name in a certificates directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client certificate's file name (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client key's file name (with [`CLIENT_CERT`]).
pub const CLIENT_KEY: &str = "client-key.pem";

/// TLS settings of an `nbds` connection. Settings left unset here are
/// taken from defaults with [`TlsConfig::or`] (the URI's own query
/// parameters win over a front end's options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificates directory (QEMU's `tls-creds-x509` layout, see the
    /// module docs); required to connect.
    pub certs_dir: Option<PathBuf>,
    /// The name the server's certificate must carry, instead of the URI's
    /// host (QEMU's `tls-hostname`).
    pub hostname: Option<String>,
}

impl TlsConfig {
    /// `self`, with what it leaves unset taken from `defaults`.
    pub fn or(&self, defaults: &TlsConfig) -> TlsConfig {
        TlsConfig {
            certs_dir: self
                .certs_dir
                .clone()
                .or_else(|| defaults.certs_dir.clone()),
            hostname: self.hostname.clone().or_else(|| defaults.hostname.clone()),
        }
    }

    /// The rustls configuration and the name to verify for a server at
    /// `host` (`None` for a Unix socket): reads the certificates.
    pub(crate) fn client(&self, host: Option<&str>) -> Result<TlsClient, NbdError> {
        let dir = self
            .certs_dir
            .as_deref()
            .ok_or(NbdError::TlsNoCertificates)?;
        let setup = |what: String| NbdError::TlsSetup {
            dir: dir.to_path_buf(),
            what,
        };
        let name = self.hostname.as_deref().or(host).unwrap_or("localhost");
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| setup(format!("{name:?} is not a valid server name")))?;

        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        let cas = read_certs(&ca_path).map_err(setup)?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| setup(format!("{CA_CERT}: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let certified = match (cert.exists(), key.exists()) {
            (false, false) => None,
            (true, true) => {
                let chain = read_certs(&cert).map_err(setup)?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| setup(format!("{CLIENT_KEY}: {}", pem_error(&e))))?;
                let certified = CertifiedKey::from_der(chain, key, &provider)
                    .map_err(|e| setup(format!("{CLIENT_CERT}/{CLIENT_KEY}: {e}")))?;
                Some(Arc::new(certified))
            }
            (true, false) => return Err(setup(format!("{CLIENT_CERT} without {CLIENT_KEY}"))),
            (false, true) => return Err(setup(format!("{CLIENT_KEY} without {CLIENT_CERT}"))),
        };
        let has_client_cert = certified.is_some();
        let resolver = Arc::new(ClientCert {
            certified,
            requested: AtomicBool::new(false),
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesClientCert>);
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
            has_client_cert,
            client_cert: resolver,
        })
    }
}

/// What a TLS connection is made with.
#[derive(Debug, Clone)]
pub(crate) struct TlsClient {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) has_client_cert: bool,
    client_cert: Arc<ClientCert>,
}

impl TlsClient {
    /// Whether the server asked for a client certificate in the
    /// handshake. A server that then refuses the client may just close
    /// the connection (QEMU does), so this is what can say why.
    pub(crate) fn client_cert_requested(&self) -> bool {
        self.client_cert.requested.load(Ordering::Relaxed)
    }

    /// The words for a server that asked for a client certificate none
    /// was given for.
    pub(crate) fn demanded_text() -> String {
        format!(
            "the server demands a client certificate and none was given ({CLIENT_CERT} and {CLIENT_KEY} in the certificates directory)"
        )
    }
}

/// The client certificate (if any), and whether the server asked for one.
#[derive(Debug)]
struct ClientCert {
    certified: Option<Arc<CertifiedKey>>,
    requested: AtomicBool,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::Relaxed);
        self.certified.clone()
    }

    fn has_certs(&self) -> bool {
        self.certified.is_some()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{file}: {}", pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!("{file}: no certificate in it"));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => crate::error::io_text(io).to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the right kind".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// One line for what went wrong in TLS with the server, naming the cause
/// (`has_client_cert`: whether a client certificate was offered;
/// `cert_requested`: whether the server asked for one).
pub(crate) fn describe(e: &rustls::Error, has_client_cert: bool, cert_requested: bool) -> String {
    use rustls::Error as E;
    use AlertDescription as A;
    match e {
        E::InvalidCertificate(c) => format!("the server's certificate {}", certificate(c)),
        E::AlertReceived(a) => match (a, has_client_cert, cert_requested) {
            (A::CertificateRequired, false, _) | (A::HandshakeFailure, false, true) => {
                TlsClient::demanded_text()
            }
            (
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::AccessDenied
                | A::CertificateRequired,
                true,
                _,
            )
            | (A::HandshakeFailure, true, true) => {
                format!("the server rejected the client certificate ({a:?} alert)")
            }
            _ => format!("the server ended TLS with a {a:?} alert"),
        },
        E::NoCertificatesPresented => "the server presented no certificate".into(),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            format!("the server does not speak TLS properly ({e})")
        }
        other => other.to_string(),
    }
}

fn certificate(c: &CertificateError) -> String {
    use CertificateError as C;
    match c {
        C::UnknownIssuer => format!("is not signed by the CA in {CA_CERT} (unknown issuer)"),
        C::Expired | C::ExpiredContext { .. } => "has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "is not valid yet".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            let detail = match c {
                C::NotValidForNameContext {
                    expected,
                    presented,
                } => format!(
                    ": expected {}, it names {}",
                    expected.to_str(),
                    if presented.is_empty() {
                        "nothing".to_string()
                    } else {
                        presented
                            .iter()
                            .map(|p| bare_name(p))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                _ => String::new(),
            };
            format!("does not name the server{detail}")
        }
        C::Revoked => "has been revoked".into(),
        C::BadSignature => "has a bad or unsupported signature".into(),
        other => format!("is not acceptable ({other:?})"),
    }
}

/// A name as rustls lists it (`DnsName("a.example")`, `IpAddress(1.2.3.4)`)
/// without the wrapping.
fn bare_name(p: &str) -> &str {
    p.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            p.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_fills_only_what_is_unset() {
        let uri = TlsConfig {
            certs_dir: Some("/a".into()),
            hostname: None,
        };
        let flags = TlsConfig {
            certs_dir: Some("/b".into()),
            hostname: Some("h".into()),
        };
        let t = uri.or(&flags);
        assert_eq!(t.certs_dir.as_deref(), Some(Path::new("/a")));
        assert_eq!(t.hostname.as_deref(), Some("h"));
    }

    #[test]
    fn missing_directory_or_ca_is_a_setup_error() {
        let e = TlsConfig::default().client(Some("h")).unwrap_err();
        assert!(matches!(e, NbdError::TlsNoCertificates), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let t = TlsConfig {
            certs_dir: Some(dir.path().to_path_buf()),
            hostname: None,
        };
        let e = t.client(Some("h")).unwrap_err();
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");
        std::fs::write(dir.path().join(CA_CERT), "junk").unwrap();
        let e = t.client(Some("h")).unwrap_err();
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    }

    #[test]
    fn names_lose_their_wrapping() {
        assert_eq!(bare_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(bare_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(bare_name("other"), "other");
    }

    #[test]
    fn descriptions_name_the_cause() {
        let d = |e| describe(&e, false, true);
        assert!(d(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
        .contains("not signed by the CA"));
        assert!(
            d(rustls::Error::InvalidCertificate(CertificateError::Expired)).contains("expired")
        );
        assert!(d(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName
        ))
        .contains("does not name the server"));
        assert!(d(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
        ))
        .contains("demands a client certificate"));
        assert!(describe(
            &rustls::Error::AlertReceived(AlertDescription::BadCertificate),
            true,
            true
        )
        .contains("rejected the client certificate"));
        // Not asked for a certificate: a handshake failure is just that.
        let other = describe(
            &rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
            false,
            false,
        );
        assert!(other.contains("HandshakeFailure alert"), "{other}");
    }
}
