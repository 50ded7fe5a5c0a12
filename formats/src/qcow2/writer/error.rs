//! Errors of the qcow2 writer: one variant per failed action, each with
//! its class (usage, I/O, unsupported, or internal for API misuse).

use std::io;

use crate::error::{Classify, ErrorClass};
use crate::storage::StorageError;
use crate::units::{ClusterIndex, HostOffset};

/// Why creating or writing an image failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The cluster size is out of range.
    #[error("cluster_bits {0} is out of range (9 to 21)")]
    ClusterBits(u32),
    /// The virtual size is not a multiple of 512 bytes (QEMU would ignore
    /// the partial sector; `qemu-img create` rounds up instead).
    #[error("virtual size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// The virtual size needs a larger L1 table than QEMU accepts.
    #[error("virtual size {size} is too large for {cluster_size}-byte clusters (at most {max})")]
    VirtualSize {
        /// The requested size.
        size: u64,
        /// The cluster size.
        cluster_size: u64,
        /// The largest size this cluster size allows.
        max: u64,
    },
    /// The backing reference cannot be stored.
    #[error("cannot record backing file {name:?}: {why}")]
    Backing {
        /// The backing file name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Querying the output file failed.
    #[error("cannot inspect the output file: {source}")]
    InspectFile {
        /// Why.
        source: StorageError,
    },
    /// The output file is not usable as given.
    #[error("output file is unusable: {why}")]
    OutputFile {
        /// What is wrong.
        why: &'static str,
    },
    /// Cluster indices must strictly increase.
    #[error("cluster {index} written after cluster {previous}")]
    OutOfOrder {
        /// The cluster being written.
        index: ClusterIndex,
        /// The cluster written before it.
        previous: ClusterIndex,
    },
    /// The cluster lies past the virtual size.
    #[error("cluster {index} is beyond the end of the disk ({clusters} clusters)")]
    BeyondEnd {
        /// The cluster being written.
        index: ClusterIndex,
        /// Number of guest clusters.
        clusters: u64,
    },
    /// A data cluster is not exactly one cluster long.
    #[error("data for cluster {index} is {len} bytes, expected {cluster_size}")]
    DataLength {
        /// The cluster being written.
        index: ClusterIndex,
        /// The length given.
        len: usize,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A compressed stream is empty or not smaller than a cluster.
    #[error(
        "compressed stream for cluster {index} is {len} bytes, must be 1 to {cluster_size} - 1"
    )]
    CompressedLength {
        /// The cluster being written.
        index: ClusterIndex,
        /// The length given.
        len: usize,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The image outgrew what qcow2 (or QEMU) can address.
    #[error("image too large: {why}")]
    TooLarge {
        /// Which limit was hit.
        why: &'static str,
    },
    /// A host cluster is shared by more compressed clusters than a 16-bit
    /// refcount can count.
    #[error("refcount of host cluster at {offset} would overflow")]
    RefcountOverflow {
        /// Start of the host cluster.
        offset: HostOffset,
    },
    /// Writing guest data failed.
    #[error("cannot write data at host offset {offset} ({len} bytes): {}", crate::error::io_text(.source))]
    WriteData {
        /// Where the failed write started.
        offset: HostOffset,
        /// Its length.
        len: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the tables failed.
    #[error("cannot write metadata at host offset {offset} ({len} bytes): {}", crate::error::io_text(.source))]
    WriteMetadata {
        /// Where the failed write started.
        offset: HostOffset,
        /// Its length.
        len: usize,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing the header cluster failed.
    #[error("cannot write the image header: {}", crate::error::io_text(.source))]
    WriteHeader {
        /// The I/O error.
        source: io::Error,
    },
    /// An earlier write failed, so the file's content is unknown.
    #[error("an earlier write failed; the image cannot be completed")]
    Poisoned,
    /// A refcount was changed after its refcount block was written: a bug
    /// in the writer, refused rather than writing a wrong count.
    #[error("refcount of host cluster at {offset} changed after its block was written")]
    RefcountWritten {
        /// Start of the host cluster.
        offset: HostOffset,
    },
}

impl Classify for WriterError {
    fn class(&self) -> ErrorClass {
        match self {
            WriterError::ClusterBits(_)
            | WriterError::UnalignedSize(_)
            | WriterError::VirtualSize { .. }
            | WriterError::Backing { .. }
            | WriterError::OutputFile { .. } => ErrorClass::Usage,
            WriterError::InspectFile { source } => source.class(),
            WriterError::WriteData { source, .. }
            | WriterError::WriteMetadata { source, .. }
            | WriterError::WriteHeader { source } => ErrorClass::of_io(source),
            WriterError::TooLarge { .. } | WriterError::RefcountOverflow { .. } => {
                ErrorClass::Unsupported
            }
            // Misuse of the API, or a write after a failed one: bugs in
            // the caller.
            WriterError::OutOfOrder { .. }
            | WriterError::BeyondEnd { .. }
            | WriterError::DataLength { .. }
            | WriterError::CompressedLength { .. }
            | WriterError::Poisoned
            | WriterError::RefcountWritten { .. } => ErrorClass::Internal,
        }
    }
}
