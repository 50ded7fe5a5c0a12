//! The lock on a backup set: `SET/.qbackup-set.lock`, an `flock` that
//! serialises the commands changing a set (backup, prune: exclusive) with
//! those that need its files to stay (restore, verify: shared).
//!
//! Why a lock file and not the directory: the backup's own publish lock
//! (`backup/destination/publish_lock.rs`) already flocks each disk's
//! directory while renaming; the set's lock is held for a whole command.
//! The kernel drops an flock when its holder dies, however it dies, so a
//! `kill -9` never leaves the set locked; the empty file stays, harmless.
//! A second process fails at once with one line naming the set, or waits
//! when asked (`--wait`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

use super::SetError;

/// The lock file's name in a set.
pub const LOCK_FILE: &str = ".qbackup-set.lock";

/// How a command holds the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Several readers at once (restore, verify).
    Shared,
    /// One writer, no readers (backup, prune).
    Exclusive,
}

/// The set, locked; unlocked on drop (or when the process dies).
#[derive(Debug)]
pub struct SetLock {
    _file: File,
    path: PathBuf,
}

impl SetLock {
    /// Locks the set `set` (made if missing) in `mode`; fails at once when
    /// another process holds it in a conflicting mode, unless `wait`.
    pub fn acquire(set: &Path, mode: LockMode, wait: bool) -> Result<SetLock, SetError> {
        std::fs::create_dir_all(set).map_err(|source| SetError::Dir {
            path: set.to_path_buf(),
            action: "create the directory",
            source,
        })?;
        let path = set.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| SetError::Lock {
                path: path.clone(),
                source,
            })?;
        let op = match mode {
            LockMode::Shared => FlockOperation::NonBlockingLockShared,
            LockMode::Exclusive => FlockOperation::NonBlockingLockExclusive,
        };
        loop {
            match flock(&file, op) {
                Ok(()) => return Ok(SetLock { _file: file, path }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) if wait => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(SetError::Busy {
                        set: set.to_path_buf(),
                    })
                }
                Err(e) => {
                    return Err(SetError::Lock {
                        path,
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let dir = tempfile::tempdir().unwrap();
        let a = SetLock::acquire(dir.path(), LockMode::Shared, false).unwrap();
        let b = SetLock::acquire(dir.path(), LockMode::Shared, false).unwrap();
        let e = SetLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap_err();
        assert!(matches!(e, SetError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("another qbackup"), "{e}");
        drop((a, b));
        let x = SetLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap();
        assert!(SetLock::acquire(dir.path(), LockMode::Shared, false).is_err());
        assert_eq!(x.path(), dir.path().join(LOCK_FILE));
    }

    #[test]
    fn waiting_gets_the_lock_once_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = SetLock::acquire(dir.path(), LockMode::Exclusive, false).unwrap();
        let set = dir.path().to_path_buf();
        let t = std::thread::spawn(move || {
            SetLock::acquire(&set, LockMode::Exclusive, true).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished());
        drop(held);
        t.join().unwrap().unwrap();
    }
}
