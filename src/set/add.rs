//! Adding a backup to a set: which file, which parent, which sync mode.
//!
//! `--sync auto` (the set's default) takes a full backup when the disk has
//! none yet, else an incremental one on the newest: by the source's dirty
//! bitmap when one is named (the backup's lineage checks decide whether it
//! can be used, falling back to by content), else by content against the
//! newest backup's manifest. The new file is named by its start time and a
//! backup id chosen here ([`crate::manifest::new_id`]) and passed to the
//! backup as its identity, so the name and the manifest agree.
//!
//! The caller holds the set's exclusive lock ([`super::lock`]) from
//! [`plan`] until the backup is published, so the newest backup cannot
//! change in between. The QMP orchestrator registers its backups the same
//! way: `plan`, then a request from [`AddPlan::request`] (or its own
//! writer, with `plan.target`, `plan.id` and `plan.parent`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::backup::{BackupRequest, SyncMode};
use crate::manifest;

use super::layout::{DiskDir, Entry, SetError};

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddSync {
    /// Full when the disk has no backup, else incremental on the newest.
    Auto,
    /// Always a full backup (a new chain).
    Full,
    /// Always incremental on the newest backup (refused when there is none).
    Incremental,
}

/// Where and how a new backup goes into a set.
#[derive(Debug, Clone)]
pub struct AddPlan {
    /// The disk's directory.
    pub disk: DiskDir,
    /// The new backup's file.
    pub target: PathBuf,
    /// Its identity (32 hex digits), to pass as the request's `id`.
    pub id: String,
    /// Full or incremental.
    pub sync: SyncMode,
    /// The backup it is an overlay on (incremental), the disk's newest.
    pub parent: Option<Entry>,
    /// What was done first about a prune cut short (to tell the user).
    pub recovered: super::prune::Recovered,
}

/// The disk name of a source when none is given: its file stem
/// (`vm.qcow2` → `vm`).
pub fn disk_name_of(source: &Path) -> String {
    source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Plans a new backup of disk `disk` in the set `set`, started `now`:
/// finishes an interrupted prune ([`super::prune::recover`]), makes the
/// disk's directory, picks the mode, the parent and the name.
/// Damaged files in the disk's directory are never parents.
pub fn plan(set: &Path, disk: &str, sync: AddSync, now: SystemTime) -> Result<AddPlan, SetError> {
    // A prune cut short is finished (or undone) first: the new backup must
    // record its parent's final manifest.
    let recovered = super::prune::recover(set)?;
    let dir = DiskDir::new(set, disk);
    dir.create()?;
    let latest = dir.latest()?;
    let (sync, parent) = match (sync, latest) {
        (AddSync::Full, _) | (AddSync::Auto, None) => (SyncMode::Full, None),
        (AddSync::Auto | AddSync::Incremental, Some(p)) => (SyncMode::Incremental, Some(p)),
        (AddSync::Incremental, None) => {
            return Err(SetError::NotFound {
                set: set.to_path_buf(),
                why: format!(
                    "disk {} has no backup yet for an incremental one to build on (use --sync auto or full)",
                    dir.name()
                ),
            })
        }
    };
    let id = manifest::new_id().map_err(|source| SetError::File {
        path: PathBuf::from("/dev/urandom"),
        action: "read a random backup id",
        source,
    })?;
    let target = dir.backup_path(now, &id);
    Ok(AddPlan {
        disk: dir,
        target,
        id,
        sync,
        parent,
        recovered,
    })
}

impl AddPlan {
    /// The backup request for `source`: target, identity, sync mode and
    /// previous backup set; the caller adds its other options.
    pub fn request(&self, source: impl Into<PathBuf>) -> BackupRequest {
        BackupRequest::new(source, &self.target)
            .id(self.id.clone())
            .sync(self.sync)
            .backing(self.parent.as_ref().map(|p| p.path.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_backup_is_full_and_named_by_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_228_400);
        let p = plan(dir.path(), "vm", AddSync::Auto, now).unwrap();
        assert_eq!(p.sync, SyncMode::Full);
        assert!(p.parent.is_none());
        assert_eq!(p.id.len(), 32);
        let name = p.target.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("20261202T162000Z-{}.qcow2", &p.id[..8]));
        assert!(dir.path().join("vm").is_dir());
        let cfg = p.request("src.qcow2").validate().unwrap();
        assert_eq!(cfg.id.as_deref(), Some(p.id.as_str()));
        assert!(cfg.backing.is_none());
        let e = plan(dir.path(), "vm", AddSync::Incremental, now).unwrap_err();
        assert!(e.to_string().contains("no backup yet"), "{e}");
    }

    #[test]
    fn disk_names_are_stems() {
        assert_eq!(disk_name_of(Path::new("/a/vm1.qcow2")), "vm1");
        assert_eq!(disk_name_of(Path::new("disk")), "disk");
    }
}
