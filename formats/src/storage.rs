//! Positioned, bounds-checked reads from one file.
//!
//! Every read names the file and the offset when it fails, and a read that
//! would run past the end of the file is reported as such rather than being
//! padded with zeros: for an image, a table or cluster past EOF means the
//! image is damaged, and backing up zeros in place of data would be the worst
//! possible outcome. All reads take `&self` so many threads can share one file.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::units::HostOffset;

/// Errors from reading a file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The file could not be opened.
    #[error("cannot open: {source}")]
    Open {
        /// Why.
        source: io::Error,
    },
    /// The file's metadata could not be read.
    #[error("cannot stat: {source}")]
    Stat {
        /// Why.
        source: io::Error,
    },
    /// A read failed in the operating system.
    #[error("read of {len} bytes at offset {offset} failed: {source}")]
    Read {
        /// Where the read started.
        offset: HostOffset,
        /// How much was asked for.
        len: u64,
        /// Why.
        source: io::Error,
    },
    /// A read would run past the end of the file.
    #[error(
        "{what} at offset {offset} (+{len} bytes) lies past the end of the file ({file_len} bytes)"
    )]
    PastEof {
        /// What was being read (e.g. "L2 table").
        what: &'static str,
        /// Where the read started.
        offset: HostOffset,
        /// How much was asked for.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Looking for data or holes failed.
    #[error("looking for data/holes at offset {offset} failed: {source}")]
    Seek {
        /// Where the search started.
        offset: HostOffset,
        /// Why.
        source: io::Error,
    },
}

/// One read-only file with its length taken at open time.
#[derive(Debug)]
pub struct Storage {
    file: File,
    path: PathBuf,
    len: u64,
}

/// What `SEEK_DATA`/`SEEK_HOLE` say about a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileExtent {
    /// Bytes that are stored in the file.
    Data,
    /// A hole: the bytes read as zero.
    Hole,
}

impl Storage {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Storage, StorageError> {
        let file = File::open(path).map_err(|source| StorageError::Open { source })?;
        let meta = file
            .metadata()
            .map_err(|source| StorageError::Stat { source })?;
        let kind = meta.file_type();
        let len = if kind.is_file() {
            meta.len()
        } else if kind.is_block_device() {
            // st_size is 0 for a block device; its end is its size.
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| StorageError::Stat { source: e.into() })?
        } else {
            return Err(StorageError::Open {
                source: io::Error::other("not a regular file or block device"),
            });
        };
        Ok(Storage {
            len,
            file,
            path: path.to_path_buf(),
        })
    }

    /// Device and inode: the file's identity, whatever path names it.
    pub fn identity(&self) -> Result<(u64, u64), StorageError> {
        let meta = self
            .file
            .metadata()
            .map_err(|source| StorageError::Stat { source })?;
        Ok((meta.dev(), meta.ino()))
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file length in bytes, as it was at open time.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the file occupies on disk (`st_blocks * 512`), as `du` counts.
    pub fn allocated_size(&self) -> Result<u64, StorageError> {
        let meta = self
            .file
            .metadata()
            .map_err(|source| StorageError::Stat { source })?;
        Ok(meta.blocks().saturating_mul(512))
    }

    /// Checks that `len` bytes at `offset` lie inside the file.
    pub fn check_range(
        &self,
        what: &'static str,
        offset: HostOffset,
        len: u64,
    ) -> Result<(), StorageError> {
        match offset.0.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(StorageError::PastEof {
                what,
                offset,
                len,
                file_len: self.len,
            }),
        }
    }

    /// Fills `buf` from `offset`; the whole range must lie inside the file.
    pub fn read_exact_at(
        &self,
        what: &'static str,
        buf: &mut [u8],
        offset: HostOffset,
    ) -> Result<(), StorageError> {
        self.check_range(what, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset.0)
            .map_err(|source| match source.kind() {
                io::ErrorKind::UnexpectedEof => StorageError::PastEof {
                    what,
                    offset,
                    len: buf.len() as u64,
                    file_len: self.len,
                },
                _ => StorageError::Read {
                    offset,
                    len: buf.len() as u64,
                    source,
                },
            })
    }

    /// Reads what the file holds of `buf.len()` bytes at `offset` and fills
    /// the rest with zeros. Only for raw images, whose tail past EOF is
    /// defined to read as zeros (the virtual size is rounded up to 512).
    pub fn read_zero_padded(&self, buf: &mut [u8], offset: HostOffset) -> Result<(), StorageError> {
        let avail = self.len.saturating_sub(offset.0).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.read_exact_at("data", head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Says whether `offset` is in data or in a hole and how many bytes
    /// (at most `max_len`) share that state. Past EOF everything is a hole.
    pub fn extent_at(
        &self,
        offset: HostOffset,
        max_len: u64,
    ) -> Result<(FileExtent, u64), StorageError> {
        use rustix::fs::{seek, SeekFrom};
        if offset.0 >= self.len {
            return Ok((FileExtent::Hole, max_len));
        }
        let to_eof = self.len - offset.0;
        let seek_err = |e: rustix::io::Errno| StorageError::Seek {
            offset,
            source: e.into(),
        };
        match seek(&self.file, SeekFrom::Data(offset.0)) {
            Ok(data) if data == offset.0 => {
                let hole = match seek(&self.file, SeekFrom::Hole(offset.0)) {
                    Ok(h) => h,
                    Err(e) => return Err(seek_err(e)),
                };
                let run = hole.saturating_sub(offset.0).max(1).min(to_eof);
                Ok((FileExtent::Data, run.min(max_len)))
            }
            Ok(data) => Ok((FileExtent::Hole, (data - offset.0).min(max_len))),
            // ENXIO: no data after offset, the rest of the file is a hole.
            Err(rustix::io::Errno::NXIO) => Ok((FileExtent::Hole, max_len)),
            // No SEEK_DATA support: treat everything as data.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                Ok((FileExtent::Data, to_eof.min(max_len)))
            }
            Err(e) => Err(seek_err(e)),
        }
    }
}
