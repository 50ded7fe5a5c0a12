//! [`Storage`] on a regular file or block device.
//!
//! Opening never blocks: the file is opened with `O_NONBLOCK` and anything
//! that is not a regular file or a block device (a FIFO, a socket, a
//! character device) is refused at once, because reading it could wait
//! forever. Allocation comes from `SEEK_DATA`/`SEEK_HOLE`. A read-only file
//! keeps the length it had at open time, so that a file that shrinks under
//! us is reported rather than read as zeros; a writable one tracks what is
//! written.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::OFlags;

use super::{FileExtent, Identity, Storage, StorageError};
use crate::units::HostOffset;

/// A file opened for reading, or for writing a new image.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    len: AtomicU64,
    writable: bool,
}

/// The kind of file a mode describes, for refusals.
fn unsupported_kind(kind: std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() || kind.is_block_device() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("an unsupported file type")
    }
}

impl FileStorage {
    /// Opens `path` read-only without blocking; refuses anything that is
    /// not a regular file or a block device.
    pub fn open_read_only(path: &Path) -> Result<FileStorage, StorageError> {
        Self::open_checked(path, false)
    }

    /// Opens `path` for reading and writing in place (an image whose
    /// metadata is updated, such as a dirty bitmap being cleared), with the
    /// same checks as [`FileStorage::open_read_only`]. Take
    /// [`FileStorage::lock_for_update`] before writing.
    pub fn open_for_update(path: &Path) -> Result<FileStorage, StorageError> {
        Self::open_checked(path, true)
    }

    fn open_checked(path: &Path, write: bool) -> Result<FileStorage, StorageError> {
        // Refuse by the path's type first: opening a socket fails with an
        // unhelpful ENXIO, and a FIFO must not be opened at all.
        if let Ok(meta) = std::fs::metadata(path) {
            if let Some(kind) = unsupported_kind(meta.file_type()) {
                return Err(StorageError::UnsupportedKind { kind });
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
            .open(path)
            .map_err(StorageError::open)?;
        let meta = file
            .metadata()
            .map_err(|source| StorageError::Stat { source })?;
        // The path may have been swapped between the check and the open.
        if let Some(kind) = unsupported_kind(meta.file_type()) {
            return Err(StorageError::UnsupportedKind { kind });
        }
        rustix::fs::fcntl_setfl(&file, OFlags::empty())
            .map_err(|e| StorageError::Open { source: e.into() })?;
        let len = if meta.file_type().is_block_device() {
            // st_size is 0 for a block device; its end is its size.
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| StorageError::Stat { source: e.into() })?
        } else {
            meta.len()
        };
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            len: AtomicU64::new(len),
            writable: write,
        })
    }

    /// Takes QEMU's locks of a writer that keeps the image to itself
    /// ([`super::lock::lock_for_update`]); fails when any other process
    /// has the image open with locks.
    pub fn lock_for_update(&self) -> Result<(), StorageError> {
        match super::lock::lock_for_update(&self.file) {
            Ok(None) => Ok(()),
            Ok(Some(conflict)) => Err(StorageError::InUseForUpdate { conflict }),
            Err(source) => Err(StorageError::Open { source }),
        }
    }

    /// Takes QEMU's locks of a consistent reader ([`super::lock`]); fails
    /// when another process writes the image or does not share reads.
    pub fn lock_for_consistent_read(&self) -> Result<(), StorageError> {
        match super::lock::lock_for_consistent_read(&self.file) {
            Ok(None) => Ok(()),
            Ok(Some(conflict)) => Err(StorageError::InUse { conflict }),
            Err(source) => Err(StorageError::open(source)),
        }
    }

    /// What another process holds that would rule out a consistent read,
    /// without taking any lock (for `--force-share`).
    pub fn lock_conflict(&self) -> Result<Option<super::lock::Conflict>, StorageError> {
        super::lock::check_conflicts(&self.file).map_err(|source| StorageError::Open { source })
    }

    /// Wraps a file the caller created for writing (a temporary target).
    /// Refuses a file that is not open for writing or is in append mode
    /// (positioned writes would land at the end).
    pub fn writable(file: File, path: &Path) -> Result<FileStorage, StorageError> {
        let flags =
            rustix::fs::fcntl_getfl(&file).map_err(|e| StorageError::Stat { source: e.into() })?;
        if flags.contains(OFlags::APPEND) {
            return Err(StorageError::NotWritable {
                why: "file is in append mode",
            });
        }
        if flags.intersection(OFlags::ACCMODE) == OFlags::RDONLY {
            return Err(StorageError::NotWritable {
                why: "file is not open for writing",
            });
        }
        let meta = file
            .metadata()
            .map_err(|source| StorageError::Stat { source })?;
        let len = if meta.file_type().is_block_device() {
            // A device written in place (a restore): its size is its end.
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| StorageError::Stat { source: e.into() })?
        } else {
            meta.len()
        };
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            len: AtomicU64::new(len),
            writable: true,
        })
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "storage is read-only",
            ))
        }
    }
}

impl Storage for FileStorage {
    fn writable(&self) -> bool {
        self.writable
    }

    fn name(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        self.file.read_at(buf, offset.0)
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        use rustix::fs::{seek, SeekFrom};
        match seek(&self.file, SeekFrom::Data(offset.0)) {
            Ok(data) if data == offset.0 => {
                let hole = seek(&self.file, SeekFrom::Hole(offset.0))?;
                Ok((FileExtent::Data, hole.saturating_sub(offset.0).min(max_len)))
            }
            Ok(data) => Ok((FileExtent::Hole, (data - offset.0).min(max_len))),
            // ENXIO: no data after offset, the rest of the file is a hole.
            Err(rustix::io::Errno::NXIO) => Ok((FileExtent::Hole, max_len)),
            // No SEEK_DATA support: treat everything as data.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                Ok((FileExtent::Data, max_len))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset.0)?;
        self.len
            .fetch_max(offset.0 + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(&self, offset: HostOffset, len: u64) -> io::Result<()> {
        self.check_writable()?;
        use rustix::fs::FallocateFlags as F;
        // The device (or file system) zeroes the range itself when it can
        // (a block device turns this into a zero-out or discard request).
        match rustix::fs::fallocate(&self.file, F::ZERO_RANGE | F::KEEP_SIZE, offset.0, len) {
            Ok(()) => Ok(()),
            Err(_) => super::write_zeroes_by_writes(self, offset, len),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.file.set_len(len)?;
        self.len.store(len, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.check_writable()?;
        self.file.sync_all()
    }

    fn start_writeback(&self) {
        if self.writable {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on a descriptor this value owns; no
            // memory is passed. Errors only mean the hint is ignored (the
            // final sync still runs).
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }

    fn identity(&self) -> Option<Identity> {
        let meta = self.file.metadata().ok()?;
        Some(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        let meta = self.file.metadata()?;
        Ok(Some(meta.blocks().saturating_mul(512)))
    }

    fn change_stamp(&self) -> Option<super::ChangeStamp> {
        let meta = self.file.metadata().ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(super::ChangeStamp {
            len: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }

    fn cache_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fifo_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let started = Instant::now();
        let err = FileStorage::open_read_only(&fifo).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(err.to_string().contains("a FIFO"), "{err}");
    }

    #[test]
    fn directory_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileStorage::open_read_only(dir.path()).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
    }

    #[test]
    fn read_only_refuses_writes_and_append_mode_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let s = FileStorage::open_read_only(&p).unwrap();
        assert!(s.write_at(b"x", HostOffset(0)).is_err());
        assert!(s.sync().is_err());
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        assert!(FileStorage::writable(f, &p).is_err());
        let f = File::open(&p).unwrap();
        assert!(FileStorage::writable(f, &p).is_err());
    }

    #[test]
    fn writable_tracks_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let s = FileStorage::writable(f, &p).unwrap();
        s.write_at(b"hello", HostOffset(10)).unwrap();
        assert_eq!(s.len(), 15);
        s.set_len(4096).unwrap();
        assert_eq!(s.len(), 4096);
        s.sync().unwrap();
        let dynamic: &dyn Storage = &s;
        let mut buf = [0u8; 5];
        dynamic
            .read_exact_at("data", &mut buf, HostOffset(10))
            .unwrap();
        assert_eq!(&buf, b"hello");
        assert!(dynamic
            .read_exact_at("data", &mut buf, HostOffset(4094))
            .is_err());
    }
}
