//! QEMU's image locking protocol, so that qbackup never reads an image that
//! a running VM (or qemu-nbd, qemu-img, another qbackup) is writing, and no
//! QEMU can start writing an image while qbackup reads it.
//!
//! QEMU (block/file-posix.c, the lock-bytes functions) expresses block
//! permissions as open-file-description byte-range locks, all shared
//! (`F_RDLCK`) so that holders coexist:
//! - byte `100 + i` is locked by every opener that *holds* permission `i`;
//! - byte `200 + i` is locked by every opener that *does not share*
//!   permission `i` with others.
//!
//! Permission bits (include/block/block-common.h): 0 consistent read,
//! 1 write, 2 write-unchanged, 3 resize. A reader that must see a consistent
//! image, like `qemu-img convert`'s source, holds "consistent read" and does
//! not share "write" or "resize". So qbackup locks bytes 100, 201 and 203,
//! then (as QEMU does, after applying its own) tests for conflicting locks
//! of others: byte 101 or 103 (someone holds write or resize) or 200
//! (someone does not share consistent reads). A conflicting lock is tested
//! with an exclusive `F_OFD_GETLK`, which our own locks on the same open file
//! description never trip.
//!
//! Clearing a persistent dirty bitmap writes the image, so for that qbackup
//! locks like a writer that wants the image to itself: it holds "consistent
//! read" and "write" (bytes 100, 101), does not share "write" or "resize"
//! (201, 203), and refuses when anyone else holds any of those permissions
//! or does not share them (bytes 100, 101, 103, 200, 201): a VM, qemu-nbd,
//! qemu-img, or another qbackup reading or clearing the same image.
//!
//! Locks are advisory: a writer that takes none (dd, a script) is not kept
//! out by them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The first byte of the "holds permission" range.
const PERM_BASE: i64 = 100;
/// The first byte of the "does not share permission" range.
const SHARED_BASE: i64 = 200;

/// Permission bits, as QEMU numbers them.
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

/// Whose permission conflicts with ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Another process holds the image open for writing (or resizing).
    Writer(&'static str),
    /// Another process does not let others read the image consistently.
    NoSharedReads,
    /// Another process reads the image consistently (only a conflict for
    /// an update, see [`lock_for_update`]).
    Reader,
    /// Another process does not let others write the image (a consistent
    /// reader such as `qemu-img convert` or a qbackup backup).
    NoSharedWrites,
}

fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_short, byte: i64) -> io::Result<i16> {
    // SAFETY: `flock` is plain data; zeroed is a valid value, and the
    // kernel only reads and writes the struct we pass for the duration of
    // the call, on a descriptor `file` owns.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

/// True when another open file description holds a lock on `byte`.
fn locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let kind = ofd_lock(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK as libc::c_short,
        byte,
    )?;
    Ok(kind != libc::F_UNLCK as libc::c_short)
}

/// Takes the read-only permissions of a consistent reader on `file` and
/// returns the first conflict with another process, if any. The locks
/// stay until the file is closed. File systems without locks (ENOLCK,
/// EOPNOTSUPP) are treated as unlocked, as QEMU's `locking=auto` does.
pub fn lock_for_consistent_read(file: &File) -> io::Result<Option<Conflict>> {
    let taken = take(
        file,
        &[
            PERM_BASE + CONSISTENT_READ,
            SHARED_BASE + WRITE,
            SHARED_BASE + RESIZE,
        ],
    )?;
    if !taken {
        return Ok(None);
    }
    check_conflicts(file)
}

/// Takes the permissions of a writer that keeps the image to itself (see
/// the module docs) on `file`, which must be open for writing, and returns
/// the first conflict with another process, if any.
pub fn lock_for_update(file: &File) -> io::Result<Option<Conflict>> {
    let taken = take(
        file,
        &[
            PERM_BASE + CONSISTENT_READ,
            PERM_BASE + WRITE,
            SHARED_BASE + WRITE,
            SHARED_BASE + RESIZE,
        ],
    )?;
    if !taken {
        return Ok(None);
    }
    first_conflict(
        file,
        &[
            (PERM_BASE + WRITE, Conflict::Writer("write")),
            (PERM_BASE + RESIZE, Conflict::Writer("resize")),
            (PERM_BASE + CONSISTENT_READ, Conflict::Reader),
            (SHARED_BASE + CONSISTENT_READ, Conflict::NoSharedReads),
            (SHARED_BASE + WRITE, Conflict::NoSharedWrites),
        ],
    )
}

/// Takes shared locks on `bytes`; false when the file system has no locks.
fn take(file: &File, bytes: &[i64]) -> io::Result<bool> {
    let rd = libc::F_RDLCK as libc::c_short;
    for &byte in bytes {
        match ofd_lock(file, libc::F_OFD_SETLK, rd, byte) {
            Ok(_) => {}
            // Someone holds an exclusive lock there: a conflict, reported
            // by the tests that follow.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Tests for others' locks that conflict with a consistent reader, without
/// taking any (for `--force-share`, which reads anyway but warns).
pub fn check_conflicts(file: &File) -> io::Result<Option<Conflict>> {
    first_conflict(
        file,
        &[
            (PERM_BASE + WRITE, Conflict::Writer("write")),
            (PERM_BASE + RESIZE, Conflict::Writer("resize")),
            (SHARED_BASE + CONSISTENT_READ, Conflict::NoSharedReads),
        ],
    )
}

/// The first of `tests` whose byte another open file description locks.
fn first_conflict(file: &File, tests: &[(i64, Conflict)]) -> io::Result<Option<Conflict>> {
    for &(byte, conflict) in tests {
        match locked_by_others(file, byte) {
            Ok(true) => return Ok(Some(conflict)),
            Ok(false) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    /// Two open file descriptions in one process conflict like two
    /// processes: a "writer" holding byte 101 is seen by a reader.
    #[test]
    fn sees_a_writer_and_ignores_its_own_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let reader = File::open(&p).unwrap();
        assert_eq!(lock_for_consistent_read(&reader).unwrap(), None);
        // A second consistent reader coexists with the first.
        let reader2 = File::open(&p).unwrap();
        assert_eq!(lock_for_consistent_read(&reader2).unwrap(), None);
        let writer = File::open(&p).unwrap();
        ofd_lock(
            &writer,
            libc::F_OFD_SETLK,
            libc::F_RDLCK as libc::c_short,
            PERM_BASE + WRITE,
        )
        .unwrap();
        let third = File::open(&p).unwrap();
        assert_eq!(
            lock_for_consistent_read(&third).unwrap(),
            Some(Conflict::Writer("write"))
        );
        assert_eq!(
            check_conflicts(&third).unwrap(),
            Some(Conflict::Writer("write"))
        );
        drop(writer);
        assert_eq!(check_conflicts(&third).unwrap(), None);
        // Our reader's lock on 201 is what keeps a new writer out.
        assert!(locked_by_others(&third, SHARED_BASE + WRITE).unwrap());
    }

    /// An update needs the image to itself: a consistent reader keeps it
    /// out, and once it holds the image, readers and writers see it.
    #[test]
    fn update_excludes_readers_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let rw = || OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let reader = File::open(&p).unwrap();
        assert_eq!(lock_for_consistent_read(&reader).unwrap(), None);
        assert_eq!(lock_for_update(&rw()).unwrap(), Some(Conflict::Reader));
        drop(reader);
        let updater = rw();
        assert_eq!(lock_for_update(&updater).unwrap(), None);
        assert_eq!(
            lock_for_consistent_read(&File::open(&p).unwrap()).unwrap(),
            Some(Conflict::Writer("write"))
        );
        assert_eq!(
            lock_for_update(&rw()).unwrap(),
            Some(Conflict::Writer("write"))
        );
        drop(updater);
        assert_eq!(lock_for_update(&rw()).unwrap(), None);
    }
}
