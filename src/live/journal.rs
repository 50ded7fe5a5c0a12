//! The cycle journal: `SET/.qbackup-live.json`, what a live backup cycle
//! added to QEMU and which files it is writing, so that a run killed at
//! any step is repaired by the next one.
//!
//! It is written (synced, renamed, directory synced) before the first
//! change to QEMU and rewritten once every disk's backup is durable
//! ([`State::Committed`]); it is removed only after QEMU is back to its
//! recording bitmaps alone. So: no journal means QEMU holds nothing of
//! ours; a `Prepared` journal means roll back (merge the frozen bitmaps
//! back, remove this cycle's backups); a `Committed` one means roll
//! forward (drop the frozen bitmaps). Either way every node, job, export
//! and server it names is removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The journal's file name in the set.
pub const FILE: &str = ".qbackup-live.json";

/// Where a cycle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// QEMU may hold this cycle's nodes and bitmaps; its backups are not
    /// all durable.
    Prepared,
    /// Every disk's backup is durable: only clean-up is left.
    Committed,
}

/// One disk's part of a cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// The disk's name in the set.
    pub name: String,
    /// The node frozen.
    pub node: String,
    /// The bitmap this cycle adds (recording from the freeze on).
    pub new_bitmap: String,
    /// The bitmap this cycle freezes (disables) and exports, if any: on
    /// failure the new one is merged back into it and it records again.
    pub frozen_bitmap: Option<String>,
    /// This cycle's backup file.
    pub target: PathBuf,
    /// The fleecing image file.
    pub fleece: PathBuf,
    /// QEMU names: fleecing node, backup job (and its filter), snapshot
    /// access node, export id.
    pub fleece_node: String,
    /// The sync=none backup job.
    pub job: String,
    /// Its copy-before-write filter node.
    pub filter: String,
    /// The snapshot-access node exported.
    pub access_node: String,
    /// The export's id.
    pub export: String,
}

/// A cycle's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Where the cycle is.
    pub state: State,
    /// The run's token: every QEMU name it adds starts `qbackup-TOKEN-`.
    pub token: String,
    /// The private directory of the NBD socket.
    pub socket_dir: PathBuf,
    /// Whether this cycle started QEMU's NBD server (then it stops it).
    pub server: bool,
    /// The disks.
    pub disks: Vec<DiskEntry>,
}

/// A journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, writing or syncing failed.
    #[error("{}: cannot {action} the live backup journal: {}", path.display(), qbackup_formats::error::io_text(source))]
    Io {
        /// The journal.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a journal this version wrote.
    #[error("{}: damaged live backup journal ({why}); QEMU may hold nodes named qbackup-*: remove them over QMP, then delete this file", path.display())]
    Damaged {
        /// The journal.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl qbackup_formats::Classify for JournalError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        match self {
            JournalError::Io { source, .. } => qbackup_formats::ErrorClass::of_io(source),
            JournalError::Damaged { .. } => qbackup_formats::ErrorClass::Corrupt,
        }
    }
}

/// The journal's path in `set`.
pub fn path(set: &Path) -> PathBuf {
    set.join(FILE)
}

/// The journal in `set`, if a cycle left one.
pub fn read(set: &Path) -> Result<Option<Journal>, JournalError> {
    let path = path(set);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JournalError::Io {
                path,
                action: "read",
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| JournalError::Damaged {
            path,
            why: e.to_string(),
        })
}

/// Writes `journal` durably (temporary file, sync, rename, directory
/// sync): a crash leaves the old journal or the new one, whole.
pub fn write(set: &Path, journal: &Journal) -> Result<(), JournalError> {
    let path = path(set);
    let io = |action, source| JournalError::Io {
        path: path.clone(),
        action,
        source,
    };
    let tmp = set.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
    let text = serde_json::to_string_pretty(journal).expect("a journal serialises");
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    sync_dir(set).map_err(|e| io("sync the directory of", e))
}

/// Removes the journal durably (the cycle is over).
pub fn remove(set: &Path) -> Result<(), JournalError> {
    let path = path(set);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(JournalError::Io {
                path,
                action: "remove",
                source,
            })
        }
    }
    sync_dir(set).map_err(|source| JournalError::Io {
        path,
        action: "sync the directory of",
        source,
    })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let j = Journal {
            state: State::Prepared,
            token: "0011aabb".into(),
            socket_dir: dir.path().join("s"),
            server: true,
            disks: vec![DiskEntry {
                name: "vda".into(),
                node: "d0".into(),
                new_bitmap: "qbackup-b".into(),
                frozen_bitmap: Some("qbackup-a".into()),
                target: dir.path().join("vda/x.qcow2"),
                fleece: dir.path().join("f"),
                fleece_node: "qbackup-0011aabb-fl0".into(),
                job: "qbackup-0011aabb-job0".into(),
                filter: "qbackup-0011aabb-cbw0".into(),
                access_node: "qbackup-0011aabb-sa0".into(),
                export: "qbackup-0011aabb-e0".into(),
            }],
        };
        write(dir.path(), &j).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(j));
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        std::fs::write(path(dir.path()), "{").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(JournalError::Damaged { .. })
        ));
    }
}
