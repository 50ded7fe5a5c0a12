//! After-durable actions: what may only happen once the backup is durable
//! under its name, passed in by the caller of [`super::run`].
//!
//! Why: a dirty bitmap may only lose the bits a backup covers once that
//! backup can no longer be lost (QEMU's bitmap-mode on-success), and the
//! same holds for what a live-VM orchestrator does after a backup (merge or
//! remove QEMU's bitmaps, end an export). Each action is prepared before
//! anything is read, so a backup that could not finish its actions fails
//! before it starts, and runs in order after the publish. A crash before
//! then leaves every action undone, which is always safe: the next backup
//! copies a little more.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use qbackup_formats::layer::BitmapClear;

use super::lineage::{self, Generation};
use super::{BackupError, SyncMode};
use crate::source::SourceChecks;

/// What an action is prepared against.
pub struct Context<'a> {
    /// The source, open.
    pub source: &'a dyn SourceChecks,
    /// The sync mode that runs.
    pub mode: SyncMode,
    /// The requested dirty bitmap can be used (and, when the request
    /// clears it, was opened for update): false when it is missing, in
    /// use, disabled or damaged and the backup fell back to one by
    /// content.
    pub bitmap_usable: bool,
}

/// The backup, complete and durable under its name.
pub struct Completed<'a> {
    /// Where it is.
    pub target: &'a Path,
    /// Its identity (its manifest's id), when it kept a manifest.
    pub id: Option<&'a str>,
}

/// What an action did, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A persistent dirty bitmap of the source image was cleared.
    BitmapCleared {
        /// Its name.
        name: String,
        /// Data clusters of the bitmap freed.
        clusters_freed: u64,
    },
}

/// Something to do once the backup is durable; see the module docs.
pub trait AfterDurable: Send {
    /// Checks, before anything is read, that the action can be done, and
    /// takes what it needs (an action may find it has nothing to do).
    fn prepare(&mut self, ctx: &Context<'_>) -> Result<(), BackupError>;

    /// Does it, once the backup is complete and durable.
    fn run(self: Box<Self>, done: &Completed<'_>) -> Result<Option<Outcome>, BackupError>;
}

/// Clears a persistent dirty bitmap of a qcow2 source image: a new
/// generation of the bitmap starts at this backup, recorded first beside
/// the image (see [`lineage`]). The source must have been opened for
/// update.
pub struct ClearBitmap {
    name: String,
    clear: Option<Prepared>,
}

/// A clearing ready to commit.
struct Prepared {
    clear: Box<dyn BitmapClear>,
    image: PathBuf,
    identity: Option<(u64, u64)>,
}

impl ClearBitmap {
    /// Clears the bitmap `name`.
    pub fn new(name: &str) -> ClearBitmap {
        ClearBitmap {
            name: name.to_string(),
            clear: None,
        }
    }
}

impl AfterDurable for ClearBitmap {
    fn prepare(&mut self, ctx: &Context<'_>) -> Result<(), BackupError> {
        // A bitmap that cannot be used (the backup fell back to one by
        // content) is left as it is. One that can is cleared even after an
        // incremental by content: that backup is exact, so the bitmap's new
        // generation may start at it.
        if ctx.mode == SyncMode::Changed && !ctx.bitmap_usable {
            return Ok(());
        }
        let source = ctx.source;
        self.clear = Some(Prepared {
            clear: source.prepare_bitmap_clear(&self.name)?,
            image: source.name().to_path_buf(),
            identity: source.identity(),
        });
        Ok(())
    }

    fn run(self: Box<Self>, done: &Completed<'_>) -> Result<Option<Outcome>, BackupError> {
        let Some(p) = self.clear else {
            return Ok(None);
        };
        // The record first: a crash before the clearing leaves more bits
        // than the record needs, which is safe.
        if let Some(identity) = p.identity {
            let generation = Generation {
                backup: done.id.map(str::to_string),
                target: done.target.display().to_string(),
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            lineage::record_start(&p.image, identity, &self.name, generation).map_err(
                |source| BackupError::RecordGeneration {
                    target: done.target.to_path_buf(),
                    record: lineage::record_path(&p.image),
                    source,
                },
            )?;
        }
        let clusters_freed = p
            .clear
            .commit()
            .map_err(|source| BackupError::ClearBitmap {
                target: done.target.to_path_buf(),
                source: Box::new(source),
            })?;
        Ok(Some(Outcome::BitmapCleared {
            name: self.name,
            clusters_freed,
        }))
    }
}

/// The actions a request itself asks for: clearing the source's bitmap
/// when `cfg.clear_bitmap` (the source is then opened for update).
pub fn requested(cfg: &super::BackupConfig) -> Vec<Box<dyn AfterDurable>> {
    match (&cfg.bitmap, cfg.clear_bitmap) {
        (Some(name), true) => vec![Box::new(ClearBitmap::new(name))],
        _ => Vec::new(),
    }
}
