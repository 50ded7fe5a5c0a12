//! What ties a manifest to the one image file it was written for.
//!
//! Why: a backup is two files, the image and its manifest, and they are
//! put under their names one after the other. Two runs racing for one
//! TARGET, a crash between the two renames, or a file copied over one of
//! them could leave an image beside another backup's manifest. The
//! manifest therefore records the image file's identity, and `verify`
//! reports a pair that does not belong together.
//!
//! The identity is the file's length and the BLAKE3 of its first and last
//! [`WINDOW`] bytes (for a qcow2 image the header with its table offsets,
//! and the last clusters written), read the same way wherever the file
//! is: it survives copying the backup elsewhere, unlike a device and inode
//! number. Two images with the same identity may still differ in their
//! other clusters; those are what `verify` checks against the manifest's
//! digests.

use std::io;

use qbackup_formats::storage::Storage;
use qbackup_formats::HostOffset;

/// Bytes read at each end of the file.
pub const WINDOW: u32 = 64 << 10;

/// The identity of an image file, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageIdentity {
    /// The file's length in bytes.
    pub length: u64,
    /// The bytes read at each end (at most the length).
    pub window: u32,
    /// BLAKE3 of the first `window` bytes followed by the last `window`
    /// bytes.
    pub digest: [u8; 32],
}

impl ImageIdentity {
    /// Reads the identity of the file behind `storage`, whose length is
    /// [`Storage::len`].
    pub fn read(storage: &dyn Storage) -> io::Result<ImageIdentity> {
        Self::read_with(storage, WINDOW)
    }

    /// Reads the identity with `window` bytes at each end (the window a
    /// manifest recorded).
    pub fn read_with(storage: &dyn Storage, window: u32) -> io::Result<ImageIdentity> {
        let length = storage.len();
        let n = u64::from(window).min(length);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; n as usize];
        for at in [0, length - n] {
            storage
                .read_exact_at("image identity", &mut buf, HostOffset(at))
                .map_err(io::Error::other)?;
            hasher.update(&buf);
        }
        Ok(ImageIdentity {
            length,
            window,
            digest: *hasher.finalize().as_bytes(),
        })
    }

    /// What differs between `self` (recorded) and `found`, in words.
    pub fn difference(&self, found: &ImageIdentity) -> Option<String> {
        if self.length != found.length {
            Some(format!(
                "it is {} bytes long, the manifest was written for an image of {} bytes",
                found.length, self.length
            ))
        } else if self.digest != found.digest {
            Some(format!(
                "its first or last {} bytes differ from those of the image the manifest was written for",
                u64::from(self.window).min(self.length)
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbackup_formats::storage::memory::MemoryStorage;

    #[test]
    fn identity_follows_length_and_both_ends() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let a = ImageIdentity::read(&MemoryStorage::read_only("m", data.clone())).unwrap();
        assert_eq!(a.length, 300_000);
        assert_eq!(a.difference(&a), None);
        // The middle is not part of it; each end and the length are.
        let mut mid = data.clone();
        mid[150_000] ^= 1;
        let m = ImageIdentity::read(&MemoryStorage::read_only("m", mid)).unwrap();
        assert_eq!(a.difference(&m), None);
        for at in [0, 65_535, 300_000 - 65_536, 299_999] {
            let mut end = data.clone();
            end[at] ^= 1;
            let e = ImageIdentity::read(&MemoryStorage::read_only("m", end)).unwrap();
            assert!(a.difference(&e).unwrap().contains("first or last"), "{at}");
        }
        let short =
            ImageIdentity::read(&MemoryStorage::read_only("m", data[..1000].to_vec())).unwrap();
        assert!(a.difference(&short).unwrap().contains("1000 bytes long"));
        // A file shorter than the window is read whole, twice.
        assert_eq!(short.window, WINDOW);
        let empty = ImageIdentity::read(&MemoryStorage::read_only("m", Vec::new())).unwrap();
        assert_eq!(empty.length, 0);
    }
}
