//! `qbackup backup`: copy an image (or the top layer of its chain) into a
//! compact qcow2 or sparse raw target.
//!
//! A backup runs in three phases: **prepare** ([`prepare`]: open the
//! source, decide the sync mode, check everything that can refuse the
//! backup, plan the totals), **copy** (the planner and the parallel copier
//! write through a [`destination::Destination`]'s staged storage) and
//! **commit** (sync, check the source did not change, publish, then run
//! the caller's [`after::AfterDurable`] actions).
//!
//! Safety invariants: the source is opened read-only, except when its
//! dirty bitmap is to be cleared (then it is opened for update, with
//! QEMU's write locks, and only the bitmap is written, by an after-durable
//! action); nothing appears at TARGET until the backup is complete and
//! durable; on any error or interruption everything staged is removed.

pub mod after;
pub mod budget;
pub mod cancel;
pub mod copier;
pub mod destination;
mod early_sync;
mod error;
pub mod lineage;
pub mod ordered;
pub mod plan;
pub mod policy;
pub mod prepare;
pub mod record;
pub mod request;
pub mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qbackup_formats::codec::CompressionType;
use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::open::{CacheOpener, Opener};
use qbackup_formats::qcow2::writer::{Qcow2Writer, WriterOptions};
use qbackup_formats::storage::cache::CachePolicy;
use qbackup_formats::{ClusterSize, Format};

use after::AfterDurable;
pub use cancel::Cancel;
pub use copier::{CopyStats, Progress};
use destination::{Destination, Published};
pub use error::BackupError;
pub use plan::SyncMode;
use prepare::Prepared;
pub use request::{BackupRequest, BitmapMode, Compression, RequestError};
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
    /// The backup's identity, chosen by the caller (`None`: a fresh one).
    pub id: Option<String>,
    /// What the backup does with the page cache it fills (see
    /// [`qbackup_formats::storage::cache`]).
    pub cache: CachePolicy,
}

/// What a finished backup did (the CLI formats it).
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// Where the backup is.
    pub target: PathBuf,
    /// The sync mode that ran (an incremental by bitmap may have fallen
    /// back to one by content: see `fallback`).
    pub mode: SyncMode,
    /// Why an incremental backup by bitmap ran by content instead.
    pub fallback: Option<String>,
    /// What the after-durable actions did.
    pub actions: Vec<after::Outcome>,
    /// The backup's identity (its manifest's), when it has a manifest.
    pub id: Option<String>,
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

/// Runs a backup, opening files through `opener`, then the caller's
/// `after` actions once it is durable. `cancel` is polled in every phase;
/// once it is set the backup stops and leaves nothing behind.
pub fn run(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    after: Vec<Box<dyn AfterDurable>>,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &Cancel,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let cache = CacheOpener::new(opener, cfg.cache);
    let policy = policy::PolicyOpener::new(&cache, cfg.on_source_error, cfg.on_target_error);
    let opener: &dyn Opener = &policy;
    // What TARGET is decides before any work (a directory fails at once).
    let kind = destination::check_target(cfg)?;
    let prepared = prepare::prepare(cfg, opener, kind, after, cancel)?;
    on_plan(prepared.planned);
    let keep_manifest = !cfg.no_manifest && !prepared.restore;
    let destination = destination::open(cfg, kind, keep_manifest, cancel);
    // Staged files stay registered until the backup ends, for a signal
    // thread that cannot wait for it to unwind.
    let _registered = TempRegistration(cancel);
    let mut prepared = prepared;
    let copied = copy(
        cfg,
        opener,
        &mut prepared,
        destination,
        kind,
        progress,
        cancel,
    )?;
    commit(prepared, copied, started, cancel)
}

/// What the copy phase leaves for the commit.
struct Copied<'a> {
    destination: Box<dyn Destination + 'a>,
    id: Option<String>,
    stats: CopyStats,
    target_size: u64,
}

/// The copy phase: stages the target and its manifest, copies, syncs, and
/// checks that the source did not change. On error the destination is
/// dropped, which removes everything staged.
fn copy<'a>(
    cfg: &BackupConfig,
    opener: &dyn Opener,
    p: &mut Prepared,
    mut destination: Box<dyn Destination + 'a>,
    kind: destination::TargetKind,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Copied<'a>, BackupError> {
    let source: &source::ImageSource = p.source.as_ref();
    let size = source.virtual_size();
    let cluster_size = p.previous.cluster_size;
    let target_err = |e: BackupError| BackupError::Target {
        path: cfg.target.clone(),
        source: Box::new(e),
    };
    let commit_err = |action, source| BackupError::Commit {
        path: cfg.target.clone(),
        action,
        source,
    };
    let in_place = kind == destination::TargetKind::Device;
    let storage = opener.target(destination.stage_image(size, progress)?);
    let compression = match cfg.target_format {
        Format::Qcow2 => cfg.compression,
        Format::Raw => None,
    };
    let mut recorder = match destination.stage_manifest()? {
        Some(staged) => Some(record::start(
            cfg,
            source,
            staged,
            record::About {
                mode: p.mode,
                cluster_size,
                backing: p.backing.as_ref().map(|b| b.name.as_str()),
                previous: p.previous.gaps.take(),
                parent_digest: p.previous.parent_digest.clone(),
            },
        )?),
        None => None,
    };
    let target: Box<dyn Target> = match cfg.target_format {
        Format::Qcow2 => {
            let opts = WriterOptions {
                virtual_size: size,
                cluster_bits: cluster_size.bits(),
                compression: compression.map(|c| c.0).unwrap_or(CompressionType::Zlib),
                backing: p.backing.clone(),
            };
            let w = Qcow2Writer::new(Arc::clone(&storage), opts)
                .map_err(|e| target_err(BackupError::Write(TargetError::Qcow2(e))))?;
            Box::new(Qcow2Target::new(w, Arc::clone(&storage)))
        }
        Format::Raw => Box::new(RawTarget::new(
            Arc::clone(&storage),
            size,
            cluster_size,
            in_place,
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
        skip_unchanged: p.previous.skip_unchanged.take(),
    };
    // ENOSPC says how much was needed and how much is free.
    let free = destination.free_space();
    let no_space = |e: BackupError| {
        if !error::caused_by_enospc(&e) {
            return e;
        }
        BackupError::NoSpace {
            path: cfg.target.clone(),
            planned: p.planned,
            written: storage.len(),
            free: free.unwrap_or(0),
            source: Box::new(e),
        }
    };
    let ranges = plan::Planner::new(source, p.mode, cluster_size, cancel.flag());
    let stats =
        copier::copy(source, ranges, params, target, recording, progress, cancel).map_err(|e| {
            match e {
                BackupError::Write(_) => no_space(target_err(e)),
                BackupError::EarlySync { source } => no_space(commit_err("sync", source)),
                other => other,
            }
        })?;
    storage
        .sync()
        .map_err(|e| no_space(commit_err("sync", e)))?;
    // A signal during the sync: stop before anything appears at TARGET.
    if cancel.is_set() {
        return Err(cancel.error());
    }
    verify_unchanged(source, &p.before)?;
    if cfg.target_format == Format::Qcow2 {
        // Only a complete, durable image gets the magic (see temp.rs).
        Qcow2Writer::seal(storage.as_ref())
            .map_err(|e| target_err(BackupError::Write(TargetError::Qcow2(e))))?;
        storage.sync().map_err(|e| commit_err("sync", e))?;
    }
    // The manifest is finished last, naming the finished image it belongs
    // to (checked again when both are published).
    if let Some(r) = recorder.as_mut() {
        if let Some(identity) = destination.image_identity()? {
            r.builder.set_image(identity);
        }
    }
    let id = recorder.map(record::Recorder::finish).transpose()?;
    Ok(Copied {
        id,
        target_size: storage.len(),
        destination,
        stats,
    })
}

/// The commit phase: publishes the durable backup, then runs the
/// after-durable actions in order.
fn commit(
    p: Prepared,
    copied: Copied<'_>,
    started: Instant,
    cancel: &Cancel,
) -> Result<BackupReport, BackupError> {
    let Published { target, manifest } = copied.destination.publish(cancel)?;
    let done = after::Completed {
        target: &target,
        id: copied.id.as_deref(),
    };
    // Only now, with the backup durable under its name, may the actions
    // run (a crash before this point leaves them undone, which is safe).
    let (mut actions, mut bitmap_cleared) = (Vec::new(), None);
    for a in p.actions {
        let Some(outcome) = a.run(&done)? else {
            continue;
        };
        match &outcome {
            after::Outcome::BitmapCleared { clusters_freed, .. } => {
                bitmap_cleared = Some(*clusters_freed)
            }
        }
        actions.push(outcome);
    }
    let mut warnings = p.warnings;
    for (f, what) in p.source.harmless_damage() {
        warnings.push(format!("{}: {}", f.display(), harmless_damage_text(&what)));
    }
    Ok(BackupReport {
        target,
        mode: p.mode,
        fallback: p.fallback,
        actions,
        id: copied.id,
        virtual_size: p.source.virtual_size(),
        cluster_size: p.previous.cluster_size,
        bitmap_cleared,
        manifest,
        warnings,
        planned_bytes: p.planned,
        guest_bytes_read: p.guest_bytes_read,
        stats: copied.stats,
        target_size: copied.target_size,
        elapsed: started.elapsed(),
    })
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

/// Unregisters the staged files from the [`Cancel`] when the backup ends,
/// whichever way.
struct TempRegistration<'a>(&'a Cancel);

impl Drop for TempRegistration<'_> {
    fn drop(&mut self) {
        self.0.set_temp(None);
    }
}
