//! Opening one image of any format: format probing like qemu-img's. The
//! format names are in [`crate::format`] and the error that names the file
//! in [`error`], which the drivers use without depending on this module
//! (which depends on them).
//!
//! Probing follows QEMU: the bytes decide (see [`crate::probe`]), and raw is
//! the fallback only when no format QEMU knows is recognised. A recognised
//! format that qbackup does not read is refused by name rather than copied
//! as raw bytes (asking for the raw format explicitly still does that).

pub mod error;

use std::path::Path;
use std::sync::Arc;

pub use crate::format::Format;
pub use error::{ImageError, ImageErrorKind};

use crate::layer::Layer;
use crate::open::{Opener, Role};
use crate::probe::{self, Probed};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::storage::Storage;
use crate::units::HostOffset;

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
