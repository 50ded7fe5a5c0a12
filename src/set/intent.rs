//! A prune's intent record, `SET/.qbackup-prune.json`: what a
//! consolidation in progress is doing, so that one cut short (`kill -9`,
//! power loss) is finished or undone by the next command that changes the
//! set (a prune, or a backup into it), which says which.
//!
//! Phase `merging`: the merged image and the new manifests are being
//! written under hidden names; nothing visible has changed, so the record
//! means "roll back" (remove them). Phase `made`: all of them are complete
//! and synced; the record means "roll forward" (rename each into place,
//! parents first, then delete the run's other members), every step
//! idempotent. While the renames are half done a child may record either
//! manifest of its parent: the record lists both digests of each
//! ([`pending_pairs`]), and the catalog accepts either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest;

use super::rewrite::{self, hidden_beside};
use super::SetError;

/// The intent record's name in a set.
pub const INTENT_FILE: &str = ".qbackup-prune.json";

/// The intent record of a consolidation in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Intent {
    /// `merging` (roll back) or `made` (roll forward).
    pub phase: String,
    /// The run's top: the file the merged image replaces.
    pub top: PathBuf,
    /// The merged image under its hidden name.
    pub hidden: PathBuf,
    /// Every manifest replaced (the top's, then those above it, parents
    /// first), with its digest before and after: while the new ones are
    /// renamed into place, a child may record either of its parent's.
    pub links: Vec<Link>,
    /// The run's other members, deleted last.
    pub delete: Vec<PathBuf>,
}

/// One manifest a consolidation replaces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Link {
    /// The backup image whose manifest it is.
    pub image: PathBuf,
    /// The new manifest, written beside it under a hidden name.
    pub staged: PathBuf,
    /// Its manifest's digest before.
    pub old: String,
    /// And after.
    pub new: String,
}

/// The pending consolidation's digest pairs (old → new and new → old)
/// when its record is `made`: a child recording one of a pair while its
/// parent has the other is the same parent, mid-rename.
pub fn pending_pairs(set: &Path) -> HashMap<String, String> {
    let Some(intent) = std::fs::read(set.join(INTENT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Intent>(&b).ok())
    else {
        return HashMap::new();
    };
    if intent.phase != "made" {
        return HashMap::new();
    }
    let mut pairs = HashMap::new();
    for l in intent.links {
        pairs.insert(l.old.clone(), l.new.clone());
        pairs.insert(l.new, l.old);
    }
    pairs
}

/// What happened to an interrupted prune.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Nothing was pending.
    Nothing,
    /// A consolidation that had not finished its image was undone.
    RolledBack(PathBuf),
    /// A consolidation whose image was complete was finished.
    Finished(PathBuf),
}

/// Writes `intent` to the set (synced, renamed into place).
pub(super) fn write_intent(set: &Path, intent: &Intent) -> Result<(), SetError> {
    let path = set.join(INTENT_FILE);
    let tmp = hidden_beside(&path, "tmp");
    let text = serde_json::to_vec_pretty(intent).expect("intent serialises");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &text)?;
        std::fs::File::open(&tmp)?.sync_all()
    };
    write().map_err(|source| SetError::File {
        path: tmp.clone(),
        action: "write the prune's intent record",
        source,
    })?;
    rewrite::rename(&tmp, &path)
}

/// Removes a file if present.
pub(super) fn remove(path: &Path) -> Result<(), SetError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SetError::File {
            path: path.to_path_buf(),
            action: "remove",
            source,
        }),
    }
}

/// Deletes a backup: its image, then its manifest.
pub(super) fn delete_backup(image: &Path) -> Result<(), SetError> {
    remove(image)?;
    rewrite::sync_dir(image);
    remove(&manifest::path_for(image))?;
    rewrite::sync_dir(image);
    Ok(())
}

/// Finishes or undoes the consolidation an interrupted prune left (its
/// intent record), if any.
pub fn recover(set: &Path) -> Result<Recovered, SetError> {
    let path = set.join(INTENT_FILE);
    let intent: Intent = match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(i) => i,
            // Written by rename: a record that does not parse was never
            // complete, so nothing acted on it.
            Err(_) => {
                remove(&path)?;
                return Ok(Recovered::Nothing);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::Nothing),
        Err(source) => {
            return Err(SetError::File {
                path,
                action: "read the prune's intent record",
                source,
            })
        }
    };
    let outcome = if intent.phase == "made" {
        finish(&intent)?;
        Recovered::Finished(intent.top.clone())
    } else {
        remove(&intent.hidden)?;
        remove(&manifest::path_for(&intent.hidden))?;
        for l in &intent.links {
            remove(&l.staged)?;
        }
        if let Some(dir) = intent.hidden.parent() {
            crate::backup::destination::temp::remove_stale(dir);
        }
        Recovered::RolledBack(intent.top.clone())
    };
    remove(&path)?;
    rewrite::sync_dir(&path);
    Ok(outcome)
}

/// The roll-forward steps of a made consolidation (each idempotent): the
/// merged image, then each new manifest (parents first) into place, then
/// the run's other members deleted.
pub(super) fn finish(intent: &Intent) -> Result<(), SetError> {
    if intent.hidden.exists() {
        rewrite::rename(&intent.hidden, &intent.top)?;
    }
    for l in &intent.links {
        if l.staged.exists() {
            rewrite::rename(&l.staged, &manifest::path_for(&l.image))?;
        }
    }
    for p in &intent.delete {
        delete_backup(p)?;
    }
    Ok(())
}
