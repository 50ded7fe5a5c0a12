//! SIGINT, SIGTERM and SIGHUP stop a backup promptly in every phase: the
//! exit status is 128 + the signal number (130, 143, 129), one stderr line
//! names the signal, nothing is at TARGET and no temporary file is left.
//!
//! Phases: a `--speed` sleep worth a minute per cluster (`--speed 1k`), a
//! read stuck on a slow NBD server (nbdkit's delay filter), and planning
//! stuck on a slow block-status reply. Times are asserted loosely (well
//! under the seconds each phase would otherwise take): not a benchmark.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

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

/// Sends `signo` to `child`, waits for it, and checks the contract.
fn interrupt(
    s: &Scratch,
    child: std::process::Child,
    cmdline: String,
    signo: i32,
    name: &str,
) -> Run {
    let pid = child.id() as i32;
    let started = Instant::now();
    // SAFETY: plain kill(2) of our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, signo) }, 0, "kill");
    let run = wait_qbackup(child, cmdline, started, Duration::from_secs(30));
    assert!(
        run.elapsed < PROMPT,
        "{name} took {:?} to stop the backup\n{}",
        run.elapsed,
        run.describe()
    );
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
