//! What each disk's backup will be this cycle, from the set and libvirt's
//! checkpoints; pure decisions, so that every rule has a unit test.
//!
//! A checkpoint qbackup makes is named `qbackup-ID`, ID being the identity
//! (manifest id) of the backups taken at that point, so the set alone
//! tells which checkpoint a disk's next incremental starts from: the one
//! named after the disk's newest backup. When that checkpoint is gone or
//! has no bitmap for the disk, the export is read whole and compared with
//! the newest backup by content (never a wrong incremental); a disk whose
//! size changed gets a full backup.

use crate::set::layout::Entry;

/// The prefix of every checkpoint qbackup makes.
pub const PREFIX: &str = "qbackup-";

/// The checkpoint taken with the backups of identity `id`.
pub fn checkpoint_name(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// The backup identity a qbackup checkpoint is named after.
pub fn id_of(checkpoint: &str) -> Option<&str> {
    checkpoint.strip_prefix(PREFIX)
}

/// `--sync`: what the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Incremental when possible (by bitmap, else by content), else full.
    Auto,
    /// Always full.
    Full,
    /// Incremental (by bitmap, else by content); fail if there is no
    /// usable previous backup.
    Incremental,
}

/// How one disk is backed up this cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Everything the guest sees.
    Full,
    /// What the dirty bitmap since `checkpoint` marks, onto the newest
    /// backup.
    Bitmap {
        /// The checkpoint named after the newest backup.
        checkpoint: String,
    },
    /// Every cluster compared with the newest backup's manifest.
    Content,
}

impl Mode {
    /// The `sync` word of the report.
    pub fn word(&self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Bitmap { .. } => "incremental",
            Mode::Content => "incremental-by-content",
        }
    }
}

/// What [`decide`] knows about a disk.
pub struct DiskState<'a> {
    /// `<target dev>`.
    pub disk: &'a str,
    /// The disk's newest backup in the set.
    pub latest: Option<&'a Entry>,
    /// The disk's size now.
    pub size: u64,
    /// Whether the domain runs (checkpoints and exports exist only then).
    pub running: bool,
    /// The domain's checkpoints.
    pub checkpoints: &'a [String],
    /// Whether the checkpoint named after the newest backup has a bitmap
    /// for this disk.
    pub covered: bool,
    /// Whether the disk can hold a bitmap at all (a qcow2 image).
    pub can_hold_bitmaps: bool,
}

/// The disk's mode and why; `Err` when `--sync incremental` cannot be
/// honoured (the reason).
pub fn decide(policy: SyncPolicy, s: &DiskState) -> Result<(Mode, String), String> {
    if policy == SyncPolicy::Full {
        return Ok((Mode::Full, "--sync full".into()));
    }
    let Some(latest) = s.latest else {
        let why = format!("no previous backup of {} in the set", s.disk);
        return match policy {
            SyncPolicy::Incremental => Err(why),
            _ => Ok((Mode::Full, format!("first backup: {why}"))),
        };
    };
    if latest.meta.virtual_size != s.size {
        let why = format!(
            "{} was resized from {} to {} bytes since its previous backup",
            s.disk, latest.meta.virtual_size, s.size
        );
        return match policy {
            SyncPolicy::Incremental => Err(why),
            _ => Ok((Mode::Full, why)),
        };
    }
    let name = checkpoint_name(&latest.meta.id);
    if !s.running {
        return Ok((
            Mode::Content,
            "the domain is shut off: its image compared with the previous backup".into(),
        ));
    }
    if !s.can_hold_bitmaps {
        return Ok((
            Mode::Content,
            format!(
                "{} is not qcow2, so libvirt keeps no bitmap for it: compared by content",
                s.disk
            ),
        ));
    }
    if !s.checkpoints.contains(&name) {
        return Ok((
            Mode::Content,
            format!("checkpoint {name} of the previous backup is gone (checkpoint deleted, domain redefined, or taken while shut off): compared by content"),
        ));
    }
    if !s.covered {
        return Ok((
            Mode::Content,
            format!(
                "checkpoint {name} has no bitmap for {}: compared by content",
                s.disk
            ),
        ));
    }
    Ok((
        Mode::Bitmap {
            checkpoint: name.clone(),
        },
        format!("what changed since checkpoint {name} (the previous backup)"),
    ))
}

/// The qbackup checkpoints that no disk's newest backup is named after
/// (`keep`: those identities): left by failed runs or superseded.
pub fn stale(checkpoints: &[String], keep: &[String]) -> Vec<String> {
    checkpoints
        .iter()
        .filter(|c| id_of(c).is_some_and(|id| !keep.iter().any(|k| k == id)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Meta;

    fn entry(id: &str, size: u64) -> Entry {
        Entry {
            written: 0,
            path: "/set/vda/x.qcow2".into(),
            meta: Meta {
                id: id.into(),
                tool: "t".into(),
                created: 0,
                source: "s".into(),
                source_identity: None,
                virtual_size: size,
                cluster_size: 65536,
                sync: "full".into(),
                bitmap: None,
                backing: None,
                backing_manifest: None,
            },
            digest: String::new(),
        }
    }

    fn state<'a>(latest: Option<&'a Entry>, cps: &'a [String]) -> DiskState<'a> {
        DiskState {
            disk: "vda",
            latest,
            size: 1 << 20,
            running: true,
            checkpoints: cps,
            covered: true,
            can_hold_bitmaps: true,
        }
    }

    #[test]
    fn incremental_by_bitmap_from_the_checkpoint_named_after_the_newest_backup() {
        let e = entry("ab", 1 << 20);
        let cps = vec!["other".to_string(), "qbackup-ab".to_string()];
        let (m, _) = decide(SyncPolicy::Auto, &state(Some(&e), &cps)).unwrap();
        assert_eq!(
            m,
            Mode::Bitmap {
                checkpoint: "qbackup-ab".into()
            }
        );
    }

    #[test]
    fn never_a_wrong_incremental() {
        let e = entry("ab", 1 << 20);
        let none: Vec<String> = vec!["qbackup-cd".into()];
        let (m, why) = decide(SyncPolicy::Incremental, &state(Some(&e), &none)).unwrap();
        assert_eq!(m, Mode::Content);
        assert!(why.contains("qbackup-ab") && why.contains("gone"), "{why}");
        let cps = vec!["qbackup-ab".to_string()];
        let mut s = state(Some(&e), &cps);
        s.covered = false;
        assert_eq!(decide(SyncPolicy::Auto, &s).unwrap().0, Mode::Content);
        s.covered = true;
        s.running = false;
        assert_eq!(decide(SyncPolicy::Auto, &s).unwrap().0, Mode::Content);
        s.running = true;
        s.can_hold_bitmaps = false;
        let (m, why) = decide(SyncPolicy::Auto, &s).unwrap();
        assert_eq!(m, Mode::Content);
        assert!(why.contains("not qcow2"), "{why}");
        s.can_hold_bitmaps = true;
        s.size = 2 << 20;
        let (m, why) = decide(SyncPolicy::Auto, &s).unwrap();
        assert_eq!(m, Mode::Full);
        assert!(why.contains("resized"), "{why}");
        assert!(decide(SyncPolicy::Incremental, &s).is_err());
    }

    #[test]
    fn first_and_forced_fulls() {
        let (m, why) = decide(SyncPolicy::Auto, &state(None, &[])).unwrap();
        assert_eq!(m, Mode::Full);
        assert!(why.starts_with("first backup"), "{why}");
        assert!(decide(SyncPolicy::Incremental, &state(None, &[])).is_err());
        let e = entry("ab", 1 << 20);
        let cps = vec!["qbackup-ab".to_string()];
        assert_eq!(
            decide(SyncPolicy::Full, &state(Some(&e), &cps)).unwrap().0,
            Mode::Full
        );
    }

    #[test]
    fn stale_checkpoints_are_qbackups_not_kept() {
        let cps: Vec<String> = ["mine", "qbackup-a", "qbackup-b", "qbackup-c"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            stale(&cps, &["b".into(), "c".into()]),
            ["qbackup-a".to_string()]
        );
    }
}
