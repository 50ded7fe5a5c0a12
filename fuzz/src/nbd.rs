//! The NBD client against a server that sends canned bytes: the fuzz
//! input is everything the server says (handshake, option replies, reply
//! chunks), written at once, after which the server reads and discards
//! what the client sends until it hangs up. The client's requests are fixed
//! (its cookies count from 1), so a recorded session replays exactly.
//!
//! With `QBACKUP_FUZZ_NBD_UPSTREAM=SOCKET` and
//! `QBACKUP_FUZZ_NBD_RECORD=FILE` the server instead relays to a real
//! server (qemu-nbd) and records what it answered: that is how `seed.sh`
//! makes the seed corpus.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use qbackup_formats::nbd::{ConnectOptions, Connection, NbdTransport, NbdUri, SharedConnection};

/// The most bytes one read asks for, whatever size the server claims.
const MAX_READ: u64 = 64 * 1024;

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    listener: UnixListener,
}

fn server() -> &'static Mutex<Server> {
    static SERVER: OnceLock<Mutex<Server>> = OnceLock::new();
    SERVER.get_or_init(|| {
        // libFuzzer's main is not Rust's: a write to a closed socket must
        // be an error, not a SIGPIPE.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).expect("listening socket");
        Mutex::new(Server {
            _dir: dir,
            socket,
            listener,
        })
    })
}

fn serve_canned(mut s: UnixStream, data: Vec<u8>) {
    let _ = s.write_all(&data);
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

fn serve_relay(client: UnixStream, upstream: PathBuf, record: PathBuf) {
    let up = UnixStream::connect(upstream).expect("upstream NBD server");
    let (mut c_rd, mut up_wr) = (client.try_clone().unwrap(), up.try_clone().unwrap());
    let to_server = thread::spawn(move || {
        let _ = std::io::copy(&mut c_rd, &mut up_wr);
        let _ = up_wr.shutdown(Shutdown::Write);
    });
    let (mut up_rd, mut c_wr) = (up, client);
    let mut said = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match up_rd.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                said.extend_from_slice(&buf[..n]);
                if c_wr.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c_wr.shutdown(Shutdown::Write);
    let _ = to_server.join();
    std::fs::write(record, said).expect("writing the recording");
}

/// Runs one client session: byte 0 of `data` chooses the client's options
/// (bit 0: ask for extended headers; bit 1: also select a dirty-bitmap
/// context; bit 2: go through a [`SharedConnection`]), the rest is what
/// the server sends.
pub fn exercise_client(data: &[u8]) {
    let Some((&sel, said)) = data.split_first() else {
        return;
    };
    let guard = server().lock().unwrap_or_else(|e| e.into_inner());
    let said = said.to_vec();
    let relay = std::env::var_os("QBACKUP_FUZZ_NBD_UPSTREAM")
        .zip(std::env::var_os("QBACKUP_FUZZ_NBD_RECORD"));
    let listener = guard.listener.try_clone().expect("listener");
    let srv = thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        match relay {
            Some((up, rec)) => serve_relay(s, up.into(), rec.into()),
            None => serve_canned(s, said),
        }
    });
    let uri = NbdUri {
        transport: NbdTransport::Unix {
            socket: guard.socket.clone(),
        },
        export: String::new(),
        tls: None,
    };
    let mut contexts = vec!["base:allocation".to_string()];
    if sel & 2 != 0 {
        contexts.push("qemu:dirty-bitmap:b0".to_string());
    }
    let opts = ConnectOptions {
        meta_contexts: contexts.clone(),
        timeout: Duration::from_secs(5),
        extended_headers: sel & 1 != 0,
        handshake_timeout: None,
    };
    if let Ok(conn) = Connection::connect(&uri, &opts) {
        if sel & 4 != 0 {
            session_shared(SharedConnection::new(conn), &contexts);
        } else {
            session(conn, &contexts);
        }
    }
    srv.join().expect("server thread");
}

fn ranges(size: u64) -> [(u64, u64); 2] {
    let first = size.min(MAX_READ);
    let last = size.min(4096);
    [(0, first), (size - last, last)]
}

/// One session's questions, the same through either connection type:
/// both ends of the disk read, then block status for each context.
fn ask(
    size: u64,
    contexts: &[String],
    mut read: impl FnMut(u64, &mut [u8]),
    mut status: impl FnMut(&str, u64) -> Option<Vec<(u64, u32)>>,
) {
    for (off, len) in ranges(size) {
        let mut buf = vec![0u8; len as usize];
        read(off, &mut buf);
    }
    for c in contexts {
        if let Some(descs) = status(c, size) {
            check_descriptors(&descs, size);
        }
    }
}

fn session(mut conn: Connection, contexts: &[String]) {
    let size = conn.size();
    let cell = std::cell::RefCell::new(&mut conn);
    ask(
        size,
        contexts,
        |off, buf| {
            let _ = cell.borrow_mut().read(off, buf);
        },
        |c, len| cell.borrow_mut().block_status(c, 0, len).ok(),
    );
    let _ = conn.disconnect();
}

fn session_shared(conn: SharedConnection, contexts: &[String]) {
    ask(
        conn.size(),
        contexts,
        |off, buf| {
            let _ = conn.read(off, buf);
        },
        |c, len| conn.block_status(c, 0, len).ok(),
    );
}

/// The documented contract of a block status answer: at least one
/// descriptor, each nonzero, together never past the range asked for.
fn check_descriptors(descs: &[(u64, u32)], len: u64) {
    if len == 0 {
        return;
    }
    assert!(!descs.is_empty(), "block status with no descriptor");
    let mut total = 0u64;
    for &(n, _) in descs {
        assert!(n > 0, "zero-length descriptor");
        total = total.checked_add(n).expect("descriptor lengths overflow");
    }
    assert!(
        total <= len,
        "descriptors cover {total} of {len} bytes asked"
    );
}
