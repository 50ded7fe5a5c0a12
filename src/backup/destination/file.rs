//! A backup written as a new file beside TARGET (and its manifest beside
//! it): the local-directory destination.
//!
//! Each file is staged as a locked temporary file in TARGET's directory
//! (see [`super::temp`]: leftovers of killed runs are removed first, and
//! the lock tells them from files of runs still going), with the usual
//! permissions. Publishing renames the image over TARGET (without
//! replacing anything unless `force`), then the manifest to
//! `TARGET.manifest`, then syncs the directory so the names survive a
//! power cut. Dropped unpublished, the temporary files go with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::storage::{FileStorage, Storage};
use tempfile::NamedTempFile;

use super::{target_dir, temp, Destination, Published, StagedFile};
use crate::backup::{BackupError, Cancel, Progress};
use crate::manifest;

/// A new file at TARGET.
pub struct FileDestination<'a> {
    target: PathBuf,
    dir: PathBuf,
    force: bool,
    keep_manifest: bool,
    cancel: &'a Cancel,
    image: Option<NamedTempFile>,
    manifest: Option<NamedTempFile>,
}

impl<'a> FileDestination<'a> {
    /// A new file at `target`; `force` replaces what is there; a manifest
    /// is kept beside it when `keep_manifest`. Staged files are registered
    /// with `cancel` (for a signal thread that cannot wait for unwinding).
    pub fn new(
        target: &Path,
        force: bool,
        keep_manifest: bool,
        cancel: &'a Cancel,
    ) -> FileDestination<'a> {
        FileDestination {
            target: target.to_path_buf(),
            dir: target_dir(target),
            force,
            keep_manifest,
            cancel,
            image: None,
            manifest: None,
        }
    }

    fn commit_err(&self, action: &'static str, source: std::io::Error) -> BackupError {
        BackupError::Commit {
            path: self.target.clone(),
            action,
            source,
        }
    }

    /// A new locked temporary file in the directory, with the usual
    /// permissions, registered with the cancel; `name` is the path
    /// messages use.
    fn stage(&self, name: &Path) -> Result<(NamedTempFile, std::fs::File), BackupError> {
        let err = |action, source| BackupError::Commit {
            path: name.to_path_buf(),
            action,
            source,
        };
        let tmp = temp::create(&self.dir)
            .map_err(|e| err("create a temporary file in its directory", e))?;
        set_backup_permissions(tmp.path())
            .map_err(|e| err("set permissions on the temporary file", e))?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| err("open the temporary file", e))?;
        self.cancel.set_temp(Some(tmp.path()));
        Ok((tmp, file))
    }
}

impl Destination for FileDestination<'_> {
    fn target(&self) -> &Path {
        &self.target
    }

    fn stage_image(
        &mut self,
        _size: u64,
        progress: &dyn Progress,
    ) -> Result<Arc<dyn Storage>, BackupError> {
        // Say what is wrong with the directory itself, not with a temporary
        // name inside it (only its existence: writing needs no read
        // permission).
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                let e = std::io::Error::from(std::io::ErrorKind::NotADirectory);
                return Err(self.commit_err("use its directory", e));
            }
            Err(e) => return Err(self.commit_err("use its directory", e)),
        }
        // Leftovers of killed backups go first, then ours, locked for as
        // long as it exists.
        for r in temp::remove_stale(&self.dir) {
            progress.removed_leftover(&r.path, r.bytes);
        }
        let (tmp, file) = self.stage(&self.target)?;
        let storage = FileStorage::writable(file, tmp.path()).map_err(|e| BackupError::Target {
            path: self.target.clone(),
            source: Box::new(BackupError::Write(e.into())),
        })?;
        self.image = Some(tmp);
        Ok(Arc::new(storage))
    }

    fn stage_manifest(&mut self) -> Result<Option<StagedFile>, BackupError> {
        if !self.keep_manifest {
            return Ok(None);
        }
        let (tmp, file) = self.stage(&manifest::path_for(&self.target))?;
        let path = tmp.path().to_path_buf();
        self.manifest = Some(tmp);
        Ok(Some(StagedFile { file, path }))
    }

    fn free_space(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|v| v.f_bavail * v.f_frsize)
    }

    fn publish(mut self: Box<Self>, cancel: &Cancel) -> Result<Published, BackupError> {
        let image = self.image.take().ok_or_else(|| {
            let e = std::io::Error::other("no image was staged");
            self.commit_err("rename the temporary file into place", e)
        })?;
        // The rename and a signal thread giving up on the backup exclude
        // each other: either TARGET is complete, or the temporary file is
        // removed.
        let persisted = cancel
            .commit(|| {
                if self.force {
                    image.persist(&self.target)
                } else {
                    image.persist_noclobber(&self.target)
                }
            })
            .ok_or_else(|| cancel.error())?;
        persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                BackupError::TargetExists(self.target.clone())
            } else {
                self.commit_err("rename the temporary file into place", e.error)
            }
        })?;
        // The manifest follows the image: a crash in between leaves a
        // backup without a manifest (or, with `force`, the replaced
        // backup's), which `verify` reports; never a manifest that vouches
        // for other data.
        let manifest = match self.manifest.take() {
            Some(tmp) => {
                let path = manifest::path_for(&self.target);
                tmp.persist(&path).map_err(|e| BackupError::Commit {
                    path: path.clone(),
                    action: "rename the manifest into place",
                    source: e.error,
                })?;
                Some(path)
            }
            None => None,
        };
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(Published {
            target: self.target.clone(),
            manifest,
        })
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
