//! Opening one image of any format: format probing like qemu-img's, the
//! format names, and the error type that names the file.
//!
//! Probing follows QEMU: the bytes decide (see [`crate::probe`]), and raw is
//! the fallback only when no format QEMU knows is recognised. A recognised
//! format that qbackup does not read is refused by name rather than copied
//! as raw bytes (`-f raw` still forces that).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Classify, ErrorClass};
use crate::layer::Layer;
use crate::open::{Opener, Role};
use crate::probe::{self, Probed};
use crate::qcow2::{Qcow2Error, Qcow2Image};
use crate::raw::RawImage;
use crate::storage::{Storage, StorageError};
use crate::units::HostOffset;

/// An image format qbackup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a qemu-img format name.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
    #[error("{0} images are not supported (convert with qemu-img, or pass -f raw to copy the file's bytes)")]
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
    /// A driver broke the [`Layer`] contract (a bug).
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

    /// True when the error is about a persistent dirty bitmap that cannot
    /// be used (missing, left in use, disabled, invalid, or an image that
    /// cannot hold one), while the image itself reads fine.
    pub fn is_unusable_bitmap(&self) -> bool {
        use crate::qcow2::bitmaps::BitmapError;
        use crate::qcow2::Qcow2Error;
        matches!(
            &self.kind,
            ImageErrorKind::NoDirtyBitmap
                | ImageErrorKind::Qcow2(Qcow2Error::Bitmap(
                    BitmapError::NotFound { .. }
                        | BitmapError::InUse { .. }
                        | BitmapError::Disabled { .. }
                        | BitmapError::Invalid { .. }
                ))
        )
    }
}

impl Classify for ImageError {
    fn class(&self) -> ErrorClass {
        self.kind.class()
    }
}

/// Opens `path` (through `opener`, in `role`) as `format`, or probes the
/// format when `None`.
pub fn open(
    opener: &dyn Opener,
    path: &Path,
    role: Role,
    format: Option<Format>,
) -> Result<Box<dyn Layer>, ImageError> {
    let storage = opener
        .open(path, role)
        .map_err(|e| ImageError::new(path, e))?;
    open_storage(opener, storage, format)
}

/// Opens an already opened storage as `format`, or probes it.
pub fn open_storage(
    opener: &dyn Opener,
    storage: Arc<dyn Storage>,
    format: Option<Format>,
) -> Result<Box<dyn Layer>, ImageError> {
    let path = storage.name().to_path_buf();
    let err = |e: ImageErrorKind| ImageError::new(&path, e);
    let format = match format {
        Some(f) => f,
        None => probe_storage(storage.as_ref()).map_err(err)?,
    };
    Ok(match format {
        Format::Raw => Box::new(RawImage::open(storage)),
        Format::Qcow2 => Box::new(Qcow2Image::open(storage, opener).map_err(|e| err(e.into()))?),
    })
}

/// Guesses the format like qemu-img from the first and last bytes.
fn probe_storage(storage: &dyn Storage) -> Result<Format, ImageErrorKind> {
    let len = storage.len();
    let mut head = vec![0u8; len.min(probe::HEAD_BYTES as u64) as usize];
    storage.read_exact_at("header", &mut head, HostOffset(0))?;
    let tail_len = len.min(probe::TAIL_BYTES as u64);
    let mut tail = vec![0u8; tail_len as usize];
    storage.read_exact_at("trailer", &mut tail, HostOffset(len - tail_len))?;
    match probe::probe(&head, &tail, storage.name().file_name()) {
        Probed::Qcow2 => Ok(Format::Qcow2),
        Probed::Raw => Ok(Format::Raw),
        Probed::Foreign(name) => Err(ImageErrorKind::ForeignFormat(name)),
    }
}
