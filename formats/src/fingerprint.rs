//! Detecting that a source changed while it was read.
//!
//! Why: QEMU's image locks keep QEMU out of a source being backed up, but
//! not another tool (dd, a host-side writer, a process ignoring locks). A
//! backup of a file that changed under it mixes two states of the disk and
//! would still look perfect to `qemu-img check`. So a backup takes a
//! [`Fingerprint`] of every file of the chain before it reads anything and
//! compares it with a new one at the end.
//!
//! What is compared, per file: its length, modification and status-change
//! times (any write through the file system moves them, and `ctime` cannot
//! be set back by a user), and for formats with metadata that locates the
//! guest data (qcow2: the header cluster and the L1 table) a hash of those
//! bytes, which catches writes the timestamps' granularity hides.
//!
//! Not detected: a write that restores the same bytes and happens within
//! one timestamp tick of the first look; writes to a block device (its
//! node's times do not move) other than to the qcow2 header and L1 table;
//! changes in an NBD export (the server owns consistency, e.g. a fleecing
//! point-in-time view).

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};

use crate::image::error::ImageError;
use crate::layer::Layer;
use crate::storage::ChangeStamp;

/// Most bytes one range hashes (an L1 table is far smaller; a bound keeps a
/// hostile header from making the check read gigabytes).
const MAX_RANGE: u64 = 64 << 20;

/// What one file looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileState {
    path: PathBuf,
    stamp: Option<ChangeStamp>,
    metadata_hash: Option<u64>,
}

/// The state of every file a chain reads, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    files: Vec<FileState>,
}

impl Fingerprint {
    /// Takes the fingerprint of `layers` (a chain, top first).
    pub fn of(layers: &[Box<dyn Layer>]) -> Result<Fingerprint, ImageError> {
        let mut files = Vec::new();
        for layer in layers {
            let image = layer.storage();
            let ranges = layer.metadata_ranges();
            let metadata_hash = if ranges.is_empty() {
                None
            } else {
                let mut h = DefaultHasher::new();
                for (offset, len) in ranges {
                    let mut buf = vec![0u8; len.min(MAX_RANGE) as usize];
                    image
                        .read_zero_padded(&mut buf, offset)
                        .map_err(|e| ImageError::new(image.name(), e))?;
                    h.write(&buf);
                }
                Some(h.finish())
            };
            files.push(FileState {
                path: image.name().to_path_buf(),
                stamp: image.change_stamp(),
                metadata_hash,
            });
            // Other files the layer reads (an external data file).
            for other in layer.files().iter().skip(1) {
                files.push(FileState {
                    path: other.name().to_path_buf(),
                    stamp: other.change_stamp(),
                    metadata_hash: None,
                });
            }
        }
        Ok(Fingerprint { files })
    }

    /// The first file that differs between `self` (earlier) and `now`.
    pub fn first_change<'a>(&'a self, now: &Fingerprint) -> Option<&'a Path> {
        if self.files.len() != now.files.len() {
            return self.files.first().map(|f| f.path.as_path());
        }
        self.files
            .iter()
            .zip(&now.files)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a.path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(path: &str, len: u64, hash: Option<u64>) -> FileState {
        FileState {
            path: path.into(),
            stamp: Some(ChangeStamp {
                len,
                mtime_ns: 1,
                ctime_ns: 2,
            }),
            metadata_hash: hash,
        }
    }

    #[test]
    fn names_the_first_changed_file() {
        let a = Fingerprint {
            files: vec![state("top", 10, Some(1)), state("base", 20, None)],
        };
        assert_eq!(a.first_change(&a.clone()), None);
        // Same times and length, other metadata bytes.
        let b = Fingerprint {
            files: vec![state("top", 10, Some(2)), state("base", 20, None)],
        };
        assert_eq!(a.first_change(&b), Some(Path::new("top")));
        let c = Fingerprint {
            files: vec![state("top", 10, Some(1)), state("base", 21, None)],
        };
        assert_eq!(a.first_change(&c), Some(Path::new("base")));
    }
}
