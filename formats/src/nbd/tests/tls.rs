//! The TLS step of the handshake against fake servers: `NBD_OPT_STARTTLS`
//! first, a refusal never continued in plaintext, `NBD_REP_ERR_TLS_REQD`
//! to a plaintext client, and a server that answers STARTTLS but does not
//! speak TLS. (Real TLS sessions are tested against qemu-nbd, nbdkit and
//! QEMU in the workspace's `tests/nbd_tls.rs`.)

use std::path::Path;

use super::*;
use crate::nbd::TlsConfig;

/// A self-signed CA, only parsed here: no server presents a certificate.
const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBhDCCASqgAwIBAgIUKO72rqcARlDVDYe30ZJIZ20o7uEwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUcWJhY2t1cC11bml0LXRlc3QtY2EwIBcNMjYxMjAyMTY0NDI0
WhgPMjEyNjExMDgxNjQ0MjRaMB8xHTAbBgNVBAMMFHFiYWNrdXAtdW5pdC10ZXN0
LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEd+p7WM9+HIrc58nH4mRUXDXJ
UEbcWkNOqf6NgjC9fYzp5S1uOBVlrlNH/aV5mBkz2A5NkO/SZ8RfoQg5XPvhJKNC
MEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwHQYDVR0OBBYEFGAx
qTcel2u4x7ZHkjsBoiGM3ET2MAoGCCqGSM49BAMCA0gAMEUCIHoKx/2PR8428loV
Pw021c2ELJbGRQfQF9MmQUA7yY3wAiEAlmysnzOhf1lcEm/Fzxza5rQJrlNtb/y0
VGtEV+yBm9s=
-----END CERTIFICATE-----
";

/// What the fake server does with `NBD_OPT_STARTTLS`.
#[derive(Clone, Copy)]
enum StartTls {
    /// `NBD_REP_ERR_UNSUP`.
    Refuse,
    /// ACK, then bytes that are not a TLS record.
    AckThenJunk,
    /// ACK with more bytes in the same write, before any handshake.
    AckWithTrailer,
}

/// Serves one client: greeting, then the first option must be STARTTLS;
/// returns the first 16 bytes it read after answering it (`None`: the
/// client sent fewer).
fn starttls_server(dir: &Path, mode: StartTls) -> (NbdUri, JoinHandle<Option<[u8; 16]>>) {
    let path = dir.join("tls.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = INIT_MAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&greeting).unwrap();
        rd::<4>(&mut s)?;
        let h = rd::<16>(&mut s)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        assert_eq!(opt, OPT_STARTTLS, "STARTTLS is the first option");
        match mode {
            StartTls::Refuse => opt_reply(&mut s, opt, REP_ERR_UNSUP, b"no TLS here"),
            StartTls::AckThenJunk => {
                opt_reply(&mut s, opt, REP_ACK, &[]);
                // Wait for the ClientHello, answer with junk.
                rd::<5>(&mut s)?;
                s.write_all(b"this is not TLS at all\n").unwrap();
            }
            StartTls::AckWithTrailer => {
                let mut m = REP_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&opt.to_be_bytes());
                m.extend_from_slice(&REP_ACK.to_be_bytes());
                m.extend_from_slice(&0u32.to_be_bytes());
                m.extend_from_slice(b"extra");
                s.write_all(&m).unwrap();
            }
        }
        // The next option the client sends, if any (OPT_ABORT after a
        // refusal, nothing in plaintext after a failed handshake).
        rd::<16>(&mut s)
    });
    let certs = dir.join("pki");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca-cert.pem"), CA).unwrap();
    let uri = NbdUri {
        transport: NbdTransport::Unix { socket: path },
        export: String::new(),
        tls: Some(TlsConfig {
            certs_dir: Some(certs),
            hostname: None,
        }),
    };
    (uri, h)
}

#[test]
fn refused_starttls_is_not_continued_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, h) = starttls_server(dir.path(), StartTls::Refuse);
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::TlsNotOffered { .. }), "{e}");
    assert!(e.to_string().contains("does not offer TLS"), "{e}");
    assert!(e.to_string().contains("no TLS here"), "{e}");
    assert_eq!(e.class(), ErrorClass::Unsupported);
    let next = h.join().unwrap().expect("an option follows");
    assert_eq!(next[..8], OPTS_MAGIC.to_be_bytes());
    assert_eq!(next[8..12], OPT_ABORT.to_be_bytes(), "the client aborts");
}

#[test]
fn a_server_that_does_not_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, h) = starttls_server(dir.path(), StartTls::AckThenJunk);
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    // The rest of the ClientHello and an alert may follow, never an option.
    if let Some(next) = h.join().unwrap() {
        assert_ne!(next[..8], OPTS_MAGIC.to_be_bytes(), "no plaintext option");
    }
}

#[test]
fn bytes_before_the_tls_handshake_are_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, h) = starttls_server(dir.path(), StartTls::AckWithTrailer);
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::Protocol { .. }), "{e}");
    h.join().unwrap();
}

#[test]
fn tls_required_by_the_server() {
    let cfg = Cfg {
        go_error: Some((REP_ERR_TLS_REQD, "TLS is required")),
        ..Cfg::default()
    };
    let (_dir, uri, h) = serve(cfg, |_| ());
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::TlsRequired), "{e}");
    assert_eq!(e.remedy(), Some(crate::Remedy::UseTls));
    assert!(h.join().unwrap().is_none(), "the client aborts");
}

#[test]
fn no_certificates_fails_before_connecting() {
    let uri = NbdUri::parse("nbds+unix:///?socket=/nonexistent").unwrap();
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::TlsNoCertificates), "{e}");
    assert_eq!(e.remedy(), Some(crate::Remedy::TlsCertificates));
    assert_eq!(e.class(), ErrorClass::Usage);
}
