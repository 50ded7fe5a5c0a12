//! Raw images: the storage is the disk. Allocation comes from the storage's
//! data/hole map; the virtual size is the length rounded up to 512 bytes, as
//! qemu-img reports it, and the tail past the end reads as zeros (mapped as
//! the storage says, [`Storage::padding`]).

use std::sync::Arc;

use crate::extent::{Allocation, HostFile, HostLocation, LayerExtent};
use crate::format::Format;
use crate::image::error::ImageError;
use crate::layer::{Layer, LayerInfo, LayerRead};
use crate::storage::{FileExtent, Padding, Storage};
use crate::units::{ClusterSize, GuestOffset, HostOffset};

/// A read-only raw image.
#[derive(Debug)]
pub struct RawImage {
    storage: Arc<dyn Storage>,
    file: HostFile,
    size: u64,
}

impl RawImage {
    /// Wraps an open storage.
    pub fn open(storage: Arc<dyn Storage>) -> RawImage {
        let size = storage.len().div_ceil(512).saturating_mul(512);
        RawImage {
            file: HostFile(Arc::from(storage.name())),
            storage,
            size,
        }
    }

    fn err(&self, e: impl Into<crate::image::error::ImageErrorKind>) -> ImageError {
        ImageError::new(self.storage.name(), e)
    }
}

impl Layer for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> Option<ClusterSize> {
        None
    }

    fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(LayerExtent, u64), ImageError> {
        let max_len = max_len.min(self.size.saturating_sub(offset.0));
        let past_end = offset.0 >= self.storage.len();
        if past_end && self.storage.padding() == Padding::Zero {
            return Ok((
                LayerExtent {
                    allocation: Allocation::Zero,
                    host: None,
                    data_reads_zero: false,
                },
                max_len,
            ));
        }
        let (kind, len) = match self.storage.padding() {
            Padding::Data if past_end => (FileExtent::Data, max_len),
            _ => self
                .storage
                .extent_at(HostOffset(offset.0), max_len)
                .map_err(|e| self.err(e))?,
        };
        let allocation = match kind {
            FileExtent::Data | FileExtent::ZeroData => Allocation::Data,
            FileExtent::Hole => Allocation::Zero,
        };
        Ok((
            LayerExtent {
                allocation,
                host: Some(HostLocation {
                    file: self.file.clone(),
                    offset: HostOffset(offset.0),
                }),
                data_reads_zero: kind == FileExtent::ZeroData,
            },
            len,
        ))
    }

    fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<LayerRead, ImageError> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset.0));
        self.storage
            .read_zero_padded(&mut buf[..n as usize], HostOffset(offset.0))
            .map_err(|e| self.err(e))?;
        Ok(LayerRead::Filled(n))
    }

    fn info(&self) -> Result<LayerInfo, ImageError> {
        let actual = self
            .storage
            .allocated_size()
            .map_err(|source| self.err(crate::storage::StorageError::Stat { source }))?;
        Ok(LayerInfo {
            format: Format::Raw,
            virtual_size: self.size,
            cluster_size: None,
            actual_size: actual,
            backing: None,
            dirty: false,
            qcow2: None,
        })
    }
}
