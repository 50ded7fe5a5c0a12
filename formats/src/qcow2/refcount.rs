//! Reading refcounts (spec "Host cluster management"): a refcount table of
//! 64-bit block offsets, each block a cluster of `refcount_bits`-wide
//! big-endian entries. Widths below 8 bits pack entries from the least
//! significant bit of each byte upwards, as QEMU does.

use super::table;
use crate::error::{Classify, ErrorClass};
use crate::storage::{Storage, StorageError};
use crate::units::HostOffset;

/// Errors from reading refcount structures.
#[derive(Debug, thiserror::Error)]
pub enum RefcountError {
    /// The refcount table or a block could not be read.
    #[error("cannot read refcount structure: {0}")]
    Read(#[from] StorageError),
    /// A refcount block offset is not cluster aligned.
    #[error("refcount block at unaligned host offset {0}")]
    UnalignedBlock(HostOffset),
}

impl Classify for RefcountError {
    fn class(&self) -> ErrorClass {
        match self {
            RefcountError::Read(e) => e.class(),
            RefcountError::UnalignedBlock(_) => ErrorClass::Corrupt,
        }
    }
}

/// Extracts entry `index` from a refcount block of `1 << order`-bit entries.
pub fn entry(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1u64 << bits) - 1)
        }
        3 => u64::from(block[index]),
        4 => u64::from(table::be16(block, 2 * index)),
        5 => u64::from(table::be32(block, 4 * index)),
        _ => table::be64(block, 8 * index),
    }
}

/// Stores `value` (which must fit) as entry `index` of a refcount block of
/// `1 << order`-bit entries; the inverse of [`entry`].
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | ((value as u8) << shift & mask);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Where a host cluster's refcount lives: its refcount block and the
/// entry's index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefcountSlot {
    /// The refcount block.
    pub block: HostOffset,
    /// The entry in it.
    pub index: usize,
}

/// Reads refcounts of an image, one block at a time.
pub struct RefcountReader<'a> {
    storage: &'a dyn Storage,
    table: Vec<u64>,
    cluster_bits: u32,
    order: u32,
    cached: Option<(usize, Vec<u8>)>,
}

impl<'a> RefcountReader<'a> {
    /// Loads the refcount table described by the header fields.
    pub fn new(
        storage: &'a dyn Storage,
        table_offset: HostOffset,
        table_clusters: u32,
        cluster_bits: u32,
        order: u32,
    ) -> Result<Self, RefcountError> {
        let entries = (u64::from(table_clusters) << cluster_bits) / 8;
        let table = table::read(storage, "refcount table", table_offset, entries)?;
        Ok(RefcountReader {
            storage,
            table,
            cluster_bits,
            order,
            cached: None,
        })
    }

    /// The refcount blocks the table points to (host offsets, nonzero).
    pub fn block_offsets(&self) -> impl Iterator<Item = HostOffset> + '_ {
        self.table
            .iter()
            .map(|e| e & !0x1ff)
            .filter(|&o| o != 0)
            .map(HostOffset)
    }

    /// Where the refcount of host cluster `cluster` lives; `None` when no
    /// refcount block covers it (its refcount is 0).
    pub fn slot(&self, cluster: u64) -> Result<Option<RefcountSlot>, RefcountError> {
        let per_block_bits = self.cluster_bits + 3 - self.order;
        let table_index = (cluster >> per_block_bits) as usize;
        let Some(&raw) = self.table.get(table_index) else {
            return Ok(None);
        };
        let block_offset = raw & !0x1ff;
        if block_offset == 0 {
            return Ok(None);
        }
        if block_offset & ((1u64 << self.cluster_bits) - 1) != 0 {
            return Err(RefcountError::UnalignedBlock(HostOffset(block_offset)));
        }
        Ok(Some(RefcountSlot {
            block: HostOffset(block_offset),
            index: (cluster & ((1u64 << per_block_bits) - 1)) as usize,
        }))
    }

    /// The refcount of host cluster `cluster` (0 when no block covers it).
    pub fn get(&mut self, cluster: u64) -> Result<u64, RefcountError> {
        let per_block_bits = self.cluster_bits + 3 - self.order;
        let table_index = (cluster >> per_block_bits) as usize;
        let Some(slot) = self.slot(cluster)? else {
            return Ok(0);
        };
        let block_offset = slot.block.0;
        if self.cached.as_ref().map(|c| c.0) != Some(table_index) {
            let mut block = vec![0u8; 1usize << self.cluster_bits];
            self.storage
                .read_exact_at("refcount block", &mut block, HostOffset(block_offset))?;
            self.cached = Some((table_index, block));
        }
        let block = &self.cached.as_ref().expect("just filled").1;
        Ok(entry(block, self.order, slot.index))
    }
}

#[cfg(test)]
mod tests {
    use super::{entry, set_entry};

    #[test]
    fn set_entry_inverts_entry_at_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0xa5u8; 64];
            let before: Vec<u64> = (0..8).map(|i| entry(&block, order, i)).collect();
            set_entry(&mut block, order, 3, max);
            set_entry(&mut block, order, 4, 0);
            for (i, &old) in before.iter().enumerate() {
                let want = match i {
                    3 => max,
                    4 => 0,
                    _ => old,
                };
                assert_eq!(entry(&block, order, i), want, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn packed_widths() {
        let block = [
            0b1011_0110u8,
            0x12,
            0x34,
            0x56,
            0x78,
            0x9a,
            0xbc,
            0xde,
            0xf0,
        ];
        // 1 bit: LSB first.
        let bits: Vec<u64> = (0..8).map(|i| entry(&block, 0, i)).collect();
        assert_eq!(bits, vec![0, 1, 1, 0, 1, 1, 0, 1]);
        // 2 bits.
        assert_eq!(entry(&block, 1, 0), 0b10);
        assert_eq!(entry(&block, 1, 3), 0b10);
        // 4 bits.
        assert_eq!(entry(&block, 2, 0), 0b0110);
        assert_eq!(entry(&block, 2, 1), 0b1011);
        assert_eq!(entry(&block, 3, 1), 0x12);
        assert_eq!(entry(&block, 4, 1), 0x3456);
        assert_eq!(entry(&block, 5, 1), 0x789a_bcde);
        assert_eq!(entry(&block, 6, 0), 0xb612_3456_789a_bcde);
    }
}
