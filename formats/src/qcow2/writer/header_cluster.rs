//! Cluster 0 of a written image: the v3 header, the backing format
//! extension, the end marker and the backing file name (qcow2 spec,
//! "Header" and "Header extensions"), zero-padded to one cluster.
//!
//! Invariants: `header_length` 112 with the compression type byte;
//! incompatible bit 3 set iff the codec is zstd; 16-bit refcounts; the
//! backing name (at most 1023 bytes, no NUL) fits in cluster 0, checked
//! before anything is written.

use crate::codec::CompressionType;
use crate::qcow2::header::{encode_extension, ext, incompat, Header, V3_HEADER_LEN};
use crate::units::HostOffset;

use super::refcount_build;
use super::{usize_of, BackingRef, WriterError, WriterOptions};

/// Spec limit on `backing_file_size`.
const MAX_BACKING_NAME: usize = 1023;

/// Cluster 0: header, extensions, end marker, backing name, zeros.
pub(super) fn header_cluster(
    opts: &WriterOptions,
    l1_size: u64,
    l1: u64,
    reftable: u64,
    reftable_clusters: u64,
) -> Result<Vec<u8>, WriterError> {
    let too_large = |why| WriterError::TooLarge { why };
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: opts.cluster_bits,
        size: opts.virtual_size,
        crypt_method: 0,
        l1_size: u32::try_from(l1_size).map_err(|_| too_large("L1 table"))?,
        l1_table_offset: HostOffset(l1),
        refcount_table_offset: HostOffset(reftable),
        refcount_table_clusters: u32::try_from(reftable_clusters)
            .map_err(|_| too_large("refcount table"))?,
        nb_snapshots: 0,
        snapshots_offset: HostOffset(0),
        incompatible_features: match opts.compression {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => incompat::COMPRESSION_TYPE,
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: refcount_build::REFCOUNT_ORDER,
        header_length: V3_HEADER_LEN,
        compression_type: opts.compression,
        backing_format: None,
        data_file: None,
        bitmaps: None,
        backing_file: None,
        crypto_header: None,
    };
    let mut extensions = Vec::new();
    if let Some(b) = &opts.backing {
        extensions = encode_extension(ext::BACKING_FORMAT, b.format.as_bytes());
        h.backing_file_offset = u64::from(V3_HEADER_LEN) + extensions.len() as u64 + 8;
        // Checked by `check_backing`.
        h.backing_file_size = b.name.len() as u32;
    }
    extensions.extend(encode_extension(ext::END, &[]));
    let mut bytes = h.encode_v3();
    bytes.extend_from_slice(&extensions);
    if let Some(b) = &opts.backing {
        bytes.extend_from_slice(b.name.as_bytes());
    }
    bytes.resize(usize_of(1 << opts.cluster_bits)?, 0);
    Ok(bytes)
}

/// Checks that the backing name and format fit in cluster 0 after the
/// header and extensions (spec "Header extensions").
pub(super) fn check_backing(b: &BackingRef, cluster_size: u64) -> Result<(), WriterError> {
    let bad = |why| WriterError::Backing {
        name: b.name.clone(),
        why,
    };
    if b.name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if b.name.len() > MAX_BACKING_NAME {
        return Err(bad("the name is longer than 1023 bytes"));
    }
    if b.format.is_empty() {
        return Err(bad("the format is empty"));
    }
    if b.name.contains('\0') || b.format.contains('\0') {
        return Err(bad("the name or format contains a NUL byte"));
    }
    // Header, format extension (8 + padded data), end marker (8), name.
    let needed = (b.format.len() as u64)
        .div_ceil(8)
        .checked_mul(8)
        .and_then(|f| f.checked_add(u64::from(V3_HEADER_LEN) + 16 + b.name.len() as u64));
    if needed.is_none_or(|n| n > cluster_size) {
        return Err(bad("the name and format do not fit in the header cluster"));
    }
    Ok(())
}
