//! `qbackup backup`: copy an image (or the top layer of its chain) into a
//! compact qcow2 or sparse raw target.
//!
//! Safety invariants: the source is opened read-only; the target is built in
//! a temporary file beside TARGET, synced, then renamed over TARGET in one
//! step. On any error or interruption the temporary file is removed and
//! nothing appears at TARGET.

pub mod copier;
pub mod ordered;
pub mod plan;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use qbackup_formats::chain::resolve_backing;
use qbackup_formats::codec::{CodecError, CompressionType};
use qbackup_formats::qcow2::writer::{BackingRef, Qcow2Writer, WriterOptions};
use qbackup_formats::{Chain, ChainError, Format};

pub use copier::Progress;
pub use plan::SyncMode;
use target::{Qcow2Target, RawTarget, Target, TargetError};

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
    /// full or top.
    pub sync: SyncMode,
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
    /// Recompress clusters that could be copied as they are.
    pub recompress: bool,
    /// Backing file name to record for `--sync top` (overrides the default).
    pub backing: Option<String>,
}

/// What a finished backup did.
#[derive(Debug, Clone, Copy)]
pub struct BackupReport {
    /// Guest bytes planned (copied or zeroed).
    pub planned_bytes: u64,
    /// Target cluster size.
    pub cluster_size: u64,
}

/// Errors of a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The source could not be read.
    #[error(transparent)]
    Source(#[from] ChainError),
    /// The target could not be written.
    #[error("{0}")]
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
    #[error("{}: cannot {action}: {source}", path.display())]
    Commit {
        /// The target path.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The target exists and `--force` was not given.
    #[error("{}: target already exists (use --force to replace it)", .0.display())]
    TargetExists(PathBuf),
    /// The request is inconsistent.
    #[error("{0}")]
    Config(String),
    /// Compression failed.
    #[error("{0}")]
    Compress(CodecError),
    /// A bug: a worker panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// Ctrl-C or SIGTERM.
    #[error("interrupted; nothing was written to the target")]
    Interrupted,
}

/// QEMU's backup rule: 64 KiB, or the source's cluster size when larger.
pub fn default_cluster_size(chain: &Chain) -> u64 {
    chain.top().cluster_size().unwrap_or(0).max(64 << 10)
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

/// Runs a backup. `cancel` is polled between batches; when it becomes true
/// the backup stops and leaves nothing behind.
pub fn run(
    cfg: &BackupConfig,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &AtomicBool,
) -> Result<BackupReport, BackupError> {
    let chain = Chain::open(&cfg.source, cfg.source_format)?;
    let target_err = |e: BackupError| BackupError::Target {
        path: cfg.target.clone(),
        source: Box::new(e),
    };
    let commit_err = |action, source| BackupError::Commit {
        path: cfg.target.clone(),
        action,
        source,
    };
    if !cfg.force && cfg.target.symlink_metadata().is_ok() {
        return Err(BackupError::TargetExists(cfg.target.clone()));
    }
    refuse_target_in_source(cfg, &chain)?;
    let cluster_size = cfg
        .cluster_size
        .unwrap_or_else(|| default_cluster_size(&chain));
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(BackupError::Config(format!(
            "cluster size {cluster_size} must be a power of two from 512 to 2M"
        )));
    }
    let size = chain.virtual_size();
    let backing = match cfg.sync {
        SyncMode::Top if cfg.target_format == Format::Raw => {
            return Err(BackupError::Config(
                "--sync top needs a qcow2 target: a raw file cannot refer to a backing file".into(),
            ));
        }
        SyncMode::Top => backing_ref(cfg, &chain)?,
        SyncMode::Full => None,
    };

    let ranges =
        plan::plan(&chain, cfg.sync, cluster_size, cancel)?.ok_or(BackupError::Interrupted)?;
    let planned: u64 = ranges.iter().map(|r| r.count * cluster_size).sum();
    on_plan(planned);

    let dir = target_dir(&cfg.target);
    let tmp = tempfile::Builder::new()
        .prefix(".qbackup-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| commit_err("create a temporary file in its directory", e))?;
    // Temporary files are created 0600; a backup gets the usual 0666 & !umask.
    let mode = 0o666 & !current_umask();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(mode),
    )
    .map_err(|e| commit_err("set permissions on the temporary file", e))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| commit_err("open the temporary file", e))?;
    let compression = match cfg.target_format {
        Format::Qcow2 => cfg.compression,
        Format::Raw => None,
    };
    let target: Box<dyn Target> = match cfg.target_format {
        Format::Qcow2 => {
            let opts = WriterOptions {
                virtual_size: size,
                cluster_bits: cluster_size.trailing_zeros(),
                compression: compression.map(|c| c.0).unwrap_or(CompressionType::Zlib),
                backing,
            };
            let handle = file
                .try_clone()
                .map_err(|e| commit_err("open the temporary file", e))?;
            let w = Qcow2Writer::new(file, opts)
                .map_err(|e| target_err(BackupError::Write(TargetError::Qcow2(e))))?;
            Box::new(Qcow2Target(w, handle))
        }
        Format::Raw => Box::new(RawTarget {
            file,
            size,
            cluster_size,
        }),
    };
    let params = copier::CopyParams {
        threads: cfg.threads.max(1),
        cluster_size,
        compression,
        passthrough: !cfg.recompress,
        speed: cfg.speed,
    };
    let file =
        copier::copy(&chain, &ranges, params, target, progress, cancel).map_err(|e| match e {
            BackupError::Write(_) => target_err(e),
            other => other,
        })?;
    file.sync_all().map_err(|e| commit_err("sync", e))?;
    drop(file);
    let persisted = if cfg.force {
        tmp.persist(&cfg.target)
    } else {
        tmp.persist_noclobber(&cfg.target)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            BackupError::TargetExists(cfg.target.clone())
        } else {
            commit_err("rename the temporary file into place", e.error)
        }
    })?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(BackupReport {
        planned_bytes: planned,
        cluster_size,
    })
}

/// Refuses a TARGET that is one of the files the source reads (an image of
/// the chain or an external data file), by device and inode so that other
/// paths and hard links are caught too.
fn refuse_target_in_source(cfg: &BackupConfig, chain: &Chain) -> Result<(), BackupError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(&cfg.target) else {
        return Ok(());
    };
    let target = (meta.dev(), meta.ino());
    for layer in chain.layers() {
        let files =
            std::iter::once(layer.storage()).chain(layer.as_qcow2().and_then(|q| q.data_storage()));
        for f in files {
            if f.identity().ok() == Some(target) {
                return Err(BackupError::Config(format!(
                    "{}: target is {}, which the source reads",
                    cfg.target.display(),
                    f.path().display()
                )));
            }
        }
    }
    Ok(())
}

/// The process umask (read by setting and restoring it).
fn current_umask() -> u32 {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(old);
    old.as_raw_mode()
}

fn backing_ref(cfg: &BackupConfig, chain: &Chain) -> Result<Option<BackingRef>, BackupError> {
    let top = chain.top();
    let Some(below) = chain.layers().get(1) else {
        return Ok(None);
    };
    let name = match &cfg.backing {
        Some(b) => b.clone(),
        None => {
            let q = top
                .as_qcow2()
                .expect("only qcow2 images have backing files");
            let recorded = q.header().backing_file.clone().unwrap_or_default();
            let path = resolve_backing(top.path(), &recorded);
            backing_name_for(&cfg.target, &path).map_err(|e| BackupError::Commit {
                path: cfg.target.clone(),
                action: "resolve the backing file name",
                source: e,
            })?
        }
    };
    Ok(Some(BackingRef {
        name,
        format: below.format().name().to_string(),
    }))
}
