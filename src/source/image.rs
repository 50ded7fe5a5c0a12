//! [`ImageSource`]: a backing chain (local images or an NBD export at the
//! top) and the dirty map it was opened with; the one [`Source`] and
//! [`SourceChecks`] implementation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::extent::LayerExtent;
use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::image::ImageErrorKind;
use qbackup_formats::layer::{BitmapClear, DirtyMap};
use qbackup_formats::open::resolve_backing;
use qbackup_formats::storage::Storage;
use qbackup_formats::{Chain, ClusterSize, CompressionType, Extent, GuestOffset, ImageError};

use super::{BackingFile, Source, SourceChecks, SourceError};

/// An image (or NBD export) and its backing chain, with the dirty bitmap it
/// was opened with: a qcow2 image's persistent bitmap, or the export's
/// `qemu:dirty-bitmap` context.
pub struct ImageSource {
    chain: Chain,
    dirty: Option<Box<dyn DirtyMap>>,
}

impl ImageSource {
    /// `chain`, with the dirty map `dirty` answers [`Source::dirty`] from.
    pub fn new(chain: Chain, dirty: Option<Box<dyn DirtyMap>>) -> ImageSource {
        ImageSource { chain, dirty }
    }
}

impl Source for ImageSource {
    fn name(&self) -> &Path {
        self.chain.top().path()
    }

    fn virtual_size(&self) -> u64 {
        self.chain.virtual_size()
    }

    fn cluster_size(&self) -> Option<ClusterSize> {
        self.chain.top().cluster_size()
    }

    fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(Extent, u64), SourceError> {
        self.chain.status(offset, max_len)
    }

    fn top_status(
        &self,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(LayerExtent, u64), SourceError> {
        self.chain.top().status(offset, max_len)
    }

    fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<(), SourceError> {
        self.chain.read(offset, buf)
    }

    fn stored_compressed(
        &self,
        offset: GuestOffset,
        len: u64,
        cluster_size: ClusterSize,
        codec: CompressionType,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        self.chain
            .stored_compressed(offset, len, cluster_size, codec)
    }

    fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), SourceError> {
        match &self.dirty {
            Some(map) => map.dirty(offset, max_len),
            None => Err(ImageError::new(self.name(), ImageErrorKind::NoDirtyBitmap)),
        }
    }
}

impl SourceChecks for ImageSource {
    fn top_backing(&self) -> Option<BackingFile> {
        let top = self.chain.top();
        let below = self.chain.layers().get(1)?;
        let spec = top.backing()?;
        Some(BackingFile {
            path: resolve_backing(top.path(), &spec.name),
            format: below.format(),
            virtual_size: below.virtual_size(),
        })
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        self.chain.files()
    }

    fn marked_corrupt(&self) -> Vec<PathBuf> {
        self.chain.marked_corrupt()
    }

    fn harmless_damage(&self) -> Vec<(PathBuf, String)> {
        self.chain.harmless_damage()
    }

    fn layer_names(&self) -> Vec<PathBuf> {
        self.chain
            .layers()
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }

    fn top_backing_name(&self) -> Option<String> {
        self.chain.top().backing().map(|b| b.name)
    }

    fn prepare_bitmap_clear(&self, name: &str) -> Result<Box<dyn BitmapClear>, SourceError> {
        self.chain.top().prepare_bitmap_clear(name)
    }

    fn fingerprint(&self) -> Result<Fingerprint, SourceError> {
        self.chain.fingerprint()
    }
}
