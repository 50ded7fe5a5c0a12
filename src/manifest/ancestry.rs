//! Walking a backup's ancestors through their manifests: each manifest
//! records its backing file's name and the BLAKE3 of that file's manifest,
//! so a chain of backups can be followed upwards, each parent checked to be
//! the very one its child was made on.
//!
//! Used by `verify` (every ancestor, not just the parent) and by the bitmap
//! lineage check (is the backup a bitmap generation started at among PREV
//! and its parents). The walk stops at a manifest that names no backing
//! file, and after [`MAX_DEPTH`] levels (QEMU's own chains are shallower).

use std::path::{Path, PathBuf};

use qbackup_formats::open::resolve_backing;

use super::{path_for, ManifestReader};

/// Levels walked at most.
pub const MAX_DEPTH: usize = 4096;

/// One backup of the chain, with its manifest.
pub struct Ancestor {
    /// The backup image.
    pub backup: PathBuf,
    /// Its manifest, opened (checksum verified).
    pub manifest: ManifestReader,
}

/// Why the walk stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AncestryError {
    /// A manifest could not be opened or read.
    #[error("{}: cannot check the backup {} was made on: {why}", backup.display(), child_name(child, *depth))]
    Unreadable {
        /// The parent backup.
        backup: PathBuf,
        /// Its child.
        child: PathBuf,
        /// Levels above the backup walked from (1: its parent).
        depth: usize,
        /// Why.
        why: String,
    },
    /// A parent's manifest is not the one its child recorded.
    #[error("{}: not the backup {} was made on (its manifest differs from the one recorded)", backup.display(), child_name(child, *depth))]
    Replaced {
        /// The parent backup.
        backup: PathBuf,
        /// Its child.
        child: PathBuf,
        /// Levels above the backup walked from (1: its parent).
        depth: usize,
    },
    /// The chain is deeper than [`MAX_DEPTH`].
    #[error("{}: the chain of backups is deeper than {MAX_DEPTH} levels", .0.display())]
    TooDeep(PathBuf),
}

/// "this one" for the backup the walk started at, else its name.
fn child_name(child: &Path, depth: usize) -> String {
    if depth == 1 {
        "this one".to_string()
    } else {
        child.display().to_string()
    }
}

/// The ancestors of `backup` (whose manifest is `manifest`), parent first,
/// each checked against the digest its child recorded. The iterator ends
/// at the first manifest without a recorded parent, or with an error.
pub fn ancestors(backup: &Path, manifest: &ManifestReader) -> Ancestors {
    Ancestors {
        next: next_of(backup, manifest),
        depth: 0,
        done: false,
    }
}

/// The parent `backup` records: (its path, the digest wanted, the child).
fn next_of(backup: &Path, manifest: &ManifestReader) -> Option<(PathBuf, String, PathBuf)> {
    let meta = manifest.meta();
    let (Some(name), Some(digest)) = (&meta.backing, &meta.backing_manifest) else {
        return None;
    };
    Some((
        resolve_backing(backup, name),
        digest.clone(),
        backup.to_path_buf(),
    ))
}

/// See [`ancestors`].
pub struct Ancestors {
    next: Option<(PathBuf, String, PathBuf)>,
    depth: usize,
    done: bool,
}

impl Iterator for Ancestors {
    type Item = Result<Ancestor, AncestryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (backup, want, child) = self.next.take()?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.done = true;
            return Some(Err(AncestryError::TooDeep(child)));
        }
        let manifest = match ManifestReader::open(&path_for(&backup)) {
            Ok(m) => m,
            Err(e) => {
                self.done = true;
                return Some(Err(AncestryError::Unreadable {
                    backup,
                    child,
                    depth: self.depth,
                    why: e.to_string(),
                }));
            }
        };
        if manifest.digest() != want {
            self.done = true;
            return Some(Err(AncestryError::Replaced {
                backup,
                child,
                depth: self.depth,
            }));
        }
        self.next = next_of(&backup, &manifest);
        Some(Ok(Ancestor { backup, manifest }))
    }
}
