//! Memory does not grow with the image: a backup of a huge sparse disk with
//! scattered writes stays under a loose bound on the child's peak RSS, and
//! `--threads` is capped.
//!
//! The source is a 15 TiB sparse raw file (ext4 refuses files of 16 TiB)
//! with 4 KiB written every 4 GiB at varying offsets: the qcow2 target then
//! has 3840 L2 tables of 64 KiB, which a writer holding every table until
//! the end kept in memory (180 MiB peak RSS measured before the
//! streaming writer; about 10 MiB after). The bound, 128 MiB, is loose on
//! purpose: this is a regression test, not a benchmark (see benches/).
//!
//! Peak RSS is the child's `ru_maxrss` from `wait4`, so nothing else the
//! test process runs is counted.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};

use common::content::text_bytes;
use common::oracle::{assert_check_clean, assert_identical};
use common::run::qbackup_bin;
use common::scratch::Scratch;
use common::{GIB, KIB, MIB};

const TIB: u64 = 1 << 40;

/// Runs `qbackup ARGS` in `dir`; returns its exit status, stderr and peak
/// RSS in bytes.
// The child is reaped by `wait4`, which std's `wait` does not offer: it
// returns the child's resource usage too.
#[allow(clippy::zombie_processes)]
fn run_measured(dir: &std::path::Path, args: &[&str]) -> (i32, String, u64) {
    let mut child = Command::new(qbackup_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qbackup");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; `child` is not
    // waited for elsewhere.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "qbackup did not exit: {status:#x}");
    // ru_maxrss is in KiB on Linux.
    let rss = u64::try_from(usage.ru_maxrss).expect("non-negative") * 1024;
    (libc::WEXITSTATUS(status), stderr, rss)
}

#[test]
fn huge_sparse_image_backs_up_in_bounded_memory() {
    let s = Scratch::new();
    let size = 15 * TIB;
    let step = 4 * GIB;
    let file = std::fs::File::create(s.path("src.raw")).unwrap();
    file.set_len(size).unwrap();
    let mut written = 0;
    for i in 0..size / step {
        // Scattered within each 4 GiB: the L2 tables differ in where their
        // one entry is.
        let offset = i * step + (i * 7919 % 1024) * 4 * KIB;
        let mut block = text_bytes(4096, i);
        block[..8].copy_from_slice(&i.to_le_bytes());
        file.write_all_at(&block, offset).unwrap();
        written += 1;
    }
    drop(file);
    assert_eq!(written, 3840);

    let (code, stderr, rss) = run_measured(s.dir(), &["backup", "src.raw", "out.qcow2"]);
    assert_eq!(code, 0, "qbackup backup failed: {stderr}");
    eprintln!("peak RSS {} MiB", rss >> 20);
    assert!(rss > 0, "no RSS reported");
    assert!(
        rss <= 128 * MIB,
        "backup of a 15 TiB sparse image took {} MiB peak RSS (bound 128 MiB)",
        rss >> 20
    );
    assert_check_clean(s.dir(), "out.qcow2");
    // Both sides are sparse: qemu-img compares 15 TiB in a few seconds.
    assert_identical(s.dir(), "src.raw", "raw", "out.qcow2", "qcow2");
}

/// 2 MiB clusters and 8 threads (the `--threads` cap is at least 8 on any
/// machine): each worker holds 2 MiB batches and a codec context for
/// 2 MiB inputs: this backup took 68 MiB (89 MiB on the realistic image)
/// before the worker count and batch size were planned from the memory
/// budget (`backup/budget.rs`); 30 MiB (zstd) and 44 MiB (uncompressed)
/// after. Here the bound is the promise itself, 64 MiB.
#[test]
fn large_clusters_and_many_threads_stay_in_the_budget() {
    let s = Scratch::new();
    // Written a MiB at a time: the child's peak RSS includes what this
    // process holds when it starts the child (Linux keeps `ru_maxrss`
    // across exec), so the test must not hold the data itself.
    let file = std::fs::File::create(s.path("src.raw")).unwrap();
    for i in 0..64u64 {
        file.write_all_at(&text_bytes(MIB as usize, i), i * MIB)
            .unwrap();
    }
    drop(file);
    for compress in ["zstd", "none"] {
        let (code, stderr, rss) = run_measured(
            s.dir(),
            &[
                "backup",
                "--force",
                "--threads",
                "8",
                "--cluster-size",
                "2M",
                "--compress",
                compress,
                "src.raw",
                "out.qcow2",
            ],
        );
        assert_eq!(code, 0, "qbackup backup failed: {stderr}");
        eprintln!("{compress}: peak RSS {} MiB", rss >> 20);
        assert!(
            rss <= 64 * MIB,
            "--compress {compress}: {} MiB peak RSS (bound 64 MiB)",
            rss >> 20
        );
        assert_identical(s.dir(), "src.raw", "raw", "out.qcow2", "qcow2");
    }
}

#[test]
fn threads_above_the_limit_are_a_usage_error() {
    let s = Scratch::new();
    s.write_file("src.raw", &[1u8; 4096]);
    let (code, stderr, _) = run_measured(
        s.dir(),
        &["backup", "--threads", "100000", "src.raw", "out.qcow2"],
    );
    assert_eq!(code, 2, "usage error: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("qbackup: ") && stderr.contains("--threads 100000 is above the limit"),
        "{stderr}"
    );
    assert!(!s.path("out.qcow2").exists());
    // The limit is at least 8 on any machine.
    let (code, stderr, _) = run_measured(
        s.dir(),
        &["backup", "--threads", "8", "src.raw", "out.qcow2"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_identical(s.dir(), "src.raw", "raw", "out.qcow2", "qcow2");
}
