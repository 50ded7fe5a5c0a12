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

use qbackup_formats::layer::BitmapClear;

use super::destination::Published;
use super::{BackupError, SyncMode};
use crate::source::SourceChecks;

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
    /// takes what it needs. `mode` is the sync mode that runs (an action
    /// may then have nothing to do).
    fn prepare(&mut self, source: &dyn SourceChecks, mode: SyncMode) -> Result<(), BackupError>;

    /// Does it; the backup is complete at `published`.
    fn run(self: Box<Self>, published: &Published) -> Result<Option<Outcome>, BackupError>;
}

/// Clears a persistent dirty bitmap of a qcow2 source image: a new cycle
/// starts at this backup. The source must have been opened for update.
pub struct ClearBitmap {
    name: String,
    clear: Option<Box<dyn BitmapClear>>,
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
    fn prepare(&mut self, source: &dyn SourceChecks, mode: SyncMode) -> Result<(), BackupError> {
        // An incremental backup by content did not use the bitmap (it could
        // not be used): it is left as it is.
        if mode != SyncMode::Changed {
            self.clear = Some(source.prepare_bitmap_clear(&self.name)?);
        }
        Ok(())
    }

    fn run(self: Box<Self>, published: &Published) -> Result<Option<Outcome>, BackupError> {
        let Some(clear) = self.clear else {
            return Ok(None);
        };
        let clusters_freed = clear.commit().map_err(|source| BackupError::ClearBitmap {
            target: published.target.clone(),
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
