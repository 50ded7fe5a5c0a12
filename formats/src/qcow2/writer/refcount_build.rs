//! Refcounts for the streaming writer (qcow2 spec, "Host cluster
//! management"), kept only for the host clusters whose refcount block is
//! not written yet.
//!
//! Host clusters are allocated in increasing order, so the refcount of a
//! cluster below the writer's *frontier* (the first cluster a later write
//! may still touch) never changes again. As soon as every cluster a block
//! covers is below the frontier, the writer encodes the block, appends it
//! like any metadata cluster and records its offset in the refcount table;
//! the counts it covered are dropped. Memory is one block's worth of counts
//! plus the clusters between the block's start and the frontier, and one
//! 8-byte table entry per written block (at most QEMU's 8 MiB table).
//!
//! Invariants:
//! - Refcounts are 16 bits wide (`refcount_order` 4): entry `i` of block `b`
//!   counts host cluster `b * (cluster_size / 2) + i`, big-endian.
//! - A block is placed after the clusters it covers, so it is counted by a
//!   later block, never by itself. The blocks written by
//!   [`Refcounts::finish_layout`]'s tail and the table count themselves: the
//!   smallest fixed point is found by iteration.
//! - A count never wraps: adding a reference to a cluster already at
//!   `u16::MAX` is refused before anything changes. Changing a count whose
//!   block is written is refused too (a writer bug, never a wrong count).

/// log2 of the refcount width in bits.
pub(super) const REFCOUNT_ORDER: u32 = 4;

/// Why a refcount could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefcountError {
    /// The host cluster with this index already has `u16::MAX` references.
    Overflow(u64),
    /// The cluster index does not fit in memory addressing.
    TooManyClusters,
    /// The block counting this cluster is already written.
    Written(u64),
    /// More blocks than QEMU's refcount table limit allows.
    TableFull,
}

/// How many more refcount blocks and how many refcount table clusters an
/// image needs at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// Refcount blocks still to write, one cluster each.
    pub blocks: u64,
    /// Clusters of the refcount table (8-byte entries, one per block,
    /// written or not).
    pub table_clusters: u64,
}

/// Refcount entries in one block.
pub(super) fn per_block(cluster_bits: u32) -> u64 {
    (1u64 << cluster_bits << 3) >> REFCOUNT_ORDER
}

/// The counts of the host clusters not yet covered by a written block, and
/// the refcount table entries of the blocks written so far.
#[derive(Debug)]
pub(super) struct Refcounts {
    cluster_bits: u32,
    /// First cluster of the next block to write.
    base: u64,
    /// `counts[i]` is the refcount of host cluster `base + i`.
    counts: Vec<u16>,
    /// Host offsets of the written blocks, in block order.
    table: Vec<u64>,
    /// QEMU's limit on the refcount table, in bytes.
    max_table_bytes: u64,
}

impl Refcounts {
    /// No cluster counted, no block written.
    pub fn new(cluster_bits: u32, max_table_bytes: u64) -> Self {
        Refcounts {
            cluster_bits,
            base: 0,
            counts: Vec::new(),
            table: Vec::new(),
            max_table_bytes,
        }
    }

    /// The refcount of host cluster `cluster` (0 when never set or when its
    /// block is written).
    pub fn get(&self, cluster: u64) -> u16 {
        cluster
            .checked_sub(self.base)
            .and_then(|c| usize::try_from(c).ok())
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
        if first < self.base {
            return Err(RefcountError::Written(first));
        }
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
        let rel = cluster
            .checked_sub(self.base)
            .ok_or(RefcountError::Written(cluster))?;
        let c = usize::try_from(rel).map_err(|_| RefcountError::TooManyClusters)?;
        if self.counts.len() <= c {
            let len = c.checked_add(1).ok_or(RefcountError::TooManyClusters)?;
            self.counts.resize(len, 0);
        }
        Ok(&mut self.counts[c])
    }

    /// Whether the next block is final: every cluster it covers lies below
    /// `frontier`, the first host cluster a later write may still change.
    pub fn next_block_final(&self, frontier: u64) -> bool {
        frontier >= self.base.saturating_add(per_block(self.cluster_bits))
    }

    /// Appends the next block (one cluster) to `out`.
    pub fn encode_next_block(&self, out: &mut Vec<u8>) {
        let n = per_block(self.cluster_bits);
        for cluster in self.base..self.base.saturating_add(n) {
            out.extend_from_slice(&self.get(cluster).to_be_bytes());
        }
    }

    /// Records that the next block was written at host byte `offset` and
    /// forgets the counts it covers.
    pub fn next_block_placed(&mut self, offset: u64) -> Result<(), RefcountError> {
        let entries = self.table.len() as u64 + 1;
        if entries.saturating_mul(8) > self.max_table_bytes {
            return Err(RefcountError::TableFull);
        }
        let n = per_block(self.cluster_bits);
        let drop = self.counts.len().min(n as usize);
        self.counts.drain(..drop);
        self.base += n;
        self.table.push(offset);
        Ok(())
    }

    /// The refcount table's entries so far.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Sizes the rest of the refcount structures for an image whose first
    /// `used` host clusters are taken (all of them final), with the
    /// remaining blocks and then the table placed right after them.
    ///
    /// The blocks must also cover themselves and the table, so this
    /// iterates to the smallest fixed point: each step can only grow the
    /// counts, and it settles within a few steps because one block covers
    /// at least 256 clusters. Fails when QEMU's refcount table limit is
    /// exceeded.
    pub fn finish_layout(&self, used: u64) -> Result<Layout, &'static str> {
        let cluster_size = 1u64 << self.cluster_bits;
        let per_block = per_block(self.cluster_bits);
        let written = self.table.len() as u64;
        let mut current = Layout {
            blocks: 0,
            table_clusters: 0,
        };
        loop {
            let total = used
                .checked_add(current.blocks)
                .and_then(|t| t.checked_add(current.table_clusters))
                .ok_or("refcount structures beyond the largest file offset")?;
            let blocks = total.div_ceil(per_block).max(written);
            let next = Layout {
                blocks: blocks - written,
                // blocks <= 2^64 / 256, so the entry bytes cannot overflow.
                table_clusters: (blocks * 8).div_ceil(cluster_size),
            };
            if next.table_clusters > self.max_table_bytes / cluster_size {
                return Err("refcount table larger than QEMU's 8 MiB limit");
            }
            if next == current {
                return Ok(current);
            }
            current = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 8 << 20;

    fn l(blocks: u64, table_clusters: u64) -> Layout {
        Layout {
            blocks,
            table_clusters,
        }
    }

    #[test]
    fn fixed_point() {
        let layout = |bits, used| Refcounts::new(bits, MAX).finish_layout(used).unwrap();
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
    fn fixed_point_after_written_blocks() {
        // 512-byte clusters, two blocks (clusters 0..512) written already.
        let mut r = Refcounts::new(9, MAX);
        for c in 0..600 {
            r.set_one(c).unwrap();
        }
        assert!(r.next_block_final(256));
        r.next_block_placed(300 << 9).unwrap();
        r.next_block_placed(301 << 9).unwrap();
        // 600 used + 1 block + 1 table cluster fit in block 2.
        assert_eq!(r.finish_layout(600).unwrap(), l(1, 1));
        // 766 + 1 + 1 = 768 fill block 2 exactly.
        assert_eq!(r.finish_layout(766).unwrap(), l(1, 1));
        assert_eq!(r.finish_layout(767).unwrap(), l(2, 1));
        // The two written blocks are among the used clusters: 16321 + 62
        // blocks + 1 table cluster fill 64 blocks; one more needs a 65th
        // block, whose entry needs a second table cluster.
        assert_eq!(r.finish_layout(64 * 256 - 63).unwrap(), l(62, 1));
        assert_eq!(r.finish_layout(64 * 256 - 62).unwrap(), l(63, 2));
    }

    #[test]
    fn table_limit() {
        let layout = |used, max| Refcounts::new(9, max).finish_layout(used);
        // 8 MiB of table = 2^20 blocks of 256 clusters = 2^28 clusters.
        assert_eq!(
            layout((1 << 28) - (1 << 20) - (1 << 14), MAX)
                .unwrap()
                .table_clusters,
            1 << 14
        );
        assert!(layout(1 << 28, MAX).is_err());
        assert!(layout(u64::MAX - 1, MAX).is_err());
        assert!(layout(u64::MAX, u64::MAX).is_err());
        // Written blocks count against the limit too: one 512-byte table
        // cluster holds 64 entries.
        let mut r = Refcounts::new(9, 512);
        for b in 0..64 {
            r.next_block_placed(b << 9).unwrap();
        }
        assert_eq!(r.next_block_placed(64 << 9), Err(RefcountError::TableFull));
    }

    #[test]
    fn counting_encoding_and_streaming() {
        let mut r = Refcounts::new(9, MAX);
        r.set_one(0).unwrap();
        r.add_ref(2, 3).unwrap();
        r.add_ref(3, 3).unwrap();
        assert_eq!(
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(99)),
            (1, 0, 1, 2, 0)
        );
        r.set_one(300).unwrap();
        // Block 0 covers clusters 0..256: final once nothing below 256 can
        // change.
        assert!(!r.next_block_final(255));
        assert!(r.next_block_final(256));
        let mut block = Vec::new();
        r.encode_next_block(&mut block);
        assert_eq!(block.len(), 512);
        assert_eq!(&block[..10], &[0, 1, 0, 0, 0, 1, 0, 2, 0, 0]);
        assert!(block[10..].iter().all(|&b| b == 0));
        r.next_block_placed(0x2_0000).unwrap();
        assert_eq!(r.table(), &[0x2_0000]);
        // Its counts are gone, and may not change any more.
        assert_eq!(r.get(0), 0);
        assert_eq!(r.set_one(255), Err(RefcountError::Written(255)));
        assert_eq!(r.add_ref(255, 256), Err(RefcountError::Written(255)));
        assert_eq!(r.get(256), 0);
        // Block 1 (clusters 256..512) holds cluster 300 at entry 44.
        block.clear();
        r.encode_next_block(&mut block);
        assert_eq!(&block[86..90], &[0, 0, 0, 1]);
        assert_eq!(block.iter().filter(|&&b| b != 0).count(), 1);
        assert!(!r.next_block_final(511));
    }

    #[test]
    fn overflow_changes_nothing() {
        let mut r = Refcounts::new(16, MAX);
        for _ in 0..u16::MAX {
            r.add_ref(5, 5).unwrap();
        }
        assert_eq!(r.add_ref(4, 5), Err(RefcountError::Overflow(5)));
        assert_eq!((r.get(4), r.get(5)), (0, u16::MAX));
    }
}
