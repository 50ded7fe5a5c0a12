//! The CLI's words for what the user can do about a failure. Library
//! errors say what failed without naming command-line options; those that
//! have one thing to do about them expose it as a [`Remedy`]
//! ([`Classify::remedy`]). Here the failed command's error chain is walked
//! to the concrete library errors, and the remedy found is phrased as the
//! option to pass, appended to the one error line.
//!
//! Invariant: a hint is added at most once, and not when the message
//! already names the option (a library message from before the remedies).

use std::error::Error as StdError;

use qbackup::backup::target::TargetError;
use qbackup::backup::{BackupError, RequestError};
use qbackup::live::LiveError;
use qbackup::manifest::ManifestError;
use qbackup::map::MapError;
use qbackup::set::SetError;
use qbackup::verify::VerifyError;
use qbackup_formats::nbd::NbdError;
use qbackup_formats::qcow2::Qcow2Error;
use qbackup_formats::storage::StorageError;
use qbackup_formats::{Classify, ErrorClass, ImageError, Remedy};

use super::status::UsageError;

/// `e` as the library error (or the CLI's usage error) it is, when it is
/// one that can say its class and remedy.
fn classified<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a dyn Classify> {
    macro_rules! first_of {
        ($($t:ty),* $(,)?) => {
            $( if let Some(x) = e.downcast_ref::<$t>() { return Some(x); } )*
        };
    }
    first_of!(
        UsageError,
        RequestError,
        BackupError,
        LiveError,
        TargetError,
        VerifyError,
        ManifestError,
        MapError,
        SetError,
        ImageError,
        Qcow2Error,
        StorageError,
        NbdError,
    );
    #[cfg(feature = "libvirt")]
    first_of!(qbackup::live::libvirt::LibvirtError);
    #[cfg(test)]
    first_of!(tests::Exists);
    None
}

/// The class of a failed command's error: that of the outermost error in
/// its chain that has one (an OS error by its kind); `Internal` when none
/// does (a failure the library did not classify is a bug to report).
pub fn class_of(err: &anyhow::Error) -> ErrorClass {
    for e in err.chain() {
        if let Some(c) = classified(e) {
            return c.class();
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return ErrorClass::of_io(io);
        }
    }
    ErrorClass::Internal
}

/// The first remedy an error of the chain names.
pub fn remedy_of(err: &anyhow::Error) -> Option<Remedy> {
    err.chain().filter_map(classified).find_map(|c| c.remedy())
}

/// How a hint joins the library's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// Another way out than the one the message gives: ", or ..." (inside
    /// the message's closing parenthesis when it ends with one).
    Or,
    /// How to do what the message says, or to do it at all: ": ..."
    /// (inside the message's closing parenthesis when it ends with one).
    Do,
    /// A remark of its own: " (...)".
    Aside,
}

/// The CLI's words for `remedy`: the option that carries it out (to
/// recognise a message that names it already), the hint, and how it joins
/// the message. The library's messages say the way out in words ("or read
/// the file anyway, ...", "(or leave the bitmap as it is)") or not at all
/// ("target already exists"); the joined lines read as they did when the
/// messages named the options.
fn words(remedy: Remedy) -> Option<(String, String, Join)> {
    let (option, hint, join) = match remedy {
        Remedy::ForceShare => (
            "--force-share",
            "pass -U/--force-share (a running VM: qbackup backup --qmp SOCKET DIR)".into(),
            Join::Do,
        ),
        Remedy::KeepBitmap => (
            "--bitmap-mode never",
            "pass --bitmap-mode never".into(),
            Join::Do,
        ),
        Remedy::AllowDisabledBitmap => (
            "--allow-disabled-bitmap",
            "pass --allow-disabled-bitmap".into(),
            Join::Do,
        ),
        Remedy::ReadAsRaw => ("-f raw", "pass -f raw".into(), Join::Do),
        Remedy::ReplaceTarget => ("--force", "use --force to replace it".into(), Join::Aside),
        Remedy::WriteInPlace => (
            "--no-create",
            "pass -n (--no-create) with -O raw".into(),
            Join::Do,
        ),
        Remedy::AllowCorrupt => (
            "--allow-corrupt",
            "pass --allow-corrupt to back up what it reads".into(),
            Join::Or,
        ),
        Remedy::JsonOutput => ("--output=json", "use --output=json".into(), Join::Do),
        Remedy::ClusterSize(bytes) => (
            "--cluster-size",
            format!("pass --cluster-size {bytes}"),
            Join::Do,
        ),
        Remedy::RecordBackingUnchecked => (
            "--backing-unchecked",
            "--backing-unchecked records the name anyway".into(),
            Join::Aside,
        ),
        Remedy::UseTls => (
            "nbds://",
            "connect with an nbds:// URI (and --tls-certs DIR)".into(),
            Join::Do,
        ),
        Remedy::TlsCertificates => (
            "--tls-certs",
            "pass --tls-certs DIR (or tls-certificates=DIR in the URI)".into(),
            Join::Do,
        ),
        _ => return None,
    };
    Some((option.to_string(), hint, join))
}

/// `message` with the CLI's hint for `remedy` (see [`Join`]).
pub fn with_hint(message: &str, remedy: Option<Remedy>) -> String {
    let Some((option, hint, join)) = remedy.and_then(words) else {
        return message.to_string();
    };
    if message.contains(&option) {
        return message.to_string();
    }
    // The message's own closing parenthesis, when it ends with one.
    let in_paren = message.strip_suffix(')').filter(|head| head.contains('('));
    match (join, in_paren) {
        (Join::Or, Some(head)) => format!("{head}, or {hint})"),
        (Join::Or, None) => format!("{message}, or {hint}"),
        (Join::Do, Some(head)) => format!("{head}: {hint})"),
        (Join::Do, None) => format!("{message}: {hint}"),
        (Join::Aside, _) => format!("{message} ({hint})"),
    }
}

/// The one line for a failed command (without the `qbackup: ` prefix):
/// the error's message on one line, with the hint for its remedy.
pub fn message(err: &anyhow::Error) -> String {
    // Each error's message already says its cause: print it alone (the
    // alternate form would repeat every cause after it).
    let msg = format!("{err}").replace('\n', " ");
    with_hint(&msg, remedy_of(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of the library kind that names a remedy.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}: target already exists")]
    pub(super) struct Exists(pub &'static str);

    #[test]
    fn each_remedy_has_words_naming_its_option() {
        for r in [
            Remedy::ForceShare,
            Remedy::KeepBitmap,
            Remedy::AllowDisabledBitmap,
            Remedy::ReadAsRaw,
            Remedy::ReplaceTarget,
            Remedy::WriteInPlace,
            Remedy::AllowCorrupt,
            Remedy::JsonOutput,
            Remedy::ClusterSize(65536),
            Remedy::RecordBackingUnchecked,
            Remedy::UseTls,
            Remedy::TlsCertificates,
        ] {
            let (option, hint, _) = words(r).expect("words");
            assert!(hint.contains(&option), "{r:?}: {hint}");
        }
    }

    /// The library's messages with the hints read as the lines did when
    /// the messages named the options (the texts tests and users know).
    #[test]
    fn hinted_lines_read_as_before() {
        let cases = [
            (
                "t.qcow2: target already exists",
                Remedy::ReplaceTarget,
                "t.qcow2: target already exists (use --force to replace it)",
            ),
            (
                "x.vmdk: vmdk images are not supported (convert it with qemu-img, or copy the file's bytes as a raw image)",
                Remedy::ReadAsRaw,
                "x.vmdk: vmdk images are not supported (convert it with qemu-img, or copy the file's bytes as a raw image: pass -f raw)",
            ),
            (
                "c.qcow2: image is marked corrupt (QEMU found its metadata inconsistent); run 'qemu-img check -r all' on a copy first",
                Remedy::AllowCorrupt,
                "c.qcow2: image is marked corrupt (QEMU found its metadata inconsistent); run 'qemu-img check -r all' on a copy first, or pass --allow-corrupt to back up what it reads",
            ),
            (
                "p.manifest: the previous backup's manifest records 65536-byte clusters, this backup uses 131072-byte clusters (an incremental backup by content needs the same)",
                Remedy::ClusterSize(65536),
                "p.manifest: the previous backup's manifest records 65536-byte clusters, this backup uses 131072-byte clusters (an incremental backup by content needs the same: pass --cluster-size 65536)",
            ),
            (
                "b.qcow2: this backing file is 1 bytes but the source's is 2; the overlay needs a backing file of the same size",
                Remedy::RecordBackingUnchecked,
                "b.qcow2: this backing file is 1 bytes but the source's is 2; the overlay needs a backing file of the same size (--backing-unchecked records the name anyway)",
            ),
            (
                "d.qcow2: in use; back up a running VM through its QMP socket instead, or read the file anyway, accepting that the copy may be inconsistent",
                Remedy::ForceShare,
                "d.qcow2: in use; back up a running VM through its QMP socket instead, or read the file anyway, accepting that the copy may be inconsistent: pass -U/--force-share (a running VM: qbackup backup --qmp SOCKET DIR)",
            ),
            (
                "d.qcow2: in use; clearing a dirty bitmap in it needs the image to itself (or leave the bitmap as it is)",
                Remedy::KeepBitmap,
                "d.qcow2: in use; clearing a dirty bitmap in it needs the image to itself (or leave the bitmap as it is: pass --bitmap-mode never)",
            ),
            (
                "/dev/loop0: target is a block device, which a backup never replaces; a restore onto it writes it in place, as raw bytes",
                Remedy::WriteInPlace,
                "/dev/loop0: target is a block device, which a backup never replaces; a restore onto it writes it in place, as raw bytes: pass -n (--no-create) with -O raw",
            ),
            (
                "m.img: contains compressed clusters, which only the JSON output shows",
                Remedy::JsonOutput,
                "m.img: contains compressed clusters, which only the JSON output shows: use --output=json",
            ),
            (
                "bitmap 'b' is disabled (enable it, or allow it if it was disabled on purpose)",
                Remedy::AllowDisabledBitmap,
                "bitmap 'b' is disabled (enable it, or allow it if it was disabled on purpose: pass --allow-disabled-bitmap)",
            ),
            // A parenthesis inside the message is not its end.
            (
                "a (b) c",
                Remedy::AllowCorrupt,
                "a (b) c, or pass --allow-corrupt to back up what it reads",
            ),
            (
                "a (b) c",
                Remedy::ReadAsRaw,
                "a (b) c: pass -f raw",
            ),
        ];
        for (message, remedy, line) in cases {
            assert_eq!(with_hint(message, Some(remedy)), line);
        }
    }

    #[test]
    fn no_hint_twice_nor_without_a_remedy() {
        let m = "t: target already exists (use --force to replace it)";
        assert_eq!(with_hint(m, Some(Remedy::ReplaceTarget)), m);
        assert_eq!(with_hint("t: broken", None), "t: broken");
    }

    impl Classify for Exists {
        fn class(&self) -> ErrorClass {
            ErrorClass::Usage
        }
        fn remedy(&self) -> Option<Remedy> {
            Some(Remedy::ReplaceTarget)
        }
    }

    #[test]
    fn remedy_and_class_are_found_down_the_chain() {
        let e = anyhow::Error::new(Exists("t.qcow2")).context("backing up");
        assert_eq!(remedy_of(&e), Some(Remedy::ReplaceTarget));
        assert_eq!(class_of(&e), ErrorClass::Usage);
        assert_eq!(
            message(&anyhow::Error::new(Exists("t.qcow2"))),
            "t.qcow2: target already exists (use --force to replace it)"
        );
        // No classified error in the chain: no remedy, an internal error.
        let e = anyhow::anyhow!("broken").context("backing up");
        assert_eq!(remedy_of(&e), None);
        assert_eq!(class_of(&e), ErrorClass::Internal);
        // A usage error from the request, under context.
        let e = anyhow::Error::new(RequestError::ZeroSpeed).context("checking");
        assert_eq!(class_of(&e), ErrorClass::Usage);
        assert_eq!(
            class_of(&anyhow::Error::new(UsageError("x".into()))),
            ErrorClass::Usage
        );
        // An OS error by its kind.
        let nf = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(class_of(&anyhow::Error::new(nf)), ErrorClass::Usage);
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(class_of(&anyhow::Error::new(eio)), ErrorClass::Io);
        // A backup interrupted by a signal.
        let e = anyhow::Error::new(BackupError::Interrupted { signal: 2 });
        assert_eq!(class_of(&e), ErrorClass::Interrupted);
        assert_eq!(message(&e), e.to_string());
    }
}
