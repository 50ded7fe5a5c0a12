//! Opening storage by name, in one place.
//!
//! Every file the drivers touch is opened through an [`Opener`]: the image
//! named on the command line, each backing file, an external data file. So a
//! new kind of storage (an NBD export, an in-memory image) only needs an
//! opener that recognises its names, and tests can wrap every open
//! ([`WrappingOpener`]) to put a fault-injecting storage under any layer.
//! QEMU's rules for relative names live here too.
//!
//! Invariant: opening never blocks (see [`FileStorage::open_read_only`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::nbd::TlsConfig;
use crate::storage::cache::{CacheDropping, CachePolicy, Records};
use crate::storage::{FileStorage, Storage, StorageError};

/// Why a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The image named by the user (the top of a chain).
    Image,
    /// A backing file named by an overlay.
    Backing,
    /// A qcow2 image's external data file.
    DataFile,
    /// A backup target being written (see [`Opener::target`]).
    Target,
}

/// What an open negotiates besides the bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Metadata contexts to negotiate (NBD meta contexts such as
    /// `qemu:dirty-bitmap:NAME`; `base:allocation` always is), queried
    /// later with [`Storage::context_status`]. A context the storage cannot
    /// offer fails the open.
    pub meta_contexts: Vec<String>,
}

impl OpenOptions {
    /// Fails when contexts are asked of storage that has none.
    pub fn refuse_contexts(&self) -> Result<(), StorageError> {
        match self.meta_contexts.first() {
            Some(context) => Err(StorageError::NoContexts {
                context: context.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Opens storage by name.
pub trait Opener: Send + Sync {
    /// Opens `name` read-only.
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError>;

    /// Opens `name` read-only with `options`. Wrappers forward it to their
    /// inner opener and wrap the result as [`Opener::open`] does; the
    /// default opens with [`Opener::open`] and refuses metadata contexts.
    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        options.refuse_contexts()?;
        self.open(name, role)
    }

    /// The canonical form of `name`, which a backing chain compares to find
    /// loops (as QEMU compares file names), or why `name` cannot be
    /// resolved. The default takes names as they are.
    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        Ok(name.to_path_buf())
    }

    /// The storage a backup target is written through, given the file the
    /// backup created. Wrappers put themselves in here; the default passes
    /// it through.
    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        storage
    }

    /// Storage for `name` and `role` that was opened around this opener
    /// (the top image [`UpdatingOpener`] opens for update), wrapped as far
    /// as its page cache is concerned as this opener would wrap it
    /// ([`CacheOpener`]). Wrappers forward it; the default passes it
    /// through.
    fn wrap_opened(&self, name: &Path, role: Role, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let _ = (name, role);
        storage
    }
}

/// Opens local files and block devices as a consistent reader: takes
/// QEMU's image locks and refuses a file another process writes
/// ([`crate::storage::lock`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileOpener;

/// The NBD URI `name` is, if it is one (`nbd://…`, `nbd+unix://…`).
pub fn nbd_uri(name: &Path) -> Option<&str> {
    name.to_str().filter(|s| crate::nbd::is_nbd_uri(s))
}

impl Opener for FileOpener {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_with(name, role, &OpenOptions::default())
    }

    fn open_with(
        &self,
        name: &Path,
        _role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        if let Some(uri) = nbd_uri(name) {
            // The server owns the image and its consistency (QEMU's locks
            // are on its side).
            return Ok(Arc::new(crate::storage::nbd::open(
                uri,
                &options.meta_contexts,
            )?));
        }
        options.refuse_contexts()?;
        let storage = FileStorage::open_read_only(name)?;
        storage.lock_for_consistent_read()?;
        Ok(Arc::new(storage))
    }

    /// Symlinks and `..` resolved; hard links stay distinct, because a
    /// relative backing name resolves from the path an image is reached by.
    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        if nbd_uri(name).is_some() {
            return Ok(name.to_path_buf());
        }
        std::fs::canonicalize(name).map_err(|source| StorageError::Open { source })
    }
}

/// Opens `nbds` URIs with the TLS settings they leave out (a front end's
/// options: the certificates directory, the server name to verify) and
/// everything else through `inner`.
#[derive(Debug, Default)]
pub struct TlsOpener<O> {
    inner: O,
    tls: TlsConfig,
}

impl<O: Opener> TlsOpener<O> {
    /// `inner`, with `tls` for the NBD URIs it is asked to open.
    pub fn new(inner: O, tls: TlsConfig) -> Self {
        TlsOpener { inner, tls }
    }

    /// The opener of everything but NBD URIs.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

impl<O: Opener> Opener for TlsOpener<O> {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_with(name, role, &OpenOptions::default())
    }

    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        match nbd_uri(name) {
            Some(uri) => Ok(Arc::new(crate::storage::nbd::open_with_tls(
                uri,
                &options.meta_contexts,
                &self.tls,
            )?)),
            None => self.inner.open_with(name, role, options),
        }
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        self.inner.canonical(name)
    }

    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        self.inner.target(storage)
    }
}

/// Opens local files like [`FileOpener`] but ignores QEMU's image locks
/// (qemu-img's `-U`/`--force-share`): takes none, and records the files
/// another process was writing so the caller can warn that what it read
/// may be inconsistent.
#[derive(Debug, Default)]
pub struct ForceShareOpener {
    in_use: Mutex<Vec<PathBuf>>,
}

impl ForceShareOpener {
    /// The files that were in use by a writer when they were opened.
    pub fn in_use(&self) -> Vec<PathBuf> {
        self.in_use.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Opener for ForceShareOpener {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        self.open_with(name, role, &OpenOptions::default())
    }

    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        if nbd_uri(name).is_some() {
            return FileOpener.open_with(name, role, options);
        }
        options.refuse_contexts()?;
        let storage = FileStorage::open_read_only(name)?;
        if storage.lock_conflict()?.is_some() {
            if let Ok(mut v) = self.in_use.lock() {
                v.push(name.to_path_buf());
            }
        }
        Ok(Arc::new(storage))
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        FileOpener.canonical(name)
    }
}

/// Opens the image named by the user for updating in place (clearing one
/// of its persistent dirty bitmaps): read-write, with QEMU's locks of a
/// writer that keeps the image to itself, so it is refused while any other
/// process (a VM, qemu-nbd, qemu-img, another qbackup) has it open, and no
/// such process can open it until this storage is dropped. Backing files
/// and data files are opened by `inner`, read-only. NBD exports are
/// refused: their server owns the image and its bitmaps.
pub struct UpdatingOpener<'a> {
    inner: &'a dyn Opener,
}

impl<'a> UpdatingOpener<'a> {
    /// Opens the top image for update and everything else through `inner`.
    pub fn new(inner: &'a dyn Opener) -> Self {
        UpdatingOpener { inner }
    }
}

impl fmt::Debug for UpdatingOpener<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpdatingOpener")
    }
}

impl Opener for UpdatingOpener<'_> {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        if role != Role::Image {
            return self.inner.open(name, role);
        }
        if nbd_uri(name).is_some() {
            return Err(StorageError::NotWritable {
                why: "an NBD export's bitmaps belong to its server",
            });
        }
        let storage = FileStorage::open_for_update(name)?;
        storage.lock_for_update()?;
        Ok(self.inner.wrap_opened(name, role, Arc::new(storage)))
    }

    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        if role != Role::Image {
            return self.inner.open_with(name, role, options);
        }
        options.refuse_contexts()?;
        self.open(name, role)
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        self.inner.canonical(name)
    }

    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        self.inner.target(storage)
    }
}

/// A function that wraps a storage: given its name and role (`Role::Target`
/// for targets), returns what to use instead.
pub type WrapFn = dyn Fn(&Path, Role, Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync;

/// An opener that passes everything it opens through a function, like
/// imago's delegating storage wrappers (used for fault injection).
pub struct WrappingOpener<O> {
    inner: O,
    wrap: Box<WrapFn>,
}

impl<O: Opener> WrappingOpener<O> {
    /// Wraps `inner`'s storage with `wrap`.
    pub fn new(
        inner: O,
        wrap: impl Fn(&Path, Role, Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync + 'static,
    ) -> Self {
        WrappingOpener {
            inner,
            wrap: Box::new(wrap),
        }
    }
}

impl<O> fmt::Debug for WrappingOpener<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappingOpener")
    }
}

impl<O: Opener> Opener for WrappingOpener<O> {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        let s = self.inner.open(name, role)?;
        Ok((self.wrap)(name, role, s))
    }

    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        let s = self.inner.open_with(name, role, options)?;
        Ok((self.wrap)(name, role, s))
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        self.inner.canonical(name)
    }

    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let s = self.inner.target(storage);
        let name = s.name().to_path_buf();
        (self.wrap)(&name, Role::Target, s)
    }
}

/// An opener that applies a [`CachePolicy`] to everything `inner` opens:
/// with [`CachePolicy::Drop`], each local file read and each target is
/// wrapped in [`CacheDropping`] (see [`crate::storage::cache`]); with
/// [`CachePolicy::Keep`] storage passes through as it is.
pub struct CacheOpener<'a> {
    inner: &'a dyn Opener,
    policy: CachePolicy,
    records: Records,
}

impl<'a> CacheOpener<'a> {
    /// Applies `policy` to what `inner` opens.
    pub fn new(inner: &'a dyn Opener, policy: CachePolicy) -> Self {
        CacheOpener {
            inner,
            policy,
            records: Records::default(),
        }
    }

    fn read(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        match self.policy {
            CachePolicy::Drop => CacheDropping::reading(storage, &self.records),
            CachePolicy::Keep => storage,
        }
    }
}

impl fmt::Debug for CacheOpener<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheOpener({:?})", self.policy)
    }
}

impl Opener for CacheOpener<'_> {
    fn open(&self, name: &Path, role: Role) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.read(self.inner.open(name, role)?))
    }

    fn open_with(
        &self,
        name: &Path,
        role: Role,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.read(self.inner.open_with(name, role, options)?))
    }

    fn canonical(&self, name: &Path) -> Result<PathBuf, StorageError> {
        self.inner.canonical(name)
    }

    fn target(&self, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        let storage = self.inner.target(storage);
        match self.policy {
            CachePolicy::Drop => CacheDropping::written(storage),
            CachePolicy::Keep => storage,
        }
    }

    fn wrap_opened(&self, name: &Path, role: Role, storage: Arc<dyn Storage>) -> Arc<dyn Storage> {
        self.read(self.inner.wrap_opened(name, role, storage))
    }
}

/// Resolves a backing file name the way QEMU does: relative names are taken
/// relative to the directory of the overlay that names them.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Resolves an external data file name the way qemu-img does: relative to
/// the current directory, not the image's, so that both read the same file.
pub fn resolve_data_file(name: &str) -> PathBuf {
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names() {
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "base.qcow2"),
            Path::new("/a/b/base.qcow2")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "/x/base"),
            Path::new("/x/base")
        );
        assert_eq!(resolve_backing(Path::new("top"), "b"), Path::new("b"));
    }

    #[test]
    fn wrapper_sees_every_open() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let opener = WrappingOpener::new(FileOpener, move |_, role, s| {
            assert_eq!(role, Role::Backing);
            counter.fetch_add(1, Ordering::Relaxed);
            s
        });
        opener.open(&p, Role::Backing).unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 1);
    }

    /// Options reach the inner opener through a wrapper, and the wrapper
    /// still wraps what it returns; a file cannot offer meta contexts.
    #[test]
    fn open_with_goes_through_wrappers() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let opener = WrappingOpener::new(FileOpener, move |_, _, s| {
            counter.fetch_add(1, Ordering::Relaxed);
            s
        });
        opener
            .open_with(&p, Role::Image, &OpenOptions::default())
            .unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        let contexts = OpenOptions {
            meta_contexts: vec!["qemu:dirty-bitmap:b".into()],
        };
        let e = opener.open_with(&p, Role::Image, &contexts).unwrap_err();
        assert!(matches!(e, StorageError::NoContexts { .. }), "{e}");
        let e = ForceShareOpener::default()
            .open_with(&p, Role::Image, &contexts)
            .unwrap_err();
        assert!(matches!(e, StorageError::NoContexts { .. }), "{e}");
        let updating = UpdatingOpener::new(&FileOpener);
        let e = updating.open_with(&p, Role::Image, &contexts).unwrap_err();
        assert!(matches!(e, StorageError::NoContexts { .. }), "{e}");
    }
}
