//! Dirty maps a source reads besides its image: an NBD export's
//! `qemu:dirty-bitmap:NAME` meta context. (A qcow2 image's persistent
//! bitmap is its driver's, [`qbackup_formats::Layer::dirty_bitmap`].)
//!
//! Why here and not in the formats crate's NBD storage: which guest ranges
//! changed is a question about a source, asked by the planner; storage only
//! negotiates contexts and answers their flags
//! ([`Storage::context_status`]). Asking through the `Storage` trait, on
//! the storage the opener returned, means every wrapper an opener puts
//! under the source (the retry policy, a test's fault injection) applies to
//! the dirty map as to the reads.

use std::sync::Arc;

use qbackup_formats::layer::DirtyMap;
use qbackup_formats::storage::Storage;
use qbackup_formats::{GuestOffset, HostOffset, ImageError};

/// The meta context of QEMU's dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// A dirty bitmap the server exports (`qemu:dirty-bitmap:NAME`): bit 0 of a
/// context extent's flags says dirty. The export's offsets are guest
/// offsets (the server presents the guest's view).
pub struct NbdDirtyMap {
    export: Arc<dyn Storage>,
    context: String,
}

impl NbdDirtyMap {
    /// The bitmap `name` of `export`, which was opened with its context.
    pub fn new(export: Arc<dyn Storage>, name: &str) -> NbdDirtyMap {
        NbdDirtyMap {
            export,
            context: dirty_bitmap_context(name),
        }
    }
}

impl DirtyMap for NbdDirtyMap {
    fn dirty(&self, offset: GuestOffset, max_len: u64) -> Result<(bool, u64), ImageError> {
        let (flags, len) = self
            .export
            .context_status_at(&self.context, HostOffset(offset.0), max_len)
            .map_err(|e| ImageError::new(self.export.name(), e))?;
        Ok((flags & 1 != 0, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::{Path, PathBuf};

    /// Answers a fixed context map: dirty below 4096, clean above; counts
    /// the questions.
    #[derive(Debug)]
    struct Contexts(PathBuf);

    impl Storage for Contexts {
        fn name(&self) -> &Path {
            &self.0
        }
        fn len(&self) -> u64 {
            8192
        }
        fn read_at(&self, _: &mut [u8], _: HostOffset) -> io::Result<usize> {
            Ok(0)
        }
        fn context_status(
            &self,
            context: &str,
            offset: HostOffset,
            max_len: u64,
        ) -> io::Result<(u32, u64)> {
            assert_eq!(context, "qemu:dirty-bitmap:bm0");
            Ok(if offset.0 < 4096 {
                (1, (4096 - offset.0).min(max_len))
            } else {
                (0, (8192 - offset.0).min(max_len))
            })
        }
    }

    #[test]
    fn bit_0_says_dirty_through_the_storage_trait() {
        let map = NbdDirtyMap::new(Arc::new(Contexts("x".into())), "bm0");
        assert_eq!(map.dirty(GuestOffset(0), 1 << 20).unwrap(), (true, 4096));
        assert_eq!(map.dirty(GuestOffset(4096), 100).unwrap(), (false, 100));
    }

    #[test]
    fn storage_without_contexts_refuses_with_the_file_name() {
        #[derive(Debug)]
        struct Plain;
        impl Storage for Plain {
            fn name(&self) -> &Path {
                Path::new("plain.raw")
            }
            fn len(&self) -> u64 {
                512
            }
            fn read_at(&self, _: &mut [u8], _: HostOffset) -> io::Result<usize> {
                Ok(0)
            }
        }
        let map = NbdDirtyMap::new(Arc::new(Plain), "bm0");
        let e = map.dirty(GuestOffset(0), 512).unwrap_err();
        assert!(e.to_string().starts_with("plain.raw: "), "{e}");
        assert_eq!(
            qbackup_formats::Classify::class(&e),
            qbackup_formats::ErrorClass::Unsupported
        );
    }
}
