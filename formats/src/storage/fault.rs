//! A fault-injecting [`Storage`] wrapper for tests.
//!
//! Put it under any layer (through an `Opener` wrapper) or under a backup
//! target to see how the code above copes with the failures real disks and
//! networks produce: EIO on a read, a read that stops short, ENOSPC on a
//! write, EIO on sync, or a slow request. Each fault applies to the
//! operations whose byte range overlaps its range; everything else is passed
//! to the wrapped storage unchanged. It is part of the library (not
//! `cfg(test)`) so that integration tests can use it.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{FileExtent, Identity, Storage};
use crate::units::HostOffset;

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// A read fails with EIO.
    ReadEio,
    /// The first N reads in the range fail with EIO, later ones work (a
    /// transient error, for retry policies).
    ReadEioFirst(u64),
    /// A read returns the bytes before the fault's range and then
    /// end-of-file, as if the storage ended there.
    ShortRead,
    /// A write fails with ENOSPC.
    WriteNoSpace,
    /// A sync fails with EIO (the range is ignored).
    SyncEio,
    /// The first sync fails with EIO and later ones succeed, as Linux
    /// reports a failed writeback once (the range is ignored).
    SyncEioOnce,
    /// Reads in the range take this long first.
    ReadDelay(Duration),
}

/// One fault: a kind and the bytes it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What goes wrong.
    pub kind: FaultKind,
    /// Host bytes whose access triggers it.
    pub range: Range<u64>,
}

impl Fault {
    /// A fault of `kind` over `range`.
    pub fn new(kind: FaultKind, range: Range<u64>) -> Fault {
        Fault { kind, range }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.range.end && self.range.start < offset.saturating_add(len)
    }
}

/// A storage that fails as told; see the module docs.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Vec<Fault>,
    /// Reads (or syncs) each fault has seen (for `ReadEioFirst`,
    /// `SyncEioOnce`).
    seen: Vec<AtomicU64>,
    triggered: AtomicU64,
}

impl FaultyStorage {
    /// Wraps `inner` with `faults`.
    pub fn new(inner: Arc<dyn Storage>, faults: Vec<Fault>) -> FaultyStorage {
        FaultyStorage {
            inner,
            seen: faults.iter().map(|_| AtomicU64::new(0)).collect(),
            faults,
            triggered: AtomicU64::new(0),
        }
    }

    /// How many operations a fault has hit so far.
    pub fn triggered(&self) -> u64 {
        self.triggered.load(Ordering::Relaxed)
    }

    fn hit(&self) {
        self.triggered.fetch_add(1, Ordering::Relaxed);
    }
}

impl Storage for FaultyStorage {
    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn name(&self) -> &Path {
        self.inner.name()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        let len = buf.len() as u64;
        let mut limit = buf.len();
        let overlapping = self
            .faults
            .iter()
            .zip(&self.seen)
            .filter(|(f, _)| f.overlaps(offset.0, len));
        for (f, seen) in overlapping {
            match &f.kind {
                FaultKind::ReadEio => {
                    self.hit();
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                FaultKind::ReadEioFirst(n) => {
                    if seen.fetch_add(1, Ordering::SeqCst) < *n {
                        self.hit();
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                }
                FaultKind::ShortRead => {
                    self.hit();
                    limit = limit.min(f.range.start.saturating_sub(offset.0) as usize);
                }
                FaultKind::ReadDelay(d) => {
                    self.hit();
                    std::thread::sleep(*d);
                }
                FaultKind::WriteNoSpace | FaultKind::SyncEio | FaultKind::SyncEioOnce => {}
            }
        }
        if limit == 0 {
            return Ok(0);
        }
        self.inner.read_at(&mut buf[..limit], offset)
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        self.inner.data_or_hole(offset, max_len)
    }

    fn context_status(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> io::Result<(u32, u64)> {
        self.inner.context_status(context, offset, max_len)
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        let hit = self
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::WriteNoSpace && f.overlaps(offset.0, buf.len() as u64));
        if hit {
            self.hit();
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        for (f, seen) in self.faults.iter().zip(&self.seen) {
            let fails = match f.kind {
                FaultKind::SyncEio => true,
                FaultKind::SyncEioOnce => seen.fetch_add(1, Ordering::SeqCst) == 0,
                _ => false,
            };
            if fails {
                self.hit();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.inner.sync()
    }

    fn start_writeback(&self) {
        self.inner.start_writeback()
    }

    fn identity(&self) -> Option<Identity> {
        self.inner.identity()
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }

    fn change_stamp(&self) -> Option<super::ChangeStamp> {
        self.inner.change_stamp()
    }

    fn cache_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.cache_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;
    use crate::storage::StorageError;

    fn storage(faults: Vec<Fault>) -> Arc<dyn Storage> {
        let inner = Arc::new(MemoryStorage::read_only("f", vec![7u8; 8192]));
        Arc::new(FaultyStorage::new(inner, faults))
    }

    #[test]
    fn eio_only_inside_range() {
        let s = storage(vec![Fault::new(FaultKind::ReadEio, 4096..4097)]);
        let mut buf = [0u8; 4096];
        s.read_exact_at("data", &mut buf, HostOffset(0)).unwrap();
        assert_eq!(buf[0], 7);
        let err = s
            .read_exact_at("data", &mut buf, HostOffset(2048))
            .unwrap_err();
        assert!(matches!(err, StorageError::Read { .. }), "{err}");
        assert!(err.to_string().contains("Input/output error"), "{err}");
    }

    #[test]
    fn short_read_is_reported() {
        let s = storage(vec![Fault::new(FaultKind::ShortRead, 6000..8192)]);
        let mut buf = [0u8; 4096];
        let err = s
            .read_exact_at("L2 table", &mut buf, HostOffset(4096))
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::EndedEarly {
                    at: HostOffset(6000),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn sync_and_write_faults() {
        let inner = Arc::new(MemoryStorage::writable("w", Vec::new()));
        let s = FaultyStorage::new(
            inner,
            vec![
                Fault::new(FaultKind::WriteNoSpace, 1 << 20..u64::MAX),
                Fault::new(FaultKind::SyncEio, 0..0),
            ],
        );
        s.write_at(b"ok", HostOffset(0)).unwrap();
        let e = s.write_at(b"no", HostOffset(1 << 20)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(s.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(s.triggered(), 2);
    }
}
