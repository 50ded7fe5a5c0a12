//! A source written to during a backup (by a tool that ignores QEMU's
//! image locks, here `dd conv=notrunc`) fails the backup with
//! "FILE: source changed during backup", naming the file of the chain that
//! changed; nothing is at TARGET and no temporary file is left. QEMU's own
//! writers are kept out by the shared locks held throughout
//! (`image_locks.rs`).

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::content::random_bytes;
use common::oracle::assert_identical;
use common::run::{assert_no_leftovers, leftovers, spawn_qbackup, wait_qbackup, Run};
use common::scratch::Scratch;
use common::{KIB, MIB};

/// Starts `qbackup backup --speed 4M SRC out/t.qcow2` (about 2 s for the
/// 8 MiB sources here), waits until it copies (its temporary file exists),
/// runs `change`, and returns the finished run.
fn backup_while_changing(s: &Scratch, src: &str, change: impl FnOnce()) -> Run {
    s.mkdir("out");
    let started = Instant::now();
    let (mut child, cmdline) =
        spawn_qbackup(s.dir(), &["backup", "--speed", "4M", src, "out/t.qcow2"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&s.path("out")).is_empty() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup ended before the change"
        );
        assert!(Instant::now() < deadline, "no temporary file appeared");
        thread::sleep(Duration::from_millis(10));
    }
    change();
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the backup ended before the change"
    );
    wait_qbackup(child, cmdline, started, Duration::from_secs(30))
}

/// Overwrites 64 KiB of `file` at `offset` in place, as a host-side tool
/// would.
fn dd_write(s: &Scratch, file: &str, offset: u64) {
    let st = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", s.p(file)),
            "bs=64k",
            "count=1",
            &format!("seek={}", offset / (64 * KIB)),
            "conv=notrunc",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(st.success());
}

fn assert_changed(s: &Scratch, run: &Run, file: &str) {
    run.assert_clean_failure(&[file])
        .assert_clean_failure_mentioning(&["source changed during backup"]);
    assert!(!s.path("out/t.qcow2").exists(), "{}", run.describe());
    assert_no_leftovers(&s.path("out"));
}

#[test]
fn raw_source_written_mid_backup() {
    let s = Scratch::new();
    s.write_file("src.raw", &random_bytes(8 * MIB as usize, 5));
    let run = backup_while_changing(&s, "src.raw", || dd_write(&s, "src.raw", 6 * MIB));
    assert_changed(&s, &run, "src.raw");
}

/// The change is in the backing file, below the image named on the
/// command line: the message names that file.
#[test]
fn backing_file_written_mid_backup() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 8 * MIB, "");
    s.io("base.qcow2", "qcow2", &["write -P 0x21 0 8M"]);
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 0x42 1M 1M"]);
    // Host offset 1 MiB of base.qcow2 is inside its data clusters.
    let run = backup_while_changing(&s, "top.qcow2", || dd_write(&s, "base.qcow2", MIB));
    assert_changed(&s, &run, "base.qcow2");
    // Left alone, the same backup succeeds.
    let run = s.backup(&["--speed", "64M", "top.qcow2", "out/t.qcow2"]);
    run.assert_ok();
    assert_identical(s.dir(), "top.qcow2", "qcow2", "out/t.qcow2", "qcow2");
}
