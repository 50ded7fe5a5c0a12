//! Fixtures shared by the QEMU parity tests (issue 19): a few real
//! backups to damage, and the two verdicts they check, "every qbackup
//! command refuses what QEMU refuses" and "verify OK means QEMU restores
//! exactly the original".

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const CLUSTER: u64 = 65536;
/// Guest offset of the incompressible cluster (a plain data cluster).
pub const NOISE: u64 = 2560 << 10;

pub fn run(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

pub fn qbackup(dir: &Path, args: &[&str]) -> Output {
    run(dir, env!("CARGO_BIN_EXE_qbackup"), args)
}

pub fn ok(dir: &Path, prog: &str, args: &[&str]) {
    let out = run(dir, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The backups the tests mutate, in one directory: `full.qcow2` (data and
/// compressed clusters; its source `src.qcow2` has a dirty bitmap),
/// `top.qcow2` (a `--sync top` backup whose backing file is `full.qcow2`)
/// and `snap.qcow2` (`full.qcow2` with two internal snapshots), with
/// manifests.
pub fn backups() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
    );
    // Incompressible data: stored as a plain data cluster in the backup.
    let noise: Vec<u8> = (0..CLUSTER).map(|i| (splitmix(i) >> 7) as u8).collect();
    fs::write(d.join("noise.bin"), noise).unwrap();
    ok(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -c -P 0x22 1M 512k",
            "-c",
            "write -z 1536k 64k",
            "-c",
            "write -s noise.bin 2560k 64k",
            "src.qcow2",
        ],
    );
    ok(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "nightly"]);
    ok(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 2M 64k", "src.qcow2"],
    );
    ok(
        d,
        env!("CARGO_BIN_EXE_qbackup"),
        &["backup", "src.qcow2", "full.qcow2"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
        ],
    );
    ok(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 3M 64k", "over.qcow2"],
    );
    ok(
        d,
        env!("CARGO_BIN_EXE_qbackup"),
        &[
            "backup",
            "--sync",
            "top",
            "--backing",
            "full.qcow2",
            "over.qcow2",
            "top.qcow2",
        ],
    );
    // A backup QEMU took internal snapshots of (its clusters shared, so
    // refcounts of 2 and cleared COPIED flags). QEMU rewrote it, so it is
    // no longer the image its manifest was written for (verify says so):
    // it goes without a manifest, for the reader alone.
    copy(d, "full.qcow2", "snap.qcow2");
    fs::remove_file(d.join("snap.qcow2.manifest")).unwrap();
    ok(d, "qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"]);
    ok(d, "qemu-img", &["snapshot", "-c", "second", "snap.qcow2"]);
    for b in ["full.qcow2", "top.qcow2"] {
        let v = qbackup(d, &["verify", b]);
        assert!(v.status.success(), "fresh {b} does not verify");
    }
    t
}

/// A working copy of `backup` named `name` (with its manifest) beside it,
/// so that a relative backing name resolves alike.
pub fn copy(dir: &Path, backup: &str, name: &str) -> PathBuf {
    fs::copy(dir.join(backup), dir.join(name)).unwrap();
    let manifest = dir.join(format!("{backup}.manifest"));
    if manifest.exists() {
        fs::copy(manifest, dir.join(format!("{name}.manifest"))).unwrap();
    }
    dir.join(name)
}

pub fn one_line(out: &Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    err.trim().lines().count() == 1 && !err.contains("panicked")
}

/// Whether `qemu-img info` opens the image as qcow2.
pub fn qemu_opens(dir: &Path, name: &str) -> bool {
    run(dir, "qemu-img", &["info", "-f", "qcow2", name])
        .status
        .success()
}

/// What qbackup does with a damaged image: `None` when every command
/// (`verify` when it has a manifest, `map`, `info`, `compare`, `backup`)
/// refuses it properly, in one line naming it, else what went wrong.
pub fn qbackup_refuses(dir: &Path, name: &str, original: &str) -> Option<String> {
    let v = qbackup(dir, &["verify", name]);
    let no_manifest = !dir.join(format!("{name}.manifest")).exists();
    match v.status.code() {
        Some(1) => {}
        Some(2) if one_line(&v) => {}
        _ if no_manifest => {}
        c => {
            return Some(format!(
                "verify exit {c:?}: {}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            ))
        }
    }
    let target = format!("{name}.backup");
    for args in [
        vec!["map", "-f", "qcow2", name],
        vec!["info", "-f", "qcow2", name],
        vec!["compare", "-f", "qcow2", "-F", "qcow2", name, original],
        vec!["backup", "-f", "qcow2", "--no-manifest", name, &target],
    ] {
        let out = qbackup(dir, &args);
        if out.status.success() || out.status.code() == Some(101) || !one_line(&out) {
            return Some(format!(
                "{} exit {:?}: {}",
                args[0],
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains(name) {
            return Some(format!("{} does not name the file: {err}", args[0]));
        }
    }
    if dir.join(&target).exists() {
        return Some("backup left a target".into());
    }
    None
}

/// `verify` OK implies QEMU restores exactly the original: `None` when it
/// holds (or verify does not say OK).
pub fn verify_ok_is_restorable(dir: &Path, name: &str, original: &str) -> (bool, Option<String>) {
    let v = qbackup(dir, &["verify", name]);
    if v.status.code() == Some(101) || String::from_utf8_lossy(&v.stderr).contains("panicked") {
        return (false, Some("verify panicked".into()));
    }
    if !v.status.success() {
        return (false, None);
    }
    let cmp = run(
        dir,
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", name, original],
    );
    if !cmp.status.success() {
        return (
            true,
            Some(format!(
                "verify OK but qemu-img compare: {}{}",
                String::from_utf8_lossy(&cmp.stdout),
                String::from_utf8_lossy(&cmp.stderr)
            )),
        );
    }
    let check = run(dir, "qemu-img", &["check", "-f", "qcow2", name]);
    if !check.status.success() {
        return (
            true,
            Some(format!(
                "verify OK but qemu-img check: {}",
                String::from_utf8_lossy(&check.stdout)
            )),
        );
    }
    (true, None)
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
