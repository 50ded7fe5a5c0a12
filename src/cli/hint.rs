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
use qbackup::manifest::ManifestError;
use qbackup::map::MapError;
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
        TargetError,
        VerifyError,
        ManifestError,
        MapError,
        ImageError,
        Qcow2Error,
        StorageError,
        NbdError,
    );
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

/// The option that carries out `remedy` (to recognise a message that
/// names it already), and the CLI's words for it.
fn words(remedy: Remedy) -> Option<(&'static str, &'static str)> {
    Some(match remedy {
        Remedy::ForceShare => (
            "--force-share",
            "pass -U/--force-share to read it anyway; the copy may be inconsistent",
        ),
        Remedy::KeepBitmap => (
            "--bitmap-mode never",
            "pass --bitmap-mode never, which leaves the bitmap as it is",
        ),
        Remedy::AllowDisabledBitmap => (
            "--allow-disabled-bitmap",
            "pass --allow-disabled-bitmap to use it as it is",
        ),
        Remedy::ReadAsRaw => ("-f raw", "pass -f raw to copy the file's bytes"),
        Remedy::ReplaceTarget => ("--force", "use --force to replace it"),
        Remedy::WriteInPlace => ("--no-create", "pass -n (--no-create) with -O raw"),
        Remedy::AllowCorrupt => (
            "--allow-corrupt",
            "pass --allow-corrupt to back up what it reads",
        ),
        Remedy::JsonOutput => ("--output=json", "use --output=json"),
        _ => return None,
    })
}

/// `message` with the hint for `remedy`: into the message's closing
/// parenthesis as one more way out ("(convert with qemu-img, or pass -f
/// raw ...)"), else as a parenthesis of its own, or after a semicolon when
/// the hint has parentheses itself.
pub fn with_hint(message: &str, remedy: Option<Remedy>) -> String {
    let Some((option, hint)) = remedy.and_then(words) else {
        return message.to_string();
    };
    if message.contains(option) {
        return message.to_string();
    }
    match message.strip_suffix(')') {
        Some(head) if head.contains('(') => format!("{head}, or {hint})"),
        _ if hint.contains('(') => format!("{message}; {hint}"),
        _ => format!("{message} ({hint})"),
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
        ] {
            let (option, hint) = words(r).expect("words");
            assert!(hint.contains(option), "{r:?}: {hint}");
        }
    }

    #[test]
    fn hints_append_or_join_the_closing_parenthesis() {
        assert_eq!(
            with_hint(
                "t.qcow2: target already exists",
                Some(Remedy::ReplaceTarget)
            ),
            "t.qcow2: target already exists (use --force to replace it)"
        );
        assert_eq!(
            with_hint(
                "x.vmdk: vmdk images are not supported (convert with qemu-img)",
                Some(Remedy::ReadAsRaw)
            ),
            "x.vmdk: vmdk images are not supported (convert with qemu-img, or pass -f raw to copy the file's bytes)"
        );
        assert_eq!(
            with_hint(
                "m.img: contains compressed clusters",
                Some(Remedy::JsonOutput)
            ),
            "m.img: contains compressed clusters (use --output=json)"
        );
        assert_eq!(
            with_hint(
                "/dev/loop0: target is a block device",
                Some(Remedy::WriteInPlace)
            ),
            "/dev/loop0: target is a block device; pass -n (--no-create) with -O raw"
        );
        // A parenthesis inside the message is not its end.
        assert_eq!(
            with_hint("a (b) c", Some(Remedy::AllowCorrupt)),
            "a (b) c (pass --allow-corrupt to back up what it reads)"
        );
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
