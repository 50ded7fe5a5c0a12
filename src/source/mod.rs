//! The source seam: what `map`, `compare`, `verify` and the backup planner
//! and copier need from whatever they read, so that they never depend on how
//! it is stored.
//!
//! Two capabilities, two traits: [`Source`] reads (size, allocation, bytes,
//! stored compressed clusters, the dirty map) and is all the planner and
//! copier see; [`SourceChecks`] (a `Source` too) is what a backup checks
//! around the copy: the files it reads, whether they changed, corruption,
//! the chain's names, and clearing the bitmap afterwards. A source that
//! only streams data (a test double, a future remote reader) implements
//! `Source` alone.
//!
//! One implementation serves every source today, [`ImageSource`]: a
//! [`qbackup_formats::Chain`] whose top storage is an image file or an NBD
//! export, plus the dirty bitmap it was opened with, if any (a qcow2
//! persistent bitmap, or the export's `qemu:dirty-bitmap` context, see
//! [`dirty`]). Everything is opened through the caller's [`Opener`], NBD
//! exports and their meta contexts included, so the opener's wrappers (the
//! error policies, tests' fault injection) apply to all of it. Every method
//! is safe to call from many threads at once.

pub mod dirty;
mod image;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qbackup_formats::extent::LayerExtent;
use qbackup_formats::fingerprint::Fingerprint;
use qbackup_formats::layer::BitmapClear;
use qbackup_formats::open::{nbd_uri, OpenOptions, Opener, Role};
use qbackup_formats::storage::Storage;
use qbackup_formats::{
    image as image_open, Chain, ClusterSize, CompressionType, Extent, Format, GuestOffset,
    ImageError,
};

pub use dirty::{dirty_bitmap_context, NbdDirtyMap};
pub use image::ImageSource;

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

/// What the planner and copier read; see the module docs.
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
}

/// What a backup checks around the copy; see the module docs.
pub trait SourceChecks: Source {
    /// The image below the top layer, for `--sync top` overlays.
    fn top_backing(&self) -> Option<BackingFile>;

    /// Every storage the source reads (so a target can be refused when it
    /// is one of them).
    fn files(&self) -> Vec<Arc<dyn Storage>>;

    /// The top image's device and inode, when it is a local file: what a
    /// manifest records as the source, and a bitmap record as its image.
    fn identity(&self) -> Option<(u64, u64)> {
        let top = self.files().into_iter().next()?;
        top.identity().map(|i| (i.dev, i.ino))
    }

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

/// Opens the source named `name` through `opener` (an image or an NBD
/// export, and its backing chain), with the dirty bitmap `bitmap` when
/// given (an export's bitmap is negotiated as a meta context through the
/// opener, [`Opener::open_with`]). Boxed: callers keep it while they
/// borrow it as `&dyn Source` and `&dyn SourceChecks`.
pub fn open(
    opener: &dyn Opener,
    name: &Path,
    format: Option<Format>,
    bitmap: Option<BitmapRequest<'_>>,
) -> Result<Box<ImageSource>, SourceError> {
    let Some(bitmap) = bitmap else {
        return Ok(Box::new(ImageSource::new(
            Chain::open_with(opener, name, format)?,
            None,
        )));
    };
    if nbd_uri(name).is_some() {
        // The bitmap's context is negotiated when connecting, through the
        // opener, so that its wrappers (the error policy) apply to it too.
        let options = OpenOptions {
            meta_contexts: vec![dirty_bitmap_context(bitmap.name)],
        };
        let export = opener
            .open_with(name, Role::Image, &options)
            .map_err(|e| ImageError::new(name, e))?;
        let top = image_open::open_storage(opener, Arc::clone(&export), format)?;
        return Ok(Box::new(ImageSource::new(
            Chain::with_top(opener, top)?,
            Some(Box::new(NbdDirtyMap::new(export, bitmap.name))),
        )));
    }
    let chain = Chain::open_with(opener, name, format)?;
    let dirty = Some(
        chain
            .top()
            .dirty_bitmap(bitmap.name, bitmap.allow_disabled)?,
    );
    Ok(Box::new(ImageSource::new(chain, dirty)))
}
