//! `prune`: apply a retention policy ([`retention`]) to every disk of a
//! set, keep every kept backup restorable, and free the rest.
//!
//! A pruned backup with no kept descendant is deleted (newest first, the
//! image before its manifest, so a crash never leaves a kept child without
//! its parent). A single pruned backup under a kept one stays, its parent
//! ("held"). A run of two or more pruned backups under a kept one is
//! **consolidated**: one new image holding what the run's top read as
//! (made by the backup itself: an incremental by content onto the nearest
//! kept ancestor, or a full when there is none; compressed clusters are
//! passed through, never recompressed), which takes over the top's file
//! name, id and time, with kind `consolidated`. The kept child's header is
//! therefore never edited (its backing name still resolves); only the
//! manifests above it are rewritten to record their new parent's digest.
//! The run's other members are then deleted.
//!
//! Crash safety: each consolidation first writes an intent record
//! ([`super::intent`]) and stages every new file under a hidden name
//! before renaming any; the next prune (or backup into the set) rolls it
//! back or forward, and says so. At every point every kept backup reads
//! the same guest data (the consolidated image reads as the top it
//! replaces).
//!
//! Space: a consolidated image is at most the size of the run it merges,
//! so a prune needs at most the largest run's bytes free (checked first).
//! A damaged disk (see [`catalog`]) is refused before anything is done.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use qbackup_formats::open::Opener;

use crate::backup::{self, BackupRequest, Cancel, SyncMode};
use crate::manifest;

use super::catalog::{self, Catalog, Kind};
use super::intent::{delete_backup, finish, remove, write_intent};
pub use super::intent::{pending_pairs, recover, Intent, Link, Recovered, INTENT_FILE};
use super::retention::{self, Policy};
use super::rewrite::{self, hidden_beside};
use super::SetError;

/// One consolidation: the pruned run under a kept backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The run, top (newest) first; the top's file becomes the merged image.
    pub run: Vec<usize>,
    /// The nearest kept ancestor the merged image is an overlay on.
    pub onto: Option<usize>,
    /// The kept backup above the run.
    pub child: usize,
}

/// What a prune does to a set.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The kept backups and the rules that keep them.
    pub keep: Vec<(usize, Vec<String>)>,
    /// Pruned backups that stay as they are, the parent of a kept one
    /// (a run of one needs no merging), with that kept one.
    pub held: Vec<(usize, usize)>,
    /// The consolidations, oldest first.
    pub merges: Vec<Merge>,
    /// Backups deleted outright (newest first).
    pub delete: Vec<usize>,
    /// Most bytes of free space needed.
    pub space_needed: u64,
}

/// The kept backups of `cat` by `policy` (ids), per disk; consolidated
/// images are never kept by a rule, only as parents.
pub fn kept_ids(cat: &Catalog, policy: &Policy) -> Result<Vec<(String, Vec<String>)>, SetError> {
    let mut kept = Vec::new();
    for disk in cat.disks() {
        let mine: Vec<usize> = cat.of_disk(&disk).map(|(i, _)| i).collect();
        // A leftover of a killed backup is no damage: it is deleted.
        let damage: Vec<&str> = mine
            .iter()
            .filter(|&&i| !cat.backups[i].incomplete)
            .flat_map(|&i| cat.backups[i].problems.iter().map(String::as_str))
            .collect();
        if !damage.is_empty() {
            return Err(SetError::Damaged {
                set: cat.set.clone(),
                why: format!(
                    "disk {disk} is damaged, so it is not pruned (verify it; restore what is intact): {}",
                    damage.join("; ")
                ),
            });
        }
        let candidates: Vec<usize> = mine
            .into_iter()
            .filter(|&i| cat.backups[i].kind != Kind::Consolidated && cat.backups[i].meta.is_some())
            .collect();
        let times: Vec<u64> = candidates
            .iter()
            .map(|&i| cat.backups[i].created())
            .collect();
        for (k, reasons) in retention::apply(&times, policy).into_iter().enumerate() {
            if !reasons.is_empty() {
                kept.push((cat.backups[candidates[k]].id.clone(), reasons));
            }
        }
    }
    Ok(kept)
}

/// The plan for keeping `kept` (ids with reasons) in `cat`.
pub fn plan(cat: &Catalog, kept: &[(String, Vec<String>)]) -> Plan {
    let by_id: HashMap<&str, usize> = cat
        .backups
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id.as_str(), i))
        .collect();
    let keep: Vec<(usize, Vec<String>)> = kept
        .iter()
        .filter_map(|(id, r)| by_id.get(id.as_str()).map(|&i| (i, r.clone())))
        .collect();
    let is_kept: BTreeSet<usize> = keep.iter().map(|(i, _)| *i).collect();
    // Needed: kept, or an ancestor of a kept one.
    let mut needed = BTreeSet::new();
    for &k in &is_kept {
        needed.extend(cat.chain(k));
    }
    let mut merges = Vec::new();
    let mut held = Vec::new();
    for &k in &is_kept {
        let Some(top) = cat.backups[k].parent else {
            continue;
        };
        if is_kept.contains(&top) {
            continue;
        }
        let mut run = vec![top];
        let mut onto = None;
        let mut at = top;
        while let Some(p) = cat.backups[at].parent {
            if is_kept.contains(&p) {
                onto = Some(p);
                break;
            }
            run.push(p);
            at = p;
        }
        // One backup between them (a consolidated image, or a pruned
        // one already on the right parent): it stays as the parent.
        if run.len() == 1 {
            held.push((top, k));
            continue;
        }
        if !merges.iter().any(|m: &Merge| m.run[0] == top) {
            merges.push(Merge {
                run,
                onto,
                child: k,
            });
        }
    }
    merges.sort_by_key(|m| cat.backups[m.run[0]].created());
    // Deleted: not needed at all, or merged into the run's top.
    let mut delete: Vec<usize> = (0..cat.backups.len())
        .filter(|i| !needed.contains(i))
        .collect();
    for m in &merges {
        delete.extend(m.run[1..].iter().copied());
    }
    delete.sort_by_key(|&i| std::cmp::Reverse((cat.backups[i].created(), i)));
    delete.dedup();
    let space_needed = merges
        .iter()
        .map(|m| {
            m.run
                .iter()
                .map(|&i| cat.backups[i].bytes_stored)
                .sum::<u64>()
                + (1 << 20)
        })
        .max()
        .unwrap_or(0);
    Plan {
        keep,
        held,
        merges,
        delete,
        space_needed,
    }
}

/// Consolidates `m` of `cat`; `cancel` stops the backup it runs.
fn consolidate(
    cat: &Catalog,
    m: &Merge,
    opener: &dyn Opener,
    cancel: &Cancel,
) -> Result<backup::CopyStats, SetError> {
    let top = &cat.backups[m.run[0]];
    let top_meta = top.meta.clone().expect("an intact backup has a manifest");
    let hidden = hidden_beside(&top.path, "consolidating.qcow2");
    // Every backup above the run, parents first.
    let mut above = Vec::new();
    let mut level = cat.children(m.run[0]);
    while !level.is_empty() {
        let mut next = Vec::new();
        for &i in &level {
            above.push(i);
            next.extend(cat.children(i));
        }
        level = next;
    }
    let mut intent = Intent {
        phase: "merging".into(),
        top: top.path.clone(),
        hidden: hidden.clone(),
        links: vec![],
        delete: m.run[1..]
            .iter()
            .map(|&i| cat.backups[i].path.clone())
            .collect(),
    };
    write_intent(&cat.set, &intent)?;
    let id = manifest::new_id().map_err(|source| SetError::File {
        path: PathBuf::from("/dev/urandom"),
        action: "read a random backup id",
        source,
    })?;
    let request = BackupRequest::new(&top.path, &hidden).id(id).force(true);
    let request = match m.onto {
        Some(a) => request
            .sync(SyncMode::Incremental)
            .backing(cat.backups[a].path.display().to_string()),
        None => request.sync(SyncMode::Full),
    };
    let cfg = request.validate().map_err(|e| SetError::Request {
        target: top.path.clone(),
        why: e.to_string(),
    })?;
    let report = backup::run(&cfg, opener, vec![], &Quiet, &mut |_| {}, cancel).map_err(|e| {
        SetError::Consolidate {
            target: top.path.clone(),
            source: Box::new(e),
        }
    })?;
    // The merged image reads as the top did: it takes over its id and
    // time (its manifest staged beside the top's, as the others).
    let staged_top = hidden_beside(&top.path, "manifest.new");
    let new_top = rewrite::write_edited(&manifest::path_for(&hidden), &staged_top, |meta| {
        meta.id = top_meta.id.clone();
        meta.created = top_meta.created;
        meta.sync = "consolidated".into();
    })?;
    remove(&manifest::path_for(&hidden))?;
    let mut digests: HashMap<PathBuf, String> = HashMap::new();
    digests.insert(top.path.clone(), new_top.clone());
    intent.links.push(Link {
        image: top.path.clone(),
        staged: staged_top,
        old: top.digest.clone().unwrap_or_default(),
        new: new_top,
    });
    // Each manifest above records its parent's new digest.
    for &i in &above {
        let b = &cat.backups[i];
        let parent = &cat.backups[b.parent.expect("above the run: has a parent")].path;
        let want = digests[parent].clone();
        let staged = hidden_beside(&b.path, "manifest.new");
        let new = rewrite::write_edited(&manifest::path_for(&b.path), &staged, |meta| {
            meta.backing_manifest = Some(want);
        })?;
        digests.insert(b.path.clone(), new.clone());
        intent.links.push(Link {
            image: b.path.clone(),
            staged,
            old: b.digest.clone().unwrap_or_default(),
            new,
        });
    }
    intent.phase = "made".into();
    write_intent(&cat.set, &intent)?;
    finish(&intent)?;
    remove(&cat.set.join(INTENT_FILE))?;
    catalog::forget_verify(&cat.set, std::slice::from_ref(&top_meta.id))?;
    Ok(report.stats)
}

/// No progress reports.
struct Quiet;

impl backup::Progress for Quiet {
    fn advance(&self, _bytes: u64) {}
}

/// One consolidation made.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The run's ids, top first (the consolidated image has the top's).
    pub run: Vec<String>,
    /// What the copy stored: compressed clusters passed through as they
    /// were, those compressed anew, zeros.
    pub stats: backup::CopyStats,
}

/// What a prune did.
#[derive(Debug, Clone, Default)]
pub struct Done {
    /// How an interrupted prune was dealt with first.
    pub recovered: Option<Recovered>,
    /// Consolidations made.
    pub merged: Vec<Merged>,
    /// Backups deleted (ids), those merged into a consolidated image
    /// included (the run's top lives on as the consolidated image).
    pub deleted: Vec<String>,
}

/// Prunes the set (the caller holds its exclusive lock): recovers an
/// interrupted prune, checks the space, consolidates, deletes.
pub fn run(
    set: &Path,
    policy: &Policy,
    opener: &dyn Opener,
    cancel: &Cancel,
) -> Result<Done, SetError> {
    let mut done = Done::default();
    let r = recover(set)?;
    if r != Recovered::Nothing {
        done.recovered = Some(r);
    }
    let cat = catalog::read(set)?;
    let kept = kept_ids(&cat, policy)?;
    let first = plan(&cat, &kept);
    check_space(set, first.space_needed)?;
    // One consolidation at a time, each on a fresh catalog (each changes
    // the manifests above it).
    loop {
        let cat = catalog::read(set)?;
        let p = plan(&cat, &kept);
        let Some(m) = p.merges.first() else {
            break;
        };
        let stats = consolidate(&cat, m, opener, cancel)?;
        done.merged.push(Merged {
            run: m.run.iter().map(|&i| cat.backups[i].id.clone()).collect(),
            stats,
        });
        // The run's other members went with it.
        done.deleted
            .extend(m.run[1..].iter().map(|&i| cat.backups[i].id.clone()));
    }
    let cat = catalog::read(set)?;
    let p = plan(&cat, &kept);
    for &i in &p.delete {
        delete_backup(&cat.backups[i].path)?;
        done.deleted.push(cat.backups[i].id.clone());
    }
    Ok(done)
}

/// Refuses when the set's file system has less than `needed` bytes free.
fn check_space(set: &Path, needed: u64) -> Result<(), SetError> {
    if needed == 0 {
        return Ok(());
    }
    let Ok(st) = rustix::fs::statvfs(set) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < needed {
        return Err(SetError::NoSpace {
            set: set.to_path_buf(),
            needed,
            free,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Meta;
    use crate::set::catalog::Backup;

    /// A catalog of one disk: a chain of `kinds` (oldest first), each the
    /// parent of the next, made a day apart.
    fn chain(kinds: &[Kind]) -> Catalog {
        let backups = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| Backup {
                disk: "vm".into(),
                path: PathBuf::from(format!("/set/vm/{i}.qcow2")),
                id: format!("id{i}"),
                meta: Some(Meta {
                    id: format!("id{i}"),
                    tool: "t".into(),
                    created: 1_000_000 + i as u64 * 86_400,
                    source: "s".into(),
                    source_identity: None,
                    virtual_size: 1 << 20,
                    cluster_size: 65536,
                    sync: "full".into(),
                    bitmap: None,
                    backing: None,
                    backing_manifest: None,
                }),
                digest: Some(format!("d{i}")),
                kind,
                parent: i.checked_sub(1),
                depth: Some(i + 1),
                bytes_stored: 1000,
                problems: vec![],
                last_verify: None,
                incomplete: false,
            })
            .collect();
        Catalog {
            set: PathBuf::from("/set"),
            backups,
        }
    }

    fn keep(ids: &[usize]) -> Vec<(String, Vec<String>)> {
        ids.iter()
            .map(|i| (format!("id{i}"), vec!["last".into()]))
            .collect()
    }

    #[test]
    fn pruned_runs_under_kept_backups_are_merged() {
        let inc = Kind::IncrementalContent;
        let cat = chain(&[Kind::Full, inc, inc, inc, inc]);
        // The two newest: the full and two incrementals merge under 3.
        let p = plan(&cat, &keep(&[3, 4]));
        assert_eq!(
            p.merges,
            vec![Merge {
                run: vec![2, 1, 0],
                onto: None,
                child: 3
            }]
        );
        assert_eq!(p.delete, vec![1, 0]);
        assert_eq!(p.space_needed, 3000 + (1 << 20));
        // The oldest and the newest: the middle merges onto the full.
        let p = plan(&cat, &keep(&[0, 4]));
        assert_eq!(
            p.merges,
            vec![Merge {
                run: vec![3, 2, 1],
                onto: Some(0),
                child: 4
            }]
        );
        assert_eq!(p.delete, vec![2, 1]);
        // A pruned full under a kept backup stays as its parent (a run of
        // one needs no merging); a pruned tail is only deleted.
        let p = plan(&cat, &keep(&[1]));
        assert!(p.merges.is_empty());
        assert_eq!(p.held, vec![(0, 1)]);
        assert_eq!(p.delete, vec![4, 3, 2]);
        assert_eq!(p.space_needed, 0);
    }

    #[test]
    fn one_consolidated_parent_is_left_as_it_is() {
        let inc = Kind::IncrementalContent;
        let cat = chain(&[Kind::Consolidated, inc, inc]);
        let p = plan(&cat, &keep(&[1, 2]));
        assert!(p.merges.is_empty());
        assert!(p.delete.is_empty());
        // But merged again with a pruned backup above it.
        let p = plan(&cat, &keep(&[2]));
        assert_eq!(p.merges[0].run, vec![1, 0]);
        assert_eq!(p.delete, vec![0]);
    }

    #[test]
    fn too_little_space_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_space(dir.path(), u64::MAX).unwrap_err();
        assert!(matches!(e, SetError::NoSpace { .. }));
        assert!(!e.to_string().contains('\n'));
        check_space(dir.path(), 1).unwrap();
    }
}
