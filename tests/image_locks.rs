//! QEMU's image locks, against the real holders: `qemu-nbd` serving an image
//! read-write, `qemu-nbd -r`, and a running `qemu-system-x86_64` with the
//! image as its disk. qbackup must refuse an image (or any layer of its
//! chain) that another process writes, with one line that names the file,
//! the cause and the ways out; read it with `-U`/`--force-share` and warn;
//! coexist with read-only holders; and hold its own locks while it reads,
//! so that no QEMU can start writing the image under a running backup.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::backup::backup_checked;
use common::oracle::compare_force_share;
use common::process::{qemu_nbd_with, qemu_vm, Holder};
use common::run::{assert_no_leftovers, qbackup_in, run_unchecked, spawn_qbackup};
use common::scratch::Scratch;
use common::MIB;

/// `qemu-nbd` serving `image` (read-write unless `read_only`).
fn qemu_nbd(s: &Scratch, image: &str, read_only: bool) -> Holder {
    let args: &[&str] = if read_only {
        &["-r", "-f", "qcow2"]
    } else {
        &["-f", "qcow2"]
    };
    qemu_nbd_with(s, image, args).0
}

/// A running QEMU with `image` as its disk, once its locks are taken.
fn vm_holding(s: &Scratch, image: &str) -> Holder {
    // QMP answers once the block devices are open, so the locks are held.
    let (h, _qmp) = qemu_vm(s, image);
    h
}

fn image(s: &Scratch, name: &str) {
    s.create(name, "qcow2", 4 * MIB, "");
    s.io(
        name,
        "qcow2",
        &["write -P 0x5a 0 1M", "write -P 0xa5 2M 64k"],
    );
}

/// `map` and `backup` of `top` (and `info`, which opens only `top`, when
/// `top` is the held file) refuse with one line naming `held`, and leave
/// nothing behind.
fn assert_refused(s: &Scratch, top: &str, held: &str) {
    let out = s.p("out.qcow2");
    let mut commands = vec![
        vec!["map", "--output=json", top],
        vec!["backup", top, out.as_str()],
    ];
    if top == held {
        commands.push(vec!["info", top]);
    }
    for args in commands {
        qbackup_in(s.dir(), &args)
            .assert_clean_failure(&[held])
            .assert_clean_failure_mentioning(&["--force-share"])
            .assert_clean_failure_mentioning(&["--qmp SOCKET"])
            .assert_clean_failure_mentioning(&["\"write\" lock"]);
    }
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// With `-U` the backup succeeds, equals the image, and warns once.
fn assert_force_share_reads(s: &Scratch, top: &str, held: &str) {
    let run = qbackup_in(s.dir(), &["backup", "-q", "-U", top, "out.qcow2"]);
    run.assert_ok();
    assert!(
        run.stderr.contains("warning") && run.stderr.contains(held),
        "a warning naming {held}\n{}",
        run.describe()
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
    // The oracle needs -U too while the image is held.
    let (code, text) = compare_force_share(s.dir(), top, "out.qcow2");
    assert_eq!(code, Some(0), "backup differs from {top}: {text}");
    std::fs::remove_file(s.path("out.qcow2")).unwrap();
}

#[test]
fn refuses_an_image_qemu_nbd_writes() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    let _nbd = qemu_nbd(&s, "d.qcow2", false);
    assert_refused(&s, "d.qcow2", "d.qcow2");
    assert_force_share_reads(&s, "d.qcow2", "d.qcow2");
}

#[test]
fn coexists_with_a_read_only_holder() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    let _nbd = qemu_nbd(&s, "d.qcow2", true);
    backup_checked(&s, &[], "d.qcow2", "out.qcow2");
    let run = qbackup_in(s.dir(), &["map", "-U", "--output=json", "d.qcow2"]);
    run.assert_ok();
    assert!(run.stderr.is_empty(), "no warning: {}", run.describe());
}

#[test]
fn refuses_a_backing_file_a_vm_writes() {
    let s = Scratch::new();
    image(&s, "base.qcow2");
    s.overlay("top.qcow2", "base.qcow2", "qcow2", None, "");
    let _nbd = qemu_nbd(&s, "base.qcow2", false);
    assert_refused(&s, "top.qcow2", "base.qcow2");
    assert_force_share_reads(&s, "top.qcow2", "base.qcow2");
}

#[test]
fn refuses_the_disk_of_a_running_qemu() {
    let s = Scratch::new();
    image(&s, "vm.qcow2");
    let _vm = vm_holding(&s, "vm.qcow2");
    assert_refused(&s, "vm.qcow2", "vm.qcow2");
    assert_force_share_reads(&s, "vm.qcow2", "vm.qcow2");
}

/// While qbackup reads an image, QEMU cannot open it for writing.
#[test]
fn a_running_backup_keeps_writers_out() {
    let s = Scratch::new();
    image(&s, "d.qcow2");
    let (mut backup, _) = spawn_qbackup(
        s.dir(),
        &["backup", "--speed", "256k", "d.qcow2", "out.qcow2"],
    );
    // Wait until qbackup holds its locks (seen in /proc/locks, without
    // opening the image: a writer probing in a loop could hold its own lock
    // at the moment qbackup opens, and make qbackup refuse instead).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(s.path("d.qcow2")).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains(&format!(":{ino} ")))
    {
        assert!(
            backup.try_wait().unwrap().is_none(),
            "qbackup ended before it locked the image"
        );
        assert!(Instant::now() < deadline, "qbackup never locked the image");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Then QEMU's "write not shared" lock (byte 201) makes qemu-io's
    // read-write open fail.
    let err = loop {
        let out = run_unchecked(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x11 0 4k", "d.qcow2"])
                .current_dir(s.dir()),
        );
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if text.contains("lock") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-io was never refused: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(err.contains("\"write\" lock"), "{err}");
    // SIGTERM: qbackup stops and cleans up (SIGKILL would leave its
    // temporary file behind).
    let pid = rustix::process::Pid::from_raw(backup.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    let status = backup.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(143),
        "interrupted backup exits 128 + SIGTERM"
    );
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}
