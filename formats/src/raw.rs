//! Raw images: the file is the disk. Allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE`; the virtual size is the file size rounded up to
//! 512 bytes, as qemu-img reports it, and the tail past EOF reads as zeros.

use std::sync::Arc;

use crate::extent::{Allocation, HostFile, HostLocation, LayerExtent};
use crate::storage::{FileExtent, Storage, StorageError};
use crate::units::{GuestOffset, HostOffset};

/// A read-only raw image.
#[derive(Debug)]
pub struct RawImage {
    storage: Storage,
    file: HostFile,
    size: u64,
}

impl RawImage {
    /// Wraps an open file.
    pub fn open(storage: Storage) -> RawImage {
        let size = storage.len().div_ceil(512).saturating_mul(512);
        RawImage {
            file: HostFile(Arc::from(storage.path())),
            storage,
            size,
        }
    }

    /// Virtual size: the file length rounded up to 512 bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The underlying file.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Data or hole at `offset`, for at most `max_len` bytes.
    pub fn status(
        &self,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(LayerExtent, u64), StorageError> {
        let max_len = max_len.min(self.size.saturating_sub(offset.0));
        let (kind, len) = self.storage.extent_at(HostOffset(offset.0), max_len)?;
        let allocation = match kind {
            FileExtent::Data => Allocation::Data,
            FileExtent::Hole => Allocation::Zero,
        };
        Ok((
            LayerExtent {
                allocation,
                host: Some(HostLocation {
                    file: self.file.clone(),
                    offset: HostOffset(offset.0),
                }),
                data_reads_zero: false,
            },
            len,
        ))
    }

    /// Reads guest bytes; the tail past EOF reads as zeros.
    pub fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<(), StorageError> {
        self.storage.read_zero_padded(buf, HostOffset(offset.0))
    }
}
