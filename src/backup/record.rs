//! The backup's manifest (see [`crate::manifest`]): where its entries for
//! clusters the copier does not write come from, the previous backup's
//! manifest for incremental backups, and writing it beside the target.
//!
//! The manifest is written to a file the destination staged, and synced
//! here; the destination publishes it after the image (see
//! [`super::destination`]).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::destination::StagedFile;
use super::{BackupConfig, BackupError, SyncMode};
use crate::manifest::{self, Gaps, ManifestBuilder, ManifestReader, ManifestWriter, Meta};
use crate::source::SourceChecks;
use qbackup_formats::ClusterSize;

/// The manifest of the previous backup `prev`, or `None` when it has none.
fn previous_manifest(prev: &Path) -> Result<Option<ManifestReader>, BackupError> {
    let path = manifest::path_for(prev);
    if !path.exists() {
        return Ok(None);
    }
    ManifestReader::open(&path)
        .map(Some)
        .map_err(BackupError::Manifest)
}

/// Whether a manifest's entries line up with a backup of `virtual_size`
/// in clusters of `cluster_size`.
fn lines_up(m: &ManifestReader, cluster_size: ClusterSize, virtual_size: u64) -> bool {
    m.meta().cluster_size == cluster_size.bytes() && m.meta().virtual_size == virtual_size
}

/// What a backup takes from the previous backup's manifest.
pub struct Previous {
    /// The target cluster size: `chosen`, else the previous backup's
    /// (so that the manifests line up), else the default.
    pub cluster_size: ClusterSize,
    /// Its entries for the clusters this backup does not write, when they
    /// line up.
    pub gaps: Option<ManifestReader>,
    /// Its BLAKE3 (hex), recorded as the parent's.
    pub parent_digest: Option<String>,
    /// A second stream of its entries, for an incremental by content.
    pub skip_unchanged: Option<ManifestReader>,
}

/// Reads what an incremental backup in `mode` on `prev` needs from
/// PREV's manifest (opened once, and once more for a second stream when
/// unchanged clusters are skipped); `chosen` is `--cluster-size`.
pub fn previous(
    prev: Option<&Path>,
    mode: SyncMode,
    chosen: Option<ClusterSize>,
    default: ClusterSize,
    virtual_size: u64,
) -> Result<Previous, BackupError> {
    let incremental = matches!(mode, SyncMode::Incremental | SyncMode::Changed);
    let (Some(prev), true) = (prev, incremental) else {
        return Ok(Previous {
            cluster_size: chosen.unwrap_or(default),
            gaps: None,
            parent_digest: None,
            skip_unchanged: None,
        });
    };
    let m = previous_manifest(prev)?;
    let cluster_size = chosen
        .or_else(|| {
            m.as_ref()
                .and_then(|m| ClusterSize::new(m.meta().cluster_size))
        })
        .unwrap_or(default);
    let skip_unchanged = match (&m, mode) {
        (None, SyncMode::Changed) => {
            return Err(BackupError::PreviousHasNoManifest {
                path: manifest::path_for(prev),
            })
        }
        (Some(m), SyncMode::Changed) if !lines_up(m, cluster_size, virtual_size) => {
            return Err(BackupError::PreviousManifestMismatch {
                path: m.path().to_path_buf(),
                cluster_size: m.meta().cluster_size,
                wanted: cluster_size.bytes(),
            });
        }
        (Some(m), SyncMode::Changed) => {
            Some(ManifestReader::open(m.path()).map_err(BackupError::Manifest)?)
        }
        _ => None,
    };
    let parent_digest = m.as_ref().map(|m| m.digest().to_string());
    let gaps = m.filter(|m| lines_up(m, cluster_size, virtual_size));
    Ok(Previous {
        cluster_size,
        gaps,
        parent_digest,
        skip_unchanged,
    })
}

/// A manifest being written beside the target.
pub struct Recorder {
    /// Receives the copier's entries.
    pub builder: ManifestBuilder,
    /// The backup's identity, as the manifest records it.
    id: String,
}

/// What the manifest records about the backup.
pub struct About<'a> {
    /// The effective sync mode.
    pub mode: SyncMode,
    /// Its target cluster size.
    pub cluster_size: ClusterSize,
    /// The backing file name the target records.
    pub backing: Option<&'a str>,
    /// The previous backup's manifest, when its entries line up with
    /// this backup's clusters (incremental backups).
    pub previous: Option<ManifestReader>,
    /// The BLAKE3 (hex) of the previous backup's manifest.
    pub parent_digest: Option<String>,
}

/// Starts the manifest of the backup `cfg` of `source` in the file
/// `staged`.
pub fn start(
    cfg: &BackupConfig,
    source: &dyn SourceChecks,
    staged: StagedFile,
    about: About<'_>,
) -> Result<Recorder, BackupError> {
    let io = |action, source| BackupError::Commit {
        path: manifest::path_for(&cfg.target),
        action,
        source,
    };
    let size = source.virtual_size();
    let meta = Meta {
        id: match &cfg.id {
            Some(id) => id.clone(),
            None => manifest::new_id()
                .map_err(|e| io("read /dev/urandom for the backup's identity", e))?,
        },
        tool: format!("qbackup {}", env!("CARGO_PKG_VERSION")),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        source: cfg.source.display().to_string(),
        source_identity: source.identity(),
        virtual_size: size,
        cluster_size: about.cluster_size.bytes(),
        sync: about.mode.name().to_string(),
        bitmap: match about.mode {
            SyncMode::Incremental => cfg.bitmap.clone(),
            _ => None,
        },
        backing: about.backing.map(str::to_string),
        backing_manifest: about.parent_digest,
    };
    let writer =
        ManifestWriter::new(staged.file, &staged.path, &meta).map_err(BackupError::Manifest)?;
    let gaps = match (about.mode, about.previous) {
        (SyncMode::Full, _) => Gaps::Zero,
        (_, Some(prev)) => Gaps::Previous(Box::new(prev)),
        (_, None) => Gaps::Unknown,
    };
    let clusters = size.div_ceil(about.cluster_size.bytes());
    Ok(Recorder {
        builder: ManifestBuilder::new(writer, gaps, clusters),
        id: meta.id,
    })
}

impl Recorder {
    /// Ends and syncs the manifest (the destination publishes it);
    /// returns the backup's identity.
    pub fn finish(self) -> Result<String, BackupError> {
        self.builder.finish().map_err(BackupError::Manifest)?;
        Ok(self.id)
    }
}
