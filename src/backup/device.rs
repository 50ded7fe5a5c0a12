//! What TARGET may be, checked before any work, and restores onto block
//! devices.
//!
//! Why: a backup is written to a temporary file and renamed over TARGET.
//! Renamed over a device node, that would replace the node with a regular
//! file (the device itself untouched, the "restore" silently lost); over a
//! directory it fails only at the very end. So a directory, a character
//! device, a FIFO or a socket is refused at once, and a block device is
//! only written *in place* when asked (`in_place`, the CLI's `-n`, like
//! `qemu-img convert -n`): opened exclusively (the kernel refuses a device
//! that is mounted or held), its size checked against the virtual size,
//! every byte up to the virtual size written or zeroed (a device is not
//! zero to begin with), then synced. The node is never replaced; bytes past
//! the virtual size are left alone. An interrupted restore leaves the
//! device partly written: there is no temporary copy of a device.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use qbackup_formats::storage::{FileStorage, Storage};

use super::{BackupConfig, BackupError};

/// What TARGET is, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Nothing there yet (or a file `--force` replaces): a new file.
    NewFile,
    /// An existing block device, written in place.
    Device,
}

/// Checks TARGET against the request, before the source is opened.
pub fn check_target(cfg: &BackupConfig) -> Result<TargetKind, BackupError> {
    let path = &cfg.target;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if cfg.in_place {
                return Err(BackupError::InPlaceNeedsDevice(path.clone()));
            }
            // A dangling symbolic link is still something at TARGET.
            if !cfg.force && path.symlink_metadata().is_ok() {
                return Err(BackupError::TargetExists(path.clone()));
            }
            return Ok(TargetKind::NewFile);
        }
        // Let the commit step name the problem (a directory we cannot
        // search, a component that is not a directory).
        Err(_) if !cfg.in_place => return Ok(TargetKind::NewFile),
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
    if !cfg.force {
        return Err(BackupError::TargetExists(path.clone()));
    }
    Ok(TargetKind::NewFile)
}

/// Opens the block device at `path` for writing in place, exclusively,
/// and checks that it holds `size` bytes.
pub fn open(path: &Path, size: u64) -> Result<Arc<dyn Storage>, BackupError> {
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
