//! Which backup each disk gets in this cycle, and why.
//!
//! `auto` (the default): incremental when the set holds a backup of the
//! disk and QEMU still has the bitmap recording since that backup's
//! freeze point ([`BITMAP_PREFIX`](super::BITMAP_PREFIX) + its id),
//! consistent and enabled; incremental by content (every cluster read,
//! only changed ones stored, compared with the previous backup's
//! manifest) when the backup exists but the bitmap cannot be trusted;
//! full when there is no backup or the disk's size changed. A bitmap is
//! never trusted by name alone: it must be the one for the newest backup,
//! so a bitmap left from before a failed or lost backup never drives an
//! incremental.

use crate::set::{DiskDir, Entry};

use super::disks::Disk;
use super::BITMAP_PREFIX;

/// The sync mode asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LiveSync {
    /// Incremental when possible, else full.
    #[default]
    Auto,
    /// Always full.
    Full,
    /// Incremental (by bitmap, or by content when the bitmap is unusable);
    /// an error when the disk has no backup.
    Incremental,
}

/// The backup a disk gets.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Everything.
    Full,
    /// What the frozen bitmap marks, on `previous`.
    Bitmap {
        /// The newest backup.
        previous: Entry,
        /// The bitmap recording since it.
        bitmap: String,
    },
    /// Every cluster that differs from `previous`'s manifest.
    Content {
        /// The newest backup.
        previous: Entry,
    },
}

impl Mode {
    /// The name used in results (`sync` key).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Bitmap { .. } => "incremental",
            Mode::Content { .. } => "incremental-by-content",
        }
    }

    /// The previous backup, for incrementals.
    pub fn previous(&self) -> Option<&Entry> {
        match self {
            Mode::Full => None,
            Mode::Bitmap { previous, .. } | Mode::Content { previous } => Some(previous),
        }
    }
}

/// The bitmap that records writes since the backup `id`'s freeze point.
pub fn bitmap_name(id: &str) -> String {
    format!("{BITMAP_PREFIX}{id}")
}

/// The mode for `disk` whose backups are in `dir`, and the reason.
pub fn decide(
    sync: LiveSync,
    disk: &Disk,
    dir: &DiskDir,
) -> Result<(Mode, String), super::LiveError> {
    let latest = dir.latest()?;
    let Some(previous) = latest else {
        if sync == LiveSync::Incremental {
            return Err(super::LiveError::NoPrevious(disk.name().to_string()));
        }
        return Ok((Mode::Full, "first backup of this disk".to_string()));
    };
    if sync == LiveSync::Full {
        return Ok((Mode::Full, "a full backup was asked for".to_string()));
    }
    let short: String = previous.meta.id.chars().take(8).collect();
    if previous.meta.virtual_size != disk.virtual_size {
        return Ok((
            Mode::Full,
            format!(
                "the disk was resized ({} bytes at backup {short}, {} now)",
                previous.meta.virtual_size, disk.virtual_size
            ),
        ));
    }
    let name = bitmap_name(&previous.meta.id);
    let why = match disk.bitmap(&name) {
        None if !disk.persistent_bitmaps() => format!(
            "bitmap {name} is missing (a {} image cannot keep it across a QEMU restart)",
            disk.driver
        ),
        None => format!("bitmap {name} is missing (removed, or QEMU stopped without saving it)"),
        Some(b) if b.inconsistent => {
            format!("bitmap {name} is inconsistent (QEMU stopped while it was in use)")
        }
        Some(b) if !b.recording => format!("bitmap {name} is disabled"),
        Some(b) if b.busy => format!("bitmap {name} is in use by another job or export"),
        Some(_) => {
            return Ok((
                Mode::Bitmap {
                    previous,
                    bitmap: name.clone(),
                },
                format!("bitmap {name} has recorded every write since backup {short}"),
            ))
        }
    };
    Ok((
        Mode::Content { previous },
        format!("{why}: comparing every cluster with backup {short}"),
    ))
}
