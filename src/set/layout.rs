//! Where a set keeps each disk's backups: `SET/DISK/TIME-ID.qcow2` with
//! its manifest beside it (`TIME-ID.qcow2.manifest`).
//!
//! TIME is the backup's start in UTC (`20261202T163000Z`), so a directory
//! listing sorts by time; ID is the first 8 hex digits of the backup's
//! identity (its manifest's `id`), so two backups in one second never
//! collide and `list`/`restore --at` can name a file by id. DISK is the
//! disk's name (a device id, a node name or an image's stem) reduced to
//! `[A-Za-z0-9._-]`, so it is always one path component.
//!
//! Invariants: a backup is listed only once its manifest reads (a file
//! without one is a leftover or damage, reported, never a parent); the
//! incremental backups of a disk name their parent by a relative backing
//! name (same directory), so a set can be moved as a whole.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::manifest::{self, ManifestError, ManifestReader, Meta};

/// Errors reading or making a set's directories.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// A directory of the set could not be read or made.
    #[error("{}: cannot {action}: {}", path.display(), qbackup_formats::error::io_text(source))]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The set's lock file could not be opened or locked.
    #[error("{}: cannot lock the backup set: {}", path.display(), qbackup_formats::error::io_text(source))]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the set.
    #[error("{}: another qbackup process is using this backup set (pass --wait to wait for it)", set.display())]
    Busy {
        /// The set.
        set: PathBuf,
    },
    /// A file of the set could not be read, written, renamed or removed.
    #[error("{}: cannot {action}: {}", path.display(), qbackup_formats::error::io_text(source))]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// No backup matches what was asked for.
    #[error("{}: {why}", set.display())]
    NotFound {
        /// The set.
        set: PathBuf,
        /// What is missing.
        why: String,
    },
    /// A manifest could not be read or rewritten.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Consolidating backups failed.
    #[error("cannot consolidate backups into {}: {source}", target.display())]
    Consolidate {
        /// The consolidated image being made.
        target: PathBuf,
        /// Why.
        source: Box<crate::backup::BackupError>,
    },
    /// A consolidation's backup request was refused (a bug).
    #[error("cannot consolidate backups into {}: {why}", target.display())]
    Request {
        /// The consolidated image being made.
        target: PathBuf,
        /// Why.
        why: String,
    },
    /// Not enough free space for a prune.
    #[error("{}: a prune needs up to {needed} bytes free for the consolidated images, {free} are free", set.display())]
    NoSpace {
        /// The set.
        set: PathBuf,
        /// Bytes needed at most.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// The set's chains are damaged where the command needs them.
    #[error("{}: {why}", set.display())]
    Damaged {
        /// The set.
        set: PathBuf,
        /// The damage and the backups it affects.
        why: String,
    },
}

impl qbackup_formats::Classify for SetError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        match self {
            SetError::Dir { source, .. }
            | SetError::Lock { source, .. }
            | SetError::File { source, .. } => qbackup_formats::ErrorClass::of_io(source),
            SetError::Busy { .. } => qbackup_formats::ErrorClass::Io,
            SetError::NotFound { .. } => qbackup_formats::ErrorClass::Usage,
            SetError::Damaged { .. } => qbackup_formats::ErrorClass::Corrupt,
            SetError::Manifest(e) => e.class(),
            SetError::Consolidate { source, .. } => source.class(),
            SetError::NoSpace { .. } => qbackup_formats::ErrorClass::Io,
            SetError::Request { .. } => qbackup_formats::ErrorClass::Internal,
        }
    }
}

/// One backup found in a disk's directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The backup image.
    pub path: PathBuf,
    /// Its manifest's metadata.
    pub meta: Meta,
    /// The BLAKE3 (hex) of its manifest.
    pub digest: String,
    /// When its manifest was last written (nanoseconds since the epoch):
    /// orders backups made in the same second (a manifest is written
    /// after its parent's was).
    pub written: u128,
}

/// A file in a disk's directory that looks like a backup but cannot be
/// used as one.
#[derive(Debug)]
pub struct Damaged {
    /// The backup image.
    pub path: PathBuf,
    /// Why its manifest cannot be read.
    pub error: ManifestError,
}

/// One disk's directory in a set.
#[derive(Debug, Clone)]
pub struct DiskDir {
    path: PathBuf,
    name: String,
}

impl DiskDir {
    /// The directory of the disk named `disk` in the set `set` (not
    /// created: see [`create`](Self::create)).
    pub fn new(set: &Path, disk: &str) -> DiskDir {
        let name = component(disk);
        DiskDir {
            path: set.join(&name),
            name,
        }
    }

    /// The disk's name as a path component.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the directory (and the set's) if missing.
    pub fn create(&self) -> Result<(), SetError> {
        std::fs::create_dir_all(&self.path).map_err(|source| SetError::Dir {
            path: self.path.clone(),
            action: "create the directory",
            source,
        })
    }

    /// The path of a new backup started at `at` with identity `id`.
    pub fn backup_path(&self, at: SystemTime, id: &str) -> PathBuf {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let short: String = id.chars().take(8).collect();
        self.path.join(format!("{}-{short}.qcow2", utc_stamp(secs)))
    }

    /// Every backup of the disk, oldest first (by the manifest's time,
    /// then by depth in its chain, so that backups made within one second
    /// keep their order), and the files that look like backups but whose
    /// manifest does not read. A missing directory has none.
    pub fn scan(&self) -> Result<(Vec<Entry>, Vec<Damaged>), SetError> {
        let read = match std::fs::read_dir(&self.path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], vec![])),
            Err(source) => {
                return Err(SetError::Dir {
                    path: self.path.clone(),
                    action: "list the directory",
                    source,
                })
            }
        };
        let mut found = Vec::new();
        let mut damaged = Vec::new();
        for item in read {
            let item = item.map_err(|source| SetError::Dir {
                path: self.path.clone(),
                action: "list the directory",
                source,
            })?;
            let path = item.path();
            let name = item.file_name();
            let name = name.to_string_lossy();
            if !name.ends_with(".qcow2") || name.starts_with('.') {
                continue;
            }
            match ManifestReader::open(&manifest::path_for(&path)) {
                Ok(m) => found.push(Entry {
                    meta: m.meta().clone(),
                    digest: m.digest().to_string(),
                    written: written_ns(&manifest::path_for(&path)),
                    path,
                }),
                Err(error) => damaged.push(Damaged { path, error }),
            }
        }
        found.sort_by(|a, b| {
            (a.meta.created, a.written, &a.path).cmp(&(b.meta.created, b.written, &b.path))
        });
        parents_first(&mut found);
        damaged.sort_by(|a, b| a.path.cmp(&b.path));
        Ok((found, damaged))
    }

    /// The disks of the set `set` (its subdirectories not starting with
    /// `.`), by name. A missing set has none.
    pub fn all(set: &Path) -> Result<Vec<DiskDir>, SetError> {
        let read = match std::fs::read_dir(set) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(SetError::Dir {
                    path: set.to_path_buf(),
                    action: "list the directory",
                    source,
                })
            }
        };
        let mut disks = Vec::new();
        for item in read {
            let item = item.map_err(|source| SetError::Dir {
                path: set.to_path_buf(),
                action: "list the directory",
                source,
            })?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !item.path().is_dir() {
                continue;
            }
            disks.push(DiskDir {
                path: item.path(),
                name,
            });
        }
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(disks)
    }

    /// The newest backup of the disk, if any.
    pub fn latest(&self) -> Result<Option<Entry>, SetError> {
        Ok(self.scan()?.0.pop())
    }
}

/// Moves each backup's parent before it where the time order put it
/// after (backups made in one clock tick; manifests rewritten by a prune).
fn parents_first(entries: &mut Vec<Entry>) {
    let parent_of = |e: &Entry| {
        e.meta
            .backing
            .as_deref()
            .map(|b| qbackup_formats::open::resolve_backing(&e.path, b))
    };
    let mut moves = 0;
    let limit = entries.len() * entries.len();
    let mut i = 0;
    while i < entries.len() {
        let parent = parent_of(&entries[i]);
        let later = parent.and_then(|p| (i + 1..entries.len()).find(|&j| entries[j].path == p));
        match later {
            Some(j) if moves < limit => {
                let e = entries.remove(j);
                entries.insert(i, e);
                moves += 1;
            }
            _ => i += 1,
        }
    }
}

/// The modification time of `path` in nanoseconds since the epoch (0
/// when unknown).
fn written_ns(path: &Path) -> u128 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// `name` reduced to one safe path component: characters outside
/// `[A-Za-z0-9._-]` become `_`, and a name that would be empty, `.` or
/// `..` or hidden gets a `disk` prefix.
pub fn component(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert_str(0, "disk");
    }
    s
}

/// `secs` since the epoch as `YYYYMMDDTHHMMSSZ` (UTC, proleptic
/// Gregorian; Howard Hinnant's days-to-civil algorithm).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // date -u -d @1796228400 +%Y%m%dT%H%M%SZ
        assert_eq!(utc_stamp(1_796_228_400), "20261202T162000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn names_are_one_component() {
        assert_eq!(component("vda"), "vda");
        assert_eq!(component("../x/y"), "disk.._x_y");
        assert_eq!(component(""), "disk");
        assert_eq!(component("#block123"), "_block123");
    }

    #[test]
    fn backup_paths_sort_by_time() {
        let d = DiskDir::new(Path::new("/set"), "vda");
        let a = d.backup_path(
            UNIX_EPOCH + std::time::Duration::from_secs(100),
            "ffff0000aaaa",
        );
        let b = d.backup_path(
            UNIX_EPOCH + std::time::Duration::from_secs(200),
            "00000000bbbb",
        );
        assert!(a < b);
        assert_eq!(a, Path::new("/set/vda/19700101T000140Z-ffff0000.qcow2"));
    }

    #[test]
    fn a_missing_directory_has_no_backups() {
        let d = DiskDir::new(Path::new("/nonexistent-qbackup-set"), "vda");
        assert!(d.latest().unwrap().is_none());
    }
}
