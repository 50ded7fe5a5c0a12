//! Rewriting a manifest's metadata line (its runs and image identity kept
//! as they are), crash-safe: the new manifest is written beside it under a
//! hidden name, synced, and renamed over it, so a crash leaves the old
//! one or the new one, never a mix.
//!
//! Used by a prune: a consolidated image takes over a pruned backup's
//! point in time (its id and time), and each backup above a consolidated
//! image records the new parent's manifest digest.

use std::path::{Path, PathBuf};

use crate::manifest::{ManifestReader, ManifestWriter, Meta};

use super::SetError;

/// Rewrites the manifest at `path` with `edit` applied to its metadata;
/// returns the new manifest's BLAKE3 (hex).
pub fn rewrite_manifest(path: &Path, edit: impl FnOnce(&mut Meta)) -> Result<String, SetError> {
    let tmp = hidden_beside(path, "rewrite");
    let digest = write_edited(path, &tmp, edit)?;
    rename(&tmp, path)?;
    Ok(digest)
}

/// Writes the manifest at `from` with `edit` applied to its metadata to
/// `to` (synced; not yet in place); returns its BLAKE3 (hex).
pub fn write_edited(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut Meta),
) -> Result<String, SetError> {
    let mut reader = ManifestReader::open(from)?;
    let mut meta = reader.meta().clone();
    edit(&mut meta);
    let image = reader.image().copied();
    let file = std::fs::File::create(to).map_err(|source| SetError::File {
        path: to.to_path_buf(),
        action: "create",
        source,
    })?;
    let result = (|| {
        let mut w = ManifestWriter::new(file, to, &meta)?;
        while let Some((n, e)) = reader.next_run()? {
            w.push_run(n, e)?;
        }
        if let Some(i) = image {
            w.set_image(i);
        }
        Ok::<_, SetError>(w.finish()?)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result
}

/// `.NAME.WHAT` beside `path` (hidden: a set's scan ignores it).
pub fn hidden_beside(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}"))
}

/// Renames `from` to `to` and syncs their directory.
pub fn rename(from: &Path, to: &Path) -> Result<(), SetError> {
    std::fs::rename(from, to).map_err(|source| SetError::File {
        path: to.to_path_buf(),
        action: "rename into place",
        source,
    })?;
    sync_dir(to);
    Ok(())
}

/// Syncs the directory holding `path` (best effort: some file systems
/// cannot).
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
