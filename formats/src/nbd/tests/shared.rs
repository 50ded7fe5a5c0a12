//! [`SharedConnection`] against the fake server: many threads on one
//! connection with replies out of order and interleaved, and every way the
//! connection can break while threads wait. Every thread is joined with a
//! deadline: a hang fails the test instead of stalling it.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc};

use super::transmission::export;
use super::*;

/// How long any test waits for its threads.
const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `f(i)` on `n` threads sharing `conn` and returns their results in
/// order; fails if they are not all done within [`DEADLINE`].
fn on_threads<T: Send + 'static>(
    n: usize,
    conn: &Arc<SharedConnection>,
    f: impl Fn(usize, &SharedConnection) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (f, tx, conn) = (Arc::clone(&f), tx.clone(), Arc::clone(conn));
            thread::spawn(move || {
                let r = f(i, &conn);
                let _ = tx.send((i, r));
            })
        })
        .collect();
    drop(tx);
    let deadline = Instant::now() + DEADLINE;
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, r) = rx.recv_timeout(left).expect("a thread hung or panicked");
        out[i] = Some(r);
    }
    for h in handles {
        h.join().unwrap();
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Drops the last reference to `conn` (disconnect, reader joined) within
/// the deadline.
fn drop_in_time(conn: Arc<SharedConnection>) {
    let conn = Arc::into_inner(conn).expect("the threads are done");
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        drop(conn);
        let _ = tx.send(());
    });
    rx.recv_timeout(DEADLINE).expect("drop hung");
    h.join().unwrap();
}

fn shared(uri: &NbdUri, o: &ConnectOptions) -> Arc<SharedConnection> {
    Arc::new(SharedConnection::new(Connection::connect(uri, o).unwrap()))
}

/// One message of a reply, for [`serve_interleaved`].
enum Msg {
    Data(usize, usize),
    Hole(usize, usize),
    None,
    Simple(usize, usize),
    Status(u32, Vec<(u64, u32)>, u16),
}

/// Serves `export` until disconnect like [`Fake::serve`], but answers each
/// batch in reverse order with the chunks of all its replies interleaved
/// (one message of each in turn). Returns the requests seen and the
/// largest batch.
fn serve_interleaved(f: &mut Fake, export: &[u8], structured: bool) -> (Vec<Req>, usize) {
    let mut seen = Vec::new();
    let mut largest = 0;
    loop {
        let batch = f.batch();
        if batch.is_empty() {
            return (seen, largest);
        }
        largest = largest.max(batch.len());
        let mut replies: Vec<(Req, VecDeque<Msg>)> = Vec::new();
        let mut disc = false;
        for r in batch.iter().rev() {
            seen.push(*r);
            let (o, l) = (r.offset as usize, r.len as usize);
            let mut msgs = VecDeque::new();
            match r.command {
                CMD_DISC => disc = true,
                CMD_READ if !structured => msgs.push_back(Msg::Simple(o, l)),
                CMD_READ => {
                    for p in (o..o + l).step_by(4096).rev() {
                        let n = 4096.min(o + l - p);
                        if export[p..p + n].iter().all(|&b| b == 0) {
                            msgs.push_back(Msg::Hole(p, n));
                        } else {
                            msgs.push_back(Msg::Data(p, n));
                        }
                    }
                    msgs.push_back(Msg::None);
                }
                CMD_BLOCK_STATUS => {
                    let descs = status_descs(export, o, l);
                    for (i, (id, _)) in f.ids.iter().enumerate() {
                        let last = i + 1 == f.ids.len();
                        let flags = if last { REPLY_FLAG_DONE } else { 0 };
                        msgs.push_back(Msg::Status(*id, descs.clone(), flags));
                    }
                }
                c => panic!("unexpected command {c}"),
            }
            replies.push((*r, msgs));
        }
        while replies.iter().any(|(_, m)| !m.is_empty()) {
            for (r, msgs) in &mut replies {
                match msgs.pop_front() {
                    Some(Msg::Data(p, n)) => f.data(r, p as u64, &export[p..p + n], 0),
                    Some(Msg::Hole(p, n)) => f.hole(r, p as u64, n as u32, 0),
                    Some(Msg::None) => f.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r, &[]),
                    Some(Msg::Simple(o, l)) => f.simple(r.cookie, 0, &export[o..o + l]),
                    Some(Msg::Status(id, d, flags)) => f.block_status(r, id, &d, flags),
                    None => {}
                }
            }
        }
        if disc {
            return (seen, largest);
        }
    }
}

/// A small deterministic generator for offsets and lengths.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

fn many_threads(cfg: Cfg) {
    let data = Arc::new(export());
    let served = Arc::clone(&data);
    let structured = cfg.structured;
    let (_dir, uri, h) = serve(cfg.clone(), move |mut f| {
        f.gap = Duration::from_millis(3);
        serve_interleaved(&mut f, &served, structured)
    });
    let ctx: &[&str] = if structured {
        &["base:allocation"]
    } else {
        &[]
    };
    let conn = shared(&uri, &opts(ctx));
    assert_eq!(conn.size(), 1 << 20);
    assert!(conn.read_only() && conn.can_multi_conn() && conn.is_usable());
    assert_eq!(conn.has_context("base:allocation"), structured);
    let min = u64::from(conn.block_size().0);
    let size = conn.size();
    let expected = Arc::clone(&data);
    let done = on_threads(8, &conn, move |i, c| {
        let mut rng = i as u64 + 1;
        for op in 0..40 {
            let len = 1 + lcg(&mut rng) % 200_000;
            let offset = lcg(&mut rng) % (size - len);
            if structured && op % 3 == 0 {
                let offset = offset - offset % min;
                let d = c.block_status("base:allocation", offset, len).unwrap();
                let (o, l) = (offset as usize, len as usize);
                let l = l.next_multiple_of(min as usize).min(size as usize - o);
                let mut want = status_descs(&expected, o, l);
                // What the client cuts to the asked length.
                let mut left = len;
                want.retain_mut(|d| {
                    let keep = left > 0;
                    d.0 = d.0.min(left);
                    left -= d.0;
                    keep
                });
                assert_eq!(d, want, "block status {offset}+{len}");
            } else {
                let mut buf = vec![0xeeu8; len as usize];
                c.read(offset, &mut buf).unwrap();
                let o = offset as usize;
                assert!(buf == expected[o..o + len as usize], "read {offset}+{len}");
            }
        }
        true
    });
    assert!(done.iter().all(|&d| d));
    drop_in_time(conn);
    let (seen, largest) = h.join().unwrap().unwrap();
    assert_eq!(seen.last().unwrap().command, CMD_DISC, "drop disconnects");
    assert!(largest > 1, "requests were pipelined");
    let mut cookies: Vec<u64> = seen.iter().map(|r| r.cookie).collect();
    cookies.sort_unstable();
    cookies.dedup();
    assert_eq!(cookies.len(), seen.len(), "cookies are unique");
    for r in &seen {
        assert_eq!(r.offset % min, 0, "{r:?}");
    }
}

#[test]
fn many_threads_structured() {
    many_threads(Cfg::default());
}

#[test]
fn many_threads_extended() {
    many_threads(Cfg {
        extended: true,
        ..Cfg::default()
    });
}

#[test]
fn many_threads_simple_replies() {
    many_threads(Cfg {
        structured: false,
        ..Cfg::default()
    });
}

#[test]
fn many_threads_with_a_minimum_block_size() {
    many_threads(Cfg {
        block_size: Some((512, 4096, 64 * 1024)),
        ..Cfg::default()
    });
}

#[test]
fn requests_from_all_threads_are_in_flight_together() {
    let data = export();
    let served = data.clone();
    // The server answers nothing before it has all 8 requests: one thread
    // at a time would never get there.
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| {
        let reqs: Vec<Req> = (0..8).map(|_| f.req().unwrap()).collect();
        for r in reqs.iter().rev() {
            let o = r.offset as usize;
            f.data(r, r.offset, &served[o..o + 4096], REPLY_FLAG_DONE);
        }
        f.req().map(|r| r.command)
    });
    let conn = shared(&uri, &opts(&[]));
    let expected = data.clone();
    on_threads(8, &conn, move |i, c| {
        let mut buf = vec![0u8; 4096];
        c.read(i as u64 * 8192, &mut buf).unwrap();
        assert!(buf == expected[i * 8192..][..4096]);
    });
    drop_in_time(conn);
    assert_eq!(h.join().unwrap().unwrap(), Some(CMD_DISC));
}

#[test]
fn in_flight_requests_are_bounded() {
    let data = export();
    let served = data.clone();
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| {
        // Collects requests until they stop coming, before answering.
        f.gap = Duration::from_millis(100);
        serve_interleaved(&mut f, &served, true).1
    });
    let conn = shared(&uri, &opts(&[]));
    let expected = data.clone();
    // 8 threads × 16 requests of 64 KiB.
    on_threads(8, &conn, move |_, c| {
        let mut buf = vec![0u8; 1 << 20];
        c.read(0, &mut buf).unwrap();
        assert!(buf == expected);
    });
    drop_in_time(conn);
    let largest = h.join().unwrap().unwrap();
    assert!(largest <= 64 && largest > 16, "{largest}");
}

#[test]
fn an_error_chunk_fails_only_its_request() {
    let data = export();
    let served = data.clone();
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| {
        // 4 small reads, one of 2 requests, one block status.
        let reqs: Vec<Req> = (0..7).map(|_| f.req().unwrap()).collect();
        for r in reqs.iter().rev() {
            let o = r.offset as usize;
            let l = r.len as usize;
            match (r.command, r.offset) {
                (CMD_READ, 8192) => f.error(r, EIO, "bad sector", None, REPLY_FLAG_DONE),
                (CMD_READ, 0x90000) => {
                    f.data(r, r.offset, &served[o..o + 4096], 0);
                    f.error(r, ENOSPC, "", Some(r.offset + 4096), REPLY_FLAG_DONE);
                }
                (CMD_READ, _) => f.data(r, r.offset, &served[o..o + l], REPLY_FLAG_DONE),
                _ => f.block_status(r, 100, &status_descs(&served, o, l), REPLY_FLAG_DONE),
            }
        }
        f.serve(&served, true);
    });
    let conn = shared(&uri, &opts(&["base:allocation"]));
    let expected = data.clone();
    let results = on_threads(6, &conn, move |i, c| match i {
        5 => c.block_status("base:allocation", 0, 65536).map(|_| ()),
        4 => {
            // Two requests of 64 KiB; the second fails.
            let mut buf = vec![0u8; 128 << 10];
            c.read(0x80000, &mut buf)
        }
        _ => {
            let mut buf = vec![0u8; 4096];
            let r = c.read(i as u64 * 8192, &mut buf);
            if r.is_ok() {
                assert!(buf == expected[i * 8192..][..4096]);
            }
            r
        }
    });
    for (i, r) in results.iter().enumerate() {
        match i {
            1 => assert!(
                matches!(r, Err(NbdError::Request { errno: EIO, offset: 8192, message, .. }) if message == "bad sector"),
                "{r:?}"
            ),
            4 => assert!(
                matches!(
                    r,
                    Err(NbdError::Request {
                        errno: ENOSPC,
                        offset: 0x90000,
                        ..
                    })
                ),
                "{r:?}"
            ),
            _ => assert!(r.is_ok(), "thread {i}: {r:?}"),
        }
    }
    assert!(conn.is_usable());
    let mut buf = vec![0u8; 8192];
    conn.read(8192, &mut buf).unwrap();
    assert!(buf == data[8192..16384]);
    drop_in_time(conn);
    h.join().unwrap().unwrap();
}

/// 8 threads read 4 KiB each from a server that collects the 8 requests
/// and runs `script` on them; returns each thread's result and how long it
/// took.
fn break_while_waiting(
    o: ConnectOptions,
    script: impl FnOnce(&mut Fake, Vec<Req>) + Send + 'static,
) -> Vec<(Result<(), NbdError>, Duration)> {
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| {
        let reqs: Vec<Req> = (0..8).map(|_| f.req().unwrap()).collect();
        script(&mut f, reqs);
    });
    let conn = shared(&uri, &o);
    let results = on_threads(8, &conn, |i, c| {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        let r = c.read(i as u64 * 4096, &mut buf);
        (r, start.elapsed())
    });
    assert!(!conn.is_usable());
    let mut buf = vec![0u8; 4096];
    assert!(matches!(conn.read(0, &mut buf), Err(NbdError::Unusable)));
    assert!(matches!(
        conn.block_status("base:allocation", 0, 4096),
        Err(NbdError::Unusable)
    ));
    drop_in_time(conn);
    h.join().unwrap();
    results
}

#[test]
fn server_closing_mid_reply_fails_all_waiters() {
    let results = break_while_waiting(opts(&["base:allocation"]), |f, reqs| {
        for r in &reqs[..2] {
            f.hole(r, r.offset, 4096, REPLY_FLAG_DONE);
        }
        let r = &reqs[2];
        let mut m = f.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r, 8 + 4096);
        m.extend_from_slice(&r.offset.to_be_bytes());
        m.extend_from_slice(&[7; 100]);
        f.s.write_all(&m).unwrap();
        // Returning closes the socket.
    });
    let ok = results.iter().filter(|r| r.0.is_ok()).count();
    assert_eq!(ok, 2, "{results:?}");
    for (r, took) in &results {
        if let Err(e) = r {
            assert!(matches!(e, NbdError::Disconnected { .. }), "{e}");
            assert_eq!(e.class(), ErrorClass::Io);
        }
        assert!(*took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn silent_server_times_out_all_waiters() {
    // Silence after the requests; and silence in the middle of a reply.
    for partial in [false, true] {
        let results = break_while_waiting(quick(), move |f, reqs| {
            if partial {
                let r = &reqs[0];
                let h = f.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r, 8 + 4096);
                f.s.write_all(&h).unwrap();
            }
            // Until the client hangs up.
            let _ = f.req();
        });
        for (r, took) in &results {
            let e = r.as_ref().unwrap_err();
            assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
            assert_eq!(e.class(), ErrorClass::Io);
            assert!(*took < TIMEOUT * 5, "{took:?}");
        }
        // The first request waited the whole timeout.
        let longest = results.iter().map(|r| r.1).max().unwrap();
        assert!(longest >= TIMEOUT, "{longest:?}");
    }
}

#[test]
fn unknown_cookie_fails_all_waiters() {
    let results = break_while_waiting(opts(&[]), |f, reqs| {
        let wrong = Req {
            cookie: 0xdead,
            ..reqs[3]
        };
        f.hole(&wrong, wrong.offset, 4096, REPLY_FLAG_DONE);
        let _ = f.req();
    });
    for (r, _) in &results {
        let e = r.as_ref().unwrap_err();
        assert_protocol(e, "cookie 0xdead");
    }
}

#[test]
fn a_broken_connection_is_not_shared() {
    let (_dir, uri, h) = serve(Cfg::default(), |mut f| {
        let _ = f.req();
        f.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
        let _ = f.req();
    });
    let mut c = Connection::connect(&uri, &opts(&[])).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(c.read(0, &mut buf).is_err());
    let conn = SharedConnection::new(c);
    assert!(!conn.is_usable());
    assert_eq!(conn.size(), 1 << 20);
    assert!(matches!(conn.read(0, &mut buf), Err(NbdError::Unusable)));
    drop_in_time(Arc::new(conn));
    h.join().unwrap();
}

#[test]
fn local_checks_come_first() {
    let data = export();
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| f.serve(&data, true));
    let conn = shared(&uri, &opts(&["base:allocation"]));
    let mut buf = [0u8; 2];
    let e = conn.read((1 << 20) - 1, &mut buf).unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest { .. }), "{e}");
    let e = conn
        .block_status("qemu:dirty-bitmap:x", 0, 4096)
        .unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest { .. }), "{e}");
    conn.read(0, &mut []).unwrap();
    assert!(conn.is_usable());
    drop_in_time(conn);
    assert_eq!(h.join().unwrap().unwrap().last().unwrap().command, CMD_DISC);
}

#[test]
fn a_call_cut_short_by_a_broken_connection_fails() {
    // 256 requests of 4 KiB for one read; the server answers the first 64
    // (all the client may have in flight) and hangs up: however the client
    // learns it (end of stream, or failing to send the rest), the read must
    // fail, never return a half-filled buffer.
    for _ in 0..10 {
        let cfg = Cfg {
            block_size: Some((1, 4096, 4096)),
            ..Cfg::default()
        };
        let (_dir, uri, h) = serve(cfg, |mut f| {
            let reqs: Vec<Req> = (0..64).map(|_| f.req().unwrap()).collect();
            for r in &reqs {
                f.hole(r, r.offset, 4096, REPLY_FLAG_DONE);
            }
        });
        let conn = shared(&uri, &opts(&[]));
        let results = on_threads(1, &conn, |_, c| {
            let mut buf = vec![0xeeu8; 1 << 20];
            c.read(0, &mut buf)
        });
        let e = results[0].as_ref().unwrap_err();
        assert!(
            matches!(e, NbdError::Disconnected { .. } | NbdError::Io { .. }),
            "{e}"
        );
        assert!(!conn.is_usable());
        drop_in_time(conn);
        h.join().unwrap();
    }
}
