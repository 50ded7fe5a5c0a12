//! The answer model for "what is at this range?", shared by every driver.
//!
//! A layer answers with a [`LayerExtent`]: what that one image says, before
//! its backing file is consulted (like a QEMU driver's block status). The
//! chain turns layer answers into an [`Extent`], the fields `qemu-img map`
//! prints: present / zero / data / compressed / depth / host offset.

use std::path::Path;
use std::sync::Arc;

use crate::units::HostOffset;

/// What one layer stores over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Nothing here: the guest sees the backing file (or zeros without one).
    Unallocated,
    /// Allocated in this layer and reads as zeros.
    Zero,
    /// Allocated data stored uncompressed at a host offset.
    Data,
    /// A compressed cluster; read it with the layer's decoder.
    Compressed,
}

/// Which file a host offset refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile(pub Arc<Path>);

/// A host location: file and byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLocation {
    /// The file holding the bytes (the image itself or its external data file).
    pub file: HostFile,
    /// Offset of the first byte of the range in that file.
    pub offset: HostOffset,
}

/// One layer's answer for a range that starts at the queried offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerExtent {
    /// What the layer stores.
    pub allocation: Allocation,
    /// Where the range's bytes are, when the layer can say (normal data,
    /// preallocated zero clusters, allocated but unused subclusters).
    pub host: Option<HostLocation>,
    /// For `Data`: the stored bytes are a hole of a preallocated file and
    /// read as zeros (QEMU reports such ranges as data and zero).
    pub data_reads_zero: bool,
}

/// What the guest sees over a range, and where it comes from (the fields of
/// one `qemu-img map --output=json` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by stored data.
    pub data: bool,
    /// Stored as compressed clusters.
    pub compressed: bool,
    /// How deep in the chain the answer came from (0 = top).
    pub depth: u32,
    /// The host location, when it is known.
    pub host: Option<HostLocation>,
}
