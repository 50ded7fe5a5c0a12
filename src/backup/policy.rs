//! Error policies, like the backup job's `on-source-error` and
//! `on-target-error`: what a failed read of the source or write of the
//! target does. `report` fails the backup (the default); `retry` tries the
//! operation again a few times with growing pauses before failing (a
//! storage wrapper put under every file through the opener seam); `ignore`
//! (source only) writes the clusters that cannot be read as zeros (the
//! copier reads a failed run again cluster by cluster to find them) and
//! reports them, and the backup ends with its own exit status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qbackup_formats::open::{OpenOptions, Opener, Role};
use qbackup_formats::storage::retry::{RetryPolicy, RetryingStorage};
use qbackup_formats::storage::{Storage, StorageError};

/// What a failed read of the source does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnSourceError {
    /// Fail the backup.
    #[default]
    Report,
    /// Retry, then fail.
    Retry,
    /// Write the clusters that cannot be read as zeros and report them.
    Ignore,
}

/// What a failed write (or sync) of the target does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnTargetError {
    /// Fail the backup.
    #[default]
    Report,
    /// Retry, then fail.
    Retry,
}

/// Attempts in all for `retry`, and the first pause (doubling: 0.1, 0.2,
/// 0.4, 0.8 s, 1.5 s of waiting at most per operation).
const RETRY: RetryPolicy = RetryPolicy {
    attempts: 5,
    first_pause: Duration::from_millis(100),
    reads: false,
    writes: false,
};

/// An opener that puts the retry wrapper under the source's files and the
/// target, as the policies ask.
pub struct PolicyOpener<'a> {
    inner: &'a dyn Opener,
    source: OnSourceError,
    target: OnTargetError,
}

impl<'a> PolicyOpener<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn Opener, source: OnSourceError, target: OnTargetError) -> Self {
        PolicyOpener {
            inner,
            source,
            target,
        }
    }
}

impl Opener for PolicyOpener<'_> {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_with(name, role, &OpenOptions::default())
    }

    /// Every source file, and the metadata contexts (an NBD export's dirty
    /// bitmap) read through it, gets the source policy.
    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        let storage = self.inner.open_with(name, role, options)?;
        Ok(match self.source {
            // ignore: the copier isolates the clusters that fail, at once.
            OnSourceError::Report | OnSourceError::Ignore => storage,
            OnSourceError::Retry => Arc::new(RetryingStorage::new(
                storage,
                RetryPolicy {
                    reads: true,
                    ..RETRY
                },
            )),
        })
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        self.inner.canonical(name)
    }

    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let storage = self.inner.target(storage);
        match self.target {
            OnTargetError::Report => storage,
            OnTargetError::Retry => Arc::new(RetryingStorage::new(
                storage,
                RetryPolicy {
                    writes: true,
                    ..RETRY
                },
            )),
        }
    }

    fn wrap_opened(&self, name: &Path, role: Role, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        self.inner.wrap_opened(name, role, storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    use qbackup_formats::HostOffset;

    /// A storage whose metadata context fails with EIO `failures` times.
    #[derive(Debug)]
    struct FlakyContext {
        failures: AtomicU32,
    }

    impl Storage for FlakyContext {
        fn name(&self) -> &Path {
            Path::new("nbd+unix:///?socket=x")
        }
        fn len(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: &mut [u8], _: HostOffset) -> io::Result<usize> {
            Ok(0)
        }
        fn context_status(&self, _: &str, _: HostOffset, max_len: u64) -> io::Result<(u32, u64)> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok((1, max_len))
        }
    }

    /// Hands out a [`FlakyContext`] when asked for the context `want`.
    struct ContextOpener {
        want: String,
    }

    impl Opener for ContextOpener {
        fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
            self.open_with(name, role, &OpenOptions::default())
        }
        fn open_with(
            &self,
            _: &Path,
            _: Role,
            options: &OpenOptions,
        ) -> Result<Arc<dyn Storage>, StorageError> {
            assert_eq!(options.meta_contexts, std::slice::from_ref(&self.want));
            Ok(Arc::new(FlakyContext {
                failures: AtomicU32::new(1),
            }))
        }
    }

    /// Regression (issue 18): the source policy applies to what is opened
    /// with metadata contexts (an NBD export's dirty bitmap), and to the
    /// contexts' queries, as to any source file.
    #[test]
    fn retry_applies_to_metadata_contexts() {
        let want = "qemu:dirty-bitmap:b".to_string();
        let inner = ContextOpener { want: want.clone() };
        let options = OpenOptions {
            meta_contexts: vec![want.clone()],
        };
        let query = |source| {
            let opener = PolicyOpener::new(&inner, source, OnTargetError::Report);
            let s = opener
                .open_with(Path::new("x"), Role::Image, &options)
                .unwrap();
            s.context_status_at(&want, HostOffset(0), 4096)
        };
        assert!(query(OnSourceError::Report).is_err());
        assert_eq!(query(OnSourceError::Retry).unwrap(), (1, 4096));
    }
}
