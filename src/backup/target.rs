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
    /// Writes what remains (metadata). The caller syncs the storage, and
    /// for qcow2 then writes the magic ([`Qcow2Writer::seal`]).
    fn finish(self: Box<Self>) -> Result<(), TargetError>;
    /// The storage being written, for early writeback and syncs.
    fn storage(&self) -> &Arc<dyn Storage>;
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
        Ok(self.writer.finish_unsealed()?)
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

/// A raw target. A new file is sparse: zero clusters and clusters the plan
/// skips stay holes, and the file gets its length at the end. An existing
/// block device written in place (`fill_zeros`) is not zero to begin with:
/// every byte up to the virtual size that no data cluster writes is zeroed
/// explicitly, in order, and its size is never changed.
pub struct RawTarget {
    /// Where the bytes go.
    pub storage: Arc<dyn Storage>,
    /// Virtual size.
    pub size: u64,
    /// Cluster size used for offsets.
    pub cluster_size: ClusterSize,
    /// Zero what is not written (a device), instead of leaving holes.
    pub fill_zeros: bool,
    /// With `fill_zeros`: every byte below this is written or zeroed.
    pub done_to: u64,
}

impl RawTarget {
    /// A raw target for `size` guest bytes; `fill_zeros` for a device.
    pub fn new(
        storage: Arc<dyn Storage>,
        size: u64,
        cluster_size: ClusterSize,
        fill_zeros: bool,
    ) -> RawTarget {
        RawTarget {
            storage,
            size,
            cluster_size,
            fill_zeros,
            done_to: 0,
        }
    }

    /// With `fill_zeros`: zeroes `done_to..end`.
    fn zero_to(&mut self, end: u64) -> Result<(), TargetError> {
        if self.fill_zeros && end > self.done_to {
            let (offset, len) = (self.done_to, end - self.done_to);
            self.storage
                .write_zeroes(HostOffset(offset), len)
                .map_err(|source| StorageError::Write {
                    offset: HostOffset(offset),
                    len,
                    source,
                })?;
            self.done_to = end;
        }
        Ok(())
    }
}

impl Target for RawTarget {
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<u64, TargetError> {
        let offset = self.cluster_size.start_of(index).0;
        let len = self.cluster_size.bytes_below(index, self.size);
        self.zero_to(offset)?;
        match out {
            Output::Data(d) => {
                let len = (len as usize).min(d.len());
                self.storage.write_all_at(&d[..len], HostOffset(offset))?;
                self.done_to = self.done_to.max(offset + len as u64);
                Ok(len as u64)
            }
            // Holes read as zeros (a device's range is zeroed); the copier
            // never compresses for raw.
            Output::Zero | Output::Compressed(_) | Output::Stored(_) => {
                self.zero_to(offset + len)?;
                Ok(0)
            }
        }
    }

    fn finish(mut self: Box<Self>) -> Result<(), TargetError> {
        if self.fill_zeros {
            return self.zero_to(self.size);
        }
        self.storage
            .set_len(self.size)
            .map_err(|source| StorageError::Resize {
                len: self.size,
                source,
            })?;
        Ok(())
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}
