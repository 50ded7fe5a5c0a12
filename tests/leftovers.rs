//! Temporary files left by killed backups: a later backup into the same
//! directory removes them and says so on stderr, one line each; the
//! temporary file of a backup that is still running is never touched; and a
//! leftover never begins with the qcow2 magic.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::oracle::{assert_check_clean, assert_identical};
use common::process::Holder;
use common::run::{assert_no_leftovers, leftovers, spawn_qbackup, Run};
use common::scratch::Scratch;
use common::MIB;

/// A 1 MiB qcow2 of non-zero data: a minute per cluster at `--speed 1k`.
fn slow_source(s: &Scratch) {
    s.create("src.qcow2", "qcow2", MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x5c 0 1M"]);
}

/// Starts a backup of `src.qcow2` into `out/NAME` at `--speed 1k` and
/// waits (bounded) until its temporary files exist (the target's and the
/// manifest's); returns the child and their names.
fn start_slow(s: &Scratch, name: &str) -> (std::process::Child, Vec<String>) {
    let before = leftovers(&s.path("out"));
    let target = format!("out/{name}");
    let (mut child, _) = spawn_qbackup(s.dir(), &["backup", "--speed", "1k", "src.qcow2", &target]);
    let new = || -> Vec<String> {
        leftovers(&s.path("out"))
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while new().is_empty() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the backup ended early"
        );
        assert!(Instant::now() < deadline, "no temporary file appeared");
        thread::sleep(Duration::from_millis(10));
    }
    // The manifest's follows the target's at once; the copy then sleeps.
    thread::sleep(Duration::from_millis(200));
    (child, new())
}

/// The stderr lines that report a removed leftover (the result line
/// follows them).
fn removal_lines(run: &Run) -> Vec<&str> {
    run.stderr
        .lines()
        .filter(|l| l.contains("removed the temporary file"))
        .collect()
}

fn first_bytes(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).expect("read leftover");
    b.truncate(4);
    b
}

#[test]
fn next_backup_removes_leftovers_of_killed_ones() {
    let s = Scratch::new();
    slow_source(&s);
    s.mkdir("out");
    // Two backups at once (a later one would remove an earlier leftover).
    let running: Vec<_> = ["a.qcow2", "b.qcow2"]
        .iter()
        .map(|t| start_slow(&s, t))
        .collect();
    // Let them write some clusters' worth of data first.
    thread::sleep(Duration::from_millis(200));
    let mut names = Vec::new();
    for (mut child, temps) in running {
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        for name in temps {
            let path = s.path(&format!("out/{name}"));
            assert!(path.exists(), "kill -9 leaves the temporary file");
            assert_ne!(
                first_bytes(&path),
                b"QFI\xfb",
                "an unfinished temporary file must not look like a qcow2 image"
            );
            names.push(name);
        }
    }
    let run = s.backup(&["src.qcow2", "out/c.qcow2"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let lines = removal_lines(&run);
    assert!(names.len() >= 2);
    assert_eq!(
        lines.len(),
        names.len(),
        "one line per leftover\n{}",
        run.describe()
    );
    for name in &names {
        assert!(
            lines.iter().any(|l| l.starts_with("qbackup: ")
                && l.contains(name.as_str())
                && l.contains("removed")),
            "no line reports removing {name}\n{}",
            run.describe()
        );
    }
    assert_no_leftovers(&s.path("out"));
    assert_check_clean(s.dir(), "out/c.qcow2");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out/c.qcow2", "qcow2");
    // Nothing left, nothing said.
    let run = s.backup(&["src.qcow2", "out/d.qcow2"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(removal_lines(&run).is_empty(), "{}", run.describe());
}

#[test]
fn a_running_backups_temporary_file_is_left_alone() {
    let s = Scratch::new();
    slow_source(&s);
    s.mkdir("out");
    let (live, names) = start_slow(&s, "slow.qcow2");
    let _live = Holder(live);
    let run = s.backup(&["src.qcow2", "out/fast.qcow2"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert!(removal_lines(&run).is_empty(), "{}", run.describe());
    for name in &names {
        assert!(
            s.path(&format!("out/{name}")).exists(),
            "the running backup's temporary file {name} was removed"
        );
    }
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out/fast.qcow2", "qcow2");
}
