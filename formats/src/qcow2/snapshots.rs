//! The internal snapshot table (spec "Snapshots"), read as QEMU reads it
//! when it opens an image (`qcow2_read_snapshots`), so that an image QEMU
//! refuses for its snapshot table is refused here too.
//!
//! Only what the checks and the metadata check need is kept: each
//! snapshot's L1 table and the table's length. Entries are variable length:
//! a 40-byte fixed part, extra data, the ID and the name, each entry
//! starting 8-byte aligned. QEMU's limits: at most 1024 bytes of extra data
//! per entry and 64 MiB for the whole table (the count and the table's
//! offset are checked with the header).

use crate::error::{Classify, ErrorClass};
use crate::storage::{Storage, StorageError};
use crate::units::HostOffset;

use super::header::{Header, SNAPSHOT_HEADER_LEN};
use super::table::{be16, be32, be64};

/// QEMU's limit on a snapshot entry's extra data.
const MAX_EXTRA_DATA: u64 = 1024;
/// QEMU's limit on the whole snapshot table.
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// Errors in the snapshot table.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The table could not be read (it runs past the end of the file).
    #[error("cannot read snapshot table: {0}")]
    Read(#[from] StorageError),
    /// An entry has more extra data than QEMU accepts.
    #[error("snapshot table entry {index} at offset {offset} has {size} bytes of extra data (QEMU accepts at most 1024)")]
    TooMuchExtraData {
        /// The entry's number.
        index: u32,
        /// Where it starts.
        offset: HostOffset,
        /// Its extra data size.
        size: u64,
    },
    /// The table is larger than QEMU accepts.
    #[error("snapshot table at offset {offset} is larger than 64 MiB")]
    TooLarge {
        /// Where the table starts.
        offset: HostOffset,
    },
}

impl Classify for SnapshotError {
    fn class(&self) -> ErrorClass {
        match self {
            SnapshotError::Read(e) => e.class(),
            _ => ErrorClass::Corrupt,
        }
    }
}

/// One internal snapshot, as far as the metadata check needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Its L1 table.
    pub l1_table_offset: HostOffset,
    /// Entries of its L1 table.
    pub l1_size: u32,
}

/// The snapshot table: its entries and its length in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The snapshots, in table order.
    pub snapshots: Vec<Snapshot>,
    /// Bytes from the table's offset to the end of its last entry.
    pub len: u64,
}

/// Reads the snapshot table the header describes (empty without snapshots).
pub fn read_table(storage: &dyn Storage, header: &Header) -> Result<SnapshotTable, SnapshotError> {
    let start = header.snapshots_offset.0;
    let mut table = SnapshotTable::default();
    let mut offset = start;
    for index in 0..header.nb_snapshots {
        offset = offset.div_ceil(8) * 8;
        let here = HostOffset(offset);
        let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
        storage.read_exact_at("snapshot table", &mut h, here)?;
        let id_size = u64::from(be16(&h, 12));
        let name_size = u64::from(be16(&h, 14));
        let extra = u64::from(be32(&h, 36));
        if extra > MAX_EXTRA_DATA {
            return Err(SnapshotError::TooMuchExtraData {
                index,
                offset: here,
                size: extra,
            });
        }
        offset += SNAPSHOT_HEADER_LEN + extra + id_size + name_size;
        if offset - start > MAX_TABLE_BYTES {
            return Err(SnapshotError::TooLarge {
                offset: HostOffset(start),
            });
        }
        storage.check_range("snapshot table", here, offset - here.0)?;
        table.snapshots.push(Snapshot {
            l1_table_offset: HostOffset(be64(&h, 0)),
            l1_size: be32(&h, 8),
        });
    }
    table.len = offset - start;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::header::Header;
    use crate::storage::memory::MemoryStorage;

    const TABLE: u64 = 0x10000;

    /// A header (from the header tests' fixture) with `n` snapshots at
    /// `TABLE`, and a file holding `table` there.
    fn read(n: u32, table: &[u8]) -> Result<SnapshotTable, SnapshotError> {
        let mut b = crate::qcow2::header::tests::fixture();
        b[60..64].copy_from_slice(&n.to_be_bytes());
        b[64..72].copy_from_slice(&TABLE.to_be_bytes());
        let h = Header::decode(&b, b.len() as u64).unwrap();
        let mut file = vec![0u8; TABLE as usize];
        file.extend_from_slice(table);
        read_table(&MemoryStorage::read_only("img", file), &h)
    }

    /// One entry: L1 table at 0x20000 with `l1_size` entries, `extra`
    /// bytes of extra data, ID "1" and name "snap".
    fn entry(l1_size: u32, extra: u32) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x20000u64.to_be_bytes());
        e[8..12].copy_from_slice(&l1_size.to_be_bytes());
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&4u16.to_be_bytes());
        e[36..40].copy_from_slice(&extra.to_be_bytes());
        e.resize(40 + extra as usize, 0);
        e.extend_from_slice(b"1snap");
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    #[test]
    fn reads_entries_and_the_table_length() {
        let mut t = entry(1, 16);
        t.extend(entry(2, 0));
        let got = read(2, &t).unwrap();
        assert_eq!(got.snapshots.len(), 2);
        assert_eq!(got.snapshots[1].l1_size, 2);
        // The second entry ends unpadded: 40 + 5 bytes after the first.
        assert_eq!(got.len, 40 + 16 + 5 + 3 + 40 + 5);
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        assert!(matches!(
            read(1, &entry(1, 1025)),
            Err(SnapshotError::TooMuchExtraData { size: 1025, .. })
        ));
        assert!(read(1, &entry(1, 1024)).is_ok());
        // The second entry is missing: the table runs past the end.
        assert!(matches!(read(2, &entry(1, 0)), Err(SnapshotError::Read(_))));
    }
}
