//! Every backup of a set, with its place in its chain and the damage that
//! concerns it: what `list` shows, what `verify DIR`, `restore` and
//! `prune` walk.
//!
//! Built from the manifests each time (they are the truth): a child's
//! parent is the file its manifest's backing name resolves to, and it must
//! be the very one the child was made on (the parent's manifest digest is
//! the one the child recorded). Damage is named with every backup it
//! affects: a missing parent, a parent whose manifest is not the recorded
//! one (swapped or edited), a manifest that does not read (truncated,
//! edited, missing) affect the backup and all its descendants.
//!
//! The last verify result of each backup is kept in
//! `SET/.qbackup-verify.json` (id → result and time), written by
//! `verify DIR`; a record for an id no manifest has is ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use qbackup_formats::open::resolve_backing;

use crate::manifest::{self, ManifestError, ManifestReader, Meta};

use super::layout::{DiskDir, SetError};

/// The file keeping the last verify result of each backup.
pub const VERIFY_FILE: &str = ".qbackup-verify.json";

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// All of the disk.
    Full,
    /// What the source's dirty bitmap marked.
    IncrementalBitmap,
    /// What differed from its parent's manifest.
    IncrementalContent,
    /// The top layer of a chain (`--sync top`).
    Top,
    /// Several pruned backups merged into one (a prune).
    Consolidated,
    /// The manifest does not read.
    Unknown,
}

impl Kind {
    /// The kind a manifest's `sync` names.
    pub fn of(meta: &Meta) -> Kind {
        match meta.sync.as_str() {
            "full" => Kind::Full,
            "incremental" => Kind::IncrementalBitmap,
            "incremental-by-content" => Kind::IncrementalContent,
            "top" => Kind::Top,
            s if s.starts_with("consolidated") => Kind::Consolidated,
            _ => Kind::Unknown,
        }
    }

    /// The words `list` shows.
    pub fn text(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::IncrementalBitmap => "incremental (bitmap)",
            Kind::IncrementalContent => "incremental (by content)",
            Kind::Top => "top",
            Kind::Consolidated => "consolidated",
            Kind::Unknown => "unknown",
        }
    }
}

/// A recorded verify result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    /// "ok" or "damaged".
    pub result: String,
    /// When (seconds since the epoch).
    pub time: u64,
}

/// One backup of the set.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The disk's name.
    pub disk: String,
    /// The image.
    pub path: PathBuf,
    /// Its id (the manifest's; the first 8 hex digits of the file name
    /// when the manifest does not read).
    pub id: String,
    /// Its manifest's metadata (`None`: it does not read).
    pub meta: Option<Meta>,
    /// Its manifest's BLAKE3.
    pub digest: Option<String>,
    /// What it holds.
    pub kind: Kind,
    /// The index (in [`Catalog::backups`]) of its parent, when that is a
    /// backup of the set it was made on.
    pub parent: Option<usize>,
    /// Images in its chain (a full: 1); `None` when the chain is broken.
    pub depth: Option<usize>,
    /// The image file's size.
    pub bytes_stored: u64,
    /// What is wrong with it or its chain (empty: nothing known).
    pub problems: Vec<String>,
    /// The last `verify DIR` result, if recorded.
    pub last_verify: Option<VerifyRecord>,
    /// An image without a manifest that no backup is made on: the
    /// leftover of a backup killed between publishing its image and its
    /// manifest (listed as damage; `prune` deletes it).
    pub incomplete: bool,
}

impl Backup {
    /// When it was made (seconds since the epoch; 0 when unknown).
    pub fn created(&self) -> u64 {
        self.meta.as_ref().map_or(0, |m| m.created)
    }

    /// True when it and its whole chain are intact as far as the
    /// manifests tell.
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Every backup of a set, per disk oldest first.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The set.
    pub set: PathBuf,
    /// The backups: by disk name, then oldest first.
    pub backups: Vec<Backup>,
}

impl Catalog {
    /// The backups of disk `disk`, oldest first.
    pub fn of_disk<'a>(&'a self, disk: &'a str) -> impl Iterator<Item = (usize, &'a Backup)> {
        self.backups
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.disk == disk)
    }

    /// The disks, by name.
    pub fn disks(&self) -> Vec<String> {
        let mut d: Vec<String> = self.backups.iter().map(|b| b.disk.clone()).collect();
        d.dedup();
        d
    }

    /// The chain of backup `i`: itself, then its parents (as far as they
    /// are known).
    pub fn chain(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut at = i;
        while let Some(p) = self.backups[at].parent {
            if out.contains(&p) {
                break;
            }
            out.push(p);
            at = p;
        }
        out
    }

    /// The children of backup `i`.
    pub fn children(&self, i: usize) -> Vec<usize> {
        (0..self.backups.len())
            .filter(|&c| self.backups[c].parent == Some(i))
            .collect()
    }

    /// Every problem, each once, with the backups it affects.
    pub fn damage(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for b in &self.backups {
            for p in &b.problems {
                if !seen.contains(p) {
                    seen.push(p.clone());
                }
            }
        }
        seen.into_iter()
            .map(|p| {
                let ids: Vec<&str> = self
                    .backups
                    .iter()
                    .filter(|b| b.problems.contains(&p))
                    .map(|b| b.id.as_str())
                    .collect();
                format!("{p} (affects {})", ids.join(", "))
            })
            .collect()
    }
}

/// The id part of a set file name (`TIME-ID.qcow2` → `ID`).
fn id_of_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    stem.rsplit('-').next().unwrap_or_default().to_string()
}

/// Reads the set at `set`.
pub fn read(set: &Path) -> Result<Catalog, SetError> {
    if !set.is_dir() {
        return Err(SetError::NotFound {
            set: set.to_path_buf(),
            why: "not a backup set (no such directory)".into(),
        });
    }
    let verified = read_verify_records(set);
    let pairs = super::intent::pending_pairs(set);
    let mut backups = Vec::new();
    for disk in DiskDir::all(set)? {
        let (entries, damaged) = disk.scan()?;
        let start = backups.len();
        for e in entries {
            let bytes_stored = std::fs::metadata(&e.path).map_or(0, |m| m.len());
            let last_verify = verified.get(&e.meta.id).cloned();
            backups.push(Backup {
                disk: disk.name().to_string(),
                id: e.meta.id.clone(),
                kind: Kind::of(&e.meta),
                meta: Some(e.meta),
                digest: Some(e.digest),
                path: e.path,
                parent: None,
                depth: None,
                bytes_stored,
                problems: vec![],
                last_verify,
                incomplete: false,
            });
        }
        for d in damaged {
            let missing = matches!(&d.error, ManifestError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
            backups.push(Backup {
                disk: disk.name().to_string(),
                id: id_of_name(&d.path),
                meta: None,
                digest: None,
                kind: Kind::Unknown,
                bytes_stored: std::fs::metadata(&d.path).map_or(0, |m| m.len()),
                problems: vec![format!(
                    "{}: its manifest does not read: {}",
                    d.path.display(),
                    d.error
                )],
                path: d.path,
                parent: None,
                depth: None,
                last_verify: None,
                incomplete: missing,
            });
        }
        link(&mut backups[start..], start, &pairs);
    }
    Ok(Catalog {
        set: set.to_path_buf(),
        backups,
    })
}

/// Finds each backup's parent among `disk` (whose first index in the
/// catalog is `base`), records the damage, and spreads it to descendants.
fn link(disk: &mut [Backup], base: usize, pairs: &HashMap<String, String>) {
    let by_path: HashMap<PathBuf, usize> = disk
        .iter()
        .enumerate()
        .map(|(i, b)| (b.path.clone(), i))
        .collect();
    let mut parent_local: Vec<Option<usize>> = vec![None; disk.len()];
    for i in 0..disk.len() {
        let Some(meta) = disk[i].meta.clone() else {
            continue;
        };
        let Some(name) = &meta.backing else {
            continue;
        };
        let ppath = resolve_backing(&disk[i].path, name);
        let problem = match by_path.get(&ppath) {
            Some(&p) => match (&disk[p].digest, &meta.backing_manifest) {
                // Or mid-rename of a consolidation: the same parent.
                (Some(d), Some(want)) if d == want || pairs.get(want) == Some(d) => {
                    parent_local[i] = Some(p);
                    None
                }
                // The parent's own problem is spread below.
                (None, _) => {
                    parent_local[i] = Some(p);
                    None
                }
                (Some(_), None) => Some(format!(
                    "{}: made on a parent without a manifest",
                    disk[i].path.display()
                )),
                (Some(_), Some(_)) => Some(format!(
                    "{}: not the backup {} was made on (its manifest differs from the one recorded: swapped or edited)",
                    ppath.display(),
                    disk[i].path.display()
                )),
            },
            None if ppath.exists() => outside_parent(&ppath, &meta, &disk[i].path),
            None => Some(format!(
                "{}: missing (the parent of {})",
                ppath.display(),
                disk[i].path.display()
            )),
        };
        if let Some(p) = problem {
            disk[i].problems.push(p);
        }
    }
    // Depth and inherited damage, parents first (memoised walk).
    let mut done = vec![false; disk.len()];
    for i in 0..disk.len() {
        settle(disk, &parent_local, &mut done, i, 0);
    }
    for (b, p) in disk.iter_mut().zip(&parent_local) {
        b.parent = p.map(|p| p + base);
    }
    // A manifest-less image something is made on is damage, not a leftover.
    for p in parent_local.iter().flatten() {
        disk[*p].incomplete = false;
    }
}

/// Computes backup `i`'s depth and inherited problems after its parent's.
fn settle(
    disk: &mut [Backup],
    parent: &[Option<usize>],
    done: &mut [bool],
    i: usize,
    guard: usize,
) {
    if done[i] || guard > disk.len() {
        return;
    }
    done[i] = true;
    let has_backing = disk[i].meta.as_ref().is_some_and(|m| m.backing.is_some());
    match parent[i] {
        Some(p) => {
            settle(disk, parent, done, p, guard + 1);
            let inherited = disk[p].problems.clone();
            for q in inherited {
                if !disk[i].problems.contains(&q) {
                    disk[i].problems.push(q);
                }
            }
            disk[i].depth = match (disk[p].depth, disk[i].meta.is_some()) {
                (Some(d), true) if disk[i].problems.is_empty() => Some(d + 1),
                _ => None,
            };
        }
        None if disk[i].meta.is_some() && disk[i].problems.is_empty() => {
            disk[i].depth = if has_backing { None } else { Some(1) };
        }
        None => disk[i].depth = None,
    }
}

/// A parent outside the disk's directory: accepted when its manifest is
/// the recorded one.
fn outside_parent(ppath: &Path, meta: &Meta, child: &Path) -> Option<String> {
    match ManifestReader::open(&manifest::path_for(ppath)) {
        Ok(m) if Some(m.digest()) == meta.backing_manifest.as_deref() => None,
        Ok(_) => Some(format!(
            "{}: not the backup {} was made on (its manifest differs from the one recorded: swapped or edited)",
            ppath.display(),
            child.display()
        )),
        Err(e) => Some(format!(
            "{}: its manifest does not read: {e}",
            ppath.display()
        )),
    }
}

/// The recorded verify results (none when the file is missing or does not
/// read: it is only a record).
pub fn read_verify_records(set: &Path) -> BTreeMap<String, VerifyRecord> {
    std::fs::read(set.join(VERIFY_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Forgets the verify results of `ids` (a consolidated image took over
/// one's id: its old result is not the new file's).
pub fn forget_verify(set: &Path, ids: &[String]) -> Result<(), SetError> {
    let all = read_verify_records(set);
    if !ids.iter().any(|id| all.contains_key(id)) {
        return Ok(());
    }
    write_verify_records(
        set,
        all.into_iter()
            .filter(|(id, _)| !ids.contains(id))
            .collect(),
    )
}

/// Records verify results (merged into those recorded; written to a
/// temporary file and renamed, so a crash leaves the old or the new).
pub fn record_verify(set: &Path, results: &[(String, VerifyRecord)]) -> Result<(), SetError> {
    let mut all = read_verify_records(set);
    for (id, r) in results {
        all.insert(id.clone(), r.clone());
    }
    write_verify_records(set, all)
}

/// Writes the verify records (a temporary file renamed into place).
fn write_verify_records(set: &Path, all: BTreeMap<String, VerifyRecord>) -> Result<(), SetError> {
    let path = set.join(VERIFY_FILE);
    // Verifies share the set: each writes its own temporary file.
    let tmp = set.join(format!("{VERIFY_FILE}.{}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(&all).expect("records serialise");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        SetError::File {
            path,
            action: "record the verify results",
            source,
        }
    })
}
