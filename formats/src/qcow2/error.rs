//! The qcow2 driver's errors: [`Qcow2Error`] for reading an image and
//! [`ClearError`] for clearing one of its dirty bitmaps, apart from the
//! code that raises them so that neither imports the other (the image
//! reader and the bitmap clearing both raise them).

use std::path::PathBuf;

use crate::codec::CodecError;
use crate::error::{Classify, ErrorClass, Remedy};
use crate::storage::StorageError;
use crate::units::{GuestOffset, HostOffset};

use super::bitmaps::BitmapError;
use super::header::HeaderError;
use super::l2::MappingError;
use super::refcount::RefcountError;
use super::snapshots::SnapshotError;

/// Errors from a qcow2 image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Reading the file failed or ran past its end.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The header is invalid.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A mapping table entry is invalid.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Refcounts could not be read.
    #[error(transparent)]
    Refcount(#[from] RefcountError),
    /// The bitmap directory is invalid.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The internal snapshot table is invalid.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A dirty bitmap cannot be cleared, or clearing it failed.
    #[error(transparent)]
    ClearBitmap(#[from] ClearError),
    /// A compressed cluster could not be decoded.
    #[error("compressed cluster for guest offset {guest}: {source}")]
    Decompress {
        /// The guest cluster.
        guest: GuestOffset,
        /// Why.
        source: CodecError,
    },
    /// The external data file could not be opened.
    #[error("cannot open external data file {path}: {source}", path = path.display())]
    OpenDataFile {
        /// The data file's path.
        path: PathBuf,
        /// Why.
        source: StorageError,
    },
    /// The data-file feature bit is set without a data file name.
    #[error("external data file feature set but no data file name in the header")]
    MissingDataFileName,
    /// The guest data is encrypted.
    #[error("image is encrypted; reading its data needs the key, which qbackup does not support")]
    Encrypted,
}

impl Classify for Qcow2Error {
    fn class(&self) -> ErrorClass {
        match self {
            Qcow2Error::Storage(e) => e.class(),
            Qcow2Error::Header(e) => e.class(),
            Qcow2Error::Mapping(e) => e.class(),
            Qcow2Error::Refcount(e) => e.class(),
            Qcow2Error::Bitmap(e) => e.class(),
            Qcow2Error::Snapshot(e) => e.class(),
            Qcow2Error::ClearBitmap(e) => e.class(),
            Qcow2Error::Decompress { source, .. } => source.class(),
            Qcow2Error::OpenDataFile { source, .. } => source.class(),
            Qcow2Error::MissingDataFileName => ErrorClass::Corrupt,
            Qcow2Error::Encrypted => ErrorClass::Unsupported,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            Qcow2Error::Storage(e) | Qcow2Error::OpenDataFile { source: e, .. } => e.remedy(),
            Qcow2Error::Bitmap(e) => e.remedy(),
            Qcow2Error::ClearBitmap(e) => e.remedy(),
            _ => None,
        }
    }
}

impl Qcow2Error {
    /// True when the error is about a dirty bitmap that cannot be used
    /// while the image itself reads fine (the bitmap error says which).
    pub fn is_unusable_bitmap(&self) -> bool {
        matches!(self, Qcow2Error::Bitmap(e) if e.is_unusable())
    }
}

/// Why a bitmap cannot be cleared, or clearing it failed.
#[derive(Debug, thiserror::Error)]
pub enum ClearError {
    /// The image was not opened for writing.
    #[error("cannot clear dirty bitmap '{name}': the image is open read-only")]
    ReadOnly {
        /// The bitmap.
        name: String,
    },
    /// The image carries the corrupt bit.
    #[error("cannot clear dirty bitmap '{name}': the image is marked corrupt (qemu-img check -r all repairs it)")]
    MarkedCorrupt {
        /// The bitmap.
        name: String,
    },
    /// The image was not closed cleanly and uses lazy refcounts.
    #[error("cannot clear dirty bitmap '{name}': the image was not closed cleanly and its refcounts may be stale (qemu-img check -r all repairs them)")]
    Dirty {
        /// The bitmap.
        name: String,
    },
    /// A data cluster's refcount is not what the bitmap alone gives it.
    #[error("cannot clear dirty bitmap '{name}': its data cluster at host offset {offset} has refcount {refcount}, expected 1 (qemu-img check reports the damage)")]
    Refcount {
        /// The bitmap.
        name: String,
        /// The data cluster.
        offset: HostOffset,
        /// Its refcount.
        refcount: u64,
    },
    /// Something to be written or freed overlaps other metadata.
    #[error("cannot clear dirty bitmap '{name}': its {what} at host offset {offset} overlaps the image's {other} (the image is inconsistent: qemu-img check reports it)")]
    Overlap {
        /// The bitmap.
        name: String,
        /// What would be written or freed.
        what: &'static str,
        /// Where.
        offset: HostOffset,
        /// What it overlaps.
        other: &'static str,
    },
    /// Reading the bitmap or the refcounts failed.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Reading the refcounts failed.
    #[error(transparent)]
    Refcounts(#[from] RefcountError),
    /// A write or sync failed (step `step` of the module docs).
    #[error("clearing dirty bitmap '{name}' failed while {step}: {}", crate::error::io_text(.source))]
    Write {
        /// The bitmap.
        name: String,
        /// What was being written.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl Classify for ClearError {
    fn class(&self) -> ErrorClass {
        match self {
            ClearError::ReadOnly { .. } => ErrorClass::Internal,
            ClearError::MarkedCorrupt { .. }
            | ClearError::Dirty { .. }
            | ClearError::Refcount { .. }
            | ClearError::Overlap { .. } => ErrorClass::Corrupt,
            ClearError::Bitmap(e) => e.class(),
            ClearError::Refcounts(e) => e.class(),
            ClearError::Write { source, .. } => ErrorClass::of_io(source),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            ClearError::Bitmap(e) => e.remedy(),
            _ => None,
        }
    }
}

impl From<StorageError> for ClearError {
    fn from(e: StorageError) -> Self {
        ClearError::Bitmap(BitmapError::Read(e))
    }
}
