//! One image of either format, format probing, and the error type that
//! names the file.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::extent::LayerExtent;
use crate::qcow2::{header::MAGIC, Qcow2Error, Qcow2Image};
use crate::raw::RawImage;
use crate::storage::{Storage, StorageError};
use crate::units::{GuestOffset, HostOffset};

/// An image format.
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
    /// The chain is deeper than qbackup accepts.
    #[error("backing chain deeper than {0} images")]
    ChainTooDeep(usize),
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
}

/// One opened image (a layer of a chain).
#[derive(Debug)]
pub enum Image {
    /// A raw image.
    Raw(RawImage),
    /// A qcow2 image.
    Qcow2(Box<Qcow2Image>),
}

/// Guesses the format like qemu-img: qcow2 magic, else raw.
pub fn probe(storage: &Storage) -> Result<Format, StorageError> {
    // Like qemu-img: the magic alone decides; a truncated qcow2 header is
    // then an error, not a raw image.
    if storage.len() < 4 {
        return Ok(Format::Raw);
    }
    let mut magic = [0u8; 4];
    storage.read_exact_at("header", &mut magic, HostOffset(0))?;
    Ok(if u32::from_be_bytes(magic) == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

impl Image {
    /// Opens `path` read-only as `format`, or probes the format when `None`.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Image, ImageError> {
        let storage = Storage::open(path).map_err(|e| ImageError::new(path, e))?;
        let format = match format {
            Some(f) => f,
            None => probe(&storage).map_err(|e| ImageError::new(path, e))?,
        };
        Ok(match format {
            Format::Raw => Image::Raw(RawImage::open(storage)),
            Format::Qcow2 => Image::Qcow2(Box::new(
                Qcow2Image::open(storage).map_err(|e| ImageError::new(path, e))?,
            )),
        })
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The image file.
    pub fn storage(&self) -> &Storage {
        match self {
            Image::Raw(r) => r.storage(),
            Image::Qcow2(q) => q.storage(),
        }
    }

    /// The path the image was opened by.
    pub fn path(&self) -> &Path {
        self.storage().path()
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Raw(r) => r.virtual_size(),
            Image::Qcow2(q) => q.virtual_size(),
        }
    }

    /// Cluster size, where the format has one.
    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(q) => Some(q.header().cluster_size()),
        }
    }

    /// The qcow2 image, if this is one.
    pub fn as_qcow2(&self) -> Option<&Qcow2Image> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }

    /// What this layer alone stores over the range at `offset`.
    pub fn status(
        &self,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(LayerExtent, u64), ImageError> {
        match self {
            Image::Raw(r) => r
                .status(offset, max_len)
                .map_err(|e| ImageError::new(self.path(), e)),
            Image::Qcow2(q) => q
                .status(offset, max_len)
                .map_err(|e| ImageError::new(self.path(), e)),
        }
    }
}
