//! The qcow2 driver, split by concern like the spec: the header and its
//! extensions, L1/L2 mapping entries, refcounts, the bitmap directory, the
//! reader, and the writer used for backups.

pub mod bitmaps;
pub mod header;
pub mod image;
pub mod l2;
pub mod refcount;
pub mod writer;

pub use image::{Piece, Qcow2Error, Qcow2Image};
