//! [`ImageError`]: an error about one image file, with the file's name, and
//! [`ImageErrorKind`], what went wrong. Drivers raise it; it depends on
//! their error types but not on the code that opens images
//! ([`crate::image::open`]), so no module imports one that imports it.

use std::path::{Path, PathBuf};

use crate::error::{Classify, ErrorClass, Remedy};
use crate::format::Format;
use crate::qcow2::Qcow2Error;
use crate::storage::StorageError;

/// What went wrong with an image, without the file name.
#[derive(Debug, thiserror::Error)]
pub enum ImageErrorKind {
    /// File-level failure.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// qcow2-level failure.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// The file is in a format QEMU knows and qbackup does not read.
    #[error("{0} images are not supported (convert it with qemu-img, or copy the file's bytes as a raw image)")]
    ForeignFormat(&'static str),
    /// A backing format qbackup does not read.
    #[error("unsupported backing file format '{0}'")]
    UnsupportedBackingFormat(String),
    /// The backing file could not be opened.
    #[error("cannot open backing file {}: {source}", path.display())]
    OpenBacking {
        /// The resolved backing path.
        path: PathBuf,
        /// Why.
        source: StorageError,
    },
    /// The chain refers back to one of its own images.
    #[error("backing chain loops back to {}", .0.display())]
    BackingLoop(PathBuf),
    /// An incremental backup asked an image that cannot hold a dirty
    /// bitmap.
    #[error("this image cannot hold a persistent dirty bitmap: incremental backups need a qcow2 image's bitmap or an NBD export's qemu:dirty-bitmap context")]
    NoDirtyBitmap,
    /// A driver broke the [`crate::layer::Layer`] contract (a bug).
    #[error(
        "internal error: the {format} driver answered a read of {asked} bytes with {answered}"
    )]
    BrokenRead {
        /// The driver's format.
        format: Format,
        /// Bytes asked for.
        asked: u64,
        /// Bytes it claimed to handle.
        answered: u64,
    },
}

impl Classify for ImageErrorKind {
    fn class(&self) -> ErrorClass {
        match self {
            ImageErrorKind::Storage(e) => e.class(),
            ImageErrorKind::Qcow2(e) => e.class(),
            ImageErrorKind::OpenBacking { source, .. } => source.class(),
            ImageErrorKind::BackingLoop(_) => ErrorClass::Corrupt,
            ImageErrorKind::ForeignFormat(_)
            | ImageErrorKind::UnsupportedBackingFormat(_)
            | ImageErrorKind::NoDirtyBitmap => ErrorClass::Unsupported,
            ImageErrorKind::BrokenRead { .. } => ErrorClass::Internal,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            ImageErrorKind::Storage(e) | ImageErrorKind::OpenBacking { source: e, .. } => {
                e.remedy()
            }
            ImageErrorKind::Qcow2(e) => e.remedy(),
            ImageErrorKind::ForeignFormat(_) => Some(Remedy::ReadAsRaw),
            _ => None,
        }
    }
}

/// An error with the image file it concerns: displays as `FILE: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct ImageError {
    /// The file the error is about.
    pub path: PathBuf,
    /// What went wrong.
    pub kind: ImageErrorKind,
}

impl ImageError {
    /// Attaches `path` to an error.
    pub fn new(path: &Path, kind: impl Into<ImageErrorKind>) -> ImageError {
        ImageError {
            path: path.to_path_buf(),
            kind: kind.into(),
        }
    }

    /// True when the error is about a dirty bitmap that cannot be used
    /// (missing, left in use, disabled, invalid, or an image that cannot
    /// hold one), while the image itself reads fine: a caller may fall back
    /// to reading everything. Each error type answers for its own variants.
    pub fn is_unusable_bitmap(&self) -> bool {
        self.kind.is_unusable_bitmap()
    }
}

impl ImageErrorKind {
    /// See [`ImageError::is_unusable_bitmap`].
    pub fn is_unusable_bitmap(&self) -> bool {
        match self {
            ImageErrorKind::NoDirtyBitmap => true,
            ImageErrorKind::Qcow2(e) => e.is_unusable_bitmap(),
            // An NBD export that does not offer the bitmap's context.
            ImageErrorKind::Storage(e) => e.is_context_refused(),
            _ => false,
        }
    }
}

impl Classify for ImageError {
    fn class(&self) -> ErrorClass {
        self.kind.class()
    }

    fn remedy(&self) -> Option<Remedy> {
        self.kind.remedy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::bitmaps::BitmapError;
    use crate::storage::lock::Conflict;
    use crate::units::HostOffset;

    fn image(kind: impl Into<ImageErrorKind>) -> ImageError {
        ImageError::new(Path::new("d.qcow2"), kind)
    }

    /// What the user can do is said by the remedy, through every wrapper;
    /// the message says the problem without naming a command-line option.
    #[test]
    fn remedies_pass_through_wrappers_and_messages_name_no_options() {
        let in_use = || StorageError::InUse {
            conflict: Conflict::Reader,
        };
        let cases = [
            (image(in_use()), Some(Remedy::ForceShare)),
            (
                image(Qcow2Error::Storage(in_use())),
                Some(Remedy::ForceShare),
            ),
            (
                image(ImageErrorKind::OpenBacking {
                    path: "b".into(),
                    source: in_use(),
                }),
                Some(Remedy::ForceShare),
            ),
            (
                image(StorageError::InUseForUpdate {
                    conflict: Conflict::Reader,
                }),
                Some(Remedy::KeepBitmap),
            ),
            (
                image(ImageErrorKind::ForeignFormat("vmdk")),
                Some(Remedy::ReadAsRaw),
            ),
            (
                image(Qcow2Error::Bitmap(BitmapError::Disabled {
                    name: "b".into(),
                })),
                Some(Remedy::AllowDisabledBitmap),
            ),
            (image(ImageErrorKind::NoDirtyBitmap), None),
        ];
        for (e, remedy) in cases {
            assert_eq!(e.remedy(), remedy, "{e}");
            let text = e.to_string();
            for option in ["--force", "-U", "--bitmap-mode", "-f raw", "--allow"] {
                assert!(!text.contains(option), "{text}");
            }
        }
    }

    /// The fallback question is answered by each level for its own variants.
    #[test]
    fn unusable_bitmaps_are_classified_without_reading_failures() {
        let unusable = [
            image(ImageErrorKind::NoDirtyBitmap),
            image(Qcow2Error::Bitmap(BitmapError::NotFound {
                name: "x".into(),
                existing: Vec::new(),
            })),
            image(Qcow2Error::Bitmap(BitmapError::InUse { name: "x".into() })),
            image(Qcow2Error::Bitmap(BitmapError::Disabled {
                name: "x".into(),
            })),
            image(Qcow2Error::Bitmap(BitmapError::Invalid {
                offset: HostOffset(0),
                why: "bad",
            })),
        ];
        for e in unusable {
            assert!(e.is_unusable_bitmap(), "{e}");
        }
        let eof = || StorageError::PastEof {
            what: "bitmap directory",
            offset: HostOffset(0),
            len: 1,
            file_len: 0,
        };
        for e in [
            image(Qcow2Error::Bitmap(BitmapError::Read(eof()))),
            image(eof()),
            image(ImageErrorKind::BackingLoop("x".into())),
        ] {
            assert!(!e.is_unusable_bitmap(), "{e}");
        }
    }
}
