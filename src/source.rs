//! The source seam: what `map` and the backup planner and copier need from
//! whatever they read, so that they never depend on how it is stored.
//!
//! One implementation serves every source today: a [`Chain`] whose top
//! storage is an image file or an NBD export, plus the dirty bitmap it was
//! opened with, if any (a qcow2 persistent bitmap or the export's
//! `qemu:dirty-bitmap` context). Every method is safe to call from many
//! threads at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::extent::LayerExtent;
use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::image::{self, ImageErrorKind};
use qbackup_formats::layer::{BitmapClear, DirtyMap};
use qbackup_formats::open::{nbd_uri, resolve_backing, Opener};
use qbackup_formats::storage::nbd::{dirty_bitmap_context, NbdDirtyMap, NbdStorage};
use qbackup_formats::storage::{Storage, StorageError};
use qbackup_formats::{
    Chain, ClusterSize, CompressionType, Extent, Format, GuestOffset, ImageError,
};

/// Errors from a source name the file (or export) concerned.
pub type SourceError = ImageError;

/// The image a top-layer backup is an overlay on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// Where it is, resolved.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its virtual size (the source's, unless the top image was resized).
    pub virtual_size: u64,
}

/// Something a backup reads; see the module docs.
pub trait Source: Sync {
    /// The name messages use (the image path, or an export's URI).
    fn name(&self) -> &Path;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// The source's own cluster size, where it has one.
    fn cluster_size(&self) -> Option<ClusterSize>;

    /// What the guest sees over the range at `offset` (below the virtual
    /// size): the answer and how many bytes (at most `max_len`, > 0) it
    /// covers, as `qemu-img map` reports it.
    fn status(&self, offset: GuestOffset, max_len: u64) -> Result<(Extent, u64), SourceError>;

    /// What the top layer alone allocates over the range at `offset`.
    fn top_status(
        &self,
        offset: GuestOffset,
        max_len: u64,
    ) -> Result<(LayerExtent, u64), SourceError>;

    /// Reads guest bytes; the range lies inside the virtual size.
    fn read(&self, offset: GuestOffset, buf: &mut [u8]) -> Result<(), SourceError>;

    /// The stored compressed stream of the `len` guest bytes at `offset`
    /// when it can be copied as it is into an image of `cluster_size` and
    /// `codec` (validated by the driver); `None` otherwise.
    fn stored_compressed(
        &self,
        offset: GuestOffset,
        len: u64,
        cluster_size: ClusterSize,
        codec: CompressionType,
    ) -> Result<Option<Vec<u8>>, SourceError>;

    /// Whether the range at `offset` (below the virtual size) is marked in
    /// the dirty bitmap the source was opened with, and for how many bytes
    /// (at most `max_len`, > 0) that holds. Sources without a dirty bitmap
    /// refuse.
    fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), SourceError>;

    /// The image below the top layer, for `--sync top` overlays.
    fn top_backing(&self) -> Option<BackingFile>;

    /// Every storage the source reads (so a target can be refused when it
    /// is one of them).
    fn files(&self) -> Vec<Arc<dyn Storage>>;

    /// The images of the source that QEMU marked corrupt (read anyway, as
    /// QEMU reads them read-only).
    fn marked_corrupt(&self) -> Vec<PathBuf>;

    /// Damage found so far that does not change what the guest reads
    /// (damaged qcow2 refcounts): (image, what), for a warning.
    fn harmless_damage(&self) -> Vec<(PathBuf, String)>;

    /// The names of the chain's images, top first (index = depth).
    fn layer_names(&self) -> Vec<PathBuf>;

    /// The backing file name the top image records, as written in it.
    fn top_backing_name(&self) -> Option<String>;

    /// Checks that the persistent dirty bitmap `name` of the top image can
    /// be cleared (the source must have been opened for update) and returns
    /// the clearing, which writes nothing until committed.
    fn prepare_bitmap_clear(&self, name: &str) -> Result<Box<dyn BitmapClear>, SourceError>;

    /// The state of the files it reads, to detect a change during a backup.
    fn fingerprint(&self) -> Result<Fingerprint, SourceError>;
}

/// The dirty bitmap a source is opened with.
#[derive(Debug, Clone, Copy)]
pub struct BitmapRequest<'a> {
    /// Its name.
    pub name: &'a str,
    /// Accept a disabled bitmap (see [`qbackup_formats::layer::Layer::dirty_bitmap`]).
    pub allow_disabled: bool,
}

/// Opens the source named `name` through `opener` (a local image and its
/// backing chain), with the dirty bitmap `bitmap` when given.
pub fn open(
    opener: &dyn Opener,
    name: &Path,
    format: Option<Format>,
    bitmap: Option<BitmapRequest<'_>>,
) -> Result<Box<dyn Source + Send>, SourceError> {
    let Some(bitmap) = bitmap else {
        return Ok(Box::new(ImageSource {
            chain: Chain::open_with(opener, name, format)?,
            dirty: None,
        }));
    };
    if let Some(uri) = nbd_uri(name) {
        // The bitmap's context is negotiated when connecting.
        let export = Arc::new(
            NbdStorage::connect(uri, &[dirty_bitmap_context(bitmap.name)])
                .map_err(|e| ImageError::new(name, StorageError::from(e)))?,
        );
        let top = image::open_storage(opener, export.clone(), format)?;
        return Ok(Box::new(ImageSource {
            chain: Chain::with_top(opener, top)?,
            dirty: Some(Box::new(NbdDirtyMap::new(export, bitmap.name))),
        }));
    }
    let chain = Chain::open_with(opener, name, format)?;
    let dirty = Some(
        chain
            .top()
            .dirty_bitmap(bitmap.name, bitmap.allow_disabled)?,
    );
    Ok(Box::new(ImageSource { chain, dirty }))
}

/// An image (or NBD export) and its backing chain, with the dirty bitmap it
/// was opened with: a qcow2 image's persistent bitmap, or the export's
/// `qemu:dirty-bitmap` context.
struct ImageSource {
    chain: Chain,
    dirty: Option<Box<dyn DirtyMap>>,
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
