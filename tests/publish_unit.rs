//! A backup is published as one unit (issue 19): an image and its manifest
//! always belong together, and a temporary file changed by another process
//! is never published.
//!
//! - Two `--force` backups of different sources into one TARGET at once,
//!   repeated: the target's manifest always verifies and names the source
//!   the image equals (`qemu-img compare`).
//! - An image beside another backup's manifest (same size, same layout,
//!   other data) is reported by `verify` as not the manifest's image.
//! - The temporary image truncated by another process during a slow backup:
//!   the backup fails in one line, nothing at TARGET, no leftovers.
//! - A FIFO named `BACKUP.manifest` (or PREV's): `verify` and
//!   `backup --backing` refuse it at once instead of hanging.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::oracle::{assert_check_clean, qemu_img_status};
use common::run::{
    assert_no_leftovers, leftovers, qbackup_in, qbackup_within, spawn_qbackup, wait_qbackup,
};
use common::scratch::Scratch;
use common::MIB;

/// The `source` a manifest records (its JSON line).
fn manifest_source(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read manifest");
    let line = bytes
        .split(|&b| b == b'\n')
        .nth(1)
        .expect("manifest JSON line");
    let meta: serde_json::Value = serde_json::from_slice(line).expect("manifest JSON");
    meta["source"].as_str().expect("source").to_string()
}

/// Two tiny sources of one size and layout, different data.
fn twin_sources(s: &Scratch) {
    for (name, pattern) in [("a.qcow2", "0x0a"), ("b.qcow2", "0x0b")] {
        s.create(name, "qcow2", MIB, "");
        s.io(
            name,
            "qcow2",
            &[
                &format!("write -P {pattern} 0 128k"),
                &format!("write -P {pattern} 512k 64k"),
            ],
        );
    }
}

/// `qbackup verify` exit status and stdout.
fn verify(s: &Scratch, backup: &str) -> (Option<i32>, String) {
    let run = qbackup_in(s.dir(), &["verify", backup]);
    run.assert_no_panic();
    (run.code, run.stdout)
}

#[test]
fn concurrent_forced_backups_leave_a_matching_pair() {
    const RUNS: usize = 100;
    let s = Scratch::new();
    twin_sources(&s);
    s.backup(&["a.qcow2", "t.qcow2"]).assert_ok();
    let mut won = [0usize; 2];
    for i in 0..RUNS {
        // Alternate which one starts first.
        let order = if i % 2 == 0 {
            ["a.qcow2", "b.qcow2"]
        } else {
            ["b.qcow2", "a.qcow2"]
        };
        let started = Instant::now();
        let children: Vec<_> = order
            .iter()
            .map(|src| spawn_qbackup(s.dir(), &["backup", "--force", src, "t.qcow2"]))
            .collect();
        for (child, cmdline) in children {
            wait_qbackup(child, cmdline, started, Duration::from_secs(30)).assert_ok();
        }
        let (code, out) = verify(&s, "t.qcow2");
        assert_eq!(code, Some(0), "run {i}: the pair does not verify:\n{out}");
        let source = manifest_source(&s.path("t.qcow2.manifest"));
        let (code, out) = qemu_img_status(
            s.dir(),
            &["compare", "-f", "qcow2", "-F", "qcow2", &source, "t.qcow2"],
        );
        assert_eq!(
            code,
            Some(0),
            "run {i}: the image is not the source its manifest names ({source}):\n{out}"
        );
        won[usize::from(source == "b.qcow2")] += 1;
    }
    assert_check_clean(s.dir(), "t.qcow2");
    assert_no_leftovers(s.dir());
    eprintln!(
        "{RUNS} races: a's pair last {} times, b's {} times",
        won[0], won[1]
    );
}

#[test]
fn an_image_beside_another_backups_manifest_is_reported() {
    let s = Scratch::new();
    twin_sources(&s);
    s.backup(&["a.qcow2", "ta.qcow2"]).assert_ok();
    s.backup(&["b.qcow2", "tb.qcow2"]).assert_ok();
    // Same size and layout: only the data tells them apart.
    assert_eq!(
        std::fs::metadata(s.path("ta.qcow2")).unwrap().len(),
        std::fs::metadata(s.path("tb.qcow2")).unwrap().len()
    );
    std::fs::copy(s.path("tb.qcow2"), s.path("ta.qcow2")).unwrap();
    let (code, out) = verify(&s, "ta.qcow2");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not the image") && out.contains("ta.qcow2.manifest was written for"),
        "{out}"
    );
    // A longer image: its length says so.
    s.create("big.qcow2", "qcow2", MIB, "");
    s.io("big.qcow2", "qcow2", &[&s.random_cmd("", 0, MIB)]);
    s.backup(&["big.qcow2", "tbig.qcow2"]).assert_ok();
    std::fs::copy(s.path("tbig.qcow2"), s.path("tb.qcow2")).unwrap();
    let (code, out) = verify(&s, "tb.qcow2");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("bytes long"), "{out}");
}

#[test]
fn replacing_a_backup_without_a_manifest_removes_the_old_one() {
    let s = Scratch::new();
    twin_sources(&s);
    s.backup(&["a.qcow2", "t.qcow2"]).assert_ok();
    assert!(s.path("t.qcow2.manifest").exists());
    s.backup(&["--force", "--no-manifest", "b.qcow2", "t.qcow2"])
        .assert_ok();
    assert!(!s.path("t.qcow2.manifest").exists());
}

/// A source that takes about two seconds at `--speed 6M`: 12 MiB of random
/// data, stored uncompressed (the image file grows as it is copied).
fn slow_source(s: &Scratch) {
    s.create("src.qcow2", "qcow2", 12 * MIB, "");
    s.io("src.qcow2", "qcow2", &[&s.random_cmd("", 0, 12 * MIB)]);
}

/// Starts a slow backup into `out/NAME`, truncates its temporary image once
/// it holds `grown` bytes, and returns the finished run.
fn truncated_mid_run(s: &Scratch, format: &str, name: &str, grown: u64) -> common::run::Run {
    let target = format!("out/{name}");
    let started = Instant::now();
    let (mut child, cmdline) = spawn_qbackup(
        s.dir(),
        &[
            "backup",
            "-O",
            format,
            "--compress",
            "none",
            "--speed",
            "6M",
            "src.qcow2",
            &target,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let image = loop {
        // The image's temporary file is the one that grows.
        let big = leftovers(&s.path("out"))
            .into_iter()
            .find(|n| std::fs::metadata(s.path("out").join(n)).is_ok_and(|m| m.len() >= grown));
        if let Some(n) = big {
            break s.path("out").join(n);
        }
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup ended before its image grew to {grown} bytes"
        );
        assert!(Instant::now() < deadline, "the temporary image never grew");
        thread::sleep(Duration::from_millis(5));
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(0)
        .unwrap();
    wait_qbackup(child, cmdline, started, Duration::from_secs(60))
}

#[test]
fn a_temporary_image_truncated_mid_run_is_never_published() {
    let s = Scratch::new();
    s.mkdir("out");
    slow_source(&s);
    for (format, name) in [("qcow2", "t.qcow2"), ("raw", "t.raw")] {
        let run = truncated_mid_run(&s, format, name, 4 * MIB);
        run.assert_clean_failure(&[name]);
        assert!(
            run.stderr.contains("changed by another process"),
            "{}",
            run.describe()
        );
        assert!(
            !s.path(&format!("out/{name}")).exists(),
            "{format}: TARGET published"
        );
        assert!(!s.path(&format!("out/{name}.manifest")).exists());
        assert_no_leftovers(&s.path("out"));
    }
    // Untouched, the same backup succeeds.
    s.backup(&["--compress", "none", "src.qcow2", "out/ok.qcow2"])
        .assert_ok();
    assert_eq!(verify(&s, "out/ok.qcow2").0, Some(0));
}

fn mkfifo(path: &Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect("mkfifo");
}

#[test]
fn a_fifo_manifest_is_refused_at_once() {
    let s = Scratch::new();
    twin_sources(&s);
    s.backup(&["--no-manifest", "a.qcow2", "full.qcow2"])
        .assert_ok();
    mkfifo(&s.path("full.qcow2.manifest"));
    let limit = Duration::from_secs(10);
    // verify: exit 2, one line naming the manifest and what it is.
    let run = qbackup_within(s.dir(), &["verify", "full.qcow2"], limit);
    run.assert_no_panic();
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
    assert!(
        run.stderr.contains("full.qcow2.manifest") && run.stderr.contains("a FIFO"),
        "{}",
        run.describe()
    );
    // An incremental on it: refused the same way, nothing written.
    let run = qbackup_within(
        s.dir(),
        &[
            "backup",
            "--sync",
            "incremental",
            "--backing",
            "full.qcow2",
            "a.qcow2",
            "inc.qcow2",
        ],
        limit,
    );
    run.assert_no_panic();
    assert_ne!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
    assert!(
        run.stderr.contains("full.qcow2.manifest") && run.stderr.contains("a FIFO"),
        "{}",
        run.describe()
    );
    assert!(!s.path("inc.qcow2").exists());
    assert_no_leftovers(s.dir());
}
