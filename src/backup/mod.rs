//! `qbackup backup`: copy an image (or the top layer of its chain) into a
//! compact qcow2 or sparse raw target.
//!
//! Safety invariants: the source is opened read-only, except when its
//! dirty bitmap is to be cleared (then it is opened for update, with
//! QEMU's write locks, and only the bitmap is written, after the target is
//! durable under its name); the target is built in
//! a temporary file beside TARGET, written through the storage seam, synced,
//! then renamed over TARGET in one step. On any error or interruption the
//! temporary file is removed and nothing appears at TARGET.

pub mod budget;
pub mod cancel;
pub mod copier;
pub mod device;
mod early_sync;
mod error;
pub mod ordered;
pub mod plan;
pub mod policy;
pub mod record;
pub mod target;
pub mod temp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbackup_formats::codec::CompressionType;
use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::open::{Opener, UpdatingOpener};
use qbackup_formats::qcow2::writer::{BackingRef, Qcow2Writer, WriterOptions};
use qbackup_formats::storage::{FileStorage, Identity, Storage};
use qbackup_formats::{ClusterSize, Format};

pub use cancel::Cancel;
pub use copier::{CopyStats, Progress};
pub use error::BackupError;
pub use plan::SyncMode;
use target::{Qcow2Target, RawTarget, Target, TargetError};

use crate::source::{self, Source, SourceChecks};

/// A validated backup request.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The image to back up.
    pub source: PathBuf,
    /// Its format, or probe.
    pub source_format: Option<Format>,
    /// Where the backup goes.
    pub target: PathBuf,
    /// qcow2 or raw.
    pub target_format: Format,
    /// full, top or incremental.
    pub sync: SyncMode,
    /// The source's dirty bitmap: what an incremental backup copies, and
    /// what `clear_bitmap` clears.
    pub bitmap: Option<String>,
    /// Clear `bitmap` in the source once the backup is durable (QEMU's
    /// bitmap-mode on-success); the source is then opened for update.
    pub clear_bitmap: bool,
    /// Accept a disabled bitmap for an incremental backup.
    pub allow_disabled_bitmap: bool,
    /// When `bitmap` cannot be used (missing, in use, disabled, invalid),
    /// take the incremental backup by content instead, with a warning.
    pub bitmap_fallback: bool,
    /// Write no manifest beside the target (then it cannot be verified,
    /// nor serve as the previous backup of an incremental by content).
    pub no_manifest: bool,
    /// Back up a source QEMU marked corrupt (with a warning) instead of
    /// refusing it.
    pub allow_corrupt: bool,
    /// What a failed read of the source does.
    pub on_source_error: policy::OnSourceError,
    /// What a failed write of the target does.
    pub on_target_error: policy::OnTargetError,
    /// Codec and level, or no compression.
    pub compression: Option<(CompressionType, i32)>,
    /// Target cluster size; `None` for QEMU's rule.
    pub cluster_size: Option<u64>,
    /// Worker threads.
    pub threads: usize,
    /// Rate limit in bytes per second.
    pub speed: Option<u64>,
    /// Replace an existing target.
    pub force: bool,
    /// TARGET is an existing block device, written in place (a restore;
    /// raw targets only). See `device.rs`.
    pub in_place: bool,
    /// Recompress clusters that could be copied as they are.
    pub recompress: bool,
    /// `--sync top`: the backing file name to record (overrides the
    /// default). `--sync incremental`: the previous backup, which becomes
    /// the target's backing file.
    pub backing: Option<String>,
    /// `--sync top --backing NAME`: record NAME without opening it (like
    /// `qemu-img create -u`); the caller vouches that it will resolve to
    /// the right image.
    pub backing_unchecked: bool,
}

/// What a finished backup did (the CLI formats it).
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The source's virtual size.
    pub virtual_size: u64,
    /// Target cluster size.
    pub cluster_size: ClusterSize,
    /// When the source's dirty bitmap was cleared: how many of its data
    /// clusters were freed.
    pub bitmap_cleared: Option<u64>,
    /// The manifest written beside the target.
    pub manifest: Option<PathBuf>,
    /// Things the user should know although the backup succeeded (one
    /// line each), such as a fallback from an unusable bitmap.
    pub warnings: Vec<String>,
    /// Guest bytes planned (copied or zeroed), whole clusters.
    pub planned_bytes: u64,
    /// Guest bytes read from the source: the clusters planned for copying,
    /// up to the disk's end (those found to be all zeros included).
    pub guest_bytes_read: u64,
    /// What the copier stored, cluster by cluster.
    pub stats: CopyStats,
    /// The target's size once finished and synced (the file's length).
    pub target_size: u64,
    /// Wall time from opening the source to the target in place.
    pub elapsed: Duration,
}

/// The warning for damage that does not change what the guest reads.
pub fn harmless_damage_text(what: &str) -> String {
    format!("{what}; the guest data does not depend on them and was read as QEMU reads it (qemu-img check -r all repairs them)")
}

/// QEMU's backup rule: 64 KiB, or the source's cluster size when larger.
pub fn default_cluster_size(source: &dyn Source) -> ClusterSize {
    let min = ClusterSize::new(64 << 10).expect("64 KiB is a cluster size");
    source.cluster_size().map_or(min, |c| c.max(min))
}

/// The directory TARGET will be created in ("." for a bare file name).
fn target_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The name to record for the backing file so that it resolves from the
/// target's directory: a relative name below that directory, else absolute.
fn backing_name_for(target: &Path, backing: &Path) -> Result<String, std::io::Error> {
    let abs = std::fs::canonicalize(backing)?;
    let dir = std::fs::canonicalize(target_dir(target))?;
    Ok(match abs.strip_prefix(&dir) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => abs.display().to_string(),
    })
}

/// Runs a backup, opening files through `opener`. `cancel` is polled in
/// every phase; once it is set the backup stops and leaves nothing behind.
pub fn run(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &Cancel,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let policy = policy::PolicyOpener::new(opener, cfg.on_source_error, cfg.on_target_error);
    let opener: &dyn Opener = &policy;
    // What TARGET is decides before any work (a directory fails at once).
    let kind = device::check_target(cfg)?;
    let mut warnings = Vec::new();
    let (source, mode, clear_bitmap) = open_source(cfg, opener, &mut warnings)?;
    let source: &source::ImageSource = source.as_ref();
    for f in source.marked_corrupt() {
        if !cfg.allow_corrupt {
            return Err(BackupError::MarkedCorrupt(f));
        }
        warnings.push(format!(
            "{}: image is marked corrupt (QEMU found its metadata inconsistent); backing up what it reads, as --allow-corrupt asks",
            f.display()
        ));
    }
    let clear = match (&cfg.bitmap, clear_bitmap) {
        (Some(name), true) => Some(source.prepare_bitmap_clear(name)?),
        _ => None,
    };
    // Before anything is read: compared at the end (see `verify_unchanged`).
    let before = source.fingerprint()?;
    let target_err = |e: BackupError| BackupError::Target {
        path: cfg.target.clone(),
        source: Box::new(e),
    };
    let commit_err = |action, source| BackupError::Commit {
        path: cfg.target.clone(),
        action,
        source,
    };
    refuse_target_in_source(cfg, source)?;
    let size = source.virtual_size();
    let backing = match mode {
        SyncMode::Top | SyncMode::Incremental | SyncMode::Changed
            if cfg.target_format == Format::Raw =>
        {
            return Err(BackupError::TopNeedsQcow2);
        }
        SyncMode::Top => backing_ref(cfg, opener, source)?,
        SyncMode::Incremental | SyncMode::Changed => Some(previous_backup(cfg, opener, source)?),
        SyncMode::Full => None,
    };
    // An incremental backup keeps the previous backup's cluster size, so
    // that its manifest lines up with the previous one.
    let chosen = match cfg.cluster_size {
        Some(bytes) => Some(ClusterSize::new(bytes).ok_or(BackupError::ClusterSize(bytes))?),
        None => None,
    };
    let record::Previous {
        cluster_size,
        gaps: previous,
        parent_digest,
        skip_unchanged,
    } = record::previous(
        cfg.backing.as_deref().map(Path::new),
        mode,
        chosen,
        default_cluster_size(source),
        size,
    )?;

    // A first pass over the plan for its totals (the progress bar's and the
    // report's); the copier plans again as it goes, so the plan is never
    // held whole.
    let (mut planned, mut guest_bytes_read) = (0u64, 0u64);
    for r in plan::Planner::new(source, mode, cluster_size, cancel.flag()) {
        let r = r.map_err(|e| e.into_backup_error(cancel))?;
        planned += cluster_size.bytes_in(r.count);
        if r.action == plan::Action::Copy {
            let end = cluster_size.start_of(r.first + r.count).0.min(size);
            guest_bytes_read += end - cluster_size.start_of(r.first).0;
        }
    }
    on_plan(planned);

    let dir = target_dir(&cfg.target);
    let (tmp, storage) = if kind == device::TargetKind::Device {
        (None, device::open(&cfg.target, size)?)
    } else {
        let (tmp, storage) = create_temporary(cfg, &dir, progress)?;
        (Some(tmp), storage)
    };
    // Registered until the backup ends, for a signal thread that cannot
    // wait for it to unwind.
    if let Some(t) = &tmp {
        cancel.set_temp(Some(t.path()));
    }
    let _registered = TempRegistration(cancel);
    let storage = opener.target(storage);
    let compression = match cfg.target_format {
        Format::Qcow2 => cfg.compression,
        Format::Raw => None,
    };
    // A restore onto a device writes no manifest: nothing is created
    // beside a device node.
    let mut recorder = if cfg.no_manifest || tmp.is_none() {
        None
    } else {
        Some(record::start(
            cfg,
            source,
            &dir,
            record::About {
                mode,
                cluster_size,
                backing: backing.as_ref().map(|b| b.name.as_str()),
                previous,
                parent_digest,
            },
        )?)
    };
    if let Some(r) = &recorder {
        cancel.set_temp(Some(r.temp_path()));
    }
    let target: Box<dyn Target> = match cfg.target_format {
        Format::Qcow2 => {
            let opts = WriterOptions {
                virtual_size: size,
                cluster_bits: cluster_size.bits(),
                compression: compression.map(|c| c.0).unwrap_or(CompressionType::Zlib),
                backing,
            };
            let w = Qcow2Writer::new(Arc::clone(&storage), opts)
                .map_err(|e| target_err(BackupError::Write(TargetError::Qcow2(e))))?;
            Box::new(Qcow2Target::new(w, Arc::clone(&storage)))
        }
        Format::Raw => Box::new(RawTarget::new(
            Arc::clone(&storage),
            size,
            cluster_size,
            tmp.is_none(),
        )),
    };
    let params = copier::CopyParams {
        threads: cfg.threads.max(1),
        cluster_size,
        compression,
        passthrough: !cfg.recompress,
        ignore_read_errors: cfg.on_source_error == policy::OnSourceError::Ignore,
        speed: cfg.speed,
        virtual_size: size,
    };
    let recording = copier::Recording {
        builder: recorder.as_mut().map(|r| &mut r.builder),
        skip_unchanged,
    };
    // ENOSPC says how much was needed and how much is free.
    let no_space = |e: BackupError| {
        if !error::caused_by_enospc(&e) {
            return e;
        }
        BackupError::NoSpace {
            path: cfg.target.clone(),
            planned,
            written: storage.len(),
            free: rustix::fs::statvfs(&dir).map_or(0, |v| v.f_bavail * v.f_frsize),
            source: Box::new(e),
        }
    };
    let ranges = plan::Planner::new(source, mode, cluster_size, cancel.flag());
    let stats =
        copier::copy(source, ranges, params, target, recording, progress, cancel).map_err(|e| {
            match e {
                BackupError::Write(_) => no_space(target_err(e)),
                BackupError::EarlySync { source } => no_space(commit_err("sync", source)),
                other => other,
            }
        })?;
    let manifest = recorder.map(record::Recorder::finish).transpose()?;
    storage
        .sync()
        .map_err(|e| no_space(commit_err("sync", e)))?;
    // A signal during the sync: stop before anything appears at TARGET.
    if cancel.is_set() {
        return Err(cancel.error());
    }
    verify_unchanged(source, &before)?;
    if cfg.target_format == Format::Qcow2 {
        // Only a complete, durable image gets the magic (see temp.rs).
        Qcow2Writer::seal(storage.as_ref())
            .map_err(|e| target_err(BackupError::Write(TargetError::Qcow2(e))))?;
        storage.sync().map_err(|e| commit_err("sync", e))?;
    }
    let target_size = storage.len();
    drop(storage);
    let manifest = match tmp {
        Some(tmp) => {
            // The rename and a signal thread giving up on the backup
            // exclude each other: either TARGET is complete, or the
            // temporary file is removed.
            let persisted = cancel
                .commit(|| {
                    if cfg.force {
                        tmp.persist(&cfg.target)
                    } else {
                        tmp.persist_noclobber(&cfg.target)
                    }
                })
                .ok_or_else(|| cancel.error())?;
            persisted.map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    BackupError::TargetExists(cfg.target.clone())
                } else {
                    commit_err("rename the temporary file into place", e.error)
                }
            })?;
            let manifest = manifest.map(|m| m.place(&cfg.target)).transpose()?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            manifest
        }
        // A device is written in place: there is nothing to rename.
        None => None,
    };
    // Only now, with the backup durable under its name, may the bits it
    // covers be dropped (a crash before this point leaves them set).
    let bitmap_cleared = match clear {
        Some(c) => Some(c.commit().map_err(|source| BackupError::ClearBitmap {
            target: cfg.target.clone(),
            source: Box::new(source),
        })?),
        None => None,
    };
    for (f, what) in source.harmless_damage() {
        warnings.push(format!("{}: {}", f.display(), harmless_damage_text(&what)));
    }
    Ok(BackupReport {
        virtual_size: size,
        cluster_size,
        bitmap_cleared,
        manifest,
        warnings,
        planned_bytes: planned,
        guest_bytes_read,
        stats,
        target_size,
        elapsed: started.elapsed(),
    })
}

/// Creates the temporary file the backup is built in, beside TARGET in
/// `dir`, with the usual permissions, as writable storage.
fn create_temporary(
    cfg: &BackupConfig,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<(tempfile::NamedTempFile, Arc<dyn Storage>), BackupError> {
    let commit_err = |action, source| BackupError::Commit {
        path: cfg.target.clone(),
        action,
        source,
    };
    // Say what is wrong with the directory itself, not with a temporary
    // name inside it (only its existence: writing needs no read permission).
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            let e = std::io::Error::from(std::io::ErrorKind::NotADirectory);
            return Err(commit_err("use its directory", e));
        }
        Err(e) => return Err(commit_err("use its directory", e)),
    }
    // Leftovers of killed backups go first (see temp.rs), then ours,
    // locked for as long as it exists.
    for r in temp::remove_stale(dir) {
        progress.removed_leftover(&r.path, r.bytes);
    }
    let tmp =
        temp::create(dir).map_err(|e| commit_err("create a temporary file in its directory", e))?;
    set_backup_permissions(tmp.path())
        .map_err(|e| commit_err("set permissions on the temporary file", e))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| commit_err("open the temporary file", e))?;
    let storage = FileStorage::writable(file, tmp.path()).map_err(|e| BackupError::Target {
        path: cfg.target.clone(),
        source: Box::new(BackupError::Write(e.into())),
    })?;
    Ok((tmp, Arc::new(storage)))
}

/// Opens the source for `cfg` and decides the effective sync mode:
/// `--sync incremental` without a bitmap, or with an unusable one and
/// `bitmap_fallback`, becomes [`SyncMode::Changed`] (by content, with a
/// warning in the second case). Returns the source, the mode, and whether
/// the bitmap is to be cleared after the backup.
fn open_source(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    warnings: &mut Vec<String>,
) -> Result<(Box<source::ImageSource>, SyncMode, bool), BackupError> {
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
        return Ok((plain(source_opener)?, mode, cfg.clear_bitmap));
    };
    let request = source::BitmapRequest {
        name,
        allow_disabled: cfg.allow_disabled_bitmap,
    };
    match source::open(source_opener, &cfg.source, cfg.source_format, Some(request)) {
        Ok(s) => Ok((s, SyncMode::Incremental, cfg.clear_bitmap)),
        Err(e) if cfg.bitmap_fallback && e.is_unusable_bitmap() => {
            warnings.push(format!(
                "{e}; taking the incremental backup by content instead (every cluster read, only those changed since the previous backup written), and leaving the bitmap as it is"
            ));
            Ok((plain(opener)?, SyncMode::Changed, false))
        }
        Err(e) => Err(e.into()),
    }
}

/// Fails when a file of the source changed since `before` was taken. The
/// source's files stayed open (with QEMU's shared locks) throughout, so
/// this compares the very files that were read.
fn verify_unchanged(source: &dyn SourceChecks, before: &Fingerprint) -> Result<(), BackupError> {
    match source.fingerprint() {
        Ok(now) => match before.first_change(&now) {
            Some(path) => Err(BackupError::SourceChanged(path.to_path_buf())),
            None => Ok(()),
        },
        // Its metadata can no longer be read where it was: it changed.
        Err(e) => Err(BackupError::SourceChanged(e.path)),
    }
}

/// Unregisters the temporary file from the [`Cancel`] when the backup ends,
/// whichever way.
struct TempRegistration<'a>(&'a Cancel);

impl Drop for TempRegistration<'_> {
    fn drop(&mut self) {
        self.0.set_temp(None);
    }
}

/// Refuses a TARGET that is one of the files the source reads (an image of
/// the chain or an external data file), by identity (device and inode) so
/// that other paths and hard links are caught too.
fn refuse_target_in_source(
    cfg: &BackupConfig,
    source: &dyn SourceChecks,
) -> Result<(), BackupError> {
    refuse_target_in(cfg, &source.files())
}

/// Refuses a TARGET that is one of `files`, by identity.
fn refuse_target_in(cfg: &BackupConfig, files: &[Arc<dyn Storage>]) -> Result<(), BackupError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(&cfg.target) else {
        return Ok(());
    };
    let target = Identity {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    match files.iter().find(|f| f.identity() == Some(target)) {
        Some(f) => Err(BackupError::TargetIsSource {
            target: cfg.target.clone(),
            file: f.name().to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Temporary files are created 0600; a backup (and its manifest) gets the
/// usual 0666 & !umask.
fn set_backup_permissions(path: &Path) -> std::io::Result<()> {
    let perms = 0o666 & !current_umask();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(perms))
}

/// The process umask (read by setting and restoring it).
fn current_umask() -> u32 {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(old);
    old.as_raw_mode()
}

/// The previous backup an incremental one is an overlay on: it must open
/// (with its whole chain), and is recorded by a name that resolves from
/// the target's directory.
fn previous_backup(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    source: &dyn Source,
) -> Result<BackingRef, BackupError> {
    let prev = cfg
        .backing
        .as_deref()
        .ok_or(BackupError::IncrementalNeedsBacking)?;
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
        return Ok(None);
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
