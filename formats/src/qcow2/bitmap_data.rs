//! A persistent dirty bitmap's table and data (spec "Bitmap table", "Bitmap
//! data"), read to answer "is this guest range dirty?" for incremental
//! backups of image files.
//!
//! The table is one contiguous array of 64-bit entries, one per cluster of
//! bitmap data: bits 9..55 the data cluster's offset, or 0 with bit 0 saying
//! the whole cluster reads as all zeros (0) or all ones (1). Bit `k` of the
//! bitmap (guest chunk `k`, `granularity` bytes each) is bit `k % 8`, least
//! significant first, of byte `k / 8` of the data.
//!
//! Invariants after [`DirtyBitmap::load`]: the bitmap is not marked in use
//! (a bitmap QEMU did not store cleanly cannot be trusted), the table has
//! exactly the entries the virtual size needs, lies inside the file and
//! every entry is valid (reserved bits zero, data clusters aligned and
//! inside the file). Data clusters are read when asked, one cached.

use std::sync::{Arc, Mutex};

use super::bitmaps::{flags, BitmapEntry, BitmapError};
use super::table;
use crate::storage::Storage;
use crate::units::HostOffset;

/// Bits 9..55 of a table entry.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an entry without a data cluster: all ones.
const ALL_ONES: u64 = 1;

/// A loaded dirty bitmap; see the module docs.
#[derive(Debug)]
pub struct DirtyBitmap {
    storage: Arc<dyn Storage>,
    granularity: u64,
    cluster_size: u64,
    virtual_size: u64,
    table: Vec<u64>,
    cached: Mutex<Option<(usize, Arc<[u8]>)>>,
}

/// Reads and validates the bitmap table of `entry` in an image with
/// `cluster_bits` and `virtual_size` (see the module docs), as QEMU does
/// for every bitmap not in use when it opens an image.
pub fn read_table(
    storage: &dyn Storage,
    entry: &BitmapEntry,
    cluster_bits: u32,
    virtual_size: u64,
) -> Result<Vec<u64>, BitmapError> {
    let invalid = |why| BitmapError::Invalid {
        offset: entry.table_offset,
        why,
    };
    let cluster_size = 1u64 << cluster_bits;
    let bits = virtual_size.div_ceil(entry.granularity);
    let needed = bits.div_ceil(8).div_ceil(cluster_size);
    if u64::from(entry.table_size) != needed {
        return Err(invalid("bitmap table size does not match the virtual size"));
    }
    if entry.table_offset.0 % cluster_size != 0 {
        return Err(invalid("bitmap table is not cluster aligned"));
    }
    let table = table::read(storage, "bitmap table", entry.table_offset, needed)?;
    for &e in &table {
        let offset = e & OFFSET_MASK;
        if e & !(OFFSET_MASK | ALL_ONES) != 0 || (offset != 0 && e & ALL_ONES != 0) {
            return Err(invalid("bitmap table entry has reserved bits set"));
        }
        if offset % cluster_size != 0 {
            return Err(invalid("bitmap data cluster is not cluster aligned"));
        }
        if offset != 0 {
            storage.check_range("bitmap data", HostOffset(offset), cluster_size)?;
        }
    }
    Ok(table)
}

/// The data clusters a validated bitmap table refers to, in table order.
pub fn data_clusters(table: &[u64]) -> impl Iterator<Item = HostOffset> + '_ {
    table
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .map(HostOffset)
}

impl DirtyBitmap {
    /// Loads and validates bitmap `entry` of an image with `cluster_bits`
    /// and `virtual_size`.
    pub fn load(
        storage: Arc<dyn Storage>,
        entry: &BitmapEntry,
        cluster_bits: u32,
        virtual_size: u64,
    ) -> Result<DirtyBitmap, BitmapError> {
        if entry.flags & flags::IN_USE != 0 {
            return Err(BitmapError::InUse {
                name: entry.name.clone(),
            });
        }
        let table = read_table(storage.as_ref(), entry, cluster_bits, virtual_size)?;
        Ok(DirtyBitmap {
            storage,
            granularity: entry.granularity,
            cluster_size: 1u64 << cluster_bits,
            virtual_size,
            table,
            cached: Mutex::new(None),
        })
    }

    fn data_cluster(&self, index: usize, offset: u64) -> Result<Arc<[u8]>, BitmapError> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((i, data)) = cached.as_ref().filter(|c| c.0 == index) {
            debug_assert_eq!(*i, index);
            return Ok(data.clone());
        }
        let mut buf = vec![0u8; self.cluster_size as usize];
        self.storage
            .read_exact_at("bitmap data", &mut buf, HostOffset(offset))?;
        let data: Arc<[u8]> = buf.into();
        *cached = Some((index, data.clone()));
        Ok(data)
    }

    /// Whether guest byte `offset` (below the virtual size) lies in a dirty
    /// chunk, and for how many bytes (at most `max_len`, > 0) that holds.
    pub fn dirty(&self, offset: u64, max_len: u64) -> Result<(bool, u64), BitmapError> {
        let end = offset.saturating_add(max_len).min(self.virtual_size);
        let bits_per_cluster = self.cluster_size * 8;
        let first_bit = offset / self.granularity;
        let bit_of = |b: u64| -> Result<bool, BitmapError> {
            let index = (b / bits_per_cluster) as usize;
            let entry = self.table[index];
            let data_offset = entry & OFFSET_MASK;
            if data_offset == 0 {
                return Ok(entry & ALL_ONES != 0);
            }
            let data = self.data_cluster(index, data_offset)?;
            let in_cluster = b % bits_per_cluster;
            Ok(data[(in_cluster / 8) as usize] >> (in_cluster % 8) & 1 != 0)
        };
        let state = bit_of(first_bit)?;
        let same_byte = if state { 0xff } else { 0 };
        let mut bit = first_bit + 1;
        'run: while bit * self.granularity < end {
            let index = (bit / bits_per_cluster) as usize;
            let cluster_end = (index as u64 + 1) * bits_per_cluster;
            let entry = self.table[index];
            let data_offset = entry & OFFSET_MASK;
            if data_offset == 0 {
                // A whole cluster without data has one value.
                if (entry & ALL_ONES != 0) != state {
                    break;
                }
                bit = cluster_end;
                continue;
            }
            let data = self.data_cluster(index, data_offset)?;
            while bit < cluster_end && bit * self.granularity < end {
                let in_cluster = bit % bits_per_cluster;
                let byte = data[(in_cluster / 8) as usize];
                if in_cluster % 8 == 0 && byte == same_byte {
                    bit += 8;
                    continue;
                }
                if (byte >> (in_cluster % 8) & 1 != 0) != state {
                    break 'run;
                }
                bit += 1;
            }
        }
        let run_end = (bit * self.granularity).min(end);
        Ok((state, run_end - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;

    const CLUSTER_BITS: u32 = 9; // 512-byte clusters: 4096 bits each
    const GRANULARITY: u64 = 512;

    /// An image file holding a bitmap table at 512 and data clusters after
    /// it, for a disk of `clusters` bitmap clusters' worth of chunks.
    fn bitmap(entries: &[u64], data: &[(u64, Vec<u8>)]) -> DirtyBitmap {
        let mut file = vec![0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            file[512 + 8 * i..520 + 8 * i].copy_from_slice(&e.to_be_bytes());
        }
        for (at, bytes) in data {
            file[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        let entry = BitmapEntry {
            name: "b".into(),
            granularity: GRANULARITY,
            flags: 0,
            table_offset: HostOffset(512),
            table_size: entries.len() as u32,
        };
        let size = entries.len() as u64 * 4096 * GRANULARITY;
        let storage = Arc::new(MemoryStorage::read_only("img", file));
        DirtyBitmap::load(storage, &entry, CLUSTER_BITS, size).unwrap()
    }

    #[test]
    fn runs_across_zero_one_and_data_clusters() {
        let chunk = GRANULARITY;
        let per_cluster = 4096 * chunk;
        // Cluster 0: all zeros; 1: all ones; 2: data with bits 0-1 and 9 set.
        let mut data = vec![0u8; 512];
        data[0] = 0b0000_0011;
        data[1] = 0b0000_0010;
        let b = bitmap(&[0, ALL_ONES, 1024], &[(1024, data)]);
        let total = 3 * per_cluster;
        assert_eq!(b.dirty(0, total).unwrap(), (false, per_cluster));
        assert_eq!(
            b.dirty(per_cluster, total).unwrap(),
            (true, per_cluster + 2 * chunk)
        );
        let c2 = 2 * per_cluster;
        assert_eq!(b.dirty(c2 + chunk, total).unwrap(), (true, chunk));
        assert_eq!(b.dirty(c2 + 2 * chunk, total).unwrap(), (false, 7 * chunk));
        assert_eq!(b.dirty(c2 + 9 * chunk, total).unwrap(), (true, chunk));
        assert!(!b.dirty(c2 + 10 * chunk, total - c2 - 10 * chunk).unwrap().0);
        // max_len bounds the run, and an offset inside a chunk counts.
        assert_eq!(b.dirty(per_cluster + 7, 100).unwrap(), (true, 100));
    }

    #[test]
    fn invalid_tables_and_in_use_are_refused() {
        let load = |entries: &[u64], flags: u32, table_size: u32| {
            let mut file = vec![0u8; 2048];
            for (i, e) in entries.iter().enumerate() {
                file[512 + 8 * i..520 + 8 * i].copy_from_slice(&e.to_be_bytes());
            }
            let entry = BitmapEntry {
                name: "b".into(),
                granularity: GRANULARITY,
                flags,
                table_offset: HostOffset(512),
                table_size,
            };
            let storage = Arc::new(MemoryStorage::read_only("img", file));
            DirtyBitmap::load(storage, &entry, CLUSTER_BITS, 4096 * GRANULARITY)
        };
        assert!(load(&[0], 0, 1).is_ok());
        assert!(matches!(
            load(&[0], flags::IN_USE, 1),
            Err(BitmapError::InUse { .. })
        ));
        assert!(load(&[0], 0, 2).is_err(), "table size must match the disk");
        assert!(load(&[1 << 3], 0, 1).is_err(), "reserved bits");
        assert!(
            load(&[1024 | 1], 0, 1).is_err(),
            "all-ones bit with a data cluster"
        );
        assert!(
            load(&[1024 + 512 * 8], 0, 1).is_err(),
            "data cluster past the end"
        );
    }
}
