//! Error classes: what kind of failure an error is, so that callers (exit
//! statuses, error policies, retries) can act on it without parsing text.
//!
//! Every error type of this workspace implements [`Classify`]. The class is
//! a property of the failure, not of where it surfaced: an EIO is `Io`
//! whether it hit an L2 table or a data cluster.

use std::fmt;
use std::io;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The operating system or a device failed (EIO, ENOSPC, a file that
    /// shrank); retrying or another disk may help.
    Io,
    /// The image is damaged: its content contradicts the format.
    Corrupt,
    /// A valid image or request that qbackup does not handle (a foreign
    /// format, an unknown feature bit, encryption, a FIFO).
    Unsupported,
    /// The request itself is wrong (bad option values, a missing file, a
    /// target that exists).
    Usage,
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// A bug in qbackup (a broken internal invariant, a panic): report it.
    Internal,
}

impl ErrorClass {
    /// The class of an OS error: missing files and permissions are the
    /// user's to fix, the rest is I/O.
    pub fn of_io(e: &io::Error) -> ErrorClass {
        match e.kind() {
            io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::AlreadyExists => ErrorClass::Usage,
            io::ErrorKind::Interrupted => ErrorClass::Interrupted,
            _ => ErrorClass::Io,
        }
    }

    /// A lower-case name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Io => "io",
            ErrorClass::Corrupt => "corrupt",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Usage => "usage",
            ErrorClass::Interrupted => "interrupted",
            ErrorClass::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user can do about a failure, named by the library so that each
/// front end phrases it in its own terms (the CLI names its option). Library
/// messages never name command-line options; a front end appends its hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Remedy {
    /// Read the file although another process writes it, accepting that
    /// what is read may be inconsistent (qemu-img's `-U`).
    ForceShare,
    /// Leave the source's dirty bitmap as it is instead of clearing it.
    KeepBitmap,
    /// Accept a disabled dirty bitmap that was disabled on purpose.
    AllowDisabledBitmap,
    /// Copy a file of a format qbackup does not read as raw bytes.
    ReadAsRaw,
    /// Replace the existing target.
    ReplaceTarget,
    /// Write onto an existing block device in place, as raw bytes.
    WriteInPlace,
    /// Back up an image QEMU marked corrupt, reading it as QEMU does.
    AllowCorrupt,
    /// Use an output form that can show what the human one cannot.
    JsonOutput,
    /// Use this target cluster size (the previous backup's).
    ClusterSize(u64),
    /// Record the backing file name without checking it.
    RecordBackingUnchecked,
    /// Connect with TLS (an `nbds` URI): the server requires it.
    UseTls,
    /// Name the directory of TLS certificates.
    TlsCertificates,
}

/// Displays an I/O error as its text alone: an OS error as its strerror
/// text ("No such file or directory", not "No such file or directory (os
/// error 2)"), any other error as it displays. Every message of this
/// workspace that includes an I/O error prints it through this.
#[derive(Debug, Clone, Copy)]
pub struct IoText<'a>(pub &'a io::Error);

/// See [`IoText`].
pub fn io_text(e: &io::Error) -> IoText<'_> {
    IoText(e)
}

impl fmt::Display for IoText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        match self.0.raw_os_error() {
            Some(code) => {
                let suffix = format!(" (os error {code})");
                f.write_str(text.strip_suffix(&suffix).unwrap_or(&text))
            }
            None => f.write_str(&text),
        }
    }
}

/// An error that can say its class.
pub trait Classify {
    /// The kind of failure.
    fn class(&self) -> ErrorClass;

    /// What the user can do about it, when there is one thing to do.
    fn remedy(&self) -> Option<Remedy> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_text_drops_the_os_error_number() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_text(&e).to_string(), "No such file or directory");
        let e = io::Error::other("custom text (os error 2)");
        assert_eq!(io_text(&e).to_string(), "custom text (os error 2)");
        let e = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(io_text(&e).to_string(), e.to_string());
    }
}
