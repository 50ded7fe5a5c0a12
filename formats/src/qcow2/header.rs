//! The qcow2 header (spec section "Header"), decoded and encoded big-endian;
//! its extensions are in `extensions.rs`.
//!
//! Decoding makes every check QEMU's `qcow2_do_open` makes on the header
//! (so that every command refuses what qemu-img refuses to open, one line
//! each), in QEMU's order, and validates every field later code uses for
//! arithmetic, so the rest of the driver can rely on: 9 <= cluster_bits <=
//! 21, refcount order <= 6, the L1, refcount and snapshot tables
//! cluster-aligned, within QEMU's limits and ending below i64::MAX, a
//! refcount table, a backing name inside the first cluster, and a virtual
//! size that the L1 table can address.

pub use super::extensions::encode_extension;
use super::extensions::text;
use super::table::{be32, be64};
use crate::codec::CompressionType;
use crate::error::{Classify, ErrorClass};
use crate::units::HostOffset;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of a version 3 header with the compression type field, padded.
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits (spec "incompatible_features").
pub mod incompat {
    /// The image was not closed cleanly; refcounts may be stale.
    pub const DIRTY: u64 = 1 << 0;
    /// The image is marked corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this driver knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension type codes.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Bitmaps extension.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer (LUKS only).
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// QEMU's limit on the L1 table size in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table size in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Bytes of a snapshot table entry's fixed part.
pub const SNAPSHOT_HEADER_LEN: u64 = 40;

/// Errors found while decoding the header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Not a qcow2 file.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// The file is too short to hold a header.
    #[error("file too short for a qcow2 header ({0} bytes)")]
    Truncated(u64),
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// A field has a value this driver cannot accept.
    #[error("invalid header field {field}: {value} ({why})")]
    InvalidField {
        /// The field's spec name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// Incompatible feature bits this driver does not know.
    #[error("unsupported incompatible feature bits {0:#x}")]
    UnknownFeatures(u64),
    /// A header extension is malformed.
    #[error("invalid header extension {kind:#010x} at offset {offset}: {why}")]
    BadExtension {
        /// Its type code.
        kind: u32,
        /// Where it starts.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

impl Classify for HeaderError {
    fn class(&self) -> ErrorClass {
        match self {
            HeaderError::UnsupportedVersion(_) | HeaderError::UnknownFeatures(_) => {
                ErrorClass::Unsupported
            }
            // Values that a newer QEMU may define.
            HeaderError::InvalidField {
                field: "compression_type" | "crypt_method",
                why: "unknown codec" | "unknown method",
                ..
            } => ErrorClass::Unsupported,
            _ => ErrorClass::Corrupt,
        }
    }
}

/// The decoded fixed header plus the extensions qbackup understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is, or 0.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Where the L1 table is.
    pub l1_table_offset: HostOffset,
    /// Where the refcount table is.
    pub refcount_table_offset: HostOffset,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: HostOffset,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the fixed header.
    pub header_length: u32,
    /// The cluster compression codec.
    pub compression_type: CompressionType,
    /// Backing file format, from its extension.
    pub backing_format: Option<String>,
    /// External data file name, from its extension.
    pub data_file: Option<String>,
    /// Bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
    /// Backing file name (read from `backing_file_offset`).
    pub backing_file: Option<String>,
    /// The LUKS header's place (offset, length), from the crypto extension.
    pub crypto_header: Option<(HostOffset, u64)>,
}

/// The bitmaps header extension (spec "Bitmaps extension").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Where the directory is.
    pub directory_offset: HostOffset,
}

fn invalid(field: &'static str, value: u64, why: &'static str) -> HeaderError {
    HeaderError::InvalidField { field, value, why }
}

/// QEMU's `qcow2_validate_table`: at most `max_bytes` of `entry_len`-byte
/// entries, a cluster-aligned offset, and an end that fits in an i64.
/// `name` is the table's field prefix in the spec (`l1_table`, ...).
fn validate_table(
    name: &'static str,
    offset: HostOffset,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), HeaderError> {
    let (count_field, offset_field, too_large) = match name {
        "refcount_table" => (
            "refcount_table_clusters",
            "refcount_table_offset",
            "refcount table larger than 8 MiB",
        ),
        "snapshots" => (
            "nb_snapshots",
            "snapshots_offset",
            "more than 65536 snapshots",
        ),
        _ => ("l1_size", "l1_table_offset", "L1 table larger than 32 MiB"),
    };
    if entries > max_bytes / entry_len {
        return Err(invalid(count_field, entries, too_large));
    }
    if offset.0 % cluster_size != 0 {
        return Err(invalid(offset_field, offset.0, "not cluster aligned"));
    }
    if offset.0 > i64::MAX as u64 - entries * entry_len {
        return Err(invalid(
            offset_field,
            offset.0,
            "table end beyond the largest file offset",
        ));
    }
    Ok(())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True when L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// True when guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Decodes the header from the start of the file. `first` holds at least
    /// the first cluster (or the whole file if shorter); `file_len` is the
    /// file length. Extensions and the backing name are decoded too.
    pub fn decode(first: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if first.len() < 4 || be32(first, 0) != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if first.len() < V2_HEADER_LEN as usize {
            return Err(HeaderError::Truncated(file_len));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                cluster_bits.into(),
                "must be 9 to 21",
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(first, 8),
            backing_file_size: be32(first, 16),
            cluster_bits,
            size: be64(first, 24),
            crypt_method: be32(first, 32),
            l1_size: be32(first, 36),
            l1_table_offset: HostOffset(be64(first, 40)),
            refcount_table_offset: HostOffset(be64(first, 48)),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: HostOffset(be64(first, 64)),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            backing_file: None,
            crypto_header: None,
        };
        if version == 3 {
            if first.len() < 104 {
                return Err(HeaderError::Truncated(file_len));
            }
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < 104 || u64::from(h.header_length) > cluster_size {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "must be 104 to the cluster size",
                ));
            }
            if h.header_length as usize > first.len() {
                return Err(HeaderError::Truncated(file_len));
            }
            if h.header_length > 104 {
                h.compression_type = match first[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(invalid("compression_type", other.into(), "unknown codec"))
                    }
                };
            }
        }
        // QEMU: "Invalid backing file offset" (the extension area ends
        // there, so it cannot lie past the first cluster).
        if h.backing_file_offset > cluster_size {
            return Err(invalid(
                "backing_file_offset",
                h.backing_file_offset,
                "past the first cluster",
            ));
        }
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(HeaderError::UnknownFeatures(unknown));
        }
        if h.compression_type != CompressionType::Zlib
            && h.incompatible_features & incompat::COMPRESSION_TYPE == 0
        {
            return Err(invalid(
                "compression_type",
                h.compression_type.code().into(),
                "non-zlib codec without the compression type feature bit",
            ));
        }
        if h.compression_type == CompressionType::Zlib
            && h.incompatible_features & incompat::COMPRESSION_TYPE != 0
        {
            return Err(invalid(
                "compression_type",
                0,
                "compression type feature bit set for zlib (QEMU refuses this too)",
            ));
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(invalid(
                "cluster_bits",
                h.cluster_bits.into(),
                "extended L2 needs clusters of at least 16 KiB (512-byte subclusters)",
            ));
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                "refcount_order",
                h.refcount_order.into(),
                "must be 0 to 6",
            ));
        }
        if h.crypt_method > 2 {
            return Err(invalid(
                "crypt_method",
                h.crypt_method.into(),
                "unknown method",
            ));
        }
        if h.autoclear_features & autoclear::DATA_FILE_RAW != 0 && !h.has_data_file() {
            return Err(invalid(
                "autoclear_features",
                h.autoclear_features,
                "data-file-raw set without an external data file",
            ));
        }
        h.validate_tables(cluster_size)?;
        super::extensions::decode(&mut h, first)?;
        if h.crypt_method == 2 && h.crypto_header.is_none() {
            return Err(invalid(
                "crypt_method",
                2,
                "LUKS encryption without its crypto header extension",
            ));
        }
        h.decode_backing_name(first)?;
        Ok(h)
    }

    /// QEMU's `qcow2_validate_table` for the refcount table, the snapshot
    /// table and the L1 table, in QEMU's order, plus the L1 size check.
    fn validate_tables(&self, cluster_size: u64) -> Result<(), HeaderError> {
        if self.refcount_table_clusters == 0 {
            return Err(invalid(
                "refcount_table_clusters",
                0,
                "the image has no refcount table",
            ));
        }
        validate_table(
            "refcount_table",
            self.refcount_table_offset,
            self.refcount_table_clusters.into(),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        // Checked even without snapshots, as QEMU does.
        validate_table(
            "snapshots",
            self.snapshots_offset,
            self.nb_snapshots.into(),
            SNAPSHOT_HEADER_LEN,
            SNAPSHOT_HEADER_LEN * MAX_SNAPSHOTS,
            cluster_size,
        )?;
        validate_table(
            "l1_table",
            self.l1_table_offset,
            self.l1_size.into(),
            8,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        if self.size > (1u64 << 62) {
            return Err(invalid("size", self.size, "virtual size too large"));
        }
        let needed = self.size.div_ceil(self.l2_coverage());
        if u64::from(self.l1_size) < needed {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table too small for the virtual size",
            ));
        }
        Ok(())
    }

    /// True when `first` ends at the end of a file shorter than a cluster,
    /// not at the end of the first cluster (messages name the right limit).
    fn cut_by_eof(&self, first: &[u8]) -> bool {
        (first.len() as u64) < (1u64 << self.cluster_bits.min(63))
    }

    fn decode_backing_name(&mut self, first: &[u8]) -> Result<(), HeaderError> {
        // QEMU treats an empty name as no backing file.
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(());
        }
        let len = self.backing_file_size as usize;
        if len > 1023 {
            return Err(invalid(
                "backing_file_size",
                len as u64,
                "must be 1 to 1023",
            ));
        }
        let start = self.backing_file_offset;
        let end = start
            .checked_add(len as u64)
            .filter(|&e| e <= first.len() as u64);
        let Some(end) = end else {
            let why = if self.cut_by_eof(first) {
                "backing file name runs past the end of the file"
            } else {
                "backing file name lies outside the first cluster"
            };
            return Err(invalid("backing_file_offset", start, why));
        };
        let name = text(&first[start as usize..end as usize])
            .map_err(|why| invalid("backing_file_offset", start, why))?;
        // A name that ends before its first byte (NULs) is no name: QEMU
        // opens no backing file for it.
        self.backing_file = (!name.is_empty()).then_some(name);
        Ok(())
    }

    /// Encodes a version 3 header (112 bytes, zero-padded) for the writer.
    /// Extensions are not included; see [`encode_extension`].
    pub fn encode_v3(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(V3_HEADER_LEN as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.0.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.0.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.0.to_be_bytes());
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
        b.push(self.compression_type.code());
        b.resize(V3_HEADER_LEN as usize, 0);
        b
    }
}

#[cfg(test)]
#[path = "header_tests.rs"]
pub(crate) mod tests;
