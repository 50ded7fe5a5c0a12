//! A backup written as a new file beside TARGET (and its manifest beside
//! it): the local-directory destination.
//!
//! Each file is staged as a locked temporary file in TARGET's directory
//! (see [`super::temp`]: leftovers of killed runs are removed first, and
//! the lock tells them from files of runs still going), with the usual
//! permissions. The image is written through a [`WriteGuard`], which
//! notices another process changing the temporary file.
//!
//! Publishing is one unit, under the directory's [`PublishLock`]: the
//! staged image is checked first (its length and a sample of what was
//! written read back, [`WriteGuard::check`]; its identity still the one
//! its manifest records), then renamed over TARGET (without replacing
//! anything unless `force`), then the manifest to `TARGET.manifest` (or,
//! replacing a backup without keeping a manifest, the old manifest is
//! removed: it describes another image), then the directory is synced so
//! the names survive a power cut. Dropped unpublished, the temporary files
//! go with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::storage::cache::{self, CachePolicy};
use qbackup_formats::storage::{FileStorage, Storage};
use tempfile::NamedTempFile;

use super::guard::WriteGuard;
use super::publish_lock::PublishLock;
use super::{target_dir, temp, Destination, Published, StagedFile};
use crate::backup::{BackupError, Cancel, Progress};
use crate::manifest::{self, ImageIdentity};

/// A new file at TARGET.
pub struct FileDestination<'a> {
    target: PathBuf,
    dir: PathBuf,
    force: bool,
    keep_manifest: bool,
    cancel: &'a Cancel,
    image: Option<NamedTempFile>,
    guard: Option<Arc<WriteGuard>>,
    identity: Option<ImageIdentity>,
    manifest: Option<NamedTempFile>,
    cache: CachePolicy,
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
            guard: None,
            identity: None,
            manifest: None,
            cache: CachePolicy::Keep,
        }
    }

    /// With [`CachePolicy::Drop`], what the last checks read back of the
    /// staged image is dropped from the page cache (the copy's pages are
    /// dropped after each sync by the storage itself).
    #[must_use]
    pub fn cache(mut self, policy: CachePolicy) -> Self {
        self.cache = policy;
        self
    }

    /// Drops what reading the staged image back left cached.
    fn drop_read_back(&self) {
        if let (CachePolicy::Drop, Some(guard)) = (self.cache, &self.guard) {
            cache::drop_clean(guard.as_ref());
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
        let guard = Arc::new(WriteGuard::new(Arc::new(storage)));
        self.image = Some(tmp);
        self.guard = Some(Arc::clone(&guard));
        Ok(guard)
    }

    fn image_identity(&mut self) -> Result<Option<ImageIdentity>, BackupError> {
        let Some(guard) = &self.guard else {
            return Ok(None);
        };
        let identity = ImageIdentity::read(guard.as_ref())
            .map_err(|e| self.commit_err("read the finished image's identity", e))?;
        self.drop_read_back();
        self.identity = Some(identity);
        Ok(Some(identity))
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
        // Other runs publish into this directory only before or after us.
        let lock = PublishLock::acquire(&self.dir, &self.target, cancel)?;
        self.check_staged(image.path())?;
        self.drop_read_back();
        let manifest_path = manifest::path_for(&self.target);
        let staged_manifest = self.manifest.take();
        // The renames and a signal thread giving up on the backup exclude
        // each other: either TARGET is complete, or the temporary files
        // are removed. The manifest follows the image: a crash in between
        // leaves a backup without a manifest (or, with `force`, the
        // replaced backup's, whose image identity `verify` finds wrong);
        // never a manifest that vouches for other data.
        let persisted = cancel
            .commit(|| {
                if self.force {
                    image.persist(&self.target)?;
                } else {
                    image.persist_noclobber(&self.target)?;
                }
                Ok::<_, tempfile::PersistError>(staged_manifest.map(|m| m.persist(&manifest_path)))
            })
            .ok_or_else(|| cancel.error())?;
        let manifest_persisted = persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                BackupError::TargetExists(self.target.clone())
            } else {
                self.commit_err("rename the temporary file into place", e.error)
            }
        })?;
        let manifest = match manifest_persisted {
            Some(Ok(_)) => Some(manifest_path),
            Some(Err(e)) => {
                return Err(BackupError::Commit {
                    path: manifest_path,
                    action: "rename the manifest into place",
                    source: e.error,
                })
            }
            None => {
                // A replaced backup's manifest describes another image.
                if self.force && manifest_path.symlink_metadata().is_ok_and(|m| m.is_file()) {
                    std::fs::remove_file(&manifest_path).map_err(|e| BackupError::Commit {
                        path: manifest_path.clone(),
                        action: "remove the replaced backup's manifest",
                        source: e,
                    })?;
                }
                None
            }
        };
        lock.sync_dir();
        drop(lock);
        Ok(Published {
            target: self.target.clone(),
            manifest,
        })
    }
}

impl FileDestination<'_> {
    /// The last check before publishing: the staged image is what the
    /// writer wrote (nobody truncated or rewrote it) and still has the
    /// identity its manifest records.
    fn check_staged(&self, temp: &Path) -> Result<(), BackupError> {
        let changed = |why: String| {
            self.commit_err(
                "publish the backup",
                std::io::Error::other(format!(
                    "its temporary file {} was changed by another process while the backup was written ({why}); nothing was published",
                    temp.display()
                )),
            )
        };
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        guard.check().map_err(changed)?;
        if let Some(recorded) = &self.identity {
            let now = ImageIdentity::read(guard.as_ref())
                .map_err(|e| changed(format!("it cannot be read back: {e}")))?;
            if let Some(why) = recorded.difference(&now) {
                return Err(changed(why));
            }
        }
        Ok(())
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
