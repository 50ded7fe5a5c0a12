//! The layer seam: what every format driver answers about one image, so
//! that a backing chain (and everything above it) never looks inside a
//! format.
//!
//! A driver owns its format's knowledge: it maps guest ranges
//! ([`Layer::status`]), reads and decodes what it stores ([`Layer::read`],
//! compressed clusters included), hands out a stored compressed cluster that
//! can be copied as it is ([`Layer::stored_compressed`], validated by the
//! driver), names its backing file and describes itself for `info`.
//! A new format goes behind this trait and into [`crate::image::open`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::codec::CompressionType;
use crate::extent::LayerExtent;
use crate::format::Format;
use crate::image::error::ImageError;
use crate::storage::Storage;
use crate::units::{ClusterSize, GuestOffset, HostOffset};

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec {
    /// The name as recorded (relative names resolve from the image's
    /// directory, see [`crate::open::resolve_backing`]).
    pub name: String,
    /// The recorded format name, if any.
    pub format: Option<String>,
}

/// What one layer did for a [`Layer::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRead {
    /// The first `n` bytes of the buffer are filled.
    Filled(u64),
    /// The layer does not allocate the first `n` bytes: they come from the
    /// backing file (or read as zeros without one). The buffer is untouched.
    Unallocated(u64),
}

/// What `info` reports about a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The format.
    pub format: Format,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size, where the format has one.
    pub cluster_size: Option<ClusterSize>,
    /// Bytes the image file occupies on disk, when known (not for an NBD
    /// export).
    pub actual_size: Option<u64>,
    /// The backing file, if any.
    pub backing: Option<BackingSpec>,
    /// The image was not closed cleanly (qcow2's dirty bit).
    pub dirty: bool,
    /// qcow2 specifics.
    pub qcow2: Option<crate::qcow2::Qcow2Info>,
}

/// A dirty bitmap: which guest ranges changed since it was started (a
/// qcow2 persistent bitmap, or an NBD export's `qemu:dirty-bitmap:` context).
pub trait DirtyMap: Send + Sync {
    /// Whether guest byte `offset` (below the virtual size) is dirty, and
    /// for how many bytes (at most `max_len`, > 0) that holds.
    fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), ImageError>;
}

/// A validated clearing of a persistent dirty bitmap (every bit zero),
/// written only by [`BitmapClear::commit`]; see
/// [`Layer::prepare_bitmap_clear`].
pub trait BitmapClear: Send + Sync {
    /// Clears the bitmap in the image, crash-safely (the driver documents
    /// its order of writes); returns how many bitmap data clusters were
    /// freed.
    fn commit(self: Box<Self>) -> Result<u64, ImageError>;
}

/// One opened image of a chain.
pub trait Layer: Send + Sync + fmt::Debug {
    /// Its format.
    fn format(&self) -> Format;

    /// The image file.
    fn storage(&self) -> &Arc<dyn Storage>;

    /// The name the image was opened by.
    fn path(&self) -> &Path {
        self.storage().name()
    }

    /// Every storage it reads (the image file, an external data file).
    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![Arc::clone(self.storage())]
    }

    /// Virtual disk size in bytes.
    fn virtual_size(&self) -> u64;

    /// Cluster size, where the format has one.
    fn cluster_size(&self) -> Option<ClusterSize>;

    /// The backing file the image names.
    fn backing(&self) -> Option<BackingSpec> {
        None
    }

    /// Refuses images whose data cannot be read (encrypted). `info` works
    /// on them; reading does not.
    fn check_readable(&self) -> Result<(), ImageError> {
        Ok(())
    }

    /// QEMU marked the image corrupt (qcow2's corrupt bit): it is read as
    /// QEMU reads it read-only, and callers warn or refuse.
    fn marked_corrupt(&self) -> bool {
        false
    }

    /// Metadata found damaged on the way that does not change what the
    /// guest reads (qcow2 refcounts), said in one phrase; callers warn.
    fn harmless_damage(&self) -> Option<String> {
        None
    }

    /// What this layer alone stores over the range at `offset` (below the
    /// virtual size): the answer and how many bytes (at most `max_len`, > 0)
    /// it covers.
    fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(LayerExtent, u64), ImageError>;

    /// Reads guest bytes at `offset` (below the virtual size) into the start
    /// of `buf`, as far as this layer can answer without its backing file.
    fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<LayerRead, ImageError>;

    /// The cluster size and codec of the compressed clusters it stores, if
    /// it stores any kind.
    fn compressed_format(&self) -> Option<(ClusterSize, CompressionType)> {
        None
    }

    /// The stored stream of the compressed cluster starting at `cluster`,
    /// cut to its exact end and validated by decoding, when it can be copied
    /// as it is; `None` when the cluster is not one compressed cluster or
    /// its end cannot be proven.
    fn stored_compressed(&self, cluster: GuestOffset) -> Result<Option<Vec<u8>>, ImageError> {
        let _ = cluster;
        Ok(None)
    }

    /// What `info` reports.
    fn info(&self) -> Result<LayerInfo, ImageError>;

    /// Byte ranges of the image file (offset, length) that say where the
    /// guest data is (qcow2: the header cluster and the L1 table): re-read
    /// at the end of a backup to detect a writer (see `fingerprint.rs`).
    /// Default: none (a raw image has no such metadata).
    fn metadata_ranges(&self) -> Vec<(HostOffset, u64)> {
        Vec::new()
    }

    /// The persistent dirty bitmap `name`, ready to answer queries. A
    /// disabled bitmap (one that does not record writes) is refused unless
    /// `allow_disabled`.
    fn dirty_bitmap(
        &self,
        name: &str,
        allow_disabled: bool,
    ) -> Result<Box<dyn DirtyMap>, ImageError> {
        let _ = (name, allow_disabled);
        Err(ImageError::new(
            self.path(),
            crate::image::error::ImageErrorKind::NoDirtyBitmap,
        ))
    }

    /// Checks that the persistent dirty bitmap `name` can be cleared in
    /// place (the layer's storage must have been opened for update) and
    /// returns the clearing, which writes nothing until committed.
    fn prepare_bitmap_clear(&self, name: &str) -> Result<Box<dyn BitmapClear>, ImageError> {
        let _ = name;
        Err(ImageError::new(
            self.path(),
            crate::image::error::ImageErrorKind::NoDirtyBitmap,
        ))
    }
}
