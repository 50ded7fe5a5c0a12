//! Newtypes for the kinds of position that image code juggles, with the
//! arithmetic between them.
//!
//! A guest offset (a byte in the virtual disk), a host offset (a byte in an
//! image or data file) and a cluster index are all 64-bit numbers; mixing
//! them up is the classic qcow2 bug, so they never cross a module boundary
//! as bare `u64`. [`ClusterSize`] converts between guest offsets and cluster
//! indices; it is always a power of two from 512 bytes to 2 MiB, the range
//! qcow2 allows (spec "Header", `cluster_bits` 9..=21).

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

/// A cluster size: a power of two from 512 bytes to 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterSize(u32);

impl GuestOffset {
    /// The offset `len` bytes further on, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<GuestOffset> {
        self.0.checked_add(len).map(GuestOffset)
    }

    /// Bytes from `self` up to `end` (0 when `end` is not after `self`).
    pub fn until(self, end: GuestOffset) -> u64 {
        end.0.saturating_sub(self.0)
    }
}

impl HostOffset {
    /// The offset `len` bytes further on, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<HostOffset> {
        self.0.checked_add(len).map(HostOffset)
    }
}

/// The offset `len` bytes further on; for offsets inside a virtual size,
/// which cannot overflow.
impl std::ops::Add<u64> for GuestOffset {
    type Output = GuestOffset;
    fn add(self, len: u64) -> GuestOffset {
        GuestOffset(self.0 + len)
    }
}

/// The index `n` clusters further on.
impl std::ops::Add<u64> for ClusterIndex {
    type Output = ClusterIndex;
    fn add(self, n: u64) -> ClusterIndex {
        ClusterIndex(self.0 + n)
    }
}

impl ClusterSize {
    /// The smallest cluster size qcow2 allows.
    pub const MIN: ClusterSize = ClusterSize(512);
    /// The largest cluster size qcow2 allows.
    pub const MAX: ClusterSize = ClusterSize(2 << 20);

    /// `bytes` as a cluster size, if it is a power of two from 512 to 2 MiB.
    pub fn new(bytes: u64) -> Option<ClusterSize> {
        (bytes.is_power_of_two() && (512..=(2 << 20)).contains(&bytes))
            .then_some(ClusterSize(bytes as u32))
    }

    /// The cluster size `1 << bits`, if `bits` is 9 to 21.
    pub fn from_bits(bits: u32) -> Option<ClusterSize> {
        (9..=21).contains(&bits).then(|| ClusterSize(1 << bits))
    }

    /// Bytes per cluster.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// Bytes per cluster, for buffer sizes.
    pub fn usize(self) -> usize {
        self.0 as usize
    }

    /// log2 of the size.
    pub fn bits(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// The cluster that holds guest byte `offset`.
    pub fn index_of(self, offset: GuestOffset) -> ClusterIndex {
        ClusterIndex(offset.0 >> self.bits())
    }

    /// The first guest byte of cluster `index`.
    pub fn start_of(self, index: ClusterIndex) -> GuestOffset {
        GuestOffset(index.0 << self.bits())
    }

    /// The guest bytes of cluster `index` that lie below `size`: one
    /// cluster, or less for a partial last cluster, or 0 past the end.
    pub fn bytes_below(self, index: ClusterIndex, size: u64) -> u64 {
        size.saturating_sub(self.start_of(index).0)
            .min(self.bytes())
    }

    /// Clusters needed to cover `size` bytes.
    pub fn count_for(self, size: u64) -> u64 {
        size.div_ceil(self.bytes())
    }

    /// Bytes in `n` clusters.
    pub fn bytes_in(self, n: u64) -> u64 {
        n << self.bits()
    }

    /// The offset within its cluster.
    pub fn offset_in(self, offset: GuestOffset) -> u64 {
        offset.0 & (self.bytes() - 1)
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

impl fmt::Display for ClusterSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_arithmetic() {
        assert!(ClusterSize::new(1000).is_none());
        assert!(ClusterSize::new(256).is_none());
        assert!(ClusterSize::new(4 << 20).is_none());
        let cs = ClusterSize::new(65536).unwrap();
        assert_eq!(cs.bits(), 16);
        assert_eq!(ClusterSize::from_bits(16), Some(cs));
        assert_eq!(cs.index_of(GuestOffset(65535)), ClusterIndex(0));
        assert_eq!(cs.index_of(GuestOffset(65536)), ClusterIndex(1));
        assert_eq!(cs.start_of(ClusterIndex(3)), GuestOffset(3 << 16));
        assert_eq!(cs.bytes_below(ClusterIndex(1), 65536 + 512), 512);
        assert_eq!(cs.bytes_below(ClusterIndex(0), 1 << 20), 65536);
        assert_eq!(cs.bytes_below(ClusterIndex(9), 1000), 0);
        assert_eq!(cs.count_for(65537), 2);
        assert_eq!(cs.offset_in(GuestOffset(65537)), 1);
        assert_eq!(GuestOffset(10).until(GuestOffset(4)), 0);
    }
}
