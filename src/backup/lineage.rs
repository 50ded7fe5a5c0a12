//! Bitmap generations: which backup a source image's persistent dirty
//! bitmap started recording at, so that an incremental backup by that
//! bitmap is only ever written onto that backup or one of its
//! descendants.
//!
//! Why: a bitmap marks what changed since it was last cleared, and
//! nothing in a qcow2 bitmap says when that was. An incremental onto an
//! older member of the chain (the bitmap was cleared by a later backup),
//! onto another disk's backup of the same size, or after an ad-hoc backup
//! cleared the bitmap would copy too little: exit 0, `verify` OK, wrong
//! data. So each backup that clears a bitmap first records, beside the
//! image (`IMAGE.qbackup-bitmaps`, JSON), that the bitmap's new generation
//! starts at that backup's identity (its manifest's id); an incremental by
//! the bitmap onto PREV must find that backup among PREV and its parents,
//! every one a backup of this same image (device and inode, from their
//! manifests, each parent the one its child recorded by digest).
//! Otherwise the caller falls back to an incremental by content, which is
//! exact against any parent, or refuses.
//!
//! Invariants: the record is written (synced, renamed, directory synced)
//! before the bitmap is cleared, so a crash in between leaves a bitmap
//! with more bits than its record needs, which is safe; a record of
//! another image (copied along with it) is ignored; a missing, unreadable
//! or foreign record proves nothing and never passes the check.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::ancestry::{self, Ancestor};
use crate::manifest::{self, ManifestReader};

/// The largest record read (a few hundred bytes per bitmap).
const MAX_RECORD: u64 = 1 << 20;

/// Where a bitmap's current generation started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Generation {
    /// The identity of the backup it started at (its manifest's id);
    /// `None` when that backup kept no manifest (then nothing can be
    /// linked to it).
    pub backup: Option<String>,
    /// Where that backup was written, for messages.
    pub target: String,
    /// When (seconds since the Unix epoch).
    pub created: u64,
}

/// The record beside an image.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Record {
    /// The image it describes (device, inode).
    image: Option<(u64, u64)>,
    /// Bitmap name to generation.
    bitmaps: BTreeMap<String, Generation>,
}

/// The record's path for `image`.
pub fn record_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".qbackup-bitmaps");
    PathBuf::from(s)
}

/// Why an incremental by bitmap cannot be proven to fit PREV.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// No record says where the bitmap's generation started.
    #[error("no record of the backup dirty bitmap '{bitmap}' started at ({}: {why}); qbackup records it when a backup clears the bitmap", record.display())]
    NoRecord {
        /// The bitmap.
        bitmap: String,
        /// The record looked for.
        record: PathBuf,
        /// Why it gave nothing.
        why: String,
    },
    /// The bitmap started at a backup that kept no manifest.
    #[error("dirty bitmap '{bitmap}' started at the backup {target}, which kept no manifest, so no chain can be tied to it")]
    NoManifest {
        /// The bitmap.
        bitmap: String,
        /// That backup.
        target: String,
    },
    /// The bitmap started at a backup that is not PREV nor a parent of it.
    #[error("dirty bitmap '{bitmap}' was last cleared by the backup {target}, which is not {} nor one of its parents: it does not hold the writes made between them", prev.display())]
    NotAncestor {
        /// The bitmap.
        bitmap: String,
        /// The backup its generation started at.
        target: String,
        /// PREV.
        prev: PathBuf,
    },
    /// A backup of PREV's chain is of another image.
    #[error("{} is a backup of {source_name}, not of this image", backup.display())]
    OtherImage {
        /// The backup of the chain.
        backup: PathBuf,
        /// The source its manifest records.
        source_name: String,
    },
    /// A manifest of PREV's chain could not be read or is not the one
    /// recorded.
    #[error("{why}")]
    Chain {
        /// What is wrong.
        why: String,
    },
}

/// The generation of `bitmap` recorded beside `image`, whose identity is
/// `identity`.
pub fn generation(
    image: &Path,
    identity: (u64, u64),
    bitmap: &str,
) -> Result<Generation, Mismatch> {
    let path = record_path(image);
    let no_record = |why: String| Mismatch::NoRecord {
        bitmap: bitmap.to_string(),
        record: path.clone(),
        why,
    };
    let record = read_record(&path).map_err(no_record)?;
    if record.image != Some(identity) {
        return Err(no_record("it describes another image".to_string()));
    }
    record
        .bitmaps
        .get(bitmap)
        .cloned()
        .ok_or_else(|| no_record(format!("it has no entry for '{bitmap}'")))
}

/// Checks that the generation `generation` of `bitmap` started at PREV or
/// one of its parents, all backups of the image `identity`.
pub fn check_parent(
    prev: &Path,
    bitmap: &str,
    generation: &Generation,
    identity: (u64, u64),
) -> Result<(), Mismatch> {
    let Some(start) = &generation.backup else {
        return Err(Mismatch::NoManifest {
            bitmap: bitmap.to_string(),
            target: generation.target.clone(),
        });
    };
    let chain_err = |why: String| Mismatch::Chain {
        why: format!("cannot check the chain the bitmap belongs to: {why}"),
    };
    let manifest =
        ManifestReader::open(&manifest::path_for(prev)).map_err(|e| chain_err(e.to_string()))?;
    let walk = ancestry::ancestors(prev, &manifest);
    let first = Ancestor {
        backup: prev.to_path_buf(),
        manifest,
    };
    for member in std::iter::once(Ok(first)).chain(walk) {
        let member = member.map_err(|e| chain_err(e.to_string()))?;
        let meta = member.manifest.meta();
        if meta.source_identity != Some(identity) {
            return Err(Mismatch::OtherImage {
                backup: member.backup,
                source_name: meta.source.clone(),
            });
        }
        if &meta.id == start {
            return Ok(());
        }
    }
    Err(Mismatch::NotAncestor {
        bitmap: bitmap.to_string(),
        target: generation.target.clone(),
        prev: prev.to_path_buf(),
    })
}

/// Records that `bitmap`'s new generation starts at `generation`, beside
/// `image` (identity `identity`): written to a temporary file, synced,
/// renamed over the record, directory synced.
pub fn record_start(
    image: &Path,
    identity: (u64, u64),
    bitmap: &str,
    generation: Generation,
) -> std::io::Result<()> {
    let path = record_path(image);
    // A record of another image (or none, or a damaged one) is replaced.
    let mut record = read_record(&path)
        .ok()
        .filter(|r| r.image == Some(identity))
        .unwrap_or_default();
    record.image = Some(identity);
    record.bitmaps.insert(bitmap.to_string(), generation);
    let text = serde_json::to_string_pretty(&record).map_err(std::io::Error::other)? + "\n";
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".qbackup-bitmaps-")
        .tempfile_in(&dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    File::open(&dir)?.sync_all()
}

/// Reads the record at `path`: a regular file (never blocks on a FIFO),
/// of bounded size, valid JSON.
fn read_record(path: &Path) -> Result<Record, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| qbackup_formats::error::io_text(&e).to_string())?;
    let meta = file
        .metadata()
        .map_err(|e| qbackup_formats::error::io_text(&e).to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if meta.len() > MAX_RECORD {
        return Err("too large".to_string());
    }
    let mut text = String::new();
    file.take(MAX_RECORD)
        .read_to_string(&mut text)
        .map_err(|e| qbackup_formats::error::io_text(&e).to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("not a valid record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(id: &str) -> Generation {
        Generation {
            backup: Some(id.to_string()),
            target: format!("{id}.qcow2"),
            created: 1,
        }
    }

    #[test]
    fn records_are_per_image_and_per_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.qcow2");
        let err = super::generation(&image, (1, 2), "a").unwrap_err();
        assert!(matches!(err, Mismatch::NoRecord { .. }), "{err}");
        record_start(&image, (1, 2), "a", generation("x")).unwrap();
        record_start(&image, (1, 2), "b", generation("y")).unwrap();
        assert_eq!(super::generation(&image, (1, 2), "a"), Ok(generation("x")));
        assert_eq!(super::generation(&image, (1, 2), "b"), Ok(generation("y")));
        // Another image (a copy with the record copied along) proves nothing.
        let err = super::generation(&image, (1, 3), "a").unwrap_err();
        assert!(err.to_string().contains("another image"), "{err}");
        // Recording for the other image starts a fresh record.
        record_start(&image, (1, 3), "a", generation("z")).unwrap();
        assert!(super::generation(&image, (1, 3), "b").is_err());
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_fifo_or_garbage_record_proves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.qcow2");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            record_path(&image),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = super::generation(&image, (1, 2), "a").unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_file(record_path(&image)).unwrap();
        std::fs::write(record_path(&image), b"{ not json").unwrap();
        let err = super::generation(&image, (1, 2), "a").unwrap_err();
        assert!(err.to_string().contains("not a valid record"), "{err}");
    }
}
