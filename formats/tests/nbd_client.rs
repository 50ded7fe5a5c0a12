//! The NBD client against a real `qemu-nbd` serving a qcow2 image on a Unix
//! socket: data compared with `qemu-img convert -O raw`, block status with
//! `nbdinfo --map`. Every server is killed by a guard, even when a test
//! fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::listening;
use qbackup_formats::nbd::{
    ConnectOptions, Connection, NbdError, NbdTransport, NbdUri, SharedConnection,
};
use qbackup_formats::{Classify, ErrorClass};

const SIZE: u64 = 8 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(img: &Path, op: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", op])
        .arg(img));
}

/// An 8 MiB qcow2 image: data, a sub-cluster write, zero clusters, and a
/// bitmap `bm0` that records the writes made after it was added.
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(SIZE.to_string()));
    qemu_io(&img, "write -P 0x11 0 64k");
    qemu_io(&img, "write -P 0x22 300k 8k");
    qemu_io(&img, "write -z 512k 64k");
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("bm0"));
    qemu_io(&img, "write -P 0x5a 1M 64k");
    qemu_io(&img, "write -P 0x33 5M 4k");
    qemu_io(&img, "write -P 0x44 8188k 4k");
    img
}

/// A running `qemu-nbd`, killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(img: &Path, socket: &Path, bitmap: Option<&str>) -> Server {
        Server::spawn(img, socket, bitmap, &["-e", "4"])
    }

    /// A server for one client at a time (no `-e`), like a plain
    /// `qemu-nbd` export: no multi-conn.
    fn start_single(img: &Path, socket: &Path) -> Server {
        Server::spawn(img, socket, None, &[])
    }

    fn spawn(img: &Path, socket: &Path, bitmap: Option<&str>, extra: &[&str]) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-t", "-f", "qcow2"])
            .args(extra)
            .arg("-k")
            .arg(socket);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        cmd.arg(img).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("qemu-nbd");
        let mut server = Server {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !listening(socket) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("qemu-nbd exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on its socket"
            );
            thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn uri(&self) -> NbdUri {
        NbdUri {
            transport: NbdTransport::Unix {
                socket: self.socket.clone(),
            },
            export: String::new(),
            tls: None,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn opts(contexts: &[&str], extended_headers: bool) -> ConnectOptions {
    ConnectOptions {
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(5),
        extended_headers,
        handshake_timeout: None,
    }
}

/// The image's guest-visible bytes, per `qemu-img convert`.
fn expected_bytes(dir: &Path, img: &Path) -> Vec<u8> {
    let raw = dir.join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw));
    std::fs::read(&raw).unwrap()
}

/// Adjacent extents with the same flags, merged.
fn merge(extents: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (off, len, flags) in extents {
        match out.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, flags)),
        }
    }
    out
}

/// `nbdinfo --map[=CONTEXT]` as (offset, length, flags), merged.
fn nbdinfo_map(server: &Server, context: &str) -> Vec<(u64, u64, u32)> {
    let uri = format!("nbd+unix:///?socket={}", server.socket.display());
    let out = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(&uri)
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    merge(text.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}

/// The whole export's block status for `context`, merged.
fn our_map(c: &mut Connection, context: &str) -> (Vec<(u64, u64, u32)>, usize) {
    let mut extents = Vec::new();
    let mut requests = 0;
    let mut off = 0;
    while off < c.size() {
        let descs = c.block_status(context, off, c.size() - off).unwrap();
        requests += 1;
        assert!(!descs.is_empty());
        for (len, flags) in descs {
            extents.push((off, len, flags));
            off += len;
        }
    }
    assert_eq!(off, c.size(), "descriptors end exactly at the export's end");
    (merge(extents), requests)
}

#[test]
fn reads_and_block_status_match_qemu_tools() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let expected = expected_bytes(dir.path(), &img);
    assert_eq!(expected.len() as u64, SIZE);
    let server = Server::start(&img, &dir.path().join("nbd.sock"), Some("bm0"));
    let contexts = ["base:allocation", "qemu:dirty-bitmap:bm0"];
    let want_alloc = nbdinfo_map(&server, "base:allocation");
    let want_dirty = nbdinfo_map(&server, "qemu:dirty-bitmap:bm0");
    assert_eq!(
        want_dirty,
        vec![
            (0, 1 << 20, 0),
            (1 << 20, 64 << 10, 1),
            (1088 << 10, (5 << 20) - (1088 << 10), 0),
            (5 << 20, 64 << 10, 1),
            (5184 << 10, (8128 << 10) - (5184 << 10), 0),
            (8128 << 10, 64 << 10, 1),
        ],
        "the bitmap has 64 KiB granularity"
    );

    for extended in [true, false] {
        let mut c = Connection::connect(&server.uri(), &opts(&contexts, extended)).unwrap();
        assert_eq!(c.extended_headers(), extended, "qemu-nbd 8.1+ has them");
        assert!(c.structured_replies());
        assert_eq!(c.size(), SIZE);
        assert!(c.read_only());
        assert!(c.can_multi_conn(), "-e 4 shares the export");
        assert_eq!(c.block_size(), (1, 4096, 32 << 20));
        assert!(c.has_context("base:allocation"));
        assert!(c.has_context("qemu:dirty-bitmap:bm0"));

        let mut buf = vec![0xeeu8; SIZE as usize];
        c.read(0, &mut buf).unwrap();
        assert!(buf == expected, "export differs from qemu-img convert");
        // Unaligned, across a data/zero boundary.
        let mut small = vec![0u8; 5000];
        c.read(300 * 1024 - 1234, &mut small).unwrap();
        assert_eq!(small, expected[300 * 1024 - 1234..][..5000]);

        let (alloc, requests) = our_map(&mut c, "base:allocation");
        assert_eq!(alloc, want_alloc);
        assert!(requests >= 1);
        let (dirty, _) = our_map(&mut c, "qemu:dirty-bitmap:bm0");
        assert_eq!(dirty, want_dirty);
        c.disconnect().unwrap();
    }
}

#[test]
fn refused_context_and_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let mut server = Server::start(&img, &dir.path().join("nbd.sock"), None);

    let e =
        Connection::connect(&server.uri(), &opts(&["qemu:dirty-bitmap:nope"], true)).unwrap_err();
    assert!(
        matches!(&e, NbdError::ContextRefused { name } if name == "qemu:dirty-bitmap:nope"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Unsupported);

    let mut c = Connection::connect(&server.uri(), &opts(&["base:allocation"], true)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    c.read(0, &mut buf).unwrap();
    server.kill();
    let start = Instant::now();
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(e, NbdError::Disconnected { .. } | NbdError::Io { .. }),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Io);
    assert!(start.elapsed() < Duration::from_secs(2), "no hang");
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Unusable)));

    // The killed server left its socket behind: nobody listens (I/O).
    let e = Connection::connect(&server.uri(), &opts(&[], true)).unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Io, "{e}");
    // A missing socket is the user's mistake.
    std::fs::remove_file(&server.socket).unwrap();
    let e = Connection::connect(&server.uri(), &opts(&[], true)).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Usage, "{e}");
}

#[test]
fn unknown_export_is_refused_with_the_servers_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let server = Server::start(&img, &dir.path().join("nbd.sock"), None);
    let uri = NbdUri {
        export: "nope".into(),
        ..server.uri()
    };
    let e = Connection::connect(&uri, &opts(&[], true)).unwrap_err();
    assert!(matches!(e, NbdError::OptionRefused { .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Usage, "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn tcp_transport() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    // A free loopback port (another process could take it in between; the
    // bounded wait below would then fail loudly, not hang).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let _server = Server {
        child,
        socket: dir.path().join("unused"),
    };
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = loop {
        match Connection::connect(&uri, &opts(&["base:allocation"], true)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "qemu-nbd never answered: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert_eq!(c.size(), SIZE);
    let mut buf = vec![0u8; 64 << 10];
    c.read(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let d = c.block_status("base:allocation", 0, SIZE).unwrap();
    assert_eq!(d[0], (64 << 10, 0));
    c.disconnect().unwrap();
}

/// A qcow2 image of `size` bytes of pseudo-random data.
fn random_image(dir: &Path, size: usize) -> PathBuf {
    let raw = dir.join("random.raw");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join("random.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    std::fs::remove_file(&raw).unwrap();
    img
}

/// Reads all of `buf` (the whole export) in 1 MiB calls on `threads`
/// threads, each taking a contiguous quarter (or whole) of the export.
fn read_all_shared(c: &SharedConnection, buf: &mut [u8], threads: usize) {
    let part = buf.len().div_ceil(threads);
    thread::scope(|s| {
        for (i, range) in buf.chunks_mut(part).enumerate() {
            s.spawn(move || {
                let base = (i * part) as u64;
                for (j, chunk) in range.chunks_mut(1 << 20).enumerate() {
                    c.read(base + (j << 20) as u64, chunk).unwrap();
                }
            });
        }
    });
}

fn millis(times: &[Duration]) -> String {
    let v: Vec<String> = times
        .iter()
        .map(|t| format!("{:.1}", t.as_secs_f64() * 1e3))
        .collect();
    v.join(", ")
}

#[test]
fn shared_connection_on_a_single_client_server() {
    const BIG: usize = 64 << 20;
    const RUNS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let img = random_image(dir.path(), BIG);
    let expected = expected_bytes(dir.path(), &img);
    assert_eq!(expected.len(), BIG);
    let server = Server::start_single(&img, &dir.path().join("nbd.sock"));
    let o = opts(&["base:allocation"], true);
    let mut buf = vec![0u8; BIG];

    // One thread, one connection, one 1 MiB request at a time.
    let mut c = Connection::connect(&server.uri(), &o).unwrap();
    assert!(!c.can_multi_conn(), "qemu-nbd without -e takes one client");
    let mut single = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..RUNS {
        buf.fill(0);
        let start = Instant::now();
        for (j, chunk) in buf.chunks_mut(1 << 20).enumerate() {
            c.read((j << 20) as u64, chunk).unwrap();
        }
        single.push(start.elapsed());
        assert!(buf == expected, "export differs from qemu-img convert");
        buf.fill(0);
        let start = Instant::now();
        c.read(0, &mut buf).unwrap();
        whole.push(start.elapsed());
        assert!(buf == expected);
    }
    c.disconnect().unwrap();

    // Four threads on one shared connection (the server takes no second
    // client), each reading its quarter in 1 MiB requests.
    let shared = SharedConnection::new(Connection::connect(&server.uri(), &o).unwrap());
    assert_eq!(shared.size(), BIG as u64);
    assert!(!shared.can_multi_conn());
    assert!(shared.has_context("base:allocation"));
    let mut four = Vec::new();
    let mut one = Vec::new();
    for _ in 0..RUNS {
        buf.fill(0);
        let start = Instant::now();
        read_all_shared(&shared, &mut buf, 4);
        four.push(start.elapsed());
        assert!(buf == expected, "export differs from qemu-img convert");
        buf.fill(0);
        let start = Instant::now();
        read_all_shared(&shared, &mut buf, 1);
        one.push(start.elapsed());
        assert!(buf == expected);
    }
    // Block status and unaligned reads from several threads at once.
    thread::scope(|s| {
        for i in 0..4u64 {
            let (shared, expected) = (&shared, &expected);
            s.spawn(move || {
                let d = shared
                    .block_status("base:allocation", i << 24, 1 << 24)
                    .unwrap();
                assert_eq!(d.iter().map(|x| x.0).sum::<u64>(), 1 << 24);
                assert!(d.iter().all(|x| x.1 == 0), "all data: {d:?}");
                let mut small = vec![0u8; 100_000];
                let at = (i << 24) + 12_345;
                shared.read(at, &mut small).unwrap();
                assert!(small == expected[at as usize..][..100_000]);
            });
        }
    });
    assert!(shared.is_usable());
    drop(shared);
    let mb = (BIG >> 20) as f64;
    let best = |t: &[Duration]| mb / t.iter().min().unwrap().as_secs_f64();
    println!("reading a {BIG}-byte export from qemu-nbd (single client), ms per run:");
    println!(
        "  Connection, 1 thread, 1 MiB reads:        {} (best {:.0} MiB/s)",
        millis(&single),
        best(&single)
    );
    println!(
        "  SharedConnection, 4 threads, 1 MiB reads: {} (best {:.0} MiB/s)",
        millis(&four),
        best(&four)
    );
    println!(
        "  SharedConnection, 1 thread, 1 MiB reads:  {} (best {:.0} MiB/s)",
        millis(&one),
        best(&one)
    );
    println!(
        "  Connection, 1 thread, one 64 MiB read:    {} (best {:.0} MiB/s)",
        millis(&whole),
        best(&whole)
    );
}
