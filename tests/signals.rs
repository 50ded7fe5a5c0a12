//! SIGINT, SIGTERM and SIGHUP stop a backup promptly in every phase: the
//! exit status is 128 + the signal number (130, 143, 129), one stderr line
//! names the signal, nothing is at TARGET and no temporary file is left.
//!
//! Phases: a `--speed` sleep worth a minute per cluster (`--speed 1k`), a
//! read stuck on a slow NBD server (nbdkit's delay filter), and planning
//! stuck on a slow block-status reply. Times are asserted loosely (well
//! under the seconds each phase would otherwise take): not a benchmark.
//! The phases too short to hold still (opening, the thread pool's start,
//! the background and final syncs, the rename) are covered by a sweep:
//! signals sent at growing delays across a whole backup, each run either
//! stopped by the contract or, when the signal came after the commit,
//! complete.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::content::random_bytes;
use common::oracle::assert_identical;
use common::process::{hold, Holder};
use common::run::{assert_no_leftovers, leftovers, spawn_qbackup, wait_qbackup, Run};
use common::scratch::Scratch;
use common::MIB;

/// Loose bound between the signal and the exit (the promise is 200 ms).
const PROMPT: Duration = Duration::from_millis(1500);

/// A 1 MiB qcow2 of non-zero data: 16 clusters, 64 s each at `--speed 1k`.
fn slow_source(s: &Scratch) {
    s.create("src.qcow2", "qcow2", MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x5c 0 1M"]);
}

/// Waits (bounded) until a temporary file appears in `dir`: the backup is
/// then copying.
fn wait_for_temp(dir: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(dir).is_empty() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "no temporary file appeared");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `signo` to `child` and waits for it, which must be prompt.
fn signal(child: std::process::Child, cmdline: String, signo: i32) -> Run {
    let pid = child.id() as i32;
    let started = Instant::now();
    // SAFETY: plain kill(2) of our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, signo) }, 0, "kill");
    let run = wait_qbackup(child, cmdline, started, Duration::from_secs(30));
    assert!(
        run.elapsed < PROMPT,
        "signal {signo} took {:?} to stop the backup\n{}",
        run.elapsed,
        run.describe()
    );
    run
}

/// Sends `signo` to `child`, waits for it, and checks the contract.
fn interrupt(
    s: &Scratch,
    child: std::process::Child,
    cmdline: String,
    signo: i32,
    name: &str,
) -> Run {
    let run = signal(child, cmdline, signo);
    assert_eq!(run.code, Some(128 + signo), "{}", run.describe());
    let body = run.stderr.strip_suffix('\n').unwrap_or(&run.stderr);
    assert!(
        body.starts_with("qbackup: ") && !body.contains('\n') && body.contains(name),
        "expected one line naming {name}\n{}",
        run.describe()
    );
    assert!(!s.path("out/t.qcow2").exists(), "{}", run.describe());
    assert_no_leftovers(&s.path("out"));
    run
}

fn rate_limited(signo: i32, name: &str) {
    let s = Scratch::new();
    slow_source(&s);
    s.mkdir("out");
    let (mut child, cmdline) = spawn_qbackup(
        s.dir(),
        &["backup", "--speed", "1k", "src.qcow2", "out/t.qcow2"],
    );
    wait_for_temp(&s.path("out"), &mut child);
    // Let the first cluster's minute-long sleep begin.
    thread::sleep(Duration::from_millis(300));
    interrupt(&s, child, cmdline, signo, name);
}

#[test]
fn sigint_during_rate_limit_sleep() {
    rate_limited(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_during_rate_limit_sleep() {
    rate_limited(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sighup_during_rate_limit_sleep() {
    rate_limited(libc::SIGHUP, "SIGHUP");
}

/// nbdkit serving `disk.raw` with the delay filter's `ARGS`.
fn slow_server(s: &Scratch, args: &[&str]) -> (Holder, String) {
    s.write_file("disk.raw", &random_bytes(4 * MIB as usize, 3));
    let sock = s.path("slow.sock");
    let mut cmd = std::process::Command::new("nbdkit");
    cmd.arg("-f")
        .arg("-U")
        .arg(&sock)
        .arg("--filter=delay")
        .arg("file")
        .arg(s.path("disk.raw"))
        .args(args);
    let h = hold(&mut cmd, &sock);
    (h, format!("nbd+unix:///?socket={}", sock.display()))
}

/// A read the server answers only after 30 s: the backup cannot unwind by
/// itself, and still stops at once. (`-f raw`: no probe read, so the
/// first delayed read is a data read, after the temporary file exists.)
#[test]
fn sigterm_during_a_stuck_read() {
    let s = Scratch::new();
    let (_server, uri) = slow_server(&s, &["rdelay=30"]);
    s.mkdir("out");
    let (mut child, cmdline) =
        spawn_qbackup(s.dir(), &["backup", "-f", "raw", &uri, "out/t.qcow2"]);
    wait_for_temp(&s.path("out"), &mut child);
    thread::sleep(Duration::from_millis(300));
    interrupt(&s, child, cmdline, libc::SIGTERM, "SIGTERM");
}

/// Planning waits for a block-status reply delayed by 30 s.
#[test]
fn sigint_during_planning() {
    let s = Scratch::new();
    let (_server, uri) = slow_server(&s, &["delay-extents=30"]);
    s.mkdir("out");
    let (mut child, cmdline) = spawn_qbackup(s.dir(), &["backup", &uri, "out/t.qcow2"]);
    thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the backup ended before it could be interrupted"
    );
    interrupt(&s, child, cmdline, libc::SIGINT, "SIGINT");
}

/// A signal at each point of a whole backup, from the process's start to
/// its end: 96 MiB stored uncompressed (a background sync after 64 MiB,
/// then the final sync), with 8 threads to start. Whatever the phase the
/// signal hits, the run either stops by the contract (128 + the number,
/// one line, nothing at TARGET, no temporary file), or had already
/// committed and exits 0 with a complete backup, or (a signal before the
/// handlers exist) dies of it before creating anything. Never a hang, a
/// half-written TARGET or a leftover.
#[test]
fn signals_across_every_phase() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 96 * MIB, "");
    s.io(
        "src.qcow2",
        "qcow2",
        &[
            "write -P 0x11 0 32M",
            "write -P 0x22 32M 32M",
            "write -P 0x33 64M 32M",
        ],
    );
    s.mkdir("out");
    let target = s.path("out/t.qcow2");
    let mut outcomes = Vec::new();
    for (i, delay_ms) in [
        0u64, 1, 3, 6, 10, 20, 35, 60, 100, 150, 200, 230, 260, 290, 320, 360, 420, 500, 650,
    ]
    .into_iter()
    .enumerate()
    {
        let signo = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP][i % 3];
        let args = [
            "backup",
            "--threads",
            "8",
            "--compress",
            "none",
            "src.qcow2",
            "out/t.qcow2",
        ];
        let (child, cmdline) = spawn_qbackup(s.dir(), &args);
        thread::sleep(Duration::from_millis(delay_ms));
        let run = signal(child, cmdline, signo);
        assert_no_leftovers(&s.path("out"));
        let outcome = match run.code {
            Some(0) => {
                assert_identical(s.dir(), "src.qcow2", "qcow2", "out/t.qcow2", "qcow2");
                std::fs::remove_file(&target).expect("remove the backup");
                let _ = std::fs::remove_file(s.path("out/t.qcow2.manifest"));
                "complete"
            }
            Some(code) => {
                assert_eq!(code, 128 + signo, "{}", run.describe());
                let body = run.stderr.strip_suffix('\n').unwrap_or(&run.stderr);
                assert!(
                    body.starts_with("qbackup: ") && !body.contains('\n'),
                    "expected one line\n{}",
                    run.describe()
                );
                assert!(!target.exists(), "{}", run.describe());
                "stopped"
            }
            None => {
                assert!(!target.exists(), "{}", run.describe());
                "killed before the handlers"
            }
        };
        outcomes.push((delay_ms, outcome));
    }
    eprintln!("signal delay and outcome: {outcomes:?}");
    // The sweep spans the backup: early signals stop it, the last ones
    // find it done.
    assert!(
        outcomes.iter().any(|(_, o)| *o == "stopped"),
        "no signal stopped a backup: {outcomes:?}"
    );
}
