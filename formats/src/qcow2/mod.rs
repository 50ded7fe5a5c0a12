//! The qcow2 driver, split by on-disk structure like the spec
//! (docs/interop/qcow2.rst): the header and its extensions, L1/L2 mapping
//! entries, refcounts, the bitmap directory, big-endian table encoding, the
//! reader and its [`crate::layer::Layer`] implementation, and the writer
//! used for backups. Only the reader type, `info`'s facts and the writer are
//! public; table layouts stay inside the driver.

pub(crate) mod bitmap_clear;
pub(crate) mod bitmap_data;
pub(crate) mod bitmaps;
mod check;
mod error;
mod extensions;
pub(crate) mod header;
mod image;
pub(crate) mod l2;
mod layer;
pub(crate) mod refcount;
pub(crate) mod snapshots;
pub(crate) mod table;
pub mod writer;

pub use check::MetadataReport;
pub use error::{ClearError, Qcow2Error};
pub use image::Qcow2Image;
pub use layer::{BitmapSummary, Qcow2Info};
