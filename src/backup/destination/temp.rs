//! The temporary file a backup is written to, beside TARGET, and the
//! removal of the ones earlier backups left behind (kill -9, power loss).
//!
//! Why: a killed backup cannot remove its temporary file, and a later run
//! must tell such a leftover from the file of a backup still running into
//! the same directory. The owner is recorded by a lock, not a name or a
//! PID: each backup holds an exclusive `flock` on its temporary file for as
//! long as the file exists under its temporary name, and the kernel drops
//! the lock when the owner dies, however it dies. A file whose lock can be
//! taken therefore has no owner and is removed.
//!
//! Invariants:
//! - Only names this module makes (`.qbackup-` + 6 letters or digits +
//!   `.tmp`) that are regular files are ever removed, and only while the
//!   remover holds their lock and the name still refers to the file it
//!   locked.
//! - A backup uses its temporary file only after it has locked it *and*
//!   seen that its name still refers to it: if a concurrent run locked the
//!   brand-new file first (and will remove it), the backup starts over with
//!   a new name. So no live backup's file is ever removed.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use tempfile::NamedTempFile;

const PREFIX: &str = ".qbackup-";
const SUFFIX: &str = ".tmp";
/// Random characters in a name (tempfile's default).
const RANDOM_LEN: usize = 6;
/// New names tried before giving up (each clash needs a concurrent run
/// that found the file in the microseconds between creation and lock).
const ATTEMPTS: usize = 16;

/// A leftover temporary file that was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// True for names [`create`] makes.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(SUFFIX))
        .is_some_and(|r| r.len() == RANDOM_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Takes `file`'s exclusive lock without waiting; false if another open
/// file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True when `path` names the file open as `file` (same device and inode).
fn names(path: &Path, file: &File) -> bool {
    match (path.symlink_metadata(), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Creates a temporary file in `dir`, locked for the life of the returned
/// handle (and of every handle cloned from it).
pub fn create(dir: &Path) -> io::Result<NamedTempFile> {
    for _ in 0..ATTEMPTS {
        let tmp = tempfile::Builder::new()
            .prefix(PREFIX)
            .suffix(SUFFIX)
            .rand_bytes(RANDOM_LEN)
            .tempfile_in(dir)?;
        match try_lock(tmp.as_file()) {
            Ok(true) if names(tmp.path(), tmp.as_file()) => return Ok(tmp),
            Ok(_) => {}
            // A file system without locks: the file is used unlocked (and
            // later runs, unable to lock it either, leave it alone).
            Err(_) => return Ok(tmp),
        }
        // A concurrent run took it for a leftover: it removes the name (or
        // has); dropping ours would remove nothing else.
        let _ = tmp.into_temp_path().keep();
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "temporary files kept being taken by concurrent backups",
    ))
}

/// Removes the temporary files in `dir` no running backup owns. Errors are
/// not failures here (an unreadable directory, a file of another user): such
/// files are left alone.
pub fn remove_stale(dir: &Path) -> Vec<Removed> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_temp_name) {
            continue;
        }
        let path = entry.path();
        // Never follow a link, never block on a FIFO someone put there.
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.is_file() || !matches!(try_lock(&file), Ok(true)) || !names(&path, &file) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            removed.push(Removed {
                path,
                bytes: meta.len(),
            });
        }
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_it_makes() {
        assert!(is_temp_name(".qbackup-aB3xY9.tmp"));
        assert!(!is_temp_name(".qbackup-aB3xY9.tmp~"));
        assert!(!is_temp_name(".qbackup-aB3xY.tmp"));
        assert!(!is_temp_name(".qbackup-aB3-Y9.tmp"));
        assert!(!is_temp_name("qbackup-aB3xY9.tmp"));
    }

    #[test]
    fn live_files_stay_dead_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let live = create(dir.path()).unwrap();
        // A leftover: a file of the pattern nobody holds.
        let dead = dir.path().join(".qbackup-dead00.tmp");
        std::fs::write(&dead, b"12345").unwrap();
        // Look-alikes that are not ours to remove.
        let other = dir.path().join(".qbackup-keep.tmp");
        std::fs::write(&other, b"").unwrap();
        let link = dir.path().join(".qbackup-link00.tmp");
        std::os::unix::fs::symlink(&other, &link).unwrap();

        let removed = remove_stale(dir.path());
        assert_eq!(
            removed,
            vec![Removed {
                path: dead.clone(),
                bytes: 5
            }]
        );
        assert!(live.path().exists() && other.exists() && link.symlink_metadata().is_ok());
        assert!(!dead.exists());
        // Once its owner is gone, the live one is a leftover too.
        let path = live.path().to_path_buf();
        live.into_temp_path().keep().unwrap();
        assert_eq!(remove_stale(dir.path()).len(), 1);
        assert!(!path.exists());
    }
}
