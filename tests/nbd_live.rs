//! Backups pulled over NBD, against real servers started by the tests:
//! `qemu-nbd` exports (map and info against `qemu-img` on the same export,
//! full backups over several connections, incremental backups from a dirty
//! bitmap, a refused bitmap, a server killed mid-backup, no server) and a
//! running QEMU with a fleecing export, backed up while its disk keeps
//! being written: the backup must equal the disk as it was when fleecing
//! started, not as it is after the later writes.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::backup::backup_incremental;
use common::compare::{assert_map_human_matches, assert_map_json_matches};
use common::content::random_bytes;
use common::oracle::{assert_check_clean, assert_identical, compare_force_share, qemu_info_json};
use common::process::{hold, qemu_nbd_with, qemu_vm, Holder, Qmp};
use common::run::{
    assert_no_leftovers, qbackup_in, qbackup_info_ok, spawn_qbackup, wait_qbackup, Run,
};
use common::scratch::Scratch;
use common::{KIB, MIB};
use serde_json::json;

/// An 8 MiB image with data, a zero range and a small write.
fn image(s: &Scratch, name: &str) {
    s.create(name, "qcow2", 8 * MIB, "");
    s.io(
        name,
        "qcow2",
        &[
            "write -P 0x5a 0 1M",
            "write -z 2M 1M",
            "write -P 0x01 4M 64k",
        ],
    );
}

#[test]
fn map_and_info_match_qemu_img_on_the_same_export() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    // 4 KiB allocation granularity inside a 64 KiB cluster (zero+data).
    s.io("d.qcow2", "qcow2", &["write -P 0x07 300k 8k"]);
    let (_nbd, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-f", "qcow2"]);
    assert_map_json_matches(s.dir(), &uri, None);
    assert_map_human_matches(s.dir(), &uri, None);
    let ours = qbackup_info_ok(s.dir(), &uri, None);
    let theirs = qemu_info_json(s.dir(), &uri, None);
    for key in ["virtual-size", "filename", "format"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert!(ours.get("actual-size").is_none(), "no disk size for NBD");
}

#[test]
fn full_backup_over_several_connections() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    let (_nbd, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-e", "8", "-f", "qcow2"]);
    s.backup(&["--threads", "4", &uri, "out.qcow2"]).assert_ok();
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "d.qcow2", "qcow2", "out.qcow2", "qcow2");
    // Raw targets too, and compression makes no difference to the content.
    s.backup(&["-O", "raw", &uri, "out.raw"]).assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "out.raw", "raw");
}

#[test]
fn incremental_backup_from_a_dirty_bitmap() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    // The previous backup, then a bitmap that records what changes after it.
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.io(
        "d.qcow2",
        "qcow2",
        &[
            "write -P 0x07 300k 8k",
            "write -P 0x08 6M 1M",
            // A cluster that now reads as zeros must hide the old data.
            "write -z 0 64k",
        ],
    );
    let (_nbd, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-B", "bm0", "-f", "qcow2"]);
    backup_incremental(&s, &[], ("bm0", "full.qcow2"), &uri, "inc.qcow2").assert_ok();
    assert_check_clean(s.dir(), "inc.qcow2");
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    let info = s.qemu_info("inc.qcow2", "qcow2");
    assert_eq!(info["backing-filename"], "full.qcow2", "relative to TARGET");
    // Only the dirty clusters are in the overlay: 0-64k (zero), the
    // cluster holding 300k, and 6M-7M.
    let map = s.qemu_map("inc.qcow2", "qcow2");
    let top: u64 = map
        .iter()
        .filter(|e| e.depth == 0 && e.present)
        .map(|e| e.length)
        .sum();
    assert_eq!(top, 64 * KIB + 64 * KIB + MIB, "{map:?}");
}

/// qemu-nbd exporting `d.qcow2` with its dirty bitmap `bm0`, whose first
/// data read fails once with EIO (QEMU's blkdebug driver between the qcow2
/// node and its file): a transient failure of the server's disk, on which
/// qemu-nbd drops the connection. `extra`: more qemu-nbd options.
fn bitmap_export_failing_once(s: &Scratch, extra: &[&str]) -> (Holder, String) {
    let sock = s.path("flaky.sock");
    let opts = format!(
        "driver=qcow2,file.driver=blkdebug,file.image.driver=file,file.image.filename={},\
         file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on",
        s.path("d.qcow2").display()
    );
    let mut cmd = std::process::Command::new("qemu-nbd");
    cmd.args(["-r", "-t", "-B", "bm0"])
        .args(extra)
        .arg("-k")
        .arg(&sock)
        .arg("--image-opts")
        .arg(opts);
    let server = hold(&mut cmd, &sock);
    (server, format!("nbd+unix:///?socket={}", sock.display()))
}

/// Regression: with an NBD source and `--bitmap`, the export was connected
/// directly instead of through the opener, so `--on-source-error retry`
/// did nothing there. A read that fails once now fails the incremental
/// backup without the policy and is retried with it, and the result is the
/// disk. (`-f raw`: the first read the server fails is then a dirty
/// cluster's, not the format probe's.)
#[test]
fn transient_read_error_with_a_bitmap_is_retried() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.io(
        "d.qcow2",
        "qcow2",
        &["write -P 0x07 300k 8k", "write -P 0x08 6M 1M"],
    );
    let (server, uri) = bitmap_export_failing_once(&s, &[]);
    backup_incremental(&s, &["-f", "raw"], ("bm0", "full.qcow2"), &uri, "inc.qcow2")
        .assert_clean_failure_mentioning(&["read of", "NBD server"]);
    assert!(!s.path("inc.qcow2").exists());
    drop(server);
    // One connection shared by the workers (reconnected after the server
    // dropped it), and a pool of them (-e 4: multi-conn).
    for extra in [&[][..], &["-e", "4"]] {
        let (server, uri) = bitmap_export_failing_once(&s, extra);
        let retry = ["-f", "raw", "--on-source-error", "retry"];
        backup_incremental(&s, &retry, ("bm0", "full.qcow2"), &uri, "inc.qcow2").assert_ok();
        drop(server);
        assert_check_clean(s.dir(), "inc.qcow2");
        assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
        // Only the dirty clusters are in the overlay: the bitmap was used.
        let top: u64 = s
            .qemu_map("inc.qcow2", "qcow2")
            .iter()
            .filter(|e| e.depth == 0 && e.present)
            .map(|e| e.length)
            .sum();
        assert_eq!(top, 64 * KIB + MIB, "{extra:?}");
        std::fs::remove_file(s.path("inc.qcow2")).unwrap();
        std::fs::remove_file(s.path("inc.qcow2.manifest")).ok();
    }
}

#[test]
fn refused_bitmap_and_missing_server_fail_cleanly() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    let (nbd, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-f", "qcow2"]);
    backup_incremental(
        &s,
        &["--require-bitmap"],
        ("nope", "full.qcow2"),
        &uri,
        "inc.qcow2",
    )
    .assert_clean_failure_mentioning(&["qemu:dirty-bitmap:nope"]);
    assert!(!s.path("inc.qcow2").exists());
    // Without --require-bitmap, a bitmap the export does not offer falls
    // back to an incremental by content, as a missing file bitmap does.
    let run = backup_incremental(&s, &[], ("nope", "full.qcow2"), &uri, "inc.qcow2");
    run.assert_ok();
    assert!(
        run.stderr.contains("qemu:dirty-bitmap:nope") && run.stderr.contains("by content"),
        "{}",
        run.stderr
    );
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    std::fs::remove_file(s.path("inc.qcow2")).unwrap();
    std::fs::remove_file(s.path("inc.qcow2.manifest")).ok();
    drop(nbd);
    for args in [
        vec!["map", "--output=json", uri.as_str()],
        vec!["backup", uri.as_str(), "out.qcow2"],
    ] {
        qbackup_in(s.dir(), &args).assert_clean_failure_mentioning(&["nbd", "socket"]);
    }
    assert!(!s.path("inc.qcow2").exists() && !s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// Runs an uncompressed, speed-limited backup of `uri`, calls `meanwhile`
/// half a second in, and returns the finished run.
fn backup_while(s: &Scratch, uri: &str, meanwhile: impl FnOnce()) -> Run {
    let started = Instant::now();
    let args = [
        "backup",
        "--speed",
        "8M",
        "--compress",
        "none",
        uri,
        "out.qcow2",
    ];
    let (child, cmdline) = spawn_qbackup(s.dir(), &args);
    std::thread::sleep(Duration::from_millis(500));
    meanwhile();
    wait_qbackup(child, cmdline, started, Duration::from_secs(40))
}

#[test]
fn server_killed_mid_backup() {
    let s = Scratch::new();
    s.create("big.qcow2", "qcow2", 64 * MIB, "");
    s.io("big.qcow2", "qcow2", &[&s.random_cmd("", 0, 64 * MIB)]);
    let (nbd, uri) = qemu_nbd_with(&s, "big.qcow2", &["-r", "-t", "-f", "qcow2"]);
    let run = backup_while(&s, &uri, || drop(nbd));
    run.assert_clean_failure_mentioning(&["nbd"]);
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// Writes as a guest would, through the fleecing job's copy-before-write
/// filter once it exists (writes below it are refused).
fn guest_writes(qmp: &mut Qmp, node: &str, writes: &[&str]) {
    for w in writes {
        qmp.qemu_io(node, w);
    }
}

/// The reference: a fresh image with `writes` applied by qemu-io.
fn reference(s: &Scratch, name: &str, writes: &[&str]) {
    s.create(name, "qcow2", 16 * MIB, "");
    s.io(name, "qcow2", writes);
}

/// A running VM: a persistent bitmap, guest writes, a fleecing point
/// (blockdev-backup sync=none into a temporary overlay, a new bitmap for
/// the next cycle, the exported bitmap disabled, all in one transaction),
/// an NBD export of the point-in-time view with the bitmap, and guest
/// writes that go on while full and incremental backups are pulled.
#[test]
fn live_vm_fleecing_full_and_incremental() {
    let s = Scratch::new();
    let before = ["write -P 0x10 0 1M", "write -P 0x11 5M 256k"];
    let between = [
        "write -P 0x21 2M 1M",
        "write -z 5M 64k",
        "write -P 0x22 9M 4k",
    ];
    let after = [
        "write -P 0x32 2M 64k",
        "write -P 0x33 12M 1M",
        "write -P 0x34 0 4k",
    ];
    reference(&s, "disk.qcow2", &before);
    // The previous backup, then the bitmap that tracks what changes next.
    s.backup(&["disk.qcow2", "full0.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "disk.qcow2", "bm0"]);
    s.create("fleece.qcow2", "qcow2", 16 * MIB, "");
    let (_vm, mut qmp) = qemu_vm(&s, "disk.qcow2");
    // The running VM's image file is refused.
    s.backup(&["disk.qcow2", "x.qcow2"])
        .assert_clean_failure_mentioning(&["--qmp SOCKET"]);
    guest_writes(&mut qmp, "disk0", &between);

    qmp.run(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece",
               "file": {"driver": "file", "filename": s.p("fleece.qcow2")},
               "backing": "disk0"}),
    );
    qmp.run(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"device": "disk0", "target": "fleece",
              "sync": "none", "job-id": "fleecing", "filter-node-name": "cbw"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "bm1", "persistent": true}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "bm0"}}
        ]}),
    );
    let sock = s.path("nbd.sock");
    qmp.run(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.display().to_string()}}}),
    );
    qmp.run(
        "block-export-add",
        json!({"type": "nbd", "id": "exp0", "node-name": "fleece", "name": "disk0",
               "writable": false, "bitmaps": [{"node": "disk0", "name": "bm0"}]}),
    );
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    guest_writes(&mut qmp, "cbw", &after);

    // The point-in-time disk: what the guest had written at the fleecing
    // point, and nothing after it.
    let mut at_fleecing: Vec<&str> = before.to_vec();
    at_fleecing.extend(between);
    reference(&s, "expected.qcow2", &at_fleecing);

    s.backup(&["--threads", "2", &uri, "full1.qcow2"])
        .assert_ok();
    guest_writes(&mut qmp, "cbw", &["write -P 0x44 3M 64k"]);
    backup_incremental(&s, &[], ("bm0", "full0.qcow2"), &uri, "inc1.qcow2").assert_ok();
    for out in ["full1.qcow2", "inc1.qcow2"] {
        assert_check_clean(s.dir(), out);
        assert_identical(s.dir(), "expected.qcow2", "qcow2", out, "qcow2");
    }
    // And the writes after the fleecing point did reach the disk.
    let (code, text) = compare_force_share(s.dir(), "expected.qcow2", "disk.qcow2");
    assert_eq!(code, Some(1), "the live disk moved on: {text}");
}

/// nbdkit serving disk.raw through its error filter (every read fails with
/// EIO, or only while a trigger file exists, as `extra` says): the guard,
/// the socket and the URI.
fn failing_reads_server(s: &Scratch, extra: &[&str]) -> (Holder, PathBuf, String) {
    let sock = s.path("k.sock");
    let mut cmd = std::process::Command::new("nbdkit");
    cmd.arg("-f")
        .arg("-U")
        .arg(&sock)
        .arg("--filter=error")
        .arg("file")
        .arg(s.path("disk.raw"))
        .arg("error-pread=EIO")
        .arg("error-pread-rate=100%")
        .args(extra);
    let server = hold(&mut cmd, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    (server, sock, uri)
}

/// A server that starts failing reads mid-backup (nbdkit's error filter,
/// switched on by a trigger file): one line naming the export and the
/// server's error, nothing at TARGET.
#[test]
fn server_read_errors_mid_backup() {
    let s = Scratch::new();
    s.write_file("disk.raw", &random_bytes(32 * MIB as usize, 7));
    let trigger = s.path("fail-now");
    let trigger_arg = format!("error-pread-file={}", trigger.display());
    let (_server, sock, uri) = failing_reads_server(&s, &[&trigger_arg]);
    let run = backup_while(&s, &uri, || std::fs::write(&trigger, b"").unwrap());
    run.assert_clean_failure(&[&sock.display().to_string()])
        .assert_clean_failure_mentioning(&["EIO"]);
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// Regression: a block-status request of exactly u32::MAX bytes made
/// nbdkit 1.32 abort; exports over 4 GiB must map as qemu-img maps them.
#[test]
fn nbdkit_export_over_4_gib() {
    let s = Scratch::new();
    let sock = s.path("big.sock");
    let mut cmd = std::process::Command::new("nbdkit");
    cmd.arg("-f")
        .arg("-U")
        .arg(&sock)
        .args(["memory", "size=8G"]);
    let _server = hold(&mut cmd, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert_map_json_matches(s.dir(), &uri, None);
}

/// Regression: a multi-conn server that accepts fewer clients than there
/// are workers (`qemu-nbd -e 2`, 8 threads) left an extra connection
/// waiting for a greeting until the 30 s timeout failed the backup; the
/// pool now stops growing at what the server accepts.
#[test]
fn multi_conn_server_with_fewer_clients_than_workers() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    let (_nbd, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-e", "2", "-f", "qcow2"]);
    let run = s.backup(&["--threads", "8", &uri, "out.qcow2"]);
    run.assert_ok();
    assert!(
        run.elapsed < std::time::Duration::from_secs(15),
        "{}",
        run.describe()
    );
    assert_identical(s.dir(), "d.qcow2", "qcow2", "out.qcow2", "qcow2");
}

/// `--on-source-error ignore` against a server whose every read fails:
/// the backup completes with exit status 3, every cluster listed as
/// unreadable (one merged range, on stderr and in the JSON result), and
/// the target reads as zeros.
#[test]
fn ignored_read_errors_complete_with_status_3() {
    let s = Scratch::new();
    s.write_file("disk.raw", &random_bytes(4 * MIB as usize, 9));
    let (_server, _, uri) = failing_reads_server(&s, &[]);
    // -f raw: probing the format would need a read, which fails.
    let run = s.backup(&[
        "-f",
        "raw",
        "--on-source-error",
        "ignore",
        "--output=json",
        &uri,
        "out.qcow2",
    ]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("guest bytes 0..4194304 could not be read"),
        "{}",
        run.stderr
    );
    let v = run.json();
    assert_eq!(v["unreadable-ranges"][0]["start"], 0);
    assert_eq!(v["unreadable-ranges"][0]["length"], 4 * MIB);
    assert_check_clean(s.dir(), "out.qcow2");
    s.create("zeros.raw", "raw", 4 * MIB, "");
    assert_identical(s.dir(), "zeros.raw", "raw", "out.qcow2", "qcow2");
}
