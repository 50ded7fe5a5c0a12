//! Format drivers for qbackup: storage, raw and qcow2 images and their
//! backing chains.
//!
//! Layering, bottom up:
//! - [`storage`]: the [`storage::Storage`] trait (positioned, bounds-checked
//!   I/O) and its implementations: files and block devices, and a
//!   fault-injecting double for tests. [`open`] opens storage by name, in
//!   one place, for images, backing files and data files.
//! - [`mod@format`] (the format names) and [`image::error`] (the error that
//!   names an image file): leaves every driver uses, so that drivers never
//!   import the code that opens them.
//! - [`probe`] and [`image`]: format probing like qemu-img's and opening one
//!   image as a [`layer::Layer`], the trait every format driver ([`raw`],
//!   [`qcow2`]) implements.
//! - [`chain`]: stacks layers into a backing chain and answers the questions
//!   the tool asks, as QEMU's block layer does: "over this range, what is
//!   here, and in which layer?" ([`chain::Chain::status`]) and "what bytes
//!   does the guest see?" ([`chain::Chain::read`]).
//!
//! Every error can say its class and, when there is one, what the user can
//! do about it ([`error::Classify`], [`error::Remedy`]). Nothing here
//! prints, parses or names command-line options; OS errors are printed
//! through [`error::io_text`] (no "(os error N)").

pub mod chain;
pub mod codec;
pub mod error;
pub mod extent;
pub mod fingerprint;
pub mod format;
pub mod image;
pub mod layer;
pub mod nbd;
pub mod open;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod storage;
pub mod units;

pub use chain::{Chain, ChainError};
pub use codec::CompressionType;
pub use error::{Classify, ErrorClass, Remedy};
pub use extent::Extent;
pub use format::Format;
pub use image::{ImageError, ImageErrorKind};
pub use layer::Layer;
pub use units::{ClusterIndex, ClusterSize, GuestOffset, HostOffset};
