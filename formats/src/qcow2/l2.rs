//! L1 and L2 table entries (spec "Cluster mapping", "Extended L2 Entries",
//! "Compressed Clusters Descriptor"), decoded into per-subcluster kinds.
//!
//! Classification follows the spec's rules, including the corner that QEMU
//! relies on: with an external data file, host offset 0 is a valid
//! allocation when the COPIED bit is set.

use crate::error::{Classify, ErrorClass};
use crate::units::{GuestOffset, HostOffset};

/// Bits 9–55 of an L1 or standard L2 entry: the host cluster offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (v3, no extended L2): reads as zeros.
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Errors found in mapping table entries.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A data cluster's host offset is not cluster aligned.
    #[error("data cluster for guest offset {guest} has unaligned host offset {host}")]
    UnalignedCluster {
        /// The guest cluster.
        guest: GuestOffset,
        /// Its host offset.
        host: HostOffset,
    },
    /// An L2 table's host offset is not cluster aligned.
    #[error("L2 table for guest offset {guest} has unaligned host offset {host}")]
    UnalignedL2 {
        /// First guest byte the table covers.
        guest: GuestOffset,
        /// Its host offset.
        host: HostOffset,
    },
    /// A subcluster bitmap has contradictory or reserved bits set.
    #[error("invalid subcluster bitmap {bitmap:#018x} for guest offset {guest}")]
    InvalidBitmap {
        /// The guest cluster.
        guest: GuestOffset,
        /// The bitmap.
        bitmap: u64,
    },
    /// A compressed cluster in an image whose data lives in a data file.
    #[error("compressed cluster at guest offset {guest} in an image with an external data file")]
    CompressedWithDataFile {
        /// The guest cluster.
        guest: GuestOffset,
    },
    /// Bit 0 (zero flag) set in a version 2 image, where it is reserved.
    #[error("zero cluster entry for guest offset {guest} in a version 2 image")]
    ZeroFlagInV2 {
        /// The guest cluster.
        guest: GuestOffset,
    },
    /// A compressed descriptor whose length cannot be right.
    #[error("compressed cluster at guest offset {guest} has an invalid descriptor")]
    BadCompressedDescriptor {
        /// The guest cluster.
        guest: GuestOffset,
    },
}

impl Classify for MappingError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Corrupt
    }
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// First byte of the compressed stream.
    pub offset: HostOffset,
    /// Bytes from `offset` to the end of its last 512-byte sector; the stream
    /// itself may be shorter.
    pub len: u64,
}

/// Decodes a compressed cluster descriptor (L2 entry bits 0–61).
pub fn decode_compressed(entry: u64, cluster_bits: u32) -> CompressedDescriptor {
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
    CompressedDescriptor {
        offset: HostOffset(offset),
        len: sectors * 512 - (offset & 511),
    }
}

/// Encodes a compressed cluster descriptor, compressed flag included, for a
/// stream of `len` (> 0) bytes at `offset`. Fails (saying which field) when
/// the offset or the sector count does not fit the descriptor.
pub fn encode_compressed(
    offset: HostOffset,
    len: u64,
    cluster_bits: u32,
) -> Result<u64, &'static str> {
    let x = 62 - (cluster_bits - 8);
    let last = len
        .checked_sub(1)
        .and_then(|l| offset.0.checked_add(l))
        .ok_or("compressed stream end overflows")?;
    let extra_sectors = (last >> 9) - (offset.0 >> 9);
    if offset.0 >= 1u64 << x.min(56) {
        return Err("compressed data beyond the descriptor's offset field");
    }
    if extra_sectors >= 1u64 << (62 - x) {
        return Err("compressed stream longer than the descriptor's sector field");
    }
    Ok(COMPRESSED | (extra_sectors << x) | offset.0)
}

/// What one guest subcluster (or cluster, without extended L2) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterKind {
    /// Not allocated; no host cluster.
    Unallocated,
    /// Not allocated, but its cluster has a host cluster (extended L2).
    UnallocatedAlloc(HostOffset),
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; a host cluster is reserved.
    ZeroAlloc(HostOffset),
    /// Data at this host cluster offset.
    Normal(HostOffset),
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// The parameters classification depends on.
#[derive(Debug, Clone, Copy)]
pub struct EntryFormat {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries with subcluster bitmaps.
    pub extended: bool,
    /// Guest data lives in an external data file.
    pub data_file: bool,
    /// Version 3 (bit 0 is the zero flag) rather than 2.
    pub v3: bool,
}

/// Classifies subcluster `sc` (0 without extended L2) of the cluster at
/// `guest`, given its L2 entry and (for extended L2) its bitmap.
pub fn classify(
    fmt: EntryFormat,
    guest: GuestOffset,
    entry: u64,
    bitmap: u64,
    sc: u32,
) -> Result<SubclusterKind, MappingError> {
    let host = HostOffset(entry & OFFSET_MASK);
    if entry & COMPRESSED != 0 {
        if fmt.data_file {
            return Err(MappingError::CompressedWithDataFile { guest });
        }
        if fmt.extended && bitmap != 0 {
            return Err(MappingError::InvalidBitmap { guest, bitmap });
        }
        return Ok(SubclusterKind::Compressed(decode_compressed(
            entry,
            fmt.cluster_bits,
        )));
    }
    let allocated = host.0 != 0 || (fmt.data_file && entry & COPIED != 0);
    if allocated && host.0 & ((1u64 << fmt.cluster_bits) - 1) != 0 {
        return Err(MappingError::UnalignedCluster { guest, host });
    }
    if fmt.extended {
        let alloc_bits = bitmap & 0xffff_ffff;
        let zero_bits = bitmap >> 32;
        let sc_alloc = alloc_bits >> sc & 1 != 0;
        let sc_zero = zero_bits >> sc & 1 != 0;
        if allocated {
            if alloc_bits & zero_bits != 0 {
                return Err(MappingError::InvalidBitmap { guest, bitmap });
            }
            return Ok(if sc_zero {
                SubclusterKind::ZeroAlloc(host)
            } else if sc_alloc {
                SubclusterKind::Normal(host)
            } else {
                SubclusterKind::UnallocatedAlloc(host)
            });
        }
        if alloc_bits != 0 {
            return Err(MappingError::InvalidBitmap { guest, bitmap });
        }
        return Ok(if sc_zero {
            SubclusterKind::ZeroPlain
        } else {
            SubclusterKind::Unallocated
        });
    }
    if !fmt.v3 && entry & ZERO != 0 {
        return Err(MappingError::ZeroFlagInV2 { guest });
    }
    if entry & ZERO != 0 {
        return Ok(if host.0 != 0 {
            SubclusterKind::ZeroAlloc(host)
        } else {
            SubclusterKind::ZeroPlain
        });
    }
    Ok(if allocated {
        SubclusterKind::Normal(host)
    } else {
        SubclusterKind::Unallocated
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended: false,
        data_file: false,
        v3: true,
    };

    #[test]
    fn compressed_descriptor_round_trip() {
        for bits in [9u32, 12, 16, 21] {
            for (off, len) in [
                (0x50000u64, 1u64),
                (0x50001, 511),
                (0x501ff, 2),
                (0x1234567, 300),
            ] {
                if len >= 1 << bits {
                    continue;
                }
                let e = encode_compressed(HostOffset(off), len, bits).unwrap();
                assert!(e & COMPRESSED != 0);
                let d = decode_compressed(e, bits);
                assert_eq!(d.offset, HostOffset(off));
                assert!(d.len >= len, "bits {bits} off {off:#x} len {len}");
                assert_eq!((off + d.len) % 512, 0);
            }
        }
    }

    #[test]
    fn known_descriptor_bytes() {
        // 64 KiB clusters: x = 54. Offset 0x70200, 3 extra sectors.
        let e = COMPRESSED | (3u64 << 54) | 0x70200;
        let d = decode_compressed(e, 16);
        assert_eq!(d.offset, HostOffset(0x70200));
        assert_eq!(d.len, 4 * 512);
    }

    #[test]
    fn standard_kinds() {
        let g = GuestOffset(0);
        assert_eq!(
            classify(STD, g, 0, 0, 0).unwrap(),
            SubclusterKind::Unallocated
        );
        assert_eq!(
            classify(STD, g, 1, 0, 0).unwrap(),
            SubclusterKind::ZeroPlain
        );
        assert_eq!(
            classify(STD, g, COPIED | 0x30000, 0, 0).unwrap(),
            SubclusterKind::Normal(HostOffset(0x30000))
        );
        assert_eq!(
            classify(STD, g, 0x30001, 0, 0).unwrap(),
            SubclusterKind::ZeroAlloc(HostOffset(0x30000))
        );
        assert!(matches!(
            classify(STD, g, 0x30200, 0, 0),
            Err(MappingError::UnalignedCluster { .. })
        ));
        // v2 has no zero flag: bit 0 is reserved, QEMU reports corruption.
        let v2 = EntryFormat { v3: false, ..STD };
        assert!(matches!(
            classify(v2, g, 1, 0, 0),
            Err(MappingError::ZeroFlagInV2 { .. })
        ));
    }

    #[test]
    fn data_file_offset_zero() {
        let df = EntryFormat {
            data_file: true,
            ..STD
        };
        let g = GuestOffset(0);
        assert_eq!(
            classify(df, g, COPIED, 0, 0).unwrap(),
            SubclusterKind::Normal(HostOffset(0))
        );
        assert_eq!(
            classify(df, g, 0, 0, 0).unwrap(),
            SubclusterKind::Unallocated
        );
        assert!(classify(df, g, COMPRESSED | 5, 0, 0).is_err());
    }

    #[test]
    fn extended_kinds() {
        let ext = EntryFormat {
            extended: true,
            ..STD
        };
        let g = GuestOffset(0);
        let host = COPIED | 0x40000;
        let bitmap = 0b0101 | (0b0010u64 << 32);
        let kinds: Vec<_> = (0..4)
            .map(|sc| classify(ext, g, host, bitmap, sc).unwrap())
            .collect();
        assert_eq!(
            kinds,
            vec![
                SubclusterKind::Normal(HostOffset(0x40000)),
                SubclusterKind::ZeroAlloc(HostOffset(0x40000)),
                SubclusterKind::Normal(HostOffset(0x40000)),
                SubclusterKind::UnallocatedAlloc(HostOffset(0x40000)),
            ]
        );
        assert_eq!(
            classify(ext, g, 0, 1u64 << 33, 1).unwrap(),
            SubclusterKind::ZeroPlain
        );
        assert!(
            classify(ext, g, 0, 1, 0).is_err(),
            "alloc bit without a host cluster"
        );
        assert!(
            classify(ext, g, host, 1 | (1 << 32), 0).is_err(),
            "alloc and zero"
        );
        assert!(classify(ext, g, COMPRESSED | 0x40000, 1, 0).is_err());
    }
}
