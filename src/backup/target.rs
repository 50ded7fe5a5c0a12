//! Backup targets: where finished clusters go, in order.
//!
//! The target is always a temporary file beside the final path; it only
//! becomes the target by an atomic rename after everything is written and
//! synced (see `mod.rs`). Clusters arrive in increasing order from the one
//! writer thread.

use std::fs::File;
use std::os::unix::fs::FileExt;

use qbackup_formats::qcow2::writer::{ClusterWrite, Qcow2Writer, WriterError};
use qbackup_formats::ClusterIndex;

/// A finished cluster, ready to be stored.
#[derive(Debug)]
pub enum Output {
    /// Uncompressed bytes (a whole cluster, zero-padded at the disk's end).
    Data(Vec<u8>),
    /// A compressed stream of the cluster.
    Compressed(Vec<u8>),
    /// The cluster reads as zeros.
    Zero,
}

/// Errors writing the target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The qcow2 writer failed.
    #[error(transparent)]
    Qcow2(#[from] WriterError),
    /// Writing a raw target failed.
    #[error("cannot write at offset {offset}: {source}")]
    RawWrite {
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// Something that stores clusters in order.
pub trait Target: Send {
    /// Stores cluster `index`.
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<(), TargetError>;
    /// Writes what remains (metadata) and hands back the file.
    fn finish(self: Box<Self>) -> Result<File, TargetError>;
    /// The file being written, for early writeback.
    fn file(&self) -> &File;
}

/// Asks the kernel to start writing dirty pages of `file` to disk now,
/// without waiting. The final fsync then has little left to do, so disk
/// writes overlap with compression instead of following it.
pub fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid, open descriptor; no memory is passed.
    // Errors only mean the hint is ignored (the final fsync still runs).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// A qcow2 target: the writer and a second handle on its file.
pub struct Qcow2Target(pub Qcow2Writer, pub File);

impl Target for Qcow2Target {
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<(), TargetError> {
        let w = match &out {
            Output::Data(d) => ClusterWrite::Data(d),
            Output::Compressed(c) => ClusterWrite::Compressed(c),
            Output::Zero => ClusterWrite::Zero,
        };
        Ok(self.0.write_cluster(index, w)?)
    }

    fn finish(self: Box<Self>) -> Result<File, TargetError> {
        Ok(self.0.finish()?)
    }

    fn file(&self) -> &File {
        &self.1
    }
}

/// A sparse raw target: zero clusters stay holes.
pub struct RawTarget {
    /// The file.
    pub file: File,
    /// Virtual size.
    pub size: u64,
    /// Cluster size used for offsets.
    pub cluster_size: u64,
}

impl Target for RawTarget {
    fn put(&mut self, index: ClusterIndex, out: Output) -> Result<(), TargetError> {
        let offset = index.0 * self.cluster_size;
        match out {
            Output::Data(d) => {
                let len = (self.size - offset).min(d.len() as u64) as usize;
                self.file
                    .write_all_at(&d[..len], offset)
                    .map_err(|source| TargetError::RawWrite { offset, source })
            }
            // Holes read as zeros; the copier never compresses for raw.
            Output::Zero | Output::Compressed(_) => Ok(()),
        }
    }

    fn finish(self: Box<Self>) -> Result<File, TargetError> {
        self.file
            .set_len(self.size)
            .map_err(|source| TargetError::RawWrite {
                offset: self.size,
                source,
            })?;
        Ok(self.file)
    }

    fn file(&self) -> &File {
        &self.file
    }
}
