//! Cancelling a backup: a flag the phases poll, the signal that set it,
//! and the temporary file to remove if the backup cannot unwind in time.
//!
//! Why: SIGINT, SIGTERM and SIGHUP must stop a backup within 200 ms in
//! every phase. Most phases poll [`Cancel::is_set`] between steps and
//! sleep through [`Cancel::sleep`] (rate limiting), so they unwind and the
//! temporary file is removed on the normal error path. A few steps cannot
//! be interrupted (a read stuck on a slow disk or server, building a large
//! thread pool, `fsync`): for those the binary's signal thread calls
//! [`Cancel::abandon`] after a grace period and exits, which is why the
//! temporary file's path is registered here while it exists.
//!
//! Invariants: the signal number is recorded before the flag is set, so a
//! phase that sees the flag also sees which signal it was; the registered
//! path is only ever a temporary file of this process (never TARGET); the
//! rename into TARGET and [`Cancel::abandon`] exclude each other, so a
//! signal never removes a finished backup nor reports one as not written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::BackupError;

/// The longest a cancellable sleep goes without looking at the flag.
const POLL: Duration = Duration::from_millis(20);

/// A cancellation request shared between the backup and whoever may stop
/// it (a signal thread, a test).
#[derive(Debug, Default)]
pub struct Cancel {
    flag: AtomicBool,
    signal: AtomicI32,
    temp: Mutex<Temp>,
}

impl Cancel {
    /// Not cancelled.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the backup to stop because of signal `signo` (0: no signal).
    pub fn request(&self, signo: i32) {
        let _ = self
            .signal
            .compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
        self.flag.store(true, Ordering::SeqCst);
    }

    /// True once a stop was requested.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The flag itself, for loops that only poll it.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The signal that requested the stop (the first one), 0 if none.
    pub fn signal(&self) -> i32 {
        self.signal.load(Ordering::SeqCst)
    }

    /// The error a cancelled phase returns.
    pub fn error(&self) -> BackupError {
        BackupError::Interrupted {
            signal: self.signal(),
        }
    }

    /// Sleeps for `d`, waking early when a stop is requested. Returns
    /// false if it was.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.is_set() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(POLL));
        }
    }

    /// Records a temporary file being written (the target's, the
    /// manifest's), or with `None` forgets them all.
    pub(crate) fn set_temp(&self, path: Option<&Path>) {
        let mut temp = self.temp();
        match path {
            Some(p) => temp.paths.push(p.to_path_buf()),
            None => temp.paths.clear(),
        }
    }

    /// Runs `rename` (which puts the finished backup at TARGET) unless a
    /// stop was requested; `None` if it was. While it runs, [`Self::abandon`]
    /// waits, so a signal either finds the backup committed or stops it.
    pub(crate) fn commit<T, E>(
        &self,
        rename: impl FnOnce() -> Result<T, E>,
    ) -> Option<Result<T, E>> {
        let mut temp = self.temp();
        if self.is_set() {
            return None;
        }
        let result = rename();
        if result.is_ok() {
            temp.paths.clear();
            temp.committed = true;
        }
        Some(result)
    }

    /// The last resort of a signal thread about to exit the process without
    /// unwinding: removes the registered temporary files. Returns false,
    /// removing nothing, when the backup was already committed (it is
    /// complete at TARGET, and the process should finish normally).
    pub fn abandon(&self) -> bool {
        let temp = self.temp();
        if temp.committed {
            return false;
        }
        for p in &temp.paths {
            let _ = std::fs::remove_file(p);
        }
        true
    }

    fn temp(&self) -> std::sync::MutexGuard<'_, Temp> {
        self.temp.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The temporary files, and whether the backup became TARGET.
#[derive(Debug, Default)]
struct Temp {
    paths: Vec<PathBuf>,
    committed: bool,
}

/// The conventional name of a signal number.
pub fn signal_name(signo: i32) -> String {
    match signo {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_wins_and_sleep_wakes() {
        let c = Cancel::new();
        assert!(c.sleep(Duration::from_millis(1)));
        c.request(libc::SIGTERM);
        c.request(libc::SIGINT);
        assert_eq!(c.signal(), libc::SIGTERM);
        let t = Instant::now();
        assert!(!c.sleep(Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(matches!(
            c.error(),
            BackupError::Interrupted { signal } if signal == libc::SIGTERM
        ));
        // Stopped: no commit.
        assert!(c.commit(|| Ok::<(), ()>(())).is_none());
    }

    #[test]
    fn abandon_removes_the_temporary_file_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("t");
        std::fs::write(&tmp, b"x").unwrap();
        let c = Cancel::new();
        c.set_temp(Some(&tmp));
        assert!(c.abandon());
        assert!(!tmp.exists());

        std::fs::write(&tmp, b"x").unwrap();
        let c = Cancel::new();
        c.set_temp(Some(&tmp));
        let target = dir.path().join("target");
        assert!(c.commit(|| std::fs::rename(&tmp, &target)).unwrap().is_ok());
        assert!(!c.abandon());
        assert!(target.exists());
    }
}
