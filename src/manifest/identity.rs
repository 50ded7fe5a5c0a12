//! What ties a manifest to the one image file it was written for.
//!
//! Why: a backup is two files, the image and its manifest, and they are
//! put under their names one after the other. Two runs racing for one
//! TARGET, a crash between the two renames, or a file copied over one of
//! them could leave an image beside another backup's manifest. The
//! manifest therefore records the image file's identity, and `verify`
//! reports a pair that does not belong together.
//!
//! The identity is the file's length and a BLAKE3 of its bytes, read the
//! same way wherever the file is, so it survives copying the backup
//! elsewhere (unlike a device and inode number): the whole file when it is
//! at most [`WHOLE`] bytes; otherwise its first and last [`END_BYTES`] (for
//! a qcow2 image the header with its table offsets, and the last clusters
//! written) and [`SAMPLES`] pieces of [`SAMPLE_BYTES`] spread evenly in
//! between, a few hundred KiB whatever the size. Two large images with the
//! same identity may still differ elsewhere: those clusters are what
//! `verify` checks against the manifest's digests.

use std::io;

use qbackup_formats::storage::Storage;
use qbackup_formats::HostOffset;

/// Files up to this size are hashed whole.
pub const WHOLE: u64 = 4 << 20;
/// Bytes hashed at each end of a larger file.
pub const END_BYTES: u64 = 64 << 10;
/// Pieces hashed in between.
pub const SAMPLES: u64 = 64;
/// Bytes in each piece.
pub const SAMPLE_BYTES: u64 = 4 << 10;
/// The scheme described above (recorded, so that another can follow).
pub const SCHEME: u32 = 1;

/// The identity of an image file, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageIdentity {
    /// The file's length in bytes.
    pub length: u64,
    /// How the digest was taken ([`SCHEME`]).
    pub scheme: u32,
    /// BLAKE3 of the bytes the scheme reads, in file order.
    pub digest: [u8; 32],
}

/// The (offset, length) ranges the scheme reads from a file of `length`
/// bytes, in order.
fn ranges(length: u64) -> Vec<(u64, u64)> {
    if length <= WHOLE {
        return vec![(0, length)];
    }
    let mut v = vec![(0, END_BYTES)];
    let (lo, hi) = (END_BYTES, length - END_BYTES - SAMPLE_BYTES);
    for i in 0..SAMPLES {
        v.push((lo + (hi - lo) / SAMPLES * i, SAMPLE_BYTES));
    }
    v.push((length - END_BYTES, END_BYTES));
    v
}

impl ImageIdentity {
    /// Reads the identity of the file behind `storage`, whose length is
    /// [`Storage::len`].
    pub fn read(storage: &dyn Storage) -> io::Result<ImageIdentity> {
        let length = storage.len();
        let mut hasher = blake3::Hasher::new();
        let mut buf = Vec::new();
        for (at, len) in ranges(length) {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(1 << 20);
                buf.resize(n as usize, 0);
                storage
                    .read_exact_at("image identity", &mut buf, HostOffset(at + done))
                    .map_err(io::Error::other)?;
                hasher.update(&buf);
                done += n;
            }
        }
        Ok(ImageIdentity {
            length,
            scheme: SCHEME,
            digest: *hasher.finalize().as_bytes(),
        })
    }

    /// What differs between `self` (recorded) and `found`, in words.
    pub fn difference(&self, found: &ImageIdentity) -> Option<String> {
        if self.length != found.length {
            Some(format!(
                "it is {} bytes long, that image was {} bytes",
                found.length, self.length
            ))
        } else if self.scheme != found.scheme {
            Some(format!(
                "the manifest records its identity in a way this version does not know ({})",
                self.scheme
            ))
        } else if self.digest != found.digest {
            Some(if self.length <= WHOLE {
                "its bytes differ from that image's".to_string()
            } else {
                "its bytes at its ends or at sampled offsets differ from that image's".to_string()
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qbackup_formats::storage::memory::MemoryStorage;

    fn of(bytes: Vec<u8>) -> ImageIdentity {
        ImageIdentity::read(&MemoryStorage::read_only("m", bytes)).unwrap()
    }

    #[test]
    fn small_files_whole_large_ones_at_both_ends_and_samples() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let a = of(data.clone());
        assert_eq!((a.length, a.scheme), (300_000, SCHEME));
        assert_eq!(a.difference(&a), None);
        let mut mid = data.clone();
        mid[150_000] ^= 1;
        assert!(a.difference(&of(mid)).unwrap().contains("bytes differ"));
        let short = of(data[..1000].to_vec());
        assert!(a.difference(&short).unwrap().contains("1000 bytes long"));
        assert_eq!(of(Vec::new()).length, 0);

        let len = 5 * WHOLE as usize;
        let big: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let b = of(big.clone());
        let r = ranges(len as u64);
        assert_eq!(r.len() as u64, SAMPLES + 2);
        assert_eq!(r.last().unwrap().0 + END_BYTES, len as u64);
        // Inside a range read: seen; between them: not.
        for at in [0, END_BYTES as usize - 1, len - 1, r[5].0 as usize + 10] {
            let mut x = big.clone();
            x[at] ^= 1;
            assert!(b.difference(&of(x)).is_some(), "{at}");
        }
        let mut x = big.clone();
        x[r[5].0 as usize + SAMPLE_BYTES as usize + 10] ^= 1;
        assert_eq!(b.difference(&of(x)), None);
    }
}
