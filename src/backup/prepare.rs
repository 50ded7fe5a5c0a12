//! The first phase of a backup: open the source, decide what runs, check
//! everything a backup checks before anything is read or written.
//!
//! Everything that can refuse the backup on the grounds of the request,
//! the source or the previous backup refuses it here: the source opened
//! (with the dirty bitmap, or the fallback to an incremental by content
//! when the bitmap cannot be used), images marked corrupt, TARGET being
//! one of the source's files or already existing, the previous backup or
//! backing file, the after-durable actions; then the plan's totals.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::open::{Opener, UpdatingOpener};
use qbackup_formats::qcow2::writer::BackingRef;
use qbackup_formats::storage::{Identity, Storage};
use qbackup_formats::{ClusterSize, Format};

use super::after::{self, AfterDurable};
use super::destination::{target_dir, TargetKind};
use super::{
    default_cluster_size, lineage, plan, record, BackupConfig, BackupError, Cancel, SyncMode,
};
use crate::manifest;
use crate::source::{self, ImageSource, Source, SourceChecks};

/// A backup ready to copy.
pub struct Prepared {
    /// The source, open.
    pub source: Box<ImageSource>,
    /// The sync mode that runs.
    pub mode: SyncMode,
    /// Why an incremental backup by bitmap fell back to one by content.
    pub fallback: Option<String>,
    /// Things the user should know, one line each.
    pub warnings: Vec<String>,
    /// The source's files before anything was read.
    pub before: Fingerprint,
    /// The backing file the target records.
    pub backing: Option<BackingRef>,
    /// What the previous backup's manifest gives this one.
    pub previous: record::Previous,
    /// Guest bytes planned (copied or zeroed), whole clusters.
    pub planned: u64,
    /// Guest bytes the plan reads.
    pub guest_bytes_read: u64,
    /// The after-durable actions, prepared.
    pub actions: Vec<Box<dyn AfterDurable>>,
    /// SOURCE is itself a backup (a manifest beside it) restored into a
    /// raw disk: the result is a disk, not a backup, and gets no manifest.
    pub restore: bool,
}

/// Prepares the backup `cfg` onto a TARGET of `kind`; see the module docs.
pub fn prepare(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    kind: TargetKind,
    mut actions: Vec<Box<dyn AfterDurable>>,
    cancel: &Cancel,
) -> Result<Prepared, BackupError> {
    let mut warnings = Vec::new();
    let Opened {
        source,
        mode,
        fallback,
        bitmap_usable,
    } = open_source(cfg, opener)?;
    if let Some(reason) = &fallback {
        let bitmap = if bitmap_usable && cfg.clear_bitmap {
            "clearing the bitmap once it is durable (its new generation starts at this backup)"
        } else {
            "leaving the bitmap as it is"
        };
        warnings.push(format!(
            "{reason}; taking the incremental backup by content instead (every cluster read, only those changed since the previous backup written), and {bitmap}"
        ));
    }
    for f in source.marked_corrupt() {
        if !cfg.allow_corrupt {
            return Err(BackupError::MarkedCorrupt(f));
        }
        warnings.push(format!(
            "{}: image is marked corrupt (QEMU found its metadata inconsistent); backing up what it reads, as asked",
            f.display()
        ));
    }
    let ctx = after::Context {
        source: source.as_ref(),
        mode,
        bitmap_usable,
    };
    for a in &mut actions {
        a.prepare(&ctx)?;
    }
    // Before anything is read: compared at the end.
    let before = source.fingerprint()?;
    refuse_target_in(cfg, &source.files())?;
    // Only now: a TARGET that is one of the source's files is refused for
    // that reason, which replacing it would not cure.
    if kind == (TargetKind::NewFile { exists: true }) && !cfg.force {
        return Err(BackupError::TargetExists(cfg.target.clone()));
    }
    let size = source.virtual_size();
    let backing = match mode {
        SyncMode::Top | SyncMode::Incremental | SyncMode::Changed
            if cfg.target_format == Format::Raw =>
        {
            return Err(BackupError::TopNeedsQcow2);
        }
        SyncMode::Top => backing_ref(cfg, opener, source.as_ref())?,
        SyncMode::Incremental | SyncMode::Changed => {
            Some(previous_backup(cfg, opener, source.as_ref())?)
        }
        SyncMode::Full => None,
    };
    // An incremental backup keeps the previous backup's cluster size, so
    // that its manifest lines up with the previous one.
    let chosen = match cfg.cluster_size {
        Some(bytes) => Some(ClusterSize::new(bytes).ok_or(BackupError::ClusterSize(bytes))?),
        None => None,
    };
    let previous = record::previous(
        cfg.backing.as_deref().map(Path::new),
        mode,
        chosen,
        default_cluster_size(source.as_ref()),
        size,
    )
    .map_err(|e| match (e, &fallback) {
        // Say first why the bitmap was not used: that is what to fix.
        (BackupError::PreviousHasNoManifest { path }, Some(reason)) => {
            BackupError::FallbackNeedsManifest {
                reason: reason.clone(),
                path,
            }
        }
        (e, _) => e,
    })?;
    // A first pass over the plan for its totals (the progress bar's and the
    // report's); the copier plans again as it goes, so the plan is never
    // held whole.
    let cluster_size = previous.cluster_size;
    let (mut planned, mut guest_bytes_read) = (0u64, 0u64);
    for r in plan::Planner::new(source.as_ref(), mode, cluster_size, cancel.flag()) {
        let r = r.map_err(|e| e.into_backup_error(cancel))?;
        planned += cluster_size.bytes_in(r.count);
        if r.action == plan::Action::Copy {
            let end = cluster_size.start_of(r.first + r.count).0.min(size);
            guest_bytes_read += end - cluster_size.start_of(r.first).0;
        }
    }
    let restore = cfg.target_format == Format::Raw
        && qbackup_formats::open::nbd_uri(&cfg.source).is_none()
        && manifest::path_for(&cfg.source).exists();
    Ok(Prepared {
        source,
        mode,
        fallback,
        warnings,
        before,
        backing,
        previous,
        planned,
        guest_bytes_read,
        actions,
        restore,
    })
}

/// An open source and what runs.
struct Opened {
    source: Box<ImageSource>,
    /// The sync mode that runs.
    mode: SyncMode,
    /// Why an incremental by bitmap runs by content instead.
    fallback: Option<String>,
    /// The requested bitmap can be used (see [`after::Context`]).
    bitmap_usable: bool,
}

/// Opens the source for `cfg` and decides the effective sync mode:
/// `--sync incremental` without a bitmap becomes [`SyncMode::Changed`]
/// (by content); so does one with a bitmap that cannot be used, or that
/// cannot be proven to have started at the previous backup or one of its
/// parents (see [`lineage`]), when `bitmap_fallback` allows it (with the
/// reason), else it is refused.
fn open_source(cfg: &BackupConfig, opener: &dyn Opener) -> Result<Opened, BackupError> {
    let plain = |o: &dyn Opener| source::open(o, &cfg.source, cfg.source_format, None);
    // Clearing the bitmap needs the source image to itself, from the
    // start: no VM may open it between the backup and the clearing.
    let updating = UpdatingOpener::new(opener);
    let source_opener: &dyn Opener = if cfg.clear_bitmap { &updating } else { opener };
    let (SyncMode::Incremental, Some(name)) = (cfg.sync, cfg.bitmap.as_deref()) else {
        let mode = match cfg.sync {
            SyncMode::Incremental => SyncMode::Changed,
            other => other,
        };
        return Ok(Opened {
            source: plain(source_opener)?,
            mode,
            fallback: None,
            bitmap_usable: true,
        });
    };
    let request = source::BitmapRequest {
        name,
        allow_disabled: cfg.allow_disabled_bitmap,
    };
    let source = match source::open(source_opener, &cfg.source, cfg.source_format, Some(request)) {
        Ok(s) => s,
        Err(e) if cfg.bitmap_fallback && e.is_unusable_bitmap() => {
            return Ok(Opened {
                source: plain(opener)?,
                mode: SyncMode::Changed,
                fallback: Some(e.to_string()),
                bitmap_usable: false,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let (mode, fallback) = match fits_previous(cfg, source.as_ref(), name) {
        Ok(()) => (SyncMode::Incremental, None),
        Err(m) if cfg.bitmap_fallback => (SyncMode::Changed, Some(m.to_string())),
        Err(m) => {
            return Err(BackupError::BitmapLineage {
                bitmap: name.to_string(),
                source: m,
            })
        }
    };
    Ok(Opened {
        source,
        mode,
        fallback,
        bitmap_usable: true,
    })
}

/// Checks that the generation of the image's bitmap `name` started at the
/// previous backup or one of its parents (see [`lineage`]). An NBD
/// export's bitmap belongs to its server, which vouches for it.
fn fits_previous(
    cfg: &BackupConfig,
    source: &dyn SourceChecks,
    name: &str,
) -> Result<(), lineage::Mismatch> {
    if qbackup_formats::open::nbd_uri(&cfg.source).is_some() {
        return Ok(());
    }
    let Some(prev) = cfg.backing.as_deref() else {
        // Refused later: an incremental needs the previous backup.
        return Ok(());
    };
    let Some(identity) = source.identity() else {
        return Err(lineage::Mismatch::Chain {
            why: format!("{}: its identity cannot be read", source.name().display()),
        });
    };
    let generation = lineage::generation(source.name(), identity, name)?;
    lineage::check_parent(Path::new(prev), name, &generation, identity)
}

/// Refuses a TARGET that is one of `files` (an image of the chain or an
/// external data file), by identity (device and inode) so that other
/// paths and hard links are caught too.
fn refuse_target_in(cfg: &BackupConfig, files: &[Arc<dyn Storage>]) -> Result<(), BackupError> {
    match same_file(&cfg.target, files) {
        Some(file) => Err(BackupError::TargetIsSource {
            target: cfg.target.clone(),
            file,
        }),
        None => Ok(()),
    }
}

/// The file of `files` that `path` is (by device and inode), if any.
fn same_file(path: &Path, files: &[Arc<dyn Storage>]) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let id = Identity {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    files
        .iter()
        .find(|f| f.identity() == Some(id))
        .map(|f| f.name().to_path_buf())
}

/// The name to record for the backing file so that it resolves from the
/// target's directory: relative to that directory (`base.qcow2`,
/// `../a/full.qcow2`, computed from canonical paths, which QEMU's
/// resolution from TARGET's directory follows) when both are on one file
/// system, so that a directory tree of backups can be moved; absolute
/// otherwise (a relative name across mount points breaks when either is
/// mounted elsewhere).
fn backing_name_for(target: &Path, backing: &Path) -> Result<String, std::io::Error> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::fs::canonicalize(backing)?;
    let dir = std::fs::canonicalize(target_dir(target))?;
    if let Ok(rel) = abs.strip_prefix(&dir) {
        return Ok(rel.display().to_string());
    }
    if std::fs::metadata(&abs)?.dev() != std::fs::metadata(&dir)?.dev() {
        return Ok(abs.display().to_string());
    }
    let (from, to): (Vec<_>, Vec<_>) = (dir.components().collect(), abs.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    Ok(rel.display().to_string())
}

/// The previous backup an incremental one is an overlay on: it must open
/// (with its whole chain), and is recorded by a name that resolves from
/// the target's directory.
fn previous_backup(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    source: &dyn SourceChecks,
) -> Result<BackingRef, BackupError> {
    let prev = cfg
        .backing
        .as_deref()
        .ok_or(BackupError::IncrementalNeedsBacking)?;
    // PREV being one of the source's own files would make an overlay on
    // the live disk, not a backup (and opening it would meet the source's
    // own lock).
    if let Some(file) = same_file(Path::new(prev), &source.files()) {
        return Err(BackupError::PreviousIsSource {
            prev: PathBuf::from(prev),
            file,
        });
    }
    let chain = qbackup_formats::Chain::open_with(opener, Path::new(prev), None)
        .map_err(BackupError::PreviousBackup)?;
    // Replacing PREV (or a file under it) with its own overlay would lose
    // the previous backup and make a chain that loops.
    refuse_target_in(cfg, &chain.files())?;
    if chain.top().format() != Format::Qcow2 {
        return Err(BackupError::PreviousNotQcow2 {
            path: PathBuf::from(prev),
            format: chain.top().format().name(),
        });
    }
    // A smaller PREV would make every clean cluster past its end read as
    // zeros; QEMU's backup job refuses a target of another size too.
    if chain.virtual_size() != source.virtual_size() {
        return Err(BackupError::PreviousSize {
            path: PathBuf::from(prev),
            prev: chain.virtual_size(),
            current: source.virtual_size(),
        });
    }
    let name = backing_name_for(&cfg.target, Path::new(prev)).map_err(|e| BackupError::Commit {
        path: cfg.target.clone(),
        action: "resolve the previous backup's name",
        source: e,
    })?;
    Ok(BackingRef {
        name,
        format: chain.top().format().name().to_string(),
    })
}

/// The backing file of a `--sync top` overlay: the source's, named to
/// resolve from the target's directory, or the name given with `--backing`,
/// which must then open from there (as `qemu-img create -b` checks), or the
/// overlay would be an image nothing can read, and have the virtual size of
/// the backing file it replaces, or the guest would see other data where
/// the shorter one ends. `--backing-unchecked` skips both checks, as
/// `qemu-img create -u` does.
fn backing_ref(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    source: &dyn SourceChecks,
) -> Result<Option<BackingRef>, BackupError> {
    let Some(below) = source.top_backing() else {
        // A name to record with nothing to record it for: refused, not
        // ignored (the user expects an overlay on it).
        return match &cfg.backing {
            Some(name) => Err(BackupError::NothingToRebase {
                image: source.name().to_path_buf(),
                backing: name.clone(),
            }),
            None => Ok(None),
        };
    };
    let name = match &cfg.backing {
        Some(b) if cfg.backing_unchecked => b.clone(),
        Some(b) => {
            let resolved = qbackup_formats::open::resolve_backing(&cfg.target, b);
            let chain = qbackup_formats::Chain::open_with(opener, &resolved, Some(below.format))
                .map_err(BackupError::BackingUnusable)?;
            if chain.virtual_size() != below.virtual_size {
                return Err(BackupError::BackingSize {
                    path: resolved,
                    found: chain.virtual_size(),
                    expected: below.virtual_size,
                });
            }
            b.clone()
        }
        None => backing_name_for(&cfg.target, &below.path).map_err(|e| BackupError::Commit {
            path: cfg.target.clone(),
            action: "resolve the backing file name",
            source: e,
        })?,
    };
    Ok(Some(BackingRef {
        name,
        format: below.format.name().to_string(),
    }))
}
