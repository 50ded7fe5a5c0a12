//! NBD over TLS (`nbds://`, `nbds+unix://`) against real servers with
//! certificates made at test time: qemu-nbd with `tls-creds-x509` (with
//! and without `verify-peer`), nbdkit (an expired certificate, which QEMU
//! refuses to load), and a running QEMU whose fleecing export is served
//! over TLS on TCP. Full and incremental backups must be identical to the
//! disk; every refusal is one line naming its cause, exit 1, nothing at
//! TARGET; nothing ever falls back to plaintext.

mod common;

use std::path::Path;
use std::process::Command;

use common::backup::backup_incremental;
use common::compare::map_diff;
use common::oracle::{assert_check_clean, assert_identical, qemu_img_in};
use common::process::{hold, qemu_nbd_with, qemu_vm, Holder};
use common::run::{assert_no_leftovers, qbackup_in, Run};
use common::scratch::Scratch;
use common::tls::{free_port, hold_tcp, Certs};
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

/// qemu-nbd's TLS options: the x509 credentials in `dir`.
fn tls_args(dir: &Path, verify_peer: bool) -> Vec<String> {
    let verify = if verify_peer { "on" } else { "off" };
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={verify}",
            dir.display()
        ),
        "--tls-creds".into(),
        "tls0".into(),
    ]
}

/// `qemu-nbd -r -t EXTRA` over TLS on a Unix socket: the guard and the
/// `nbds+unix://` URI.
fn tls_unix(
    s: &Scratch,
    image: &str,
    dir: &Path,
    verify_peer: bool,
    extra: &[&str],
) -> (Holder, String) {
    let tls = tls_args(dir, verify_peer);
    let mut args: Vec<&str> = vec!["-r", "-t", "-f", "qcow2"];
    args.extend(tls.iter().map(String::as_str));
    args.extend(extra);
    let (h, uri) = qemu_nbd_with(s, image, &args);
    (h, uri.replacen("nbd+unix:", "nbds+unix:", 1))
}

/// `qemu-nbd -r -t EXTRA` over TLS on 127.0.0.1: the guard and the
/// `nbds://127.0.0.1:PORT` URI.
fn tls_tcp(
    s: &Scratch,
    image: &str,
    dir: &Path,
    verify_peer: bool,
    extra: &[&str],
) -> (Holder, String) {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-r", "-t", "-f", "qcow2", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(tls_args(dir, verify_peer))
        .args(extra)
        .arg(s.path(image))
        .current_dir(s.dir());
    let h = hold_tcp(&mut cmd, port);
    (h, format!("nbds://127.0.0.1:{port}"))
}

fn certs_arg(dir: &Path) -> String {
    dir.display().to_string()
}

/// The previous backup `full.qcow2`, then bitmap `bm0` and writes after
/// it.
fn image_with_bitmap(s: &Scratch) {
    image(s, "d.qcow2");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.io(
        "d.qcow2",
        "qcow2",
        &[
            "write -P 0x07 300k 8k",
            "write -P 0x08 6M 1M",
            "write -z 0 64k",
        ],
    );
}

/// The bytes of `name`'s top layer (depth 0, present), per qemu-img map.
fn top_bytes(s: &Scratch, name: &str) -> u64 {
    s.qemu_map(name, "qcow2")
        .iter()
        .filter(|e| e.depth == 0 && e.present)
        .map(|e| e.length)
        .sum()
}

fn check_incremental(s: &Scratch, run: &Run, out: &str) {
    run.assert_ok();
    assert!(
        !run.stderr.contains("by content"),
        "the bitmap was used\n{}",
        run.describe()
    );
    assert_check_clean(s.dir(), out);
    assert_identical(s.dir(), "d.qcow2", "qcow2", out, "qcow2");
    assert_eq!(top_bytes(s, out), 64 * KIB + 64 * KIB + MIB);
}

/// Full and incremental (`-B`) backups over `nbds+unix://` (one connection
/// shared by the workers, requests pipelined) and `nbds://127.0.0.1:PORT`
/// (several connections, each with its own handshake; certificates named
/// by the URI's `tls-certificates=`), then `verify`.
#[test]
fn full_and_incremental_backups_over_tls() {
    let s = Scratch::new();
    let certs = Certs::make(&s.path("pki"));
    image_with_bitmap(&s);
    let client = certs_arg(&certs.client);

    let (unix_server, unix) = tls_unix(&s, "d.qcow2", &certs.server, false, &["-B", "bm0"]);
    let tls = ["--tls-certs", client.as_str()];
    s.backup(&[&tls[..], &["--threads", "4", &unix, "u-full.qcow2"]].concat())
        .assert_ok();
    assert_check_clean(s.dir(), "u-full.qcow2");
    assert_identical(s.dir(), "d.qcow2", "qcow2", "u-full.qcow2", "qcow2");
    let run = backup_incremental(&s, &tls, ("bm0", "full.qcow2"), &unix, "u-inc.qcow2");
    check_incremental(&s, &run, "u-inc.qcow2");
    // info and map read through TLS too, as qemu-img does with the same
    // credentials.
    let info = qbackup_in(
        s.dir(),
        &["info", "--output=json", "--tls-certs", &client, &unix],
    );
    assert_eq!(info.assert_ok().json()["virtual-size"], 8 * MIB);
    let ours = qbackup_in(
        s.dir(),
        &["map", "--output=json", "--tls-certs", &client, &unix],
    );
    let sock = unix.split("socket=").nth(1).expect("socket");
    let theirs = qemu_img_in(
        s.dir(),
        &[
            "map",
            "--output=json",
            "--object",
            &format!("tls-creds-x509,id=tls0,dir={client},endpoint=client"),
            "--image-opts",
            &format!("driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,tls-hostname=localhost"),
        ],
    );
    let theirs: serde_json::Value = serde_json::from_str(&theirs).expect("qemu-img map JSON");
    if let Some(d) = map_diff(&theirs, &ours.assert_ok().json()) {
        panic!("map over TLS differs from qemu-img's:\n{d}");
    }
    drop(unix_server);

    let (_tcp_server, tcp) = tls_tcp(
        &s,
        "d.qcow2",
        &certs.server,
        false,
        &["-B", "bm0", "-e", "4"],
    );
    let tcp = format!("{tcp}/?tls-certificates={client}");
    s.backup(&["--threads", "4", &tcp, "t-full.qcow2"])
        .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "t-full.qcow2", "qcow2");
    let run = backup_incremental(&s, &[], ("bm0", "full.qcow2"), &tcp, "t-inc.qcow2");
    check_incremental(&s, &run, "t-inc.qcow2");
    qbackup_in(s.dir(), &["verify", "t-inc.qcow2"]).assert_ok();
}

/// A backup that must fail: one line mentioning `needle`, exit 1, nothing
/// at TARGET, no temporary file left.
fn refused(s: &Scratch, args: &[&str], needle: &str) {
    let target = "refused.qcow2";
    let run = s.backup(&[args, &[target]].concat());
    run.assert_clean_failure_mentioning(&[needle]);
    assert!(!s.path(target).exists(), "{}", run.describe());
    assert_no_leftovers(s.dir());
}

/// Each refusal names its cause: a server without TLS, a plaintext URI to
/// a server that requires TLS (suggesting `nbds://`), no certificates, a
/// certificate from another CA, one for another name (the URI's host, or
/// `--tls-hostname`), an expired one (nbdkit: QEMU refuses to load it).
#[test]
fn refusals_name_their_cause() {
    let s = Scratch::new();
    let certs = Certs::make(&s.path("pki"));
    image(&s, "d.qcow2");
    let client = certs_arg(&certs.client);

    // A server without TLS: no plaintext fallback.
    {
        let (_plain, uri) = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-f", "qcow2"]);
        let uri = uri.replacen("nbd+unix:", "nbds+unix:", 1);
        refused(&s, &["--tls-certs", &client, &uri], "does not offer TLS");
    }

    let (server, uri) = tls_unix(&s, "d.qcow2", &certs.server, false, &[]);
    // Plaintext to a TLS server: the line suggests nbds://.
    let plain = uri.replacen("nbds+unix:", "nbd+unix:", 1);
    refused(&s, &[&plain], "nbds://");
    refused(&s, &[&plain], "requires TLS");
    // nbds without certificates.
    refused(&s, &[&uri], "--tls-certs");
    // Another CA.
    let wrong = certs_arg(&certs.client_wrong_ca);
    refused(&s, &["--tls-certs", &wrong, &uri], "not signed by the CA");
    // A name the certificate does not carry (it names localhost and
    // 127.0.0.1).
    refused(
        &s,
        &[
            "--tls-certs",
            &client,
            "--tls-hostname",
            "other.example",
            &uri,
        ],
        "does not name the server",
    );
    drop(server);

    let (server, uri) = tls_unix(&s, "d.qcow2", &certs.server_other_name, false, &[]);
    refused(
        &s,
        &["--tls-certs", &client, &uri],
        "does not name the server",
    );
    // The name given instead of the URI's host is what is verified.
    s.backup(&[
        "--tls-certs",
        &client,
        "--tls-hostname",
        "other.example",
        &uri,
        "named.qcow2",
    ])
    .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "named.qcow2", "qcow2");
    drop(server);

    // Expired: nbdkit serves it (QEMU refuses to load such a certificate).
    s.img(&["convert", "-f", "qcow2", "-O", "raw", "d.qcow2", "d.raw"]);
    let sock = s.path("kit.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f")
        .arg("-U")
        .arg(&sock)
        .arg("--tls=require")
        .arg(format!(
            "--tls-certificates={}",
            certs.server_expired.display()
        ))
        .arg("file")
        .arg(s.path("d.raw"));
    let _kit = hold(&mut cmd, &sock);
    let uri = format!("nbds+unix:///?socket={}", sock.display());
    refused(&s, &["--tls-certs", &client, &uri], "expired");
}

/// A server that verifies its clients (`verify-peer=on`): refused without
/// a client certificate, with a line that says so; served with one.
#[test]
fn server_verifying_clients() {
    let s = Scratch::new();
    let certs = Certs::make(&s.path("pki"));
    image(&s, "d.qcow2");
    let (_server, uri) = tls_unix(&s, "d.qcow2", &certs.server, true, &[]);
    refused(
        &s,
        &["--tls-certs", &certs_arg(&certs.client), &uri],
        "demands a client certificate",
    );
    let with_cert = certs_arg(&certs.client_with_cert);
    s.backup(&["--tls-certs", &with_cert, &uri, "out.qcow2"])
        .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "out.qcow2", "qcow2");
    // TCP too, and the server checks every connection's certificate.
    let (_tcp_server, tcp) = tls_tcp(&s, "d.qcow2", &certs.server, true, &["-e", "4"]);
    s.backup(&[
        "--threads",
        "4",
        "--tls-certs",
        &with_cert,
        &tcp,
        "tcp.qcow2",
    ])
    .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "tcp.qcow2", "qcow2");
    refused(
        &s,
        &["--tls-certs", &certs_arg(&certs.client), &tcp],
        "demands a client certificate",
    );
}

/// A running QEMU exporting a fleecing view over TLS on TCP
/// (`nbd-server-start` with `tls-creds`), as the QMP orchestrator does when
/// asked for a TCP export: full and incremental backups of the point in
/// time, while the guest goes on writing.
#[test]
fn live_vm_fleecing_export_over_tls() {
    let s = Scratch::new();
    let certs = Certs::make(&s.path("pki"));
    let before = ["write -P 0x10 0 1M", "write -P 0x11 5M 256k"];
    let between = ["write -P 0x21 2M 1M", "write -z 5M 64k"];
    let after = ["write -P 0x32 2M 64k", "write -P 0x34 0 4k"];
    s.create("disk.qcow2", "qcow2", 16 * MIB, "");
    s.io("disk.qcow2", "qcow2", &before);
    s.backup(&["disk.qcow2", "full0.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "disk.qcow2", "bm0"]);
    s.create("fleece.qcow2", "qcow2", 16 * MIB, "");
    let (_vm, mut qmp) = qemu_vm(&s, "disk.qcow2");
    for w in between {
        qmp.qemu_io("disk0", w);
    }
    qmp.run(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0",
               "dir": certs.server.display().to_string(),
               "endpoint": "server", "verify-peer": false}),
    );
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
    let port = free_port();
    qmp.run(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}},
               "tls-creds": "tls0"}),
    );
    qmp.run(
        "block-export-add",
        json!({"type": "nbd", "id": "exp0", "node-name": "fleece", "name": "disk0",
               "writable": false, "bitmaps": [{"node": "disk0", "name": "bm0"}]}),
    );
    for w in after {
        qmp.qemu_io("cbw", w);
    }
    let mut at_fleecing: Vec<&str> = before.to_vec();
    at_fleecing.extend(between);
    s.create("expected.qcow2", "qcow2", 16 * MIB, "");
    s.io("expected.qcow2", "qcow2", &at_fleecing);

    let uri = format!("nbds://127.0.0.1:{port}/disk0");
    let client = certs_arg(&certs.client);
    // Plaintext is refused by QEMU's TLS export.
    refused(&s, &[&uri.replacen("nbds:", "nbd:", 1)], "requires TLS");
    s.backup(&[
        "--threads",
        "2",
        "--tls-certs",
        &client,
        &uri,
        "full1.qcow2",
    ])
    .assert_ok();
    let run = backup_incremental(
        &s,
        &["--tls-certs", &client],
        ("bm0", "full0.qcow2"),
        &uri,
        "inc1.qcow2",
    );
    run.assert_ok();
    assert!(!run.stderr.contains("by content"), "{}", run.describe());
    for out in ["full1.qcow2", "inc1.qcow2"] {
        assert_check_clean(s.dir(), out);
        assert_identical(s.dir(), "expected.qcow2", "qcow2", out, "qcow2");
    }
}
