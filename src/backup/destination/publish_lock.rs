//! The lock that makes publishing a backup (its image, then its manifest)
//! one step for every other qbackup run publishing into the same
//! directory.
//!
//! Why: two runs replacing one TARGET (`--force`) each rename an image and
//! then a manifest; interleaved, TARGET ends up with one run's image and
//! the other's manifest. Holding this lock around both renames makes the
//! pair one unit: the last run to publish leaves both of its files.
//!
//! The lock is an exclusive `flock` on TARGET's directory itself, not on a
//! lock file: the kernel drops it when its holder dies, however it dies,
//! and nothing is ever left behind for a later run (or a user) to clean up
//! or be confused by. It is held only while publishing (a few renames and a
//! directory sync), so runs in one directory wait for each other briefly.
//! Where the directory cannot be opened for reading or locked (some network
//! file systems), publishing goes on unlocked, as before.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::backup::{BackupError, Cancel};

/// How long to wait for another process's publishing before giving up.
const WAIT: Duration = Duration::from_secs(60);
/// How often the lock is tried again.
const RETRY: Duration = Duration::from_millis(5);

/// The directory, locked (or not, where it cannot be); unlocked on drop.
pub struct PublishLock {
    dir: Option<File>,
}

impl PublishLock {
    /// Locks `dir` for publishing `target` (named in messages), waiting
    /// for other runs' publishing; gives up when `cancel` is set.
    pub fn acquire(dir: &Path, target: &Path, cancel: &Cancel) -> Result<PublishLock, BackupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir)
        else {
            return Ok(PublishLock { dir: None });
        };
        let started = Instant::now();
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(PublishLock { dir: Some(file) }),
                Err(rustix::io::Errno::WOULDBLOCK) => {}
                Err(rustix::io::Errno::INTR) => continue,
                // Locks not supported here: publish unlocked.
                Err(_) => return Ok(PublishLock { dir: Some(file) }),
            }
            if started.elapsed() >= WAIT {
                return Err(BackupError::Commit {
                    path: target.to_path_buf(),
                    action: "lock its directory for publishing",
                    source: io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "another process has held the lock on {} for {} s",
                            dir.display(),
                            WAIT.as_secs()
                        ),
                    ),
                });
            }
            if !cancel.sleep(RETRY) {
                return Err(cancel.error());
            }
        }
    }

    /// Makes the directory's entries durable (the renames done under the
    /// lock).
    pub fn sync_dir(&self) {
        if let Some(d) = &self.dir {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = Cancel::new();
        let t = dir.path().join("t");
        let first = PublishLock::acquire(dir.path(), &t, &cancel).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let c = Cancel::new();
            let l = PublishLock::acquire(&path, &path.join("t"), &c).unwrap();
            tx.send(()).unwrap();
            drop(l);
        });
        // The second waits while the first holds it.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
        // Nothing left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        let _held = PublishLock::acquire(dir.path(), &t, &Cancel::new()).unwrap();
        let cancel = Cancel::new();
        cancel.request(libc::SIGTERM);
        let err = PublishLock::acquire(dir.path(), &t, &cancel).err().unwrap();
        assert!(matches!(err, BackupError::Interrupted { .. }), "{err}");
    }
}
