//! A restore onto a block device (an LV, a loop device), written in place.
//!
//! Why in place: the node is never replaced (see [`super::check_target`]).
//! The device is opened exclusively (the kernel refuses one that is
//! mounted or held), its size checked against the virtual size, every byte
//! up to the virtual size written or zeroed by the raw target (a device is
//! not zero to begin with), then synced by the caller. Bytes past the
//! virtual size are left alone. Nothing is created beside a device node, so
//! no manifest is kept. An interrupted restore leaves the device partly
//! written: there is no temporary copy of a device.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::storage::{FileStorage, Storage};

use super::{Destination, Published, StagedFile};
use crate::backup::{BackupError, Cancel, Progress};
use crate::manifest::ImageIdentity;

/// A block device written in place.
pub struct DeviceDestination {
    path: PathBuf,
}

impl DeviceDestination {
    /// The device at `path` (checked to be one by [`super::check_target`]).
    pub fn new(path: &Path) -> DeviceDestination {
        DeviceDestination {
            path: path.to_path_buf(),
        }
    }
}

impl Destination for DeviceDestination {
    fn target(&self) -> &Path {
        &self.path
    }

    fn stage_image(
        &mut self,
        size: u64,
        _progress: &dyn Progress,
    ) -> Result<Arc<dyn Storage>, BackupError> {
        open(&self.path, size)
    }

    fn stage_manifest(&mut self) -> Result<Option<StagedFile>, BackupError> {
        Ok(None)
    }

    fn image_identity(&mut self) -> Result<Option<ImageIdentity>, BackupError> {
        Ok(None)
    }

    fn free_space(&self) -> Option<u64> {
        None
    }

    fn publish(self: Box<Self>, _cancel: &Cancel) -> Result<Published, BackupError> {
        Ok(Published {
            target: self.path,
            manifest: None,
        })
    }
}

/// Opens the block device at `path` for writing in place, exclusively,
/// and checks that it holds `size` bytes.
fn open(path: &Path, size: u64) -> Result<Arc<dyn Storage>, BackupError> {
    let open_err = |source| BackupError::Commit {
        path: path.to_path_buf(),
        action: "open the device for writing",
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    // The node may have been swapped since the check.
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_block_device() {
        return Err(BackupError::InPlaceNeedsDevice(path.to_path_buf()));
    }
    let storage = FileStorage::writable(file, path).map_err(|e| BackupError::Target {
        path: path.to_path_buf(),
        source: Box::new(BackupError::Write(e.into())),
    })?;
    if storage.len() < size {
        return Err(BackupError::DeviceTooSmall {
            path: path.to_path_buf(),
            device: storage.len(),
            needed: size,
        });
    }
    Ok(Arc::new(storage))
}
