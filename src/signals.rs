//! SIGINT, SIGTERM and SIGHUP during a backup: ask the backup to stop, and
//! if it has not unwound within a grace period (a read stuck on a slow
//! disk or server, a thread pool being built, an `fsync`), remove its
//! temporary file and exit with 128 + the signal number, as a shell does
//! for a process the signal killed.
//!
//! Invariant: the process never outlives a signal by more than
//! [`GRACE`] plus the time to unlink one file, and never leaves the
//! temporary file behind when it exits this way.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use qbackup::backup::Cancel;
use signal_hook::iterator::Signals;

/// How long the backup gets to unwind by itself after a signal.
const GRACE: Duration = Duration::from_millis(100);

/// Routes `signals` (SIGINT, SIGTERM, SIGHUP less those ignored at start)
/// to `cancel` for the rest of the process.
pub fn watch(cancel: Arc<Cancel>, signals: &[i32]) -> std::io::Result<()> {
    watch_with_grace(cancel, signals, GRACE)
}

/// [`watch`] with another grace period: a live backup needs time after
/// its pull stops to undo its changes in QEMU (a killed one is repaired by
/// the next run instead).
pub fn watch_with_grace(
    cancel: Arc<Cancel>,
    signals: &[i32],
    grace: Duration,
) -> std::io::Result<()> {
    let mut signals = Signals::new(signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Some(signo) = signals.forever().next() else {
                return;
            };
            cancel.request(signo);
            std::thread::sleep(grace);
            // Still running: the backup is stuck in a step that cannot be
            // interrupted. Clean up and leave without it, unless it is
            // already complete at TARGET (then it finishes normally).
            if !cancel.abandon() {
                return;
            }
            // The terminal may be gone (SIGHUP): never panic on stderr.
            let _ = writeln!(std::io::stderr().lock(), "qbackup: {}", cancel.error());
            std::process::exit(128 + signo);
        })?;
    Ok(())
}
