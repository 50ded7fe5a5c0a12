//! Format drivers for qbackup: raw and qcow2 images and their backing chains.
//!
//! Layering: [`storage`] does positioned file I/O; [`raw`] and [`qcow2`]
//! decode one image each; [`chain`] stacks layers into a backing chain and
//! answers the questions the tool asks, as QEMU's block layer does:
//! "over this range, what is here, and in which layer?" ([`chain::Chain::status`])
//! and "what bytes does the guest see?" ([`chain::Chain::read`]).
//! Nothing here prints or parses command-line options.

pub mod chain;
pub mod codec;
pub mod extent;
pub mod image;
pub mod qcow2;
pub mod raw;
pub mod storage;
pub mod units;

pub use chain::{Chain, ChainError};
pub use codec::CompressionType;
pub use extent::Extent;
pub use image::{Format, ImageError};
pub use units::{ClusterIndex, GuestOffset, HostOffset};
