//! Injected storage faults during a backup: an EIO while reading a data
//! cluster, a short read inside an L2 table, ENOSPC while writing the target
//! and EIO on a sync (the final one, a background one, one that fails only
//! once). Each must fail the backup with one line that
//! names the file and says the cause once, the right error class, nothing at
//! TARGET and no temporary file left behind.
//!
//! The faults are put under the source layers and the target through the
//! opener seam (`WrappingOpener`, `FaultyStorage`), exactly where a failing
//! disk or network would act; the backup itself is the real `backup::run`
//! the command line calls. FIFOs (which would block an `open()` forever) are
//! tested through the binary.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::oracle::{assert_check_clean, assert_identical};
use common::qcow2::Layout;
use common::run::{assert_no_leftovers, qbackup_within};
use common::scratch::Scratch;
use common::{KIB, MIB};
use qbackup::backup::{self, BackupConfig, BackupError, Progress, SyncMode};
use qbackup_formats::open::{FileOpener, Role, WrappingOpener};
use qbackup_formats::storage::fault::{Fault, FaultKind, FaultyStorage};
use qbackup_formats::storage::Storage;
use qbackup_formats::{Classify, CompressionType, ErrorClass, Format};

struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

fn config(source: &Path, target: &Path) -> BackupConfig {
    BackupConfig {
        source: source.to_path_buf(),
        source_format: None,
        target: target.to_path_buf(),
        target_format: Format::Qcow2,
        sync: SyncMode::Full,
        bitmap: None,
        clear_bitmap: false,
        bitmap_fallback: false,
        no_manifest: false,
        allow_corrupt: false,
        on_source_error: backup::policy::OnSourceError::Report,
        on_target_error: backup::policy::OnTargetError::Report,
        allow_disabled_bitmap: false,
        compression: Some((CompressionType::Zstd, 3)),
        cluster_size: None,
        threads: 2,
        speed: None,
        force: false,
        in_place: false,
        recompress: false,
        backing: None,
        backing_unchecked: false,
        id: None,
    }
}

/// Runs a backup whose storage opened for `role` (and named `name`, when
/// given) gets `faults`.
fn backup_with_faults(
    cfg: &BackupConfig,
    role: Role,
    name: Option<PathBuf>,
    faults: Vec<Fault>,
) -> Result<backup::BackupReport, BackupError> {
    let opener = WrappingOpener::new(FileOpener, move |n, r, s| {
        if r == role && name.as_deref().is_none_or(|want| want == n) {
            Arc::new(FaultyStorage::new(s, faults.clone())) as Arc<dyn Storage>
        } else {
            s
        }
    });
    let cancel = backup::Cancel::new();
    let after = backup::after::requested(cfg);
    backup::run(cfg, &opener, after, &NoProgress, &mut |_| {}, &cancel)
}

/// The error contract: one line, naming `file`, saying `cause` once.
fn assert_one_line(err: &BackupError, file: &Path, cause: &str) {
    let msg = err.to_string();
    eprintln!("MSG [{}] {msg}", err.class());
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains(&file.display().to_string()),
        "names {}: {msg}",
        file.display()
    );
    assert_eq!(msg.matches(cause).count(), 1, "says {cause:?} once: {msg}");
}

fn assert_nothing_written(s: &Scratch, target: &Path) {
    assert!(!target.exists(), "{} must not exist", target.display());
    assert_no_leftovers(s.dir());
}

/// Runs the backup with `faults` under `role`, expects an I/O failure that
/// names `file` and says `cause` once, and nothing written; returns it.
fn expect_io_failure(
    s: &Scratch,
    cfg: &BackupConfig,
    (role, name): (Role, Option<PathBuf>),
    faults: Vec<Fault>,
    file: &Path,
    cause: &str,
) -> BackupError {
    let err = backup_with_faults(cfg, role, name, faults).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Io, "{err}");
    assert_one_line(&err, file, cause);
    assert_nothing_written(s, &cfg.target);
    err
}

/// A 4 MiB qcow2 with data in its first 2 MiB.
fn source(s: &Scratch) -> PathBuf {
    s.create("src.qcow2", "qcow2", 4 * MIB, "");
    s.io("src.qcow2", "qcow2", &[&s.text_cmd("", 0, 2 * MIB)]);
    s.path("src.qcow2")
}

#[test]
fn eio_reading_a_data_cluster() {
    let s = Scratch::new();
    let src = source(&s);
    let layout = Layout::read(&src);
    let entry = layout.l2_entry(&src, MIB);
    let host = entry & 0x00ff_ffff_ffff_fe00;
    assert_ne!(host, 0, "guest 1 MiB is allocated");
    let target = s.path("out.qcow2");
    let err = expect_io_failure(
        &s,
        &config(&src, &target),
        (Role::Image, None),
        vec![Fault::new(FaultKind::ReadEio, host + 100..host + 101)],
        &src,
        "Input/output error",
    );
    assert!(
        matches!(err, BackupError::ReadCluster { .. }),
        "a per-cluster failure carries its cluster: {err:?}"
    );
}

#[test]
fn short_read_inside_an_l2_table() {
    let s = Scratch::new();
    let src = source(&s);
    let layout = Layout::read(&src);
    let l2 = layout.l2_table(&src, 0).expect("an L2 table");
    let target = s.path("out.qcow2");
    let err = expect_io_failure(
        &s,
        &config(&src, &target),
        (Role::Image, None),
        vec![Fault::new(
            FaultKind::ShortRead,
            l2 + 512..l2 + layout.cluster_size(),
        )],
        &src,
        "ended early",
    );
    assert!(err.to_string().contains("L2 table"), "{err}");
}

#[test]
fn eio_in_a_backing_file() {
    let s = Scratch::new();
    let base = source(&s);
    s.overlay("top.qcow2", "src.qcow2", "qcow2", None, "");
    let top = s.path("top.qcow2");
    let target = s.path("out.qcow2");
    expect_io_failure(
        &s,
        &config(&top, &target),
        (Role::Backing, Some(base.clone())),
        vec![Fault::new(FaultKind::ReadEio, 0x50000..u64::MAX)],
        &base,
        "Input/output error",
    );
}

#[test]
fn enospc_writing_the_target() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    let mut cfg = config(&src, &target);
    cfg.compression = None;
    let err = expect_io_failure(
        &s,
        &cfg,
        (Role::Target, None),
        vec![Fault::new(FaultKind::WriteNoSpace, MIB..u64::MAX)],
        &target,
        "no space left on the file system",
    );
    assert_says_needed_and_free(&err);
}

/// ENOSPC says what the backup needed, what it wrote and what is free,
/// in human sizes (binary units, as the progress bar shows them).
fn assert_says_needed_and_free(err: &BackupError) {
    let msg = err.to_string();
    assert!(
        msg.contains("needs up to 2.00 MiB (") && msg.contains(" was free there when it started"),
        "{msg}"
    );
    assert!(!msg.contains("2097152"), "raw byte count in: {msg}");
}

#[test]
fn enospc_writing_a_raw_target() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.raw");
    let mut cfg = config(&src, &target);
    cfg.target_format = Format::Raw;
    let err = expect_io_failure(
        &s,
        &cfg,
        (Role::Target, None),
        vec![Fault::new(FaultKind::WriteNoSpace, MIB..u64::MAX)],
        &target,
        "no space left on the file system",
    );
    assert_says_needed_and_free(&err);
}

#[test]
fn eio_on_the_final_sync() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    let err = expect_io_failure(
        &s,
        &config(&src, &target),
        (Role::Target, None),
        vec![Fault::new(FaultKind::SyncEio, 0..0)],
        &target,
        "Input/output error",
    );
    assert!(err.to_string().contains("cannot sync"), "{err}");
}

/// Runs `cfg` with the target's first sync failing (later ones succeed):
/// the backup must fail, saying it cannot sync.
fn sync_fails_once(s: &Scratch, cfg: &BackupConfig) {
    let err = expect_io_failure(
        s,
        cfg,
        (Role::Target, None),
        vec![Fault::new(FaultKind::SyncEioOnce, 0..0)],
        &cfg.target,
        "Input/output error",
    );
    assert!(err.to_string().contains("cannot sync"), "{err}");
}

/// A sync that fails once and then "succeeds" (Linux reports a failed
/// writeback once and may drop the pages): retrying it would turn lost
/// data into a good-looking backup, so `--on-target-error retry` does not
/// retry syncs. Regression test: the retry policy used to.
#[test]
fn a_failed_sync_is_not_retried() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    let cfg = BackupConfig {
        on_target_error: backup::policy::OnTargetError::Retry,
        ..config(&src, &target)
    };
    sync_fails_once(&s, &cfg);
}

/// The target is synced in the background while the copy runs (every
/// 64 MiB stored); when such a sync fails, the backup fails, even though
/// the final sync would report success.
#[test]
fn a_failed_background_sync_fails_the_backup() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 80 * MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x5a 0 80M"]);
    let target = s.path("out.qcow2");
    let cfg = BackupConfig {
        compression: None,
        ..config(&s.path("src.qcow2"), &target)
    };
    sync_fails_once(&s, &cfg);
}

/// A slow source still produces an exact backup (delays change timing, never
/// content).
#[test]
fn slow_reads_still_give_an_identical_backup() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    backup_with_faults(
        &config(&src, &target),
        Role::Image,
        None,
        vec![Fault::new(
            FaultKind::ReadDelay(Duration::from_millis(2)),
            0..u64::MAX,
        )],
    )
    .unwrap();
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
}

/// Without faults the same path works: the wrapper itself changes nothing.
#[test]
fn pass_through_wrapper_changes_nothing() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    backup_with_faults(&config(&src, &target), Role::Image, None, vec![]).unwrap();
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
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
fn fifo_as_source_fails_at_once() {
    let s = Scratch::new();
    mkfifo(&s.path("fifo"));
    let fifo = s.p("fifo");
    let out = s.p("out.qcow2");
    for args in [
        vec!["info", fifo.as_str()],
        vec!["map", "--output=json", fifo.as_str()],
        vec!["backup", fifo.as_str(), out.as_str()],
    ] {
        let run = qbackup_within(s.dir(), &args, Duration::from_secs(5));
        assert!(run.elapsed < Duration::from_secs(1), "{}", run.describe());
        run.assert_clean_failure(&[&fifo])
            .assert_clean_failure_mentioning(&["FIFO"]);
    }
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

#[test]
fn fifo_as_backing_file_fails_at_once() {
    let s = Scratch::new();
    mkfifo(&s.path("fifo"));
    // -u: qemu-img must not open the FIFO either.
    s.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "fifo",
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]);
    let top = s.p("top.qcow2");
    let out = s.p("out.qcow2");
    for args in [
        vec!["map", "--output=json", top.as_str()],
        vec!["backup", top.as_str(), out.as_str()],
    ] {
        let run = qbackup_within(s.dir(), &args, Duration::from_secs(5));
        assert!(run.elapsed < Duration::from_secs(1), "{}", run.describe());
        run.assert_clean_failure(&["fifo"])
            .assert_clean_failure_mentioning(&["FIFO"]);
    }
    assert!(!s.path("out.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// A backup that fails to become durable never clears the bitmap it was
/// made from: the source's bytes are untouched.
#[test]
fn failed_target_sync_keeps_the_bitmap() {
    let s = Scratch::new();
    let src = source(&s);
    // The cycle starts at a full backup that clears the bitmap (and records
    // that its generation starts there).
    s.img(&["bitmap", "--add", "src.qcow2", "bm0"]);
    s.backup(&["--bitmap", "bm0", "src.qcow2", "full.qcow2"])
        .assert_ok();
    s.io("src.qcow2", "qcow2", &["write -P 0x44 64k 64k"]);
    let before = std::fs::read(&src).unwrap();
    let target = s.path("inc.qcow2");
    let cfg = BackupConfig {
        sync: SyncMode::Incremental,
        bitmap: Some("bm0".into()),
        clear_bitmap: true,
        backing: Some(s.p("full.qcow2")),
        ..config(&src, &target)
    };
    let err = expect_io_failure(
        &s,
        &cfg,
        (Role::Target, None),
        vec![Fault::new(FaultKind::SyncEio, 0..0)],
        &target,
        "Input/output error",
    );
    assert!(err.to_string().contains("cannot sync"), "{err}");
    assert_eq!(std::fs::read(&src).unwrap(), before, "bitmap not cleared");
    // The same backup without the fault clears it.
    backup_with_faults(&cfg, Role::Target, None, vec![]).unwrap();
    assert_ne!(std::fs::read(&src).unwrap(), before, "bitmap cleared");
    assert_check_clean(s.dir(), "src.qcow2");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "inc.qcow2", "qcow2");
}

/// The host offset of guest offset `guest`'s data cluster in `src`.
fn host_of(src: &Path, guest: u64) -> u64 {
    let host = Layout::read(src).l2_entry(src, guest) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(host, 0, "guest {guest} is allocated");
    host
}

/// `--on-source-error retry`: a read that fails twice then works gives an
/// identical backup; `report` (the default) fails on the first error.
#[test]
fn transient_read_errors_are_retried() {
    let s = Scratch::new();
    let src = source(&s);
    let host = host_of(&src, MIB);
    let target = s.path("out.qcow2");
    let faults = vec![Fault::new(FaultKind::ReadEioFirst(2), host..host + 512)];
    let err =
        backup_with_faults(&config(&src, &target), Role::Image, None, faults.clone()).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Io, "{err}");
    assert!(!target.exists());
    let cfg = BackupConfig {
        on_source_error: backup::policy::OnSourceError::Retry,
        ..config(&src, &target)
    };
    backup_with_faults(&cfg, Role::Image, None, faults).unwrap();
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
}

/// `--on-target-error retry` with a sync that keeps failing: the backup
/// still fails, after its retries, with one line and nothing left behind
/// (that transient errors are retried is `storage::retry`'s unit test).
#[test]
fn target_errors_that_last_fail_after_the_retries() {
    let s = Scratch::new();
    let src = source(&s);
    let target = s.path("out.qcow2");
    let cfg = BackupConfig {
        on_target_error: backup::policy::OnTargetError::Retry,
        ..config(&src, &target)
    };
    // A sync that always fails still fails, after the retries.
    let err = backup_with_faults(
        &cfg,
        Role::Target,
        None,
        vec![Fault::new(FaultKind::SyncEio, 0..0)],
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot sync"), "{err}");
    assert!(!target.exists());
    assert_no_leftovers(s.dir());
}

/// `--on-source-error ignore`: a cluster that cannot be read is written as
/// zeros and reported as a guest range; everything else is copied.
#[test]
fn unreadable_clusters_are_zeroed_and_reported_when_ignored() {
    let s = Scratch::new();
    let src = source(&s);
    let host = host_of(&src, MIB);
    let target = s.path("out.qcow2");
    let cfg = BackupConfig {
        on_source_error: backup::policy::OnSourceError::Ignore,
        ..config(&src, &target)
    };
    let report = backup_with_faults(
        &cfg,
        Role::Image,
        None,
        vec![Fault::new(FaultKind::ReadEio, host..host + 512)],
    )
    .unwrap();
    assert_eq!(report.stats.unreadable, vec![(MIB, 64 * KIB)]);
    assert_check_clean(s.dir(), "out.qcow2");
    // The backup equals the source with that cluster zeroed.
    s.img(&["convert", "-O", "raw", "src.qcow2", "expected.raw"]);
    s.io("expected.raw", "raw", &["write -z 1M 64k"]);
    assert_identical(s.dir(), "expected.raw", "raw", "out.qcow2", "qcow2");
}
