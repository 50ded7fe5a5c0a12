//! Durability while the copy runs: a thread that syncs the target whenever
//! the writer has stored another `SYNC_BYTES`, so that the final sync only
//! has the last few MiB and the metadata left to make durable.
//!
//! Why: a sync makes the file system commit its journal and the device
//! flush its write cache; on a virtual disk the host then writes out
//! everything cached since the last flush. Done once at the end, that is
//! a serial tail of a quarter of a second per 250 MiB written, with every
//! core idle; done in the background, it overlaps compression.
//!
//! Invariants: the writer never waits for a sync (a request made while one
//! runs is merged into the next); a failed sync fails the backup even if a
//! later one succeeds (Linux may drop the pages a failed sync could not
//! write and report the next sync clean), so a failure is kept and never
//! retried; the thread ends when [`EarlySync::stop`] is called.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

use qbackup_formats::storage::Storage;

/// Bytes stored between two background syncs.
pub const SYNC_BYTES: u64 = 64 << 20;

#[derive(Default)]
struct State {
    requested: bool,
    stopped: bool,
    failed: Option<io::Error>,
}

/// See the module docs.
#[derive(Default)]
pub struct EarlySync {
    state: Mutex<State>,
    wake: Condvar,
}

impl EarlySync {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section below can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The syncing thread's body: syncs `storage` on each request until
    /// stopped or until a sync fails.
    pub fn run(&self, storage: &dyn Storage) {
        let mut s = self.lock();
        loop {
            if s.stopped || s.failed.is_some() {
                return;
            }
            if s.requested {
                s.requested = false;
                drop(s);
                let result = storage.sync();
                s = self.lock();
                if let Err(e) = result {
                    s.failed = Some(e);
                }
                continue;
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks for a sync; returns at once.
    pub fn request(&self) {
        let mut s = self.lock();
        s.requested = true;
        self.wake.notify_one();
    }

    /// The error of a failed sync, taken: the backup must fail with it.
    pub fn take_failure(&self) -> Option<io::Error> {
        self.lock().failed.take()
    }

    /// Ends the thread after the sync it is running, if any.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopped = true;
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use qbackup_formats::storage::fault::{Fault, FaultKind, FaultyStorage};
    use qbackup_formats::storage::memory::MemoryStorage;
    use qbackup_formats::storage::Storage;

    use super::EarlySync;

    fn scratch() -> Arc<dyn Storage> {
        Arc::new(MemoryStorage::writable("target", Vec::new()))
    }

    #[test]
    fn a_failed_sync_is_kept_and_ends_the_thread() {
        let file = scratch();
        let faulty = FaultyStorage::new(file, vec![Fault::new(FaultKind::SyncEio, 0..0)]);
        let early = EarlySync::default();
        std::thread::scope(|s| {
            s.spawn(|| early.run(&faulty));
            early.request();
            // The thread returns by itself after the failure.
        });
        assert_eq!(faulty.triggered(), 1);
        let err = early.take_failure().expect("the failure is kept");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn requests_are_served_and_stop_ends_the_thread() {
        let storage = scratch();
        let early = EarlySync::default();
        std::thread::scope(|s| {
            s.spawn(|| early.run(storage.as_ref()));
            for _ in 0..10 {
                early.request();
            }
            early.stop();
        });
        assert!(early.take_failure().is_none());
    }
}
