//! The storage seam: where an image's bytes come from and go to.
//!
//! Everything above this module (format drivers, the writer, the tool) does
//! I/O through [`Storage`], never through a `File`, so that an NBD export, an
//! in-memory buffer or a fault-injecting test double ([`fault`]) can stand
//! anywhere a file does. Implementations supply a few primitives; the
//! bounds-checked helpers every caller uses live on `dyn Storage` here, once:
//!
//! - A read that would run past the end is reported as such, never padded
//!   with zeros: for an image, a table or cluster past EOF means the image is
//!   damaged, and backing up zeros in place of data would be the worst
//!   possible outcome. A read that ends early inside the length known at open
//!   time (the file shrank, a short read) is an error too.
//! - Storage is read-only unless the implementation says otherwise: the
//!   default write, resize and sync refuse.
//! - All calls take `&self`, so many threads can share one storage.

pub mod cache;
pub mod fault;
pub mod file;
pub mod lock;
pub mod memory;
pub mod nbd;
pub mod retry;

use std::fmt;
use std::io;
use std::path::Path;

use crate::error::{Classify, ErrorClass, Remedy};
use crate::units::HostOffset;

pub use file::FileStorage;

/// What a storage says about a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileExtent {
    /// Bytes that are stored.
    Data,
    /// A hole: the bytes read as zero.
    Hole,
    /// Stored, but known to read as zeros (an NBD server's "zero" flag
    /// without "hole").
    ZeroData,
}

/// What the bytes past a storage's end read as in an allocation map (a raw
/// image's virtual size is its length rounded up to 512 bytes), as QEMU's
/// driver for that kind of storage reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// A hole at host offsets past the end (files: qemu's file driver).
    Hole,
    /// Zeros with no host offset (an NBD export with block status).
    Zero,
    /// Data at host offsets, like the rest (an NBD export without block
    /// status: nothing is known, everything is data).
    Data,
}

/// What identifies the object behind a storage, whatever name opened it
/// (device and inode for files), so that loops and "target is the source"
/// can be caught across paths and hard links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// What changes when a file is written: its length and its modification
/// and status-change times (nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeStamp {
    /// Length in bytes (`st_size`).
    pub len: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i128,
    /// `st_ctime` in nanoseconds.
    pub ctime_ns: i128,
}

/// A byte container: a file, a block device, an export.
pub trait Storage: Send + Sync + fmt::Debug {
    /// The name messages use for it (a path, or a URI).
    fn name(&self) -> &Path;

    /// Its length in bytes (for read-only storage: as it was at open time).
    fn len(&self) -> u64;

    /// What the bytes past the end read as in an allocation map; the
    /// default is a file's hole.
    fn padding(&self) -> Padding {
        Padding::Hole
    }

    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were
    /// read, 0 at the end. May read less than asked.
    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize>;

    /// Whether `offset` (inside the storage) starts data or a hole, and for
    /// how many bytes (at most `max_len`, which the caller has clamped to
    /// the end). The default knows no holes.
    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        let _ = offset;
        Ok((FileExtent::Data, max_len))
    }

    /// Whether writes are accepted (a target, or an image opened for
    /// update); read-only storage refuses them.
    fn writable(&self) -> bool {
        false
    }

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        let _ = (buf, offset);
        Err(read_only())
    }

    /// Makes `len` bytes at `offset` read as zeros, inside the current
    /// length (a restore onto a block device, which is not zero to begin
    /// with). The default writes zeros.
    fn write_zeroes(&self, offset: HostOffset, len: u64) -> io::Result<()> {
        write_zeroes_by_writes(self, offset, len)
    }

    /// Sets the length.
    fn set_len(&self, len: u64) -> io::Result<()> {
        let _ = len;
        Err(read_only())
    }

    /// Makes everything written durable.
    fn sync(&self) -> io::Result<()> {
        Err(read_only())
    }

    /// A hint that what was written so far may start going to disk now, so
    /// that a later [`Storage::sync`] finds little left. Default: nothing.
    fn start_writeback(&self) {}

    /// The state of the metadata context `context` (an NBD meta context
    /// such as `qemu:dirty-bitmap:NAME`, negotiated when the storage was
    /// opened, see [`crate::open::OpenOptions`]) at `offset` (inside the
    /// storage): the context's flags and for how many bytes (at most
    /// `max_len`, > 0) they hold. Wrappers forward it (so a retry policy
    /// applies to it as to reads); the default has no contexts and refuses
    /// with [`io::ErrorKind::Unsupported`].
    fn context_status(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> io::Result<(u32, u64)> {
        let _ = (offset, max_len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no metadata context {context:?}: only an NBD export has them"),
        ))
    }

    /// The identity of the object behind the storage, when it has one.
    fn identity(&self) -> Option<Identity> {
        None
    }

    /// Bytes it occupies on disk (as `du` counts), when that is known.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Its length and times as they are now, when it has them (a file;
    /// not an NBD export). Equal stamps at two moments mean no write
    /// in between, as far as the file system's timestamps can tell.
    fn change_stamp(&self) -> Option<ChangeStamp> {
        None
    }

    /// The descriptor whose page cache holds the bytes (a local file or
    /// block device), for cache hints ([`cache`]); wrappers forward it.
    /// Default: none (memory, an NBD export).
    fn cache_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// [`Storage::write_zeroes`] by writing zero buffers (at most 1 MiB each).
pub fn write_zeroes_by_writes<S: Storage + ?Sized>(
    storage: &S,
    offset: HostOffset,
    len: u64,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        storage.write_at(&zeros[..n as usize], HostOffset(offset.0 + done))?;
        done += n;
    }
    Ok(())
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "storage is read-only")
}

/// Errors from storage I/O. Variants are named after the failed action; the
/// image layer adds the file's name.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The file could not be opened.
    #[error("cannot open: {}", crate::error::io_text(.source))]
    Open {
        /// Why.
        source: io::Error,
    },
    /// The process (EMFILE) or the system (ENFILE) has no file
    /// descriptor left: a real limit on how deep a chain can be.
    #[error("cannot open: {}", too_many_files(source))]
    TooManyOpenFiles {
        /// EMFILE or ENFILE.
        source: io::Error,
    },
    /// The file is a kind that cannot hold an image (a FIFO, a socket, a
    /// character device): opening or reading it could block forever.
    #[error("cannot open: not a regular file or block device ({kind})")]
    UnsupportedKind {
        /// What it is.
        kind: &'static str,
    },
    /// The file's metadata could not be read.
    #[error("cannot stat: {}", crate::error::io_text(.source))]
    Stat {
        /// Why.
        source: io::Error,
    },
    /// A read failed in the operating system.
    #[error("read of {len} bytes at offset {offset} failed: {}", crate::error::io_text(.source))]
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
    /// A read inside the known length returned end-of-file early: the file
    /// shrank since it was opened, or the storage failed to deliver.
    #[error("read of {what} at offset {offset} (+{len} bytes) ended early at offset {at} (the file shrank since it was opened, or its storage failed)")]
    EndedEarly {
        /// What was being read.
        what: &'static str,
        /// Where the read started.
        offset: HostOffset,
        /// How much was asked for.
        len: u64,
        /// Where the data ended.
        at: HostOffset,
    },
    /// Looking for data or holes failed.
    #[error("looking for data/holes at offset {offset} failed: {}", crate::error::io_text(.source))]
    Seek {
        /// Where the search started.
        offset: HostOffset,
        /// Why.
        source: io::Error,
    },
    /// A write failed.
    #[error("write of {len} bytes at offset {offset} failed: {}", crate::error::io_text(.source))]
    Write {
        /// Where the write started.
        offset: HostOffset,
        /// Its length.
        len: u64,
        /// Why.
        source: io::Error,
    },
    /// Setting the length failed.
    #[error("cannot set the length to {len} bytes: {}", crate::error::io_text(.source))]
    Resize {
        /// The length asked for.
        len: u64,
        /// Why.
        source: io::Error,
    },
    /// Another process holds the image in a way that rules out a
    /// consistent read (QEMU's image locks).
    #[error("{}; back up a running VM through its QMP socket instead, or read the file anyway, accepting that the copy may be inconsistent", in_use_text(*.conflict))]
    InUse {
        /// What the other process holds.
        conflict: lock::Conflict,
    },
    /// Another process has the image open, so it cannot be updated in
    /// place (QEMU's image locks, see [`lock::lock_for_update`]).
    #[error("{}; clearing a dirty bitmap in it needs the image to itself (or leave the bitmap as it is)", in_use_text(*.conflict))]
    InUseForUpdate {
        /// What the other process holds.
        conflict: lock::Conflict,
    },
    /// Connecting to an NBD export failed (boxed: the NBD error is large
    /// and rare).
    #[error(transparent)]
    Nbd(Box<crate::nbd::NbdError>),
    /// Querying a metadata context failed (other than by the NBD server,
    /// whose errors are [`StorageError::Nbd`]).
    #[error("querying metadata context {context:?} at offset {offset} failed: {}", crate::error::io_text(.source))]
    ContextStatus {
        /// The context.
        context: String,
        /// Where the query started.
        offset: HostOffset,
        /// Why.
        source: io::Error,
    },
    /// Metadata contexts were asked of storage that has none (only an NBD
    /// export has them).
    #[error("cannot offer metadata context {context:?}: not an NBD export")]
    NoContexts {
        /// The first context asked for.
        context: String,
    },
    /// The storage cannot be written as asked.
    #[error("cannot write: {why}")]
    NotWritable {
        /// What is wrong.
        why: &'static str,
    },
}

impl StorageError {
    /// An error opening a file: running out of file descriptors gets its
    /// own message, the rest stays [`StorageError::Open`].
    pub fn open(source: io::Error) -> StorageError {
        match source.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => StorageError::TooManyOpenFiles { source },
            _ => StorageError::Open { source },
        }
    }
}

/// Says which limit was reached and what to do about it.
fn too_many_files(source: &io::Error) -> String {
    if source.raw_os_error() == Some(libc::ENFILE) {
        return format!(
            "{}: the system's open-file table is full",
            crate::error::io_text(source)
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or_else(|| "no".to_string(), |n| n.to_string());
    format!(
        "too many open files: the process may have {limit} open, and each image of a backing chain keeps one (raise the limit with `ulimit -n`)"
    )
}

impl StorageError {
    /// True when an NBD server does not offer a metadata context asked
    /// for (for `qemu:dirty-bitmap:NAME`: no such bitmap is exported).
    pub fn is_context_refused(&self) -> bool {
        matches!(self, StorageError::Nbd(e) if e.is_context_refused())
    }
}

impl Classify for StorageError {
    fn class(&self) -> ErrorClass {
        match self {
            StorageError::Open { source }
            | StorageError::Stat { source }
            | StorageError::TooManyOpenFiles { source } => ErrorClass::of_io(source),
            StorageError::UnsupportedKind { kind } if kind.ends_with("directory") => {
                ErrorClass::Usage
            }
            StorageError::UnsupportedKind { .. } | StorageError::NoContexts { .. } => {
                ErrorClass::Unsupported
            }
            StorageError::PastEof { .. } => ErrorClass::Corrupt,
            StorageError::NotWritable { .. }
            | StorageError::InUse { .. }
            | StorageError::InUseForUpdate { .. } => ErrorClass::Usage,
            StorageError::Read { source, .. }
            | StorageError::Seek { source, .. }
            | StorageError::Write { source, .. }
            | StorageError::Resize { source, .. }
            | StorageError::ContextStatus { source, .. } => ErrorClass::of_io(source),
            StorageError::EndedEarly { .. } => ErrorClass::Io,
            StorageError::Nbd(e) => e.class(),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            StorageError::InUse { .. } => Some(Remedy::ForceShare),
            StorageError::InUseForUpdate { .. } => Some(Remedy::KeepBitmap),
            StorageError::Nbd(e) => e.remedy(),
            _ => None,
        }
    }
}

impl From<crate::nbd::NbdError> for StorageError {
    fn from(e: crate::nbd::NbdError) -> StorageError {
        StorageError::Nbd(Box::new(e))
    }
}

fn in_use_text(c: lock::Conflict) -> String {
    match c {
        lock::Conflict::Writer(perm) => format!(
            "in use: another process (a running VM, qemu-nbd, qemu-img) holds QEMU's \"{perm}\" lock on it"
        ),
        lock::Conflict::NoSharedReads => "in use: another process holds it without letting others read it consistently (QEMU's \"consistent read\" lock)".to_string(),
        lock::Conflict::Reader => "in use: another process (qemu-img, qemu-nbd, another qbackup) is reading it".to_string(),
        lock::Conflict::NoSharedWrites => "in use: another process (qemu-img, qemu-nbd, another qbackup) reads it and does not let others write it".to_string(),
    }
}

impl dyn Storage + '_ {
    /// Checks that `len` bytes at `offset` lie inside the storage.
    pub fn check_range(
        &self,
        what: &'static str,
        offset: HostOffset,
        len: u64,
    ) -> Result<(), StorageError> {
        match offset.0.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(StorageError::PastEof {
                what,
                offset,
                len,
                file_len: self.len(),
            }),
        }
    }

    /// Fills `buf` from `offset`; the whole range must lie inside.
    pub fn read_exact_at(
        &self,
        what: &'static str,
        buf: &mut [u8],
        offset: HostOffset,
    ) -> Result<(), StorageError> {
        let len = buf.len() as u64;
        self.check_range(what, offset, len)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = HostOffset(offset.0 + done as u64);
            match self.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(StorageError::EndedEarly {
                        what,
                        offset,
                        len,
                        at,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StorageError::Read {
                        offset,
                        len,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads what the storage holds of `buf.len()` bytes at `offset` and
    /// fills the rest with zeros. Only for raw images, whose tail past EOF
    /// is defined to read as zeros (the virtual size is rounded up to 512).
    pub fn read_zero_padded(&self, buf: &mut [u8], offset: HostOffset) -> Result<(), StorageError> {
        let avail = self.len().saturating_sub(offset.0).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.read_exact_at("data", head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Says whether `offset` is in data or in a hole and how many bytes (at
    /// most `max_len`, > 0) share that state. Past the end everything is a
    /// hole.
    pub fn extent_at(
        &self,
        offset: HostOffset,
        max_len: u64,
    ) -> Result<(FileExtent, u64), StorageError> {
        if offset.0 >= self.len() {
            return Ok((FileExtent::Hole, max_len));
        }
        let to_end = (self.len() - offset.0).min(max_len);
        let (kind, n) = self
            .data_or_hole(offset, to_end)
            .map_err(|source| StorageError::Seek { offset, source })?;
        Ok((kind, n.clamp(1, to_end)))
    }

    /// The state of metadata context `context` at `offset` (inside the
    /// storage): its flags and for how many bytes (at most `max_len`, > 0)
    /// they hold; see [`Storage::context_status`]. An NBD server's error
    /// stays an NBD error, with its class.
    pub fn context_status_at(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> Result<(u32, u64), StorageError> {
        let to_end = self.len().saturating_sub(offset.0).min(max_len);
        let (flags, n) = self
            .context_status(context, offset, to_end.max(1))
            .map_err(|source| {
                if source
                    .get_ref()
                    .is_some_and(|e| e.is::<crate::nbd::NbdError>())
                {
                    match source
                        .into_inner()
                        .map(|e| e.downcast::<crate::nbd::NbdError>())
                    {
                        Some(Ok(nbd)) => return StorageError::Nbd(nbd),
                        _ => unreachable!("an NBD error, checked above"),
                    }
                }
                if source.kind() == io::ErrorKind::Unsupported {
                    return StorageError::NoContexts {
                        context: context.to_string(),
                    };
                }
                StorageError::ContextStatus {
                    context: context.to_string(),
                    offset,
                    source,
                }
            })?;
        Ok((flags, n.clamp(1, max_len.max(1))))
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: HostOffset) -> Result<(), StorageError> {
        self.write_at(buf, offset)
            .map_err(|source| StorageError::Write {
                offset,
                len: buf.len() as u64,
                source,
            })
    }
}
