//! Backup targets: where finished clusters go, in order.
//!
//! A target writes through a [`Storage`] (the temporary file beside the
//! final path, possibly wrapped, e.g. by a fault-injecting test double); it
//! only becomes the target by an atomic rename after everything is written
//! and synced (see `mod.rs`). Clusters arrive in increasing order from the
//! one writer thread.

use std::sync::Arc;

use qbackup_formats::qcow2::writer::{ClusterWrite, Qcow2Writer, WriterError};
use qbackup_formats::storage::{Storage, StorageError};
use qbackup_formats::{Classify, ErrorClass};
use qbackup_formats::{ClusterIndex, ClusterSize, HostOffset};

/// A finished cluster, ready to be stored.
#[derive(Debug)]
pub enum Output {
    /// Uncompressed bytes (a whole cluster, zero-padded at the disk's end).
    Data(Vec<u8>),
    /// A compressed stream of the cluster, made by the copier.
    Compressed(Vec<u8>),
    /// A compressed stream copied as the source stores it (passed through).
    Stored(Vec<u8>),
    /// The cluster reads as zeros.
    Zero,
}

/// Errors writing the target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The qcow2 writer failed.
    #[error(transparent)]
    Qcow2(#[from] WriterError),
    /// Writing or sizing a raw target failed.
    #[error(transparent)]
    Raw(#[from] StorageError),
}

impl Classify for TargetError {
    fn class(&self) -> ErrorClass {
        match self {
            TargetError::Qcow2(e) => e.class(),
            TargetError::Raw(e) => e.class(),
        }
    }
}

/// Something that stores clusters in order.
pub trait Target: Send {
    /// Stores cluster `index`; returns the bytes it stored for it (0 for a
    /// zero cluster), for the backup's report.
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<u64, TargetError>;
    /// Writes what remains (metadata). The caller syncs the storage.
    fn finish(self: Box<Self>) -> Result<(), TargetError>;
    /// The storage being written, for early writeback.
    fn storage(&self) -> &dyn Storage;
}

/// A qcow2 target: the writer and the storage it writes to.
pub struct Qcow2Target {
    writer: Qcow2Writer,
    storage: Arc<dyn Storage>,
}

impl Qcow2Target {
    /// A target writing `writer`'s image into `storage`.
    pub fn new(writer: Qcow2Writer, storage: Arc<dyn Storage>) -> Self {
        Qcow2Target { writer, storage }
    }
}

impl Target for Qcow2Target {
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<u64, TargetError> {
        let (w, len) = match &out {
            Output::Data(d) => (ClusterWrite::Data(d), d.len()),
            Output::Compressed(c) | Output::Stored(c) => (ClusterWrite::Compressed(c), c.len()),
            Output::Zero => (ClusterWrite::Zero, 0),
        };
        self.writer.write_cluster(index, w)?;
        Ok(len as u64)
    }

    fn finish(self: Box<Self>) -> Result<(), TargetError> {
        Ok(self.writer.finish()?)
    }

    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
}

/// A sparse raw target: zero clusters stay holes.
pub struct RawTarget {
    /// Where the bytes go.
    pub storage: Arc<dyn Storage>,
    /// Virtual size.
    pub size: u64,
    /// Cluster size used for offsets.
    pub cluster_size: ClusterSize,
}

impl Target for RawTarget {
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<u64, TargetError> {
        match out {
            Output::Data(d) => {
                let offset = self.cluster_size.start_of(index);
                let len = (self.cluster_size.bytes_below(index, self.size) as usize).min(d.len());
                self.storage.write_all_at(&d[..len], HostOffset(offset.0))?;
                Ok(len as u64)
            }
            // Holes read as zeros; the copier never compresses for raw.
            Output::Zero | Output::Compressed(_) | Output::Stored(_) => Ok(0),
        }
    }

    fn finish(self: Box<Self>) -> Result<(), TargetError> {
        self.storage
            .set_len(self.size)
            .map_err(|source| StorageError::Resize {
                len: self.size,
                source,
            })?;
        Ok(())
    }

    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
}
