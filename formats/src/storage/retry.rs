//! A storage wrapper that retries failed reads or writes a few times with
//! growing pauses: the backup job's `on-source-error`/`on-target-error`
//! retry policy, put under any storage through the opener seam.
//!
//! Only errors that may go away are retried (EIO, EAGAIN, EINTR, ETIMEDOUT,
//! ENOSPC, a reset connection); a short read is never retried here (the
//! callers treat it as the end of the data). Invariant: a retried write
//! rewrites the same bytes at the same offset, so the result does not depend
//! on how many attempts it took.
//!
//! A sync is never retried: when a sync fails, Linux may mark the pages it
//! could not write clean and report the next sync as a success, so a
//! retried sync could turn lost data into a backup that looks good (the
//! failure PostgreSQL calls "fsyncgate").

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{ChangeStamp, FileExtent, Identity, Storage};
use crate::units::HostOffset;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// The pause before the second attempt; it doubles each time.
    pub first_pause: Duration,
    /// Retry reads.
    pub reads: bool,
    /// Retry writes (never syncs: see the module docs).
    pub writes: bool,
}

/// True for errors a later attempt may not see (an NBD server's failure
/// is judged by [`crate::nbd::NbdError::is_transient`]).
pub fn transient(e: &io::Error) -> bool {
    if let Some(nbd) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::nbd::NbdError>())
    {
        return nbd.is_transient();
    }
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT | libc::ENOSPC)
    ) || matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// `inner`, with failed operations retried by `policy`.
#[derive(Debug)]
pub struct RetryingStorage {
    inner: Arc<dyn Storage>,
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl RetryingStorage {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Storage>, policy: RetryPolicy) -> Self {
        RetryingStorage {
            inner,
            policy,
            retries: AtomicU64::new(0),
        }
    }

    /// How many operations were attempted again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn attempt<T>(&self, enabled: bool, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut pause = self.policy.first_pause;
        let mut left = if enabled {
            self.policy.attempts.max(1)
        } else {
            1
        };
        loop {
            left -= 1;
            match op() {
                Err(e) if left > 0 && transient(&e) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pause);
                    pause = pause.saturating_mul(2);
                }
                other => return other,
            }
        }
    }
}

impl Storage for RetryingStorage {
    fn name(&self) -> &Path {
        self.inner.name()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: HostOffset) -> io::Result<usize> {
        self.attempt(self.policy.reads, || self.inner.read_at(buf, offset))
    }

    fn data_or_hole(&self, offset: HostOffset, max_len: u64) -> io::Result<(FileExtent, u64)> {
        self.attempt(self.policy.reads, || {
            self.inner.data_or_hole(offset, max_len)
        })
    }

    fn context_status(
        &self,
        context: &str,
        offset: HostOffset,
        max_len: u64,
    ) -> io::Result<(u32, u64)> {
        self.attempt(self.policy.reads, || {
            self.inner.context_status(context, offset, max_len)
        })
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn write_at(&self, buf: &[u8], offset: HostOffset) -> io::Result<()> {
        self.attempt(self.policy.writes, || self.inner.write_at(buf, offset))
    }

    fn write_zeroes(&self, offset: HostOffset, len: u64) -> io::Result<()> {
        self.attempt(self.policy.writes, || self.inner.write_zeroes(offset, len))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.attempt(self.policy.writes, || self.inner.set_len(len))
    }

    fn sync(&self) -> io::Result<()> {
        // Never retried: see the module docs.
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

    fn change_stamp(&self) -> Option<ChangeStamp> {
        self.inner.change_stamp()
    }

    fn cache_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.cache_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fault::{Fault, FaultKind, FaultyStorage};
    use crate::storage::memory::MemoryStorage;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_pause: Duration::from_millis(1),
            reads: true,
            writes: true,
        }
    }

    fn hello() -> Arc<dyn Storage> {
        Arc::new(MemoryStorage::read_only("f", b"hello".to_vec()))
    }

    #[test]
    fn transient_failures_are_retried_up_to_the_limit() {
        // The first `n` reads fail with EIO, later ones work.
        let flaky =
            |n| FaultyStorage::new(hello(), vec![Fault::new(FaultKind::ReadEioFirst(n), 0..5)]);
        let mut buf = [0u8; 5];
        let s = RetryingStorage::new(Arc::new(flaky(2)), policy(3));
        assert_eq!(s.read_at(&mut buf, HostOffset(0)).unwrap(), 5);
        assert_eq!(&buf, b"hello");
        assert_eq!(s.retries(), 2);
        let s = RetryingStorage::new(Arc::new(flaky(3)), policy(3));
        assert!(s.read_at(&mut buf, HostOffset(0)).is_err());
        assert_eq!(s.retries(), 2, "three attempts in all");
    }

    #[test]
    fn disabled_directions_and_lasting_errors_are_not_retried() {
        let eio = Arc::new(FaultyStorage::new(
            hello(),
            vec![Fault::new(FaultKind::ReadEio, 0..5)],
        ));
        let s = RetryingStorage::new(
            eio,
            RetryPolicy {
                reads: false,
                ..policy(5)
            },
        );
        let mut buf = [0u8; 5];
        assert!(s.read_at(&mut buf, HostOffset(0)).is_err());
        assert_eq!(s.retries(), 0);
        // A read-only storage's refusal to write is not transient.
        let s = RetryingStorage::new(hello(), policy(5));
        assert!(s.write_at(b"x", HostOffset(0)).is_err());
        assert_eq!(s.retries(), 0);
    }

    /// An NBD server's EIO, or a dropped connection, may go away; its
    /// EINVAL does not.
    #[test]
    fn nbd_failures_are_judged_by_the_nbd_error() {
        use crate::nbd::NbdError;
        let request = |errno| NbdError::Request {
            command: "read",
            offset: 0,
            len: 512,
            errno,
            message: String::new(),
        };
        assert!(transient(&io::Error::other(request(
            crate::nbd::proto::EIO
        ))));
        assert!(transient(&io::Error::other(NbdError::Disconnected {
            doing: "reading"
        })));
        assert!(!transient(&io::Error::other(request(
            crate::nbd::proto::EINVAL
        ))));
        assert!(!transient(&io::Error::other(NbdError::Unusable)));
    }

    /// A failed sync is final: the next one may succeed having lost the
    /// data the first could not write.
    #[test]
    fn a_failed_sync_is_not_retried() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::writable("w", Vec::new()));
        let faulty = Arc::new(FaultyStorage::new(
            inner,
            vec![Fault::new(FaultKind::SyncEioOnce, 0..0)],
        ));
        let retrying = RetryingStorage::new(faulty.clone(), policy(5));
        let err = retrying.sync().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(retrying.retries(), 0);
        assert_eq!(faulty.triggered(), 1);
    }
}
