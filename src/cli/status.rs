//! Exit statuses (documented in `--help` and docs/guarantees.md): 0 success, 1 error,
//! 2 usage error (the command line itself is wrong), 128 + N when signal N
//! interrupted a backup (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). `compare`
//! keeps qemu-img's 0 identical, 1 different, 2 error.
//!
//! A usage error is one the command line alone shows (an unknown option,
//! options that do not go together, a value out of range): it is raised as
//! [`UsageError`] by clap's parse or the library's validation of the
//! request (a `RequestError`, worded by the CLI). Errors found by
//! looking at files (a missing source, an existing target) are errors,
//! status 1, as with qemu-img.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use qbackup::backup::BackupError;
use qbackup_formats::{Classify, ErrorClass};

/// Success.
pub const SUCCESS: u8 = 0;
/// Any failure that is not one of the others.
pub const ERROR: u8 = 1;
/// A wrong command line.
pub const USAGE: u8 = 2;
/// `backup --on-source-error ignore` completed, but some source ranges
/// could not be read and were written as zeros.
pub const UNREADABLE: u8 = 3;
/// Interrupted by a signal we cannot name (Ctrl-C's status).
pub const INTERRUPTED: u8 = 130;

/// Text for `--help`.
pub const HELP: &str = "\
Exit status:
  0    success (compare: images identical; verify: the backup is good)
  1    error (compare: images differ; verify: damaged or not the recorded chain)
  2    usage error: the command line is wrong (compare, verify: cannot check)
  3    backup --on-source-error ignore completed with unreadable ranges
       (written as zeros, listed on stderr and in the JSON result)
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM, 129 by SIGHUP";

/// A wrong command line (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Classify for UsageError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Usage
    }
}

/// The JSON object a failed command prints on stdout with
/// `--output=json`: `{"error": {"class", "message", "exit-status"}}`, with
/// the class's name (io, corrupt, unsupported, usage, interrupted,
/// internal) and the same message as the line on stderr.
pub fn json_error(class: ErrorClass, message: &str, status: u8) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "class": class.name(),
            "message": message,
            "exit-status": status,
        }
    })
}

/// The signal that interrupted the command (0: none yet).
fn last_signal() -> &'static Arc<AtomicUsize> {
    static LAST: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    LAST.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// True when `signal` was ignored when the process started (`nohup`
/// ignores SIGHUP, a shell ignores SIGINT for a background job): such a
/// signal is left ignored instead of being turned into a cancellation.
pub fn ignored_at_start(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current
    // disposition into `old`, a zeroed plain-data struct we own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Records which of `signals` arrives, for the exit status.
pub fn record_signals(signals: &[i32]) -> std::io::Result<()> {
    for &sig in signals {
        signal_hook::flag::register_usize(sig, Arc::clone(last_signal()), sig as usize)?;
    }
    Ok(())
}

/// The exit status for a failed command; `failure` is the command's status
/// for an ordinary error.
pub fn of_error(err: &anyhow::Error, failure: u8) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() {
        return USAGE;
    }
    // The error names the signal that stopped the backup.
    if let Some(signal) = err
        .downcast_ref::<BackupError>()
        .and_then(BackupError::signal)
    {
        return interrupted_status(signal);
    }
    let interrupted =
        err.downcast_ref::<BackupError>().map(Classify::class) == Some(ErrorClass::Interrupted);
    if interrupted {
        return interrupted_status(last_signal().load(Ordering::Relaxed) as i32);
    }
    failure
}

/// True when the command failed writing its output to a reader that
/// closed its end (EPIPE on stdout). Only the CLI's own writes and `map`'s
/// output count: an EPIPE inside a library error (an NBD server that went
/// away) is a failure like any other.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    let io = err.downcast_ref::<std::io::Error>().or_else(|| {
        match err.downcast_ref::<qbackup::map::MapError>() {
            Some(qbackup::map::MapError::Output(e)) => Some(e),
            _ => None,
        }
    });
    io.is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// 128 + the signal for the signals a backup stops on cleanly; Ctrl-C's
/// 130 when it is not known.
pub fn interrupted_status(signal: i32) -> u8 {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal {
        SIGINT | SIGTERM | SIGHUP => 128 + signal as u8,
        _ => INTERRUPTED,
    }
}

/// Prints a clap error as one `qbackup: reason` line (clap's tips follow
/// on their own lines) and returns its status: 0 for `--help` and
/// `--version`, else 2. `commands` names the subcommands, for a command
/// line without one.
pub fn clap_error(e: &clap::Error, commands: &[String]) -> u8 {
    use clap::error::ErrorKind;
    if !e.use_stderr() {
        let _ = e.print();
        return SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "qbackup: a command is needed: one of {} (see qbackup --help)",
            commands.join(", ")
        );
        return USAGE;
    }
    let reason = clap_reason(&e.render().to_string());
    // A wrapper that asked for JSON gets the failure there too, even when
    // the rest of the command line could not be read.
    if asks_for_json(std::env::args().skip(1)) {
        println!("{}", json_error(ErrorClass::Usage, &reason, USAGE));
    }
    eprintln!("qbackup: {reason}");
    for tip in clap_tips(&e.render().to_string()) {
        eprintln!("{tip}");
    }
    USAGE
}

/// True when the raw arguments ask for `--output=json` (or `--output json`),
/// for a command line clap could not parse.
fn asks_for_json(args: impl Iterator<Item = String>) -> bool {
    let mut prev = String::new();
    for a in args {
        if a == "--" {
            return false;
        }
        if a == "--output=json" || (prev == "--output" && a == "json") {
            return true;
        }
        prev = a;
    }
    false
}

/// The first paragraph of clap's rendered error, on one line, without
/// its `error: ` prefix (what follows it, such as the missing arguments or
/// the possible values, joined in).
fn clap_reason(text: &str) -> String {
    let first = text.split("\n\n").next().unwrap_or_default();
    let joined = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match joined.strip_prefix("error: ") {
        Some(r) => r.to_string(),
        None if joined.is_empty() => "invalid command line".to_string(),
        None => joined,
    }
}

/// clap's `tip: ...` lines (suggestions), trimmed.
fn clap_tips(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("tip:"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_is_asked_for_before_any_double_dash() {
        let args = |v: &[&str]| {
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert!(asks_for_json(args(&["backup", "--output=json", "--bogus"])));
        assert!(asks_for_json(args(&["backup", "--output", "json", "a"])));
        assert!(!asks_for_json(args(&["backup", "--output", "human"])));
        assert!(!asks_for_json(args(&["backup", "--", "--output=json"])));
    }

    use super::*;

    #[test]
    fn signals_map_to_128_plus_n() {
        assert_eq!(interrupted_status(signal_hook::consts::SIGINT), 130);
        assert_eq!(interrupted_status(signal_hook::consts::SIGTERM), 143);
        assert_eq!(interrupted_status(signal_hook::consts::SIGHUP), 129);
        assert_eq!(interrupted_status(0), 130);
    }

    #[test]
    fn usage_errors_are_status_2() {
        let e = anyhow::Error::new(UsageError("x".into()));
        assert_eq!(of_error(&e, ERROR), USAGE);
        assert_eq!(of_error(&anyhow::anyhow!("io"), ERROR), ERROR);
        let e = anyhow::Error::new(BackupError::Interrupted { signal: 0 });
        assert_eq!(of_error(&e, ERROR), INTERRUPTED);
        // The signal the error carries decides.
        let e = anyhow::Error::new(BackupError::Interrupted {
            signal: libc::SIGHUP,
        });
        assert_eq!(of_error(&e, ERROR), 129);
    }

    #[test]
    fn json_error_object() {
        let v = json_error(ErrorClass::Usage, "--speed must be positive", USAGE);
        assert_eq!(
            v,
            serde_json::json!({"error": {"class": "usage", "message": "--speed must be positive", "exit-status": 2}})
        );
        assert_eq!(
            json_error(ErrorClass::Io, "x", ERROR)["error"]["class"],
            "io"
        );
    }

    #[test]
    fn clap_errors_become_one_line() {
        let text = "error: the following required arguments were not provided:\n  <SOURCE>\n  <TARGET>\n\nUsage: qbackup backup <SOURCE> <TARGET>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            clap_reason(text),
            "the following required arguments were not provided: <SOURCE> <TARGET>"
        );
        assert!(clap_tips(text).is_empty());
        let text = "error: unexpected argument '--forse' found\n\n  tip: a similar argument exists: '--force'\n\nUsage: x\n";
        assert_eq!(clap_reason(text), "unexpected argument '--forse' found");
        assert_eq!(
            clap_tips(text),
            ["tip: a similar argument exists: '--force'"]
        );
    }
}
