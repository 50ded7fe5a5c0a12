//! The guest-to-host mapping of the streaming writer (qcow2 spec, "Cluster
//! mapping"), held one table at a time.
//!
//! Guest clusters arrive in strictly increasing order, so once a write
//! lands beyond the guest range an L2 table covers, that table is final:
//! [`Mapping::take_passed`] hands it out to be appended, and
//! [`Mapping::l2_placed`] records its host offset in the L1 table. The L1
//! table sits at a fixed place (right after the header), and an L1 cluster
//! is final, and handed out to be written in place, once an L2 table
//! beyond its range is placed.
//!
//! Memory: one L2 table and one L1 cluster, whatever the virtual size.
//!
//! Invariants: entries are recorded in increasing guest order; an L1 entry
//! is the L2 table's offset with bit 63 (COPIED) set, since every table
//! has refcount 1; L1 clusters that would be all zeros are never handed out
//! (the file reads as zeros there anyway).

use crate::qcow2::l2::COPIED;
use crate::qcow2::table;

/// A final L2 table: its index in the L1 table and its entries.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct L2Table {
    pub l1_index: u64,
    pub entries: Box<[u64]>,
}

/// A final L1 cluster: its number within the L1 table and its bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct L1Cluster {
    pub number: u64,
    pub bytes: Vec<u8>,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Mapping {
    /// log2 of the entries per table (L1 or L2) cluster.
    entry_bits: u32,
    /// The L2 table being filled.
    current: Option<L2Table>,
    /// The L1 cluster being filled: its number and entries.
    l1: Option<(u64, Box<[u64]>)>,
}

impl Mapping {
    /// An empty mapping for clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32) -> Self {
        Mapping {
            entry_bits: cluster_bits - 3,
            current: None,
            l1: None,
        }
    }

    /// The L1 index of the table covering guest cluster `index`.
    fn l1_index(&self, index: u64) -> u64 {
        index >> self.entry_bits
    }

    /// The table being filled, if guest cluster `index` lies beyond it: it
    /// is final and must be appended before `index` gets an entry.
    pub fn take_passed(&mut self, index: u64) -> Option<L2Table> {
        let l1_index = self.l1_index(index);
        if self.current.as_ref()?.l1_index < l1_index {
            self.current.take()
        } else {
            None
        }
    }

    /// The table being filled, at the end of the image.
    pub fn take_last(&mut self) -> Option<L2Table> {
        self.current.take()
    }

    /// Records the entry of guest cluster `index`, after any passed table
    /// was taken with [`Mapping::take_passed`].
    pub fn set(&mut self, index: u64, entry: u64) {
        let l1_index = self.l1_index(index);
        let slot = (index & ((1 << self.entry_bits) - 1)) as usize;
        let table = self.current.get_or_insert_with(|| L2Table {
            l1_index,
            entries: vec![0; 1 << self.entry_bits].into_boxed_slice(),
        });
        debug_assert_eq!(table.l1_index, l1_index, "passed table not taken");
        table.entries[slot] = entry;
    }

    /// Records that the L2 table for `l1_index` (larger than any before) is
    /// at host byte `offset`; returns the L1 cluster this made final.
    pub fn l2_placed(&mut self, l1_index: u64, offset: u64) -> Option<L1Cluster> {
        let number = l1_index >> self.entry_bits;
        let done = match &self.l1 {
            Some((n, _)) if *n < number => self.take_l1(),
            _ => None,
        };
        let (_, entries) = self
            .l1
            .get_or_insert_with(|| (number, vec![0; 1 << self.entry_bits].into_boxed_slice()));
        entries[(l1_index & ((1 << self.entry_bits) - 1)) as usize] = offset | COPIED;
        done
    }

    /// The L1 cluster being filled, at the end of the image.
    pub fn take_l1(&mut self) -> Option<L1Cluster> {
        let (number, entries) = self.l1.take()?;
        let mut bytes = Vec::with_capacity(entries.len() * 8);
        table::encode_into(entries.iter().copied(), &mut bytes);
        Some(L1Cluster { number, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_handed_out_once_passed() {
        // 512-byte clusters: 64 entries per table.
        let mut m = Mapping::new(9);
        assert_eq!(m.take_passed(0), None);
        m.set(3, 0x8000_0000_0000_0200);
        assert_eq!(m.take_passed(63), None);
        m.set(63, 1);
        let t = m.take_passed(64).unwrap();
        assert_eq!(t.l1_index, 0);
        assert_eq!(t.entries.len(), 64);
        assert_eq!(
            (t.entries[3], t.entries[63], t.entries[4]),
            (0x8000_0000_0000_0200, 1, 0)
        );
        assert_eq!(m.take_passed(64), None);
        // A table that got no entries is never made.
        m.set(64 * 70 + 1, 7);
        let t = m.take_last().unwrap();
        assert_eq!((t.l1_index, t.entries[1]), (70, 7));
        assert_eq!(m.take_last(), None);
    }

    #[test]
    fn l1_clusters_are_final_when_passed() {
        // 512-byte clusters: 64 L1 entries per L1 cluster.
        let mut m = Mapping::new(9);
        assert_eq!(m.l2_placed(2, 0xa00), None);
        assert_eq!(m.l2_placed(63, 0xc00), None);
        // Skips L1 cluster 1 entirely: it stays a hole, never written.
        let c = m.l2_placed(130, 0xe00).unwrap();
        assert_eq!(c.number, 0);
        assert_eq!(c.bytes.len(), 512);
        assert_eq!(&c.bytes[16..24], &[0x80, 0, 0, 0, 0, 0, 0x0a, 0]);
        assert_eq!(&c.bytes[504..512], &[0x80, 0, 0, 0, 0, 0, 0x0c, 0]);
        assert_eq!(c.bytes.iter().filter(|&&b| b != 0).count(), 4);
        let c = m.take_l1().unwrap();
        assert_eq!(c.number, 2);
        assert_eq!(&c.bytes[16..24], &[0x80, 0, 0, 0, 0, 0, 0x0e, 0]);
        assert_eq!(m.take_l1(), None);
    }
}
