//! The destination seam: where a backup's files go, and how they become
//! a backup.
//!
//! Every file a backup produces (the image, its manifest) goes through
//! three steps: **stage** (created under a name no reader takes for a
//! backup), **durable** (synced by whoever wrote it: the image through the
//! storage it was written through, the manifest by its writer), then
//! **publish** (checked to be what was written, put under its real name,
//! image first, as one unit for other runs, and the names made durable). Dropping a destination before `publish` is the **abort**: it
//! removes everything staged. So the copier and the planner never know
//! whether the backup lands in a local directory, on a block device or,
//! later, in a backup set or an object store: each is one implementation
//! of [`Destination`].
//!
//! Implementations: [`file::FileDestination`] (a new file beside TARGET:
//! temporary file, lock, rename, directory sync, leftovers of killed runs
//! removed) and [`device::DeviceDestination`] (a restore onto a block
//! device, written in place, no manifest).
//!
//! Invariant: nothing appears at TARGET (or beside it) before `publish`,
//! and `publish` never runs once a stop was requested ([`Cancel::commit`]).

pub mod device;
pub mod file;
pub mod guard;
pub mod publish_lock;
pub mod temp;

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::storage::Storage;

use super::{BackupConfig, BackupError, Cancel, Progress};
use crate::manifest::ImageIdentity;

/// A staged file to write a manifest (or another small file) to.
pub struct StagedFile {
    /// The open file, for writing.
    pub file: File,
    /// Its temporary name, for messages.
    pub path: PathBuf,
}

/// Where a published backup is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The backup image.
    pub target: PathBuf,
    /// Its manifest, when one was kept.
    pub manifest: Option<PathBuf>,
}

/// Where a backup's files go; see the module docs.
pub trait Destination {
    /// TARGET, as messages name it.
    fn target(&self) -> &Path;

    /// Stages the image of `size` guest bytes and returns the storage it
    /// is written through (called once).
    fn stage_image(
        &mut self,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<Arc<dyn Storage>, BackupError>;

    /// Stages the manifest, or `None` when this destination keeps none.
    fn stage_manifest(&mut self) -> Result<Option<StagedFile>, BackupError>;

    /// The identity of the staged image once complete (sealed and
    /// durable), which its manifest records; `publish` checks that the
    /// image still has it. `None` when this destination keeps no manifest.
    fn image_identity(&mut self) -> Result<Option<ImageIdentity>, BackupError>;

    /// Bytes free where the image is staged, for a disk-full message.
    fn free_space(&self) -> Option<u64>;

    /// Puts every staged file under its name, once each was made durable,
    /// and makes the names durable; fails with [`Cancel::error`] and
    /// publishes nothing when a stop was requested first.
    fn publish(self: Box<Self>, cancel: &Cancel) -> Result<Published, BackupError>;
}

/// The destination for `cfg`'s TARGET, of the `kind` [`check_target`]
/// found; `keep_manifest` is false when no manifest is to be written.
pub fn open<'a>(
    cfg: &BackupConfig,
    kind: TargetKind,
    keep_manifest: bool,
    cancel: &'a Cancel,
) -> Box<dyn Destination + 'a> {
    match kind {
        TargetKind::Device => Box::new(device::DeviceDestination::new(&cfg.target)),
        TargetKind::NewFile { .. } => Box::new(
            file::FileDestination::new(&cfg.target, cfg.force, keep_manifest, cancel)
                .cache(cfg.cache),
        ),
    }
}

/// What TARGET is, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A new file; `exists` when something is at TARGET already (refused
    /// without `force`, but only once the source is open: a TARGET that is
    /// one of the source's own files is refused for that reason instead).
    NewFile {
        /// Something is at TARGET.
        exists: bool,
    },
    /// An existing block device, written in place.
    Device,
}

/// Checks TARGET against the request, before the source is opened.
///
/// Why: a backup is written to a temporary file and renamed over TARGET.
/// Renamed over a device node, that would replace the node with a regular
/// file (the device itself untouched, the "restore" silently lost); over a
/// directory it fails only at the very end. So a directory, a character
/// device, a FIFO or a socket is refused at once, and a block device is
/// only written in place when asked (`in_place`).
pub fn check_target(cfg: &BackupConfig) -> Result<TargetKind, BackupError> {
    let path = &cfg.target;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cfg.in_place {
                return Err(BackupError::InPlaceNeedsDevice(path.clone()));
            }
            // A dangling symbolic link is still something at TARGET.
            let exists = path.symlink_metadata().is_ok();
            return Ok(TargetKind::NewFile { exists });
        }
        // Let the commit step name the problem (a directory we cannot
        // search, a component that is not a directory).
        Err(_) if !cfg.in_place => return Ok(TargetKind::NewFile { exists: false }),
        Err(_) => return Err(BackupError::InPlaceNeedsDevice(path.clone())),
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(BackupError::TargetIsDirectory(path.clone()));
    }
    if kind.is_block_device() {
        return if cfg.in_place {
            Ok(TargetKind::Device)
        } else {
            Err(BackupError::TargetIsDevice(path.clone()))
        };
    }
    if !kind.is_file() {
        let what = if kind.is_char_device() {
            "a character device"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(BackupError::TargetUnsupported {
            path: path.clone(),
            what,
        });
    }
    if cfg.in_place {
        return Err(BackupError::InPlaceNeedsDevice(path.clone()));
    }
    Ok(TargetKind::NewFile { exists: true })
}

/// The directory TARGET will be created in ("." for a bare file name).
pub fn target_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
