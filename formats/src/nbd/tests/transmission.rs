//! Reads and block status against the fake server: the happy paths and
//! every way a reply can be wrong.

use super::*;

/// 1 MiB: data in some 4 KiB blocks, zeroes elsewhere.
pub(super) fn export() -> Vec<u8> {
    let mut v = vec![0u8; 1 << 20];
    for (i, b) in v.iter_mut().enumerate() {
        let block = i / 4096;
        if block % 3 == 0 || (100..130).contains(&block) {
            *b = (i % 251) as u8 | 1;
        }
    }
    v
}

fn happy(cfg: Cfg) {
    let data = export();
    let served = data.clone();
    let structured = cfg.structured;
    let ctx: &[&str] = if structured {
        &["base:allocation"]
    } else {
        &[]
    };
    let (_dir, uri, h) = serve(cfg.clone(), move |mut f| f.serve(&served, structured));
    let mut c = Connection::connect(&uri, &opts(ctx)).unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert!(c.read_only());
    assert!(c.can_multi_conn());
    assert_eq!(c.extended_headers(), cfg.extended);
    assert_eq!(c.structured_replies(), structured);
    assert_eq!(c.block_size(), (1, 4096, 64 * 1024));
    let mut buf = vec![0xeeu8; data.len()];
    c.read(0, &mut buf).unwrap();
    assert!(buf == data, "whole export differs");
    let mut small = vec![0u8; 1000];
    c.read(4096 * 3 - 7, &mut small).unwrap();
    assert_eq!(small, data[4096 * 3 - 7..4096 * 3 - 7 + 1000]);
    if structured {
        assert!(c.has_context("base:allocation"));
        let descs = c.block_status("base:allocation", 0, 5 * 4096).unwrap();
        assert_eq!(descs, vec![(4096, 0), (8192, 3), (4096, 0), (4096, 3)]);
        let descs = c.block_status("base:allocation", 4096, 1).unwrap();
        assert_eq!(descs, vec![(1, 3)]);
    }
    c.disconnect().unwrap();
    let seen = h.join().unwrap().unwrap();
    assert_eq!(seen.last().unwrap().command, CMD_DISC);
    // 16 requests of 64 KiB for the whole export, then the small read.
    let reads = seen.iter().filter(|r| r.command == CMD_READ).count();
    assert_eq!(reads, 16 + 1);
}

#[test]
fn happy_path_structured() {
    happy(Cfg::default());
}

#[test]
fn happy_path_extended() {
    happy(Cfg {
        extended: true,
        ..Cfg::default()
    });
}

#[test]
fn happy_path_simple_replies_only() {
    happy(Cfg {
        structured: false,
        ..Cfg::default()
    });
}

#[test]
fn unaligned_reads_respect_minimum_block_size() {
    let data = export();
    let served = data.clone();
    let cfg = Cfg {
        block_size: Some((512, 4096, 64 * 1024)),
        ..Cfg::default()
    };
    let (_dir, uri, h) = serve(cfg, move |mut f| f.serve(&served, true));
    let mut c = Connection::connect(&uri, &opts(&["base:allocation"])).unwrap();
    for (off, len) in [
        (100, 1000),
        (513, 10),
        (511, 2),
        (4095, 70000),
        (0, 1 << 20),
    ] {
        let mut buf = vec![0xeeu8; len];
        c.read(off as u64, &mut buf).unwrap();
        assert!(buf == data[off..off + len], "read {off}+{len}");
    }
    let mut last = [0u8; 3];
    c.read((1 << 20) - 3, &mut last).unwrap();
    assert_eq!(last, data[(1 << 20) - 3..]);
    assert!(matches!(
        c.block_status("base:allocation", 100, 512),
        Err(NbdError::InvalidRequest { .. })
    ));
    drop(c);
    let seen = h.join().unwrap().unwrap();
    for r in &seen {
        assert_eq!(r.offset % 512, 0, "{r:?}");
        assert_eq!(r.len % 512, 0, "{r:?}");
    }
    assert_eq!(seen.last().unwrap().command, CMD_DISC, "Drop disconnects");
}

#[test]
fn error_chunks_fail_the_read_and_keep_the_connection() {
    let data = export();
    let served = data.clone();
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| {
        let r = f.req().unwrap();
        f.error(&r, EIO, "disk on fire", None, REPLY_FLAG_DONE);
        let r = f.req().unwrap();
        f.data(&r, r.offset, &served[..2048], 0);
        f.error(&r, ENOSPC, "", Some(r.offset + 2048), 0);
        f.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &r, &[]);
        f.serve(&served, true)
    });
    let mut c = Connection::connect(&uri, &opts(&[])).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).unwrap_err();
    match &e {
        NbdError::Request {
            command,
            offset,
            len,
            errno,
            message,
        } => {
            assert_eq!((*command, *offset, *len, *errno), ("read", 0, 4096, EIO));
            assert_eq!(message, "disk on fire");
        }
        other => panic!("{other}"),
    }
    assert_eq!(e.class(), ErrorClass::Io);
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("ENOSPC (no space left on device) (at offset 2048)"),
        "{e}"
    );
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, data[..4096]);
    drop(c);
    h.join().unwrap().unwrap();
}

/// Connects to a server that answers the first read with `script`, and
/// returns the read's error and whether a second call reports the
/// connection unusable.
fn broken_reply(cfg: Cfg, script: impl FnOnce(&mut Fake, Req) + Send + 'static) -> NbdError {
    let (_dir, uri, h) = serve(cfg, move |mut f| {
        let r = f.req().unwrap();
        script(&mut f, r);
        // Hold the socket until the client hangs up.
        let _ = f.req();
    });
    let mut c = Connection::connect(&uri, &opts(&["base:allocation"])).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Unusable)));
    assert!(matches!(
        c.block_status("base:allocation", 0, 4096),
        Err(NbdError::Unusable)
    ));
    assert_eq!(e.class(), ErrorClass::Io, "{e}");
    drop(c);
    h.join().unwrap();
    e
}

#[test]
fn wrong_cookie() {
    let e = broken_reply(Cfg::default(), |f, r| {
        let wrong = Req {
            cookie: r.cookie + 1000,
            ..r
        };
        f.hole(&wrong, 0, 4096, REPLY_FLAG_DONE);
    });
    assert_protocol(&e, "cookie");
}

#[test]
fn bad_magic() {
    let e = broken_reply(Cfg::default(), |f, _| {
        f.s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])
            .unwrap();
    });
    assert_protocol(&e, "magic");
}

#[test]
fn simple_reply_with_data_after_structured() {
    let e = broken_reply(Cfg::default(), |f, r| f.simple(r.cookie, 0, &[0; 4096]));
    assert_protocol(&e, "simple reply");
}

#[test]
fn extended_reply_must_echo_offset() {
    let cfg = Cfg {
        extended: true,
        ..Cfg::default()
    };
    let e = broken_reply(cfg, |f, r| {
        let moved = Req { offset: 512, ..r };
        f.hole(&moved, 0, 4096, REPLY_FLAG_DONE);
    });
    assert_protocol(&e, "echoes offset");
}

#[test]
fn chunk_outside_the_request() {
    let e = broken_reply(Cfg::default(), |f, r| {
        f.hole(&r, 4096, 512, REPLY_FLAG_DONE);
    });
    assert_protocol(&e, "outside");
}

#[test]
fn overlapping_chunks() {
    let e = broken_reply(Cfg::default(), |f, r| {
        f.hole(&r, 0, 2048, 0);
        f.data(&r, 1024, &[1; 3072], REPLY_FLAG_DONE);
    });
    assert_protocol(&e, "overlapping");
}

#[test]
fn missing_coverage() {
    let e = broken_reply(Cfg::default(), |f, r| {
        f.hole(&r, 0, 2048, 0);
        f.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &r, &[]);
    });
    assert_protocol(&e, "covers only 2048");
}

#[test]
fn huge_lengths_are_not_trusted() {
    let e = broken_reply(Cfg::default(), |f, r| {
        let h = f.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &r, 0xffff_fff0);
        f.s.write_all(&h).unwrap();
    });
    assert_protocol(&e, "OFFSET_DATA of 4294967280 bytes");
    let e = broken_reply(Cfg::default(), |f, r| {
        let h = f.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &r, 0xffff_fff0);
        f.s.write_all(&h).unwrap();
    });
    assert_protocol(&e, "error chunk of 4294967280 bytes");
}

#[test]
fn unknown_chunk_type() {
    let e = broken_reply(Cfg::default(), |f, r| {
        f.chunk(REPLY_FLAG_DONE, 77, &r, &[]);
    });
    assert_protocol(&e, "chunk type 77");
}

#[test]
fn truncated_reply_is_an_error_not_a_hang() {
    let start = Instant::now();
    let (_dir, uri, h) = serve(Cfg::default(), |mut f| {
        let r = f.req().unwrap();
        let mut m = f.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &r, 8 + 4096);
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&[7; 100]);
        f.s.write_all(&m).unwrap();
        // Closing the socket ends the reply early.
    });
    let mut c = Connection::connect(&uri, &opts(&[])).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(matches!(e, NbdError::Disconnected { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Io);
    assert!(start.elapsed() < Duration::from_secs(2));
    h.join().unwrap();
}

#[test]
fn server_that_stops_answering_times_out() {
    let (_dir, uri, h) = serve(Cfg::default(), |mut f| {
        let r = f.req().unwrap();
        f.hole(&r, 0, 1024, 0);
        // Then silence, until the client hangs up.
        let _ = f.req();
    });
    let mut c = Connection::connect(&uri, &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let e = c.read(0, &mut buf).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(took >= TIMEOUT && took < TIMEOUT * 5, "{took:?}");
    assert_eq!(e.class(), ErrorClass::Io);
    drop(c);
    h.join().unwrap();
}

#[test]
fn block_status_validation() {
    for extended in [false, true] {
        let cfg = Cfg {
            extended,
            contexts: vec!["base:allocation", "qemu:dirty-bitmap:b"],
            ..Cfg::default()
        };
        let (_dir, uri, h) = serve(cfg, |mut f| {
            // 1: the last descriptor reaches past the request: cut.
            let r = f.req().unwrap();
            f.block_status(&r, 101, &[(4096, 1)], 0);
            f.block_status(&r, 100, &[(4096, 0), (1 << 20, 3)], REPLY_FLAG_DONE);
            // 2: less than asked.
            let r = f.req().unwrap();
            f.block_status(&r, 100, &[(512, 2)], 0);
            f.block_status(&r, 101, &[(512, 2)], REPLY_FLAG_DONE);
            // 3: an error chunk.
            let r = f.req().unwrap();
            f.error(&r, EINVAL, "bad range", None, REPLY_FLAG_DONE);
            // 4: descriptors past the request.
            let r = f.req().unwrap();
            f.block_status(&r, 100, &[(8192, 0), (4096, 3)], 0);
            f.block_status(&r, 101, &[(512, 2)], REPLY_FLAG_DONE);
            let _ = f.req();
        });
        let mut c =
            Connection::connect(&uri, &opts(&["base:allocation", "qemu:dirty-bitmap:b"])).unwrap();
        let bs = |c: &mut Connection, len| c.block_status("base:allocation", 0, len);
        assert_eq!(bs(&mut c, 8192).unwrap(), vec![(4096, 0), (4096, 3)]);
        assert_eq!(bs(&mut c, 8192).unwrap(), vec![(512, 2)]);
        let e = bs(&mut c, 8192).unwrap_err();
        assert!(matches!(e, NbdError::Request { errno: EINVAL, .. }), "{e}");
        assert!(matches!(
            c.block_status("qemu:dirty-bitmap:other", 0, 4096),
            Err(NbdError::InvalidRequest { .. })
        ));
        let e = bs(&mut c, 8192).unwrap_err();
        assert_protocol(&e, "starts past");
        drop(c);
        h.join().unwrap();
    }
}

#[test]
fn block_status_without_the_asked_context() {
    let cfg = Cfg {
        contexts: vec!["base:allocation", "qemu:dirty-bitmap:b"],
        ..Cfg::default()
    };
    let (_dir, uri, h) = serve(cfg, |mut f| {
        let r = f.req().unwrap();
        f.block_status(&r, 101, &[(4096, 1)], REPLY_FLAG_DONE);
        let _ = f.req();
    });
    let mut c =
        Connection::connect(&uri, &opts(&["base:allocation", "qemu:dirty-bitmap:b"])).unwrap();
    let e = c.block_status("base:allocation", 0, 4096).unwrap_err();
    assert_protocol(&e, "lacks the asked context");
    drop(c);
    h.join().unwrap();
}

#[test]
fn requests_past_the_end_are_refused_locally() {
    let data = export();
    let (_dir, uri, h) = serve(Cfg::default(), move |mut f| f.serve(&data, true));
    let mut c = Connection::connect(&uri, &opts(&["base:allocation"])).unwrap();
    let mut buf = [0u8; 2];
    let e = c.read((1 << 20) - 1, &mut buf).unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Usage);
    assert!(c.read(u64::MAX, &mut buf).is_err());
    assert!(c.block_status("base:allocation", 1 << 20, 1).is_err());
    // Still usable; block status is capped at the export's end.
    let d = c
        .block_status("base:allocation", (1 << 20) - 4096, 1 << 30)
        .unwrap();
    assert_eq!(d.iter().map(|x| x.0).sum::<u64>(), 4096);
    c.read(0, &mut buf).unwrap();
    c.disconnect().unwrap();
    h.join().unwrap();
}
