//! Refcounts for the streaming writer (qcow2 spec, "Host cluster
//! management"): counted per host cluster while data is appended, then
//! encoded as refcount blocks and a refcount table placed after everything
//! else.
//!
//! Invariants:
//! - Refcounts are 16 bits wide (`refcount_order` 4): entry `i` of block `b`
//!   counts host cluster `b * (cluster_size / 2) + i`, big-endian.
//! - The blocks and the table are clusters of the image too, so they count
//!   themselves: [`layout`] finds the smallest number of blocks that covers
//!   the used clusters plus the blocks plus the table.
//! - A count never wraps: adding a reference to a cluster already at
//!   `u16::MAX` is refused before anything changes.

/// log2 of the refcount width in bits.
pub(super) const REFCOUNT_ORDER: u32 = 4;

/// Why a refcount could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefcountError {
    /// The host cluster with this index already has `u16::MAX` references.
    Overflow(u64),
    /// The cluster index does not fit in memory addressing.
    TooManyClusters,
}

/// The refcount of every host cluster from cluster 0 on, in memory until
/// the image is finished (two bytes per host cluster, as on disk).
#[derive(Debug, Default)]
pub(super) struct Refcounts {
    counts: Vec<u16>,
}

/// How many refcount blocks and refcount table clusters an image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// Refcount blocks, one cluster each.
    pub blocks: u64,
    /// Clusters of the refcount table (8-byte entries, one per block).
    pub table_clusters: u64,
}

/// Refcount entries in one block.
pub(super) fn per_block(cluster_bits: u32) -> u64 {
    (1u64 << cluster_bits << 3) >> REFCOUNT_ORDER
}

impl Refcounts {
    /// The refcount of host cluster `cluster` (0 when never set).
    pub fn get(&self, cluster: u64) -> u16 {
        usize::try_from(cluster)
            .ok()
            .and_then(|c| self.counts.get(c))
            .copied()
            .unwrap_or(0)
    }

    /// Marks `cluster` as used exactly once (header, data, metadata).
    pub fn set_one(&mut self, cluster: u64) -> Result<(), RefcountError> {
        *self.slot(cluster)? = 1;
        Ok(())
    }

    /// Adds one reference to each cluster in `first..=last`; on overflow
    /// nothing changes.
    pub fn add_ref(&mut self, first: u64, last: u64) -> Result<(), RefcountError> {
        if let Some(full) = (first..=last).find(|&c| self.get(c) == u16::MAX) {
            return Err(RefcountError::Overflow(full));
        }
        for cluster in first..=last {
            let slot = self.slot(cluster)?;
            // Checked above: below u16::MAX.
            *slot += 1;
        }
        Ok(())
    }

    fn slot(&mut self, cluster: u64) -> Result<&mut u16, RefcountError> {
        let c = usize::try_from(cluster).map_err(|_| RefcountError::TooManyClusters)?;
        if self.counts.len() <= c {
            let len = c.checked_add(1).ok_or(RefcountError::TooManyClusters)?;
            self.counts.resize(len, 0);
        }
        Ok(&mut self.counts[c])
    }

    /// Appends refcount block `block` (one cluster) to `out`.
    pub fn encode_block(&self, cluster_bits: u32, block: u64, out: &mut Vec<u8>) {
        let n = per_block(cluster_bits);
        let first = block.saturating_mul(n);
        for cluster in first..first.saturating_add(n) {
            out.extend_from_slice(&self.get(cluster).to_be_bytes());
        }
    }
}

/// Sizes the refcount structures for an image whose first `used` host
/// clusters are taken, with the structures placed right after them.
///
/// The blocks must also cover themselves and the table, so this iterates
/// to the smallest fixed point: each step can only grow the counts, and it
/// settles within a few steps because one block covers at least 256
/// clusters. Fails when QEMU's 8 MiB refcount table limit is exceeded.
pub(super) fn layout(
    cluster_bits: u32,
    used: u64,
    max_table_bytes: u64,
) -> Result<Layout, &'static str> {
    let cluster_size = 1u64 << cluster_bits;
    let per_block = per_block(cluster_bits);
    let mut current = Layout {
        blocks: 0,
        table_clusters: 0,
    };
    loop {
        let total = used
            .checked_add(current.blocks)
            .and_then(|t| t.checked_add(current.table_clusters))
            .ok_or("refcount structures beyond the largest file offset")?;
        let blocks = total.div_ceil(per_block);
        let next = Layout {
            blocks,
            // blocks <= 2^64 / 256, so the entry bytes cannot overflow.
            table_clusters: (blocks * 8).div_ceil(cluster_size),
        };
        if next.table_clusters > max_table_bytes / cluster_size {
            return Err("refcount table larger than QEMU's 8 MiB limit");
        }
        if next == current {
            return Ok(current);
        }
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 8 << 20;

    #[test]
    fn fixed_point() {
        let layout = |bits, used| layout(bits, used, MAX).unwrap();
        let l = |blocks, table_clusters| Layout {
            blocks,
            table_clusters,
        };
        // 512-byte clusters: 256 refcounts per block, 64 table entries per
        // table cluster.
        assert_eq!(layout(9, 1), l(1, 1));
        // 254 used + 1 block + 1 table cluster fill one block exactly.
        assert_eq!(layout(9, 254), l(1, 1));
        // One more and the table spills into a second block.
        assert_eq!(layout(9, 255), l(2, 1));
        assert_eq!(layout(9, 256), l(2, 1));
        // 16384 used need 65 blocks, hence 2 table clusters (64 entries each).
        assert_eq!(layout(9, 16384), l(65, 2));
        assert_eq!(layout(9, 64 * 256 - 65), l(64, 1));
        assert_eq!(layout(9, 64 * 256 - 64), l(65, 2));
        // 64 KiB clusters: 32768 refcounts per block.
        assert_eq!(layout(16, 1), l(1, 1));
        assert_eq!(layout(16, 32766), l(1, 1));
        assert_eq!(layout(16, 32767), l(2, 1));
        // 2 MiB clusters: 1 Mi refcounts per block.
        assert_eq!(layout(21, 5), l(1, 1));
        assert_eq!(layout(21, 1 << 20), l(2, 1));
    }

    #[test]
    fn table_limit() {
        // 8 MiB of table = 2^20 blocks of 256 clusters = 2^28 clusters.
        assert_eq!(
            layout(9, (1 << 28) - (1 << 20) - (1 << 14), MAX)
                .unwrap()
                .table_clusters,
            1 << 14
        );
        assert!(layout(9, 1 << 28, MAX).is_err());
        assert!(layout(9, u64::MAX - 1, MAX).is_err());
        assert!(layout(9, u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn counting_and_encoding() {
        let mut r = Refcounts::default();
        r.set_one(0).unwrap();
        r.add_ref(2, 3).unwrap();
        r.add_ref(3, 3).unwrap();
        assert_eq!(
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(99)),
            (1, 0, 1, 2, 0)
        );
        let mut block = Vec::new();
        r.encode_block(9, 0, &mut block);
        assert_eq!(block.len(), 512);
        assert_eq!(&block[..10], &[0, 1, 0, 0, 0, 1, 0, 2, 0, 0]);
        block.clear();
        r.encode_block(9, 1, &mut block);
        assert_eq!(block, vec![0; 512]);
        r.set_one(300).unwrap();
        block.clear();
        r.encode_block(9, 1, &mut block);
        assert_eq!(&block[88..90], &[0, 1]);
    }

    #[test]
    fn overflow_changes_nothing() {
        let mut r = Refcounts::default();
        for _ in 0..u16::MAX {
            r.add_ref(5, 5).unwrap();
        }
        assert_eq!(r.add_ref(4, 5), Err(RefcountError::Overflow(5)));
        assert_eq!((r.get(4), r.get(5)), (0, u16::MAX));
    }
}
