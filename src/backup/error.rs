//! The errors of a backup: one enum, each variant named after what
//! failed, displayed as one line that names the file concerned and says
//! its cause once, and classified for the exit status.

use std::path::PathBuf;

use qbackup_formats::codec::CodecError;
use qbackup_formats::error::io_text;
use qbackup_formats::{Classify, ClusterIndex, ErrorClass, Remedy};

use super::cancel;
use super::target::TargetError;
use crate::source::SourceError;

/// Errors of a backup. Each displays as one line that names the file
/// concerned and says its cause once.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The source could not be opened or planned.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A cluster could not be read from the source.
    #[error("{source} (while copying cluster {index})")]
    ReadCluster {
        /// The target cluster being copied.
        index: ClusterIndex,
        /// Why.
        source: SourceError,
    },
    /// The target could not be written (the path is attached by
    /// [`BackupError::Target`]).
    #[error(transparent)]
    Write(TargetError),
    /// A write error with the target path attached.
    #[error("{}: {source}", path.display())]
    Target {
        /// The target path.
        path: PathBuf,
        /// Why.
        source: Box<BackupError>,
    },
    /// Creating, syncing or renaming the target file failed.
    #[error("{}: cannot {action}: {}", path.display(), io_text(source))]
    Commit {
        /// The target path.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The target exists and `--force` was not given.
    #[error("{}: target already exists", .0.display())]
    TargetExists(PathBuf),
    /// TARGET is a directory.
    #[error("{}: target is a directory; name the backup file to create in it", .0.display())]
    TargetIsDirectory(PathBuf),
    /// TARGET is a block device and `-n` was not given.
    #[error("{}: target is a block device, which a backup never replaces; a restore onto it writes it in place, as raw bytes", .0.display())]
    TargetIsDevice(PathBuf),
    /// TARGET is a character device, a FIFO or a socket.
    #[error("{}: target is {what}; a backup goes to a new file, or in place into a block device", path.display())]
    TargetUnsupported {
        /// The target path.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// `-n` with a TARGET that is not an existing block device.
    #[error("{}: writing in place needs an existing block device, and this is not one", .0.display())]
    InPlaceNeedsDevice(PathBuf),
    /// The device is smaller than the virtual size.
    #[error("{}: the device holds {}, smaller than the image's virtual size of {}", path.display(), human(*device), human(*needed))]
    DeviceTooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        device: u64,
        /// The virtual size.
        needed: u64,
    },
    /// The target is one of the files the source reads.
    #[error("{}: target is {}, which the source reads", target.display(), file.display())]
    TargetIsSource {
        /// The target path.
        target: PathBuf,
        /// The source file it is.
        file: PathBuf,
    },
    /// The previous backup named is one of the source's own files.
    #[error("{}: the previous backup is {}, which the source reads: an incremental backup is an overlay on an earlier backup, not on the disk itself", prev.display(), file.display())]
    PreviousIsSource {
        /// PREV as named.
        prev: PathBuf,
        /// The source file it is.
        file: PathBuf,
    },
    /// The requested cluster size is not one qcow2 allows.
    #[error("cluster size {0} must be a power of two from 512 to 2M")]
    ClusterSize(u64),
    /// `--sync top` or `incremental` with a raw target.
    #[error(
        "top-layer and incremental backups need a qcow2 target: a raw file cannot refer to a backing file"
    )]
    TopNeedsQcow2,
    /// `--sync incremental` without the previous backup.
    #[error("an incremental backup needs the previous backup, which the new one is an overlay on")]
    IncrementalNeedsBacking,
    /// The previous backup of an incremental backup cannot be used.
    #[error(transparent)]
    PreviousBackup(SourceError),
    /// The target's file system filled up.
    #[error("{}: no space left on the file system: the backup needs up to {} (its guest data before compression, plus metadata) and had written {} when the file system filled up; {} was free there when it started", path.display(), human(*planned), human(*written), human(*free))]
    NoSpace {
        /// The target.
        path: PathBuf,
        /// Guest bytes planned.
        planned: u64,
        /// Bytes written to the temporary file so far.
        written: u64,
        /// Bytes free for an unprivileged user on the target's file system
        /// when the backup started.
        free: u64,
        /// The write or sync that failed.
        source: Box<BackupError>,
    },
    /// An image of the source carries the corrupt bit.
    #[error("{}: image is marked corrupt (QEMU found its metadata inconsistent); run 'qemu-img check -r all' on a copy first", .0.display())]
    MarkedCorrupt(PathBuf),
    /// The previous backup is not a qcow2 image.
    #[error("the previous backup {} is a {format} image, not a qcow2 backup; an incremental backup is an overlay on the previous qcow2 backup (full or incremental)", path.display())]
    PreviousNotQcow2 {
        /// PREV.
        path: PathBuf,
        /// Its format.
        format: &'static str,
    },
    /// The previous backup's manifest is of another disk or cluster size.
    #[error("{}: the previous backup's manifest records {cluster_size}-byte clusters, this backup uses {wanted}-byte clusters (an incremental backup by content needs the same)", path.display())]
    PreviousManifestMismatch {
        /// PREV's manifest.
        path: PathBuf,
        /// Its cluster size.
        cluster_size: u64,
        /// This backup's.
        wanted: u64,
    },
    /// An incremental backup by content needs the previous backup's
    /// manifest.
    #[error("{}: no manifest beside the previous backup; an incremental backup without a dirty bitmap compares each cluster with the previous backup's manifest (take a full backup first)", path.display())]
    PreviousHasNoManifest {
        /// The manifest path looked for.
        path: PathBuf,
    },
    /// An incremental by bitmap fell back to one by content, which needs
    /// the previous backup's manifest, and there is none.
    #[error("{reason}; the incremental backup by content this falls back to compares each cluster with the previous backup's manifest, and {} is missing (fix the bitmap, or take a full backup)", path.display())]
    FallbackNeedsManifest {
        /// Why the bitmap was not used.
        reason: String,
        /// The manifest looked for.
        path: PathBuf,
    },
    /// A manifest could not be read or written.
    #[error(transparent)]
    Manifest(crate::manifest::ManifestError),
    /// The previous backup's virtual size differs from the source's.
    #[error("{}: the previous backup is {prev} bytes but the source is {current}; an incremental backup needs a previous backup of the same disk size", path.display())]
    PreviousSize {
        /// PREV.
        path: PathBuf,
        /// PREV's virtual size.
        prev: u64,
        /// The source's.
        current: u64,
    },
    /// The backing file named with `--backing` does not open from the
    /// target's directory.
    #[error("{0} (the backing file to record)")]
    BackingUnusable(SourceError),
    /// The backing file named with `--backing` is not the size of the one
    /// it replaces: the overlay would read other data past the shorter end.
    #[error("{}: this backing file is {found} bytes but the source's is {expected}; the overlay needs a backing file of the same size", path.display())]
    BackingSize {
        /// The resolved backing path.
        path: PathBuf,
        /// Its virtual size.
        found: u64,
        /// The virtual size of the source's backing file.
        expected: u64,
    },
    /// A backing file name was given for an overlay of a source that has
    /// no backing file: there is nothing to record it for.
    #[error("{}: this image has no backing file, so a top-layer backup of it is a full backup with no backing file to name; '{backing}' would not be recorded", image.display())]
    NothingToRebase {
        /// The source.
        image: PathBuf,
        /// The name given.
        backing: String,
    },
    /// An incremental backup by bitmap cannot be proven to fit the
    /// previous backup, and no fallback was allowed.
    #[error("cannot take an incremental backup by dirty bitmap '{bitmap}': {source}")]
    BitmapLineage {
        /// The bitmap.
        bitmap: String,
        /// Why.
        source: super::lineage::Mismatch,
    },
    /// The backup is durable, but the bitmap's new generation could not be
    /// recorded (so the bitmap was left as it is).
    #[error("{}: the backup is complete, but the dirty bitmap's new generation cannot be recorded in {}, so the bitmap was left as it is: {}", target.display(), record.display(), io_text(source))]
    RecordGeneration {
        /// The (complete) target.
        target: PathBuf,
        /// The record beside the source image.
        record: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The worker pool could not be started.
    #[error("cannot start worker threads: {source}")]
    StartThreads {
        /// Why.
        source: rayon::ThreadPoolBuildError,
    },
    /// Compressing a cluster failed.
    #[error("cluster {index}: {source}")]
    Compress {
        /// The target cluster.
        index: ClusterIndex,
        /// Why.
        source: CodecError,
    },
    /// A file of the source changed while it was read: the backup would mix
    /// two states of the disk.
    #[error("{}: source changed during backup; nothing was written to the target", .0.display())]
    SourceChanged(PathBuf),
    /// A sync of the target made while the copy ran failed; the caller
    /// names the target ([`BackupError::Commit`]).
    #[error("cannot sync: {}", io_text(source))]
    EarlySync {
        /// Why.
        source: std::io::Error,
    },
    /// A bug: a worker panicked.
    #[error("internal error: worker failed on cluster {index}")]
    WorkerPanicked {
        /// The cluster it was working on.
        index: ClusterIndex,
    },
    /// A bug: the writer panicked.
    #[error("internal error: writer failed")]
    WriterPanicked,
    /// A bug: planning panicked.
    #[error("internal error: planning failed")]
    PlannerPanicked,
    /// A signal (SIGINT, SIGTERM, SIGHUP) or another stop request.
    #[error("interrupted{}; nothing was written to the target", if *signal == 0 { String::new() } else { format!(" by {}", cancel::signal_name(*signal)) })]
    Interrupted {
        /// The signal number, 0 when the stop did not come from a signal.
        signal: i32,
    },
    /// The backup is durable at its path, but clearing the source's dirty
    /// bitmap failed.
    #[error("{}: the backup is complete, but {source}", target.display())]
    ClearBitmap {
        /// The (complete) target.
        target: PathBuf,
        /// Why clearing failed (boxed: rare, and large).
        source: Box<SourceError>,
    },
}

impl Classify for BackupError {
    fn class(&self) -> ErrorClass {
        match self {
            BackupError::Source(e) | BackupError::ReadCluster { source: e, .. } => e.class(),
            BackupError::Write(e) => e.class(),
            BackupError::Target { source, .. } => source.class(),
            BackupError::Commit { source, .. } | BackupError::EarlySync { source } => {
                ErrorClass::of_io(source)
            }
            BackupError::TargetExists(_)
            | BackupError::TargetIsDirectory(_)
            | BackupError::TargetIsDevice(_)
            | BackupError::TargetUnsupported { .. }
            | BackupError::InPlaceNeedsDevice(_)
            | BackupError::DeviceTooSmall { .. }
            | BackupError::TargetIsSource { .. }
            | BackupError::PreviousIsSource { .. }
            | BackupError::ClusterSize(_)
            | BackupError::TopNeedsQcow2
            | BackupError::IncrementalNeedsBacking
            | BackupError::PreviousNotQcow2 { .. }
            | BackupError::PreviousManifestMismatch { .. }
            | BackupError::PreviousHasNoManifest { .. }
            | BackupError::FallbackNeedsManifest { .. }
            | BackupError::PreviousSize { .. }
            | BackupError::BackingSize { .. }
            | BackupError::NothingToRebase { .. }
            | BackupError::BitmapLineage { .. } => ErrorClass::Usage,
            BackupError::RecordGeneration { source, .. } => ErrorClass::of_io(source),
            BackupError::Manifest(e) => e.class(),
            BackupError::MarkedCorrupt(_) => ErrorClass::Corrupt,
            BackupError::NoSpace { .. } => ErrorClass::Io,
            BackupError::PreviousBackup(e) | BackupError::BackingUnusable(e) => e.class(),
            BackupError::StartThreads { .. } | BackupError::SourceChanged(_) => ErrorClass::Io,
            BackupError::Compress { source, .. } => source.class(),
            BackupError::WorkerPanicked { .. }
            | BackupError::WriterPanicked
            | BackupError::PlannerPanicked => ErrorClass::Internal,
            BackupError::Interrupted { .. } => ErrorClass::Interrupted,
            BackupError::ClearBitmap { source, .. } => source.class(),
        }
    }

    /// What the user can do about it (the CLI names its option).
    fn remedy(&self) -> Option<Remedy> {
        match self {
            BackupError::Source(e)
            | BackupError::ReadCluster { source: e, .. }
            | BackupError::PreviousBackup(e)
            | BackupError::BackingUnusable(e) => e.remedy(),
            BackupError::ClearBitmap { source, .. } => source.remedy(),
            BackupError::Target { source, .. } | BackupError::NoSpace { source, .. } => {
                source.remedy()
            }
            BackupError::TargetExists(_) => Some(Remedy::ReplaceTarget),
            BackupError::TargetIsDevice(_) => Some(Remedy::WriteInPlace),
            BackupError::MarkedCorrupt(_) => Some(Remedy::AllowCorrupt),
            BackupError::PreviousManifestMismatch { cluster_size, .. } => {
                Some(Remedy::ClusterSize(*cluster_size))
            }
            BackupError::BackingSize { .. } => Some(Remedy::RecordBackingUnchecked),
            _ => None,
        }
    }
}

impl BackupError {
    /// The signal that interrupted the backup, if that is what happened
    /// (a shell's exit status for it is 128 + the number).
    pub fn signal(&self) -> Option<i32> {
        match self {
            BackupError::Interrupted { signal } if *signal > 0 => Some(*signal),
            BackupError::Target { source, .. } => source.signal(),
            _ => None,
        }
    }
}

/// A size for messages: binary units ("1.50 GiB"), as the progress bar
/// and the result line show them.
fn human(bytes: u64) -> indicatif::BinaryBytes {
    indicatif::BinaryBytes(bytes)
}

/// True when an ENOSPC is somewhere in `e`'s chain of causes.
pub fn caused_by_enospc(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
