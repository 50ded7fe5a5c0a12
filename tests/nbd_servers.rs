//! NBD servers no one here wrote: the reference `nbd-server` (Debian's
//! `nbd-server` package, started from a config file in a temporary
//! directory) and `nbdkit --no-sr` speak only simple replies, so there is
//! no block status: backups read everything and find the holes by content
//! (as qemu-img does), a bitmap asked for cannot be had (the incremental
//! backup falls back to one by content with a one-line note, or fails
//! with `--require-bitmap`). And exports whose size is not a multiple of
//! 512 map exactly as `qemu-img map` maps them.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::backup::backup_incremental;
use common::compare::{assert_map_human_matches, assert_map_json_matches};
use common::content::random_bytes;
use common::oracle::{assert_check_clean, assert_identical};
use common::process::{hold, listening, Holder};
use common::run::{assert_no_leftovers, qbackup_info_ok};
use common::scratch::Scratch;
use common::tls::{free_port, tcp_listening};
use common::MIB;

/// A raw disk with data, zeros and a hole.
fn disk(s: &Scratch) {
    let mut bytes = random_bytes(8 * MIB as usize, 3);
    bytes[2 * MIB as usize..5 * MIB as usize].fill(0);
    s.write_file("disk.raw", &bytes);
}

/// `nbd-server` from a config file in the scratch dir, exporting
/// disk.raw read-only as `disk` on a Unix socket or on 127.0.0.1:PORT (it
/// listens on one or the other). It daemonizes: the guard kills it by the
/// pid it writes.
struct NbdServer {
    pid_file: PathBuf,
    uri: String,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| p > 0) {
            // SAFETY: kill(2) has no memory effects; the pid is the one
            // the server this guard started wrote.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

fn nbd_server(s: &Scratch, tcp: bool) -> NbdServer {
    let name = if tcp { "tcp" } else { "unix" };
    let sock = s.path(&format!("ns-{name}.sock"));
    let pid_file = s.path(&format!("ns-{name}.pid"));
    let port = free_port();
    let listen = if tcp {
        format!("listenaddr = 127.0.0.1\nport = {port}\n")
    } else {
        format!("unixsock = {}\n", sock.display())
    };
    let config = format!(
        "[generic]\n{listen}[disk]\nexportname = {}\nreadonly = true\n",
        s.path("disk.raw").display()
    );
    let conf = s.write_file(&format!("nbd-server-{name}.conf"), config.as_bytes());
    let _ = std::fs::remove_file(&sock);
    let status = Command::new("nbd-server")
        .arg("-C")
        .arg(&conf)
        .arg("-p")
        .arg(&pid_file)
        .status()
        .expect("nbd-server (Debian package nbd-server) runs");
    assert!(status.success(), "nbd-server failed: {status}");
    let server = NbdServer {
        pid_file,
        uri: if tcp {
            format!("nbd://127.0.0.1:{port}/disk")
        } else {
            format!("nbd+unix:///disk?socket={}", sock.display())
        },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(if tcp {
        tcp_listening(port)
    } else {
        listening(&sock)
    }) {
        assert!(Instant::now() < deadline, "nbd-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Full backups of a simple-reply export, qcow2 and raw: identical to the
/// disk, with its zeros left out of the qcow2 (found by content).
fn full_backups(s: &Scratch, uri: &str, tag: &str) {
    let q = format!("{tag}.qcow2");
    s.backup(&["--threads", "4", uri, &q]).assert_ok();
    assert_check_clean(s.dir(), &q);
    assert_identical(s.dir(), "disk.raw", "raw", &q, "qcow2");
    let zeros: u64 = s
        .qemu_map(&q, "qcow2")
        .iter()
        .filter(|e| !e.data)
        .map(|e| e.length)
        .sum();
    assert!(zeros >= 3 * MIB, "the zero range is not stored: {zeros}");
    let r = format!("{tag}.raw");
    s.backup(&["-O", "raw", uri, &r]).assert_ok();
    assert_identical(s.dir(), "disk.raw", "raw", &r, "raw");
}

/// An incremental backup with a bitmap from a server without block
/// status: a one-line note and a backup by content, identical; with
/// `--require-bitmap`, one line, nothing at TARGET.
fn bitmap_unavailable(s: &Scratch, uri: &str, tag: &str) {
    let inc = format!("{tag}-inc.qcow2");
    let run = backup_incremental(s, &[], ("bm0", "prev.qcow2"), uri, &inc);
    run.assert_ok();
    let notes: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("no structured replies"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", run.describe());
    assert!(notes[0].contains("by content"), "{}", run.describe());
    assert_identical(s.dir(), "disk.raw", "raw", &inc, "qcow2");
    let refused = format!("{tag}-refused.qcow2");
    let run = backup_incremental(
        s,
        &["--require-bitmap"],
        ("bm0", "prev.qcow2"),
        uri,
        &refused,
    );
    run.assert_clean_failure_mentioning(&["no structured replies"]);
    assert!(!s.path(&refused).exists());
    assert_no_leftovers(s.dir());
}

#[test]
fn reference_nbd_server() {
    let s = Scratch::new();
    disk(&s);
    let unix = nbd_server(&s, false);
    let tcp = nbd_server(&s, true);
    let info = qbackup_info_ok(s.dir(), &unix.uri, None);
    assert_eq!(info["virtual-size"], 8 * MIB);
    full_backups(&s, &unix.uri, "unix");
    full_backups(&s, &tcp.uri, "tcp");
    s.backup(&["disk.raw", "prev.qcow2"]).assert_ok();
    bitmap_unavailable(&s, &unix.uri, "unix");
    bitmap_unavailable(&s, &tcp.uri, "tcp");
}

/// `nbdkit --no-sr PLUGIN ARGS` on a Unix socket in the scratch dir.
fn nbdkit(s: &Scratch, name: &str, no_sr: bool, plugin: &[&str]) -> (Holder, String) {
    let sock = s.path(&format!("{name}.sock"));
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f").arg("-U").arg(&sock);
    if no_sr {
        cmd.arg("--no-sr");
    }
    cmd.args(plugin);
    let h = hold(&mut cmd, &sock);
    (h, format!("nbd+unix:///?socket={}", sock.display()))
}

#[test]
fn nbdkit_without_structured_replies() {
    let s = Scratch::new();
    disk(&s);
    let file = s.p("disk.raw");
    let (_kit, uri) = nbdkit(&s, "nosr", true, &["file", &file]);
    full_backups(&s, &uri, "nosr");
    assert_map_json_matches(s.dir(), &uri, None);
    assert_map_human_matches(s.dir(), &uri, None);
    s.backup(&["disk.raw", "prev.qcow2"]).assert_ok();
    bitmap_unavailable(&s, &uri, "nosr");
}

/// Regression (issue 22): an export of 1000001 bytes (nbdkit's pattern
/// plugin) maps as qemu-img maps it: the padding to 512 bytes is zeros
/// without a host offset with block status, data like the rest without.
#[test]
fn odd_sized_export_maps_like_qemu_img() {
    let s = Scratch::new();
    for no_sr in [false, true] {
        let name = if no_sr { "odd-nosr" } else { "odd" };
        let (_kit, uri) = nbdkit(&s, name, no_sr, &["pattern", "1000001"]);
        assert_map_json_matches(s.dir(), &uri, None);
        assert_map_human_matches(s.dir(), &uri, None);
        let info = qbackup_info_ok(s.dir(), &uri, None);
        assert_eq!(info["virtual-size"], 1000448);
    }
}
