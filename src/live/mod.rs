//! Backing up a running VM in one command: qbackup drives QEMU over QMP.
//!
//! One cycle ([`cycle::run`]): repair what a killed run left (its
//! [`journal`]); pick the disks ([`disks`]) and each one's mode
//! ([`plan`]); reserve the fleecing files; freeze every disk at one point
//! in one QMP transaction, rotating each disk's dirty bitmap in the same
//! transaction ([`fleece`]); pull each disk's frozen view over a private
//! NBD socket with the ordinary backup (`crate::backup::run`) into the
//! backup set ([`crate::set`]); and commit only when every disk's backup
//! is durable. On any failure the frozen bitmaps are merged back into the
//! recording ones, this cycle's backup files are removed, and everything
//! qbackup added to QEMU is removed: no guest write is ever lost from
//! the bitmaps, and QEMU is left as it was.
//!
//! Every name qbackup adds to QEMU starts with `qbackup-`: nodes, jobs and
//! exports `qbackup-TOKEN-...` (TOKEN per run), bitmaps
//! [`BITMAP_PREFIX`]`ID` where ID is the backup whose freeze point the
//! bitmap records from.
//!
//! [`libvirt`] (cargo feature `libvirt`) is the second front end: a
//! libvirt domain frozen and exported by libvirt's pull-mode backup API,
//! with checkpoints in place of QMP bitmaps, pulled into the same set.

pub mod cycle;
pub mod disks;
pub mod fleece;
pub mod journal;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod plan;
pub mod qmp;

pub use cycle::{run, DiskReport, LiveReport, LiveRequest};
pub use plan::LiveSync;

use std::path::PathBuf;

/// Bitmaps qbackup keeps in QEMU: `qbackup-` and the id of the backup they
/// record from.
pub const BITMAP_PREFIX: &str = "qbackup-";

/// Why a live backup failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Talking to QEMU failed or QEMU refused a step.
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    /// The journal of a cycle could not be read or written.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The set could not be read.
    #[error(transparent)]
    Set(#[from] crate::set::SetError),
    /// A disk's backup failed.
    #[error("disk {disk}: {source}")]
    Backup {
        /// The disk.
        disk: String,
        /// Why.
        source: Box<crate::backup::BackupError>,
    },
    /// The backup options do not go together for a disk's backup.
    #[error("disk {disk}: {source}")]
    Request {
        /// The disk.
        disk: String,
        /// Why.
        source: crate::backup::RequestError,
    },
    /// A disk named with `--disk` is not one of the VM's.
    #[error("{socket}: the VM has no writable disk {name} (its disks: {known})")]
    NoSuchDisk {
        /// The QMP socket.
        socket: String,
        /// The name asked for.
        name: String,
        /// The disks it has.
        known: String,
    },
    /// The VM has no disk to back up.
    #[error("{0}: the VM has no writable, non-removable disk")]
    NoDisks(String),
    /// An incremental backup was asked for a disk without a backup.
    #[error(
        "disk {0}: an incremental backup needs a previous backup in the set, and there is none"
    )]
    NoPrevious(String),
    /// The scratch directory cannot hold the fleecing images.
    #[error("{}: cannot reserve {bytes} bytes for the fleecing image of disk {disk} (it must hold every cluster the guest may overwrite during the backup, up to the disk's size): {}", path.display(), qbackup_formats::error::io_text(source))]
    Reserve {
        /// The fleecing file.
        path: PathBuf,
        /// The disk.
        disk: String,
        /// Its size.
        bytes: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A file or directory of the cycle could not be made or removed.
    #[error("{}: cannot {action}: {}", path.display(), qbackup_formats::error::io_text(source))]
    File {
        /// The path.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The cycle failed, and undoing it in QEMU failed too.
    #[error("{error}; undoing the backup in QEMU also failed: {undo} (the next run repairs it from {})", journal.display())]
    Undo {
        /// The first failure.
        error: Box<LiveError>,
        /// The undo's failure.
        undo: Box<LiveError>,
        /// The journal left for the next run.
        journal: PathBuf,
    },
}

impl qbackup_formats::Classify for LiveError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        use qbackup_formats::ErrorClass;
        match self {
            LiveError::Qmp(e) => e.class(),
            LiveError::Journal(e) => e.class(),
            LiveError::Set(e) => e.class(),
            LiveError::Backup { source, .. } => source.class(),
            LiveError::Request { source, .. } => source.class(),
            LiveError::NoSuchDisk { .. } | LiveError::NoPrevious(_) => ErrorClass::Usage,
            LiveError::NoDisks(_) => ErrorClass::Unsupported,
            LiveError::Reserve { source, .. } | LiveError::File { source, .. } => {
                ErrorClass::of_io(source)
            }
            LiveError::Undo { error, .. } => error.class(),
        }
    }
}

/// Test hook: when `QBACKUP_TEST_HOLD` names `step`, print it and wait to
/// be killed, so tests can `kill -9` qbackup at an exact step of a cycle.
pub(crate) fn hold(step: &str) {
    if std::env::var("QBACKUP_TEST_HOLD").is_ok_and(|s| s == step) {
        eprintln!("qbackup: test hold at {step}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}
