//! Newtypes for the three kinds of position that qcow2 code juggles.
//!
//! A guest offset (a byte in the virtual disk), a host offset (a byte in an
//! image or data file) and a cluster index are all 64-bit numbers; mixing
//! them up is the classic qcow2 bug, so they never cross a module boundary
//! as bare `u64`.

use std::fmt;

/// A byte position in the virtual disk, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte position inside an image file or external data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// The index of a guest cluster (guest offset divided by the cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(pub u64);

impl GuestOffset {
    /// The offset `len` bytes further on, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<GuestOffset> {
        self.0.checked_add(len).map(GuestOffset)
    }
}

impl HostOffset {
    /// The offset `len` bytes further on, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<HostOffset> {
        self.0.checked_add(len).map(HostOffset)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for ClusterIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
