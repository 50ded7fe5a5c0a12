//! The client against a small fake server run in a thread over a Unix
//! socket in a temporary directory: the server side, and the handshake
//! tests ([`transmission`] has the rest).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::proto::*;
use super::*;
use crate::error::{Classify, ErrorClass};

mod shared;
mod tls;
mod transmission;

/// The timeout of the tests that expect one; the others use 5 s, so that a
/// loaded machine does not make them fail.
const TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Clone)]
struct Cfg {
    structured: bool,
    extended: bool,
    contexts: Vec<&'static str>,
    size: u64,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    go_error: Option<(u32, &'static str)>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            structured: true,
            extended: false,
            contexts: vec!["base:allocation"],
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN,
            block_size: Some((1, 4096, 64 * 1024)),
            go_error: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Req {
    command: u16,
    cookie: u64,
    offset: u64,
    len: u64,
}

/// The server side of one connection, after the handshake.
struct Fake {
    s: UnixStream,
    extended: bool,
    /// Context ids handed out, by name.
    ids: Vec<(u32, String)>,
    /// How long [`Fake::batch`] waits for more requests.
    gap: Duration,
}

fn rd<const N: usize>(s: &mut UnixStream) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

fn opt_reply(s: &mut UnixStream, opt: u32, rep: u32, data: &[u8]) {
    let mut m = REP_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rep.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Runs the server side of the handshake; `None` if the client aborted or
/// went away.
fn handshake(mut s: UnixStream, cfg: &Cfg) -> Option<Fake> {
    let mut greeting = INIT_MAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).ok()?;
    let flags = u32::from_be_bytes(rd::<4>(&mut s)?);
    assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let mut fake = Fake {
        s,
        extended: false,
        ids: Vec::new(),
        gap: Duration::from_millis(30),
    };
    loop {
        let h = rd::<16>(&mut fake.s)?;
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), OPTS_MAGIC);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..].try_into().unwrap());
        let mut data = vec![0; len as usize];
        fake.s.read_exact(&mut data).ok()?;
        let s = &mut fake.s;
        match opt {
            OPT_EXTENDED_HEADERS if cfg.extended => {
                fake.extended = true;
                opt_reply(s, opt, REP_ACK, &[]);
            }
            OPT_STRUCTURED_REPLY if cfg.structured => opt_reply(s, opt, REP_ACK, &[]),
            OPT_SET_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                let mut at = 8 + name_len;
                let n = u32::from_be_bytes(data[4 + name_len..at].try_into().unwrap());
                for _ in 0..n {
                    let l = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    let q = std::str::from_utf8(&data[at + 4..at + 4 + l]).unwrap();
                    at += 4 + l;
                    if cfg.contexts.contains(&q) {
                        let id = 100 + fake.ids.len() as u32;
                        fake.ids.push((id, q.to_string()));
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(q.as_bytes());
                        opt_reply(s, opt, REP_META_CONTEXT, &p);
                    }
                }
                opt_reply(s, opt, REP_ACK, &[]);
            }
            OPT_GO => {
                if let Some((rep, msg)) = cfg.go_error {
                    opt_reply(s, opt, rep, msg.as_bytes());
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&cfg.size.to_be_bytes());
                info.extend_from_slice(&cfg.flags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info);
                if let Some((a, b, c)) = cfg.block_size {
                    let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [a, b, c] {
                        info.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(s, opt, REP_INFO, &info);
                }
                opt_reply(s, opt, REP_ACK, &[]);
                return Some(fake);
            }
            OPT_ABORT => return None,
            _ => opt_reply(s, opt, REP_ERR_UNSUP, b"not here"),
        }
    }
}

impl Fake {
    /// The next request, `None` at end of stream.
    fn req(&mut self) -> Option<Req> {
        let b = if self.extended {
            rd::<32>(&mut self.s)?.to_vec()
        } else {
            rd::<28>(&mut self.s)?.to_vec()
        };
        let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
        let want = if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        assert_eq!(magic, want);
        let len = if self.extended {
            u64::from_be_bytes(b[24..32].try_into().unwrap())
        } else {
            u64::from(u32::from_be_bytes(b[24..28].try_into().unwrap()))
        };
        Some(Req {
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len,
        })
    }

    /// Requests already sent, without waiting long for more.
    fn batch(&mut self) -> Vec<Req> {
        let Some(first) = self.req() else {
            return Vec::new();
        };
        let mut out = vec![first];
        self.s.set_read_timeout(Some(self.gap)).unwrap();
        while let Some(r) = self.req() {
            out.push(r);
        }
        self.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        out
    }

    fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) {
        let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&error.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(data);
        let _ = self.s.write_all(&m);
    }

    fn chunk_header(&self, flags: u16, kind: u16, r: &Req, len: u64) -> Vec<u8> {
        let magic = if self.extended {
            EXTENDED_REPLY_MAGIC
        } else {
            STRUCTURED_REPLY_MAGIC
        };
        let mut m = magic.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&r.cookie.to_be_bytes());
        if self.extended {
            m.extend_from_slice(&r.offset.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&(len as u32).to_be_bytes());
        }
        m
    }

    fn chunk(&mut self, flags: u16, kind: u16, r: &Req, payload: &[u8]) {
        let mut m = self.chunk_header(flags, kind, r, payload.len() as u64);
        m.extend_from_slice(payload);
        let _ = self.s.write_all(&m);
    }

    fn data(&mut self, r: &Req, offset: u64, data: &[u8], flags: u16) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(flags, REPLY_TYPE_OFFSET_DATA, r, &p);
    }

    fn hole(&mut self, r: &Req, offset: u64, len: u32, flags: u16) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(flags, REPLY_TYPE_OFFSET_HOLE, r, &p);
    }

    fn error(&mut self, r: &Req, errno: u32, msg: &str, at: Option<u64>, flags: u16) {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        let kind = match at {
            Some(o) => {
                p.extend_from_slice(&o.to_be_bytes());
                REPLY_TYPE_ERROR_OFFSET
            }
            None => REPLY_TYPE_ERROR,
        };
        self.chunk(flags, kind, r, &p);
    }

    fn block_status(&mut self, r: &Req, id: u32, descs: &[(u64, u32)], flags: u16) {
        let mut p = id.to_be_bytes().to_vec();
        let kind = if self.extended {
            p.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            for &(l, f) in descs {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&u64::from(f).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            for &(l, f) in descs {
                p.extend_from_slice(&(l as u32).to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS
        };
        self.chunk(flags, kind, r, &p);
    }

    /// Serves `export` correctly until disconnect: reads in 4 KiB pieces,
    /// zero pieces as holes, sent in reverse order, replies to a batch in
    /// reverse order; block status per 4 KiB block (hole+zero or data).
    /// Returns the requests seen, the disconnect last.
    fn serve(&mut self, export: &[u8], structured: bool) -> Vec<Req> {
        let mut seen = Vec::new();
        loop {
            let batch = self.batch();
            if batch.is_empty() {
                return seen;
            }
            for r in batch.iter().rev() {
                seen.push(*r);
                let (o, l) = (r.offset as usize, r.len as usize);
                match r.command {
                    CMD_DISC => return seen,
                    CMD_READ if !structured => self.simple(r.cookie, 0, &export[o..o + l]),
                    CMD_READ => {
                        let pieces: Vec<usize> = (o..o + l).step_by(4096).collect();
                        for &p in pieces.iter().rev() {
                            let end = (p + 4096).min(o + l);
                            let piece = &export[p..end];
                            if piece.iter().all(|&b| b == 0) {
                                self.hole(r, p as u64, piece.len() as u32, 0);
                            } else {
                                self.data(r, p as u64, piece, 0);
                            }
                        }
                        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r, &[]);
                    }
                    CMD_BLOCK_STATUS => {
                        let descs = status_descs(export, o, l);
                        let ids = self.ids.clone();
                        for (i, (id, _)) in ids.iter().enumerate() {
                            let done = if i + 1 == ids.len() {
                                REPLY_FLAG_DONE
                            } else {
                                0
                            };
                            self.block_status(r, *id, &descs, done);
                        }
                    }
                    c => panic!("unexpected command {c}"),
                }
            }
        }
    }
}

/// `base:allocation` of `export[o..o + l]`, per 4 KiB block (hole+zero or
/// data), merged.
fn status_descs(export: &[u8], o: usize, l: usize) -> Vec<(u64, u32)> {
    let mut descs: Vec<(u64, u32)> = Vec::new();
    for p in (o..o + l).step_by(4096) {
        let end = (p + 4096).min(o + l);
        let zero = export[p..end].iter().all(|&b| b == 0);
        let f = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
        match descs.last_mut() {
            Some(d) if d.1 == f => d.0 += (end - p) as u64,
            _ => descs.push(((end - p) as u64, f)),
        }
    }
    descs
}

/// Listens on a socket in a temporary directory; the thread accepts one
/// client, runs the handshake, then `script`.
fn serve<T: Send + 'static>(
    cfg: Cfg,
    script: impl FnOnce(Fake) -> T + Send + 'static,
) -> (tempfile::TempDir, NbdUri, JoinHandle<Option<T>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let fake = handshake(s, &cfg)?;
        Some(script(fake))
    });
    let uri = NbdUri {
        transport: NbdTransport::Unix { socket: path },
        export: String::new(),
        tls: None,
    };
    (dir, uri, handle)
}

fn opts(contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(5),
        extended_headers: true,
        handshake_timeout: None,
    }
}

/// Options with the short [`TIMEOUT`].
fn quick() -> ConnectOptions {
    ConnectOptions {
        timeout: TIMEOUT,
        ..opts(&[])
    }
}

#[test]
fn no_structured_replies_means_no_contexts() {
    let cfg = Cfg {
        structured: false,
        ..Cfg::default()
    };
    let (_dir, uri, h) = serve(cfg, |_| ());
    let e = Connection::connect(&uri, &opts(&["base:allocation"])).unwrap_err();
    assert!(
        matches!(&e, NbdError::OptionRefused { option, .. } if *option == "NBD_OPT_STRUCTURED_REPLY"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Unsupported);
    assert!(h.join().unwrap().is_none(), "the client aborts");
}

fn assert_protocol(e: &NbdError, needle: &str) {
    match e {
        NbdError::Protocol { what } => assert!(what.contains(needle), "{what}"),
        other => panic!("expected a protocol error with {needle:?}, got {other}"),
    }
}

#[test]
fn silent_server_times_out_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        // Returns when the client closes.
        let _ = s.read(&mut b);
    });
    let uri = NbdUri {
        transport: NbdTransport::Unix { socket: path },
        export: String::new(),
        tls: None,
    };
    let start = Instant::now();
    let e = Connection::connect(&uri, &quick()).unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < TIMEOUT * 5);
    h.join().unwrap();
}

#[test]
fn refused_meta_context() {
    let (_dir, uri, h) = serve(Cfg::default(), |_| ());
    let e = Connection::connect(&uri, &opts(&["base:allocation", "qemu:dirty-bitmap:nope"]))
        .unwrap_err();
    assert!(
        matches!(&e, NbdError::ContextRefused { name } if name == "qemu:dirty-bitmap:nope"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Unsupported);
    assert_eq!(
        e.to_string(),
        "NBD server does not offer metadata context \"qemu:dirty-bitmap:nope\""
    );
    assert!(h.join().unwrap().is_none(), "the client aborts");
}

#[test]
fn go_error_carries_the_servers_message() {
    let cfg = Cfg {
        go_error: Some((REP_ERR_UNKNOWN, "export 'x' not present")),
        ..Cfg::default()
    };
    let (_dir, uri, h) = serve(cfg, |_| ());
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "NBD server refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN (export 'x' not present)"
    );
    assert_eq!(e.class(), ErrorClass::Usage);
    assert!(h.join().unwrap().is_none());
}

fn greeting_error(greeting: &'static [u8]) -> NbdError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(greeting).unwrap();
    });
    let uri = NbdUri {
        transport: NbdTransport::Unix { socket: path },
        export: String::new(),
        tls: None,
    };
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    h.join().unwrap();
    e
}

#[test]
fn greetings() {
    let e = greeting_error(b"HTTP/1.1 400 Bad Request\r\n");
    assert_protocol(&e, "not an NBD server");
    let e = greeting_error(b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53");
    assert!(matches!(e, NbdError::Handshake { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Unsupported);
    let e = greeting_error(b"NBDMAGICIHAVEOPT\x00\x00");
    assert!(e.to_string().contains("fixed newstyle"), "{e}");
    let e = greeting_error(b"NBDMAGICIHAVE");
    assert!(matches!(e, NbdError::Disconnected { .. }), "{e}");
}

#[test]
fn missing_socket_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let uri = NbdUri::parse(&format!(
        "nbd+unix:///?socket={}/nope.sock",
        dir.path().display()
    ))
    .unwrap();
    let e = Connection::connect(&uri, &opts(&[])).unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Usage);
}

#[test]
fn zero_timeout_is_refused() {
    let uri = NbdUri::parse("nbd+unix:///?socket=/nonexistent").unwrap();
    let o = ConnectOptions {
        timeout: Duration::ZERO,
        ..ConnectOptions::default()
    };
    assert!(matches!(
        Connection::connect(&uri, &o),
        Err(NbdError::InvalidRequest { .. })
    ));
}

#[test]
fn silent_accept_queue_is_not_a_hang() {
    // A listener that never accepts: the connection succeeds (the kernel
    // queues it) but the greeting never comes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let uri = NbdUri {
        transport: NbdTransport::Unix { socket: path },
        export: String::new(),
        tls: None,
    };
    let start = Instant::now();
    let e = Connection::connect(&uri, &quick()).unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < TIMEOUT * 5);
}
