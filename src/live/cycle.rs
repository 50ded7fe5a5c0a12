//! One live backup cycle of a VM into a backup set (see the module doc
//! of [`crate::live`] for the steps and the guarantees).
//!
//! Invariants: the journal is durable before QEMU is changed and names
//! everything the cycle adds; the cycle commits (journal `committed`)
//! only after every disk's backup is durable; until then any failure
//! removes this cycle's backups and merges the frozen bitmaps back.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use qbackup_formats::open::Opener;

use crate::backup::{self, BackupReport, BackupRequest, BitmapMode, Cancel, Progress, SyncMode};
use crate::manifest;
use crate::set::DiskDir;

use super::disks::{self, Disk};
use super::journal::{self, DiskEntry, Journal, State};
use super::plan::{self, LiveSync, Mode};
use super::qmp::Qmp;
use super::{fleece, hold, LiveError};

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct LiveRequest {
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The backup set directory.
    pub set: PathBuf,
    /// Disks to back up by node name or device id (empty: all).
    pub disks: Vec<String>,
    /// The sync mode asked for.
    pub sync: LiveSync,
    /// Where the fleecing images go (default: `SET/.qbackup-scratch`).
    pub scratch: Option<PathBuf>,
    /// The backup options (codec, threads, speed...); its source, target,
    /// sync, backing and bitmap are set per disk.
    pub options: BackupRequest,
}

/// One disk's result.
#[derive(Debug, Clone)]
pub struct DiskReport {
    /// The node frozen.
    pub node: String,
    /// The device's id, if it has one.
    pub device: Option<String>,
    /// The disk's name in the set.
    pub name: String,
    /// Why this sync mode.
    pub reason: String,
    /// The backup.
    pub backup: BackupReport,
}

/// A cycle's result.
#[derive(Debug, Clone)]
pub struct LiveReport {
    /// Per disk, in QEMU's order.
    pub disks: Vec<DiskReport>,
    /// What the cycle repaired before starting (a killed run's leftovers).
    pub repaired: Option<String>,
}

struct Planned {
    disk: Disk,
    name: String,
    mode: Mode,
    reason: String,
    id: String,
}

/// Runs one cycle; `on_note` hears what was repaired before it, as soon
/// as it is done.
pub fn run(
    req: &LiveRequest,
    opener: &dyn Opener,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &Cancel,
    on_note: &mut dyn FnMut(&str),
) -> Result<LiveReport, LiveError> {
    if req.set.is_file() {
        return Err(LiveError::File {
            path: req.set.clone(),
            action: "use it as the backup set",
            source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
        });
    }
    std::fs::create_dir_all(&req.set).map_err(|source| LiveError::File {
        path: req.set.clone(),
        action: "create the backup set directory",
        source,
    })?;
    // Absolute: QEMU opens the fleecing files from its own working
    // directory, and a repair may run from another one.
    let set = &absolute(&req.set)?;
    // One writer per set (backups, prunes), and an interrupted prune is
    // finished or undone before a backup builds on the set.
    let _lock = crate::set::SetLock::acquire(set, crate::set::LockMode::Exclusive, false)?;
    match crate::set::intent::recover(set)? {
        crate::set::intent::Recovered::Nothing => {}
        crate::set::intent::Recovered::Finished(p) => on_note(&format!(
            "finished the consolidation of {} an interrupted prune had made",
            p.display()
        )),
        crate::set::intent::Recovered::RolledBack(p) => on_note(&format!(
            "rolled back the unfinished consolidation of {} an interrupted prune left",
            p.display()
        )),
    }
    let mut qmp = Qmp::connect(&req.qmp)?;
    let repaired = match journal::read(set)? {
        Some(j) => {
            let line = repair(&mut qmp, set, j)?;
            // Said now: the cycle that follows may fail.
            on_note(&line);
            Some(line)
        }
        None => None,
    };
    let chosen = choose(&mut qmp, req)?;
    let token: String = new_id(set)?.chars().take(8).collect();
    let mut planned = Vec::new();
    for disk in chosen {
        let dir = DiskDir::new(set, disk.name());
        dir.create()?;
        let (mode, reason) = plan::decide(req.sync, &disk, &dir)?;
        planned.push(Planned {
            name: dir.name().to_string(),
            disk,
            mode,
            reason,
            id: new_id(set)?,
        });
    }
    let scratch = req
        .scratch
        .clone()
        .unwrap_or_else(|| set.join(".qbackup-scratch"));
    std::fs::create_dir_all(&scratch).map_err(|source| LiveError::File {
        path: scratch.clone(),
        action: "create the scratch directory",
        source,
    })?;
    let scratch = absolute(&scratch)?;
    let socket_dir = tempfile::Builder::new()
        .prefix("qbackup-nbd-")
        .tempdir()
        .map_err(|source| LiveError::File {
            path: std::env::temp_dir(),
            action: "create a private directory for the NBD socket",
            source,
        })?
        .keep();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| LiveError::File {
                path: socket_dir.clone(),
                action: "make the NBD socket's directory private",
                source,
            },
        )?;
    }
    let now = SystemTime::now();
    let mut j = Journal {
        state: State::Prepared,
        token: token.clone(),
        socket_dir: socket_dir.clone(),
        server: false,
        disks: planned
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let dir = DiskDir::new(set, &p.name);
                let q = |what: &str| format!("qbackup-{token}-{what}{i}");
                DiskEntry {
                    name: p.name.clone(),
                    node: p.disk.node.clone(),
                    new_bitmap: plan::bitmap_name(&p.id),
                    frozen_bitmap: match &p.mode {
                        Mode::Bitmap { bitmap, .. } => Some(bitmap.clone()),
                        _ => None,
                    },
                    target: dir.backup_path(now, &p.id),
                    fleece: scratch.join(format!("{token}-{}.fleece", p.name)),
                    fleece_node: q("fl"),
                    job: q("job"),
                    filter: q("cbw"),
                    access_node: q("sa"),
                    export: q("e"),
                }
            })
            .collect(),
    };
    // The journal first: it names the fleecing files, so a run killed
    // while reserving them leaves nothing unrecorded.
    journal::write(set, &j)?;
    if let Err(e) = reserve(&j, &planned) {
        remove_files(&j);
        journal::remove(set)?;
        return Err(e);
    }
    hold("before-freeze");
    let persistent: Vec<bool> = planned
        .iter()
        .map(|p| p.disk.persistent_bitmaps())
        .collect();
    let result = (|| -> Result<Vec<DiskReport>, LiveError> {
        fleece::freeze(&mut qmp, &j, &persistent)?;
        hold("after-freeze");
        // Recorded before it starts, so a run killed just after is
        // repaired; if it does not start (another server runs), it is
        // not ours to stop.
        j.server = true;
        journal::write(set, &j)?;
        if let Err(e) = fleece::start_server(&mut qmp, &socket_dir.join("nbd.sock")) {
            j.server = false;
            journal::write(set, &j)?;
            return Err(e.into());
        }
        fleece::export(&mut qmp, &j)?;
        hold("exported");
        let mut reports = Vec::new();
        for (p, d) in planned.iter().zip(&j.disks) {
            let uri = format!(
                "nbd+unix:///{}?socket={}",
                d.name,
                socket_dir.join("nbd.sock").display()
            );
            let what = Pull {
                disk: &p.name,
                uri,
                target: &d.target,
                id: &p.id,
                mode: &p.mode,
            };
            let backup = pull(&req.options, opener, progress, on_plan, cancel, what)?;
            hold("pulled-one");
            reports.push(DiskReport {
                node: p.disk.node.clone(),
                device: p.disk.device.clone(),
                name: p.name.clone(),
                reason: p.reason.clone(),
                backup,
            });
        }
        Ok(reports)
    })();
    let reports = match result {
        Ok(r) => r,
        Err(error) => return Err(undo(&mut qmp, set, &j, error)),
    };
    hold("before-commit");
    j.state = State::Committed;
    journal::write(set, &j)?;
    hold("committed");
    finish(&mut qmp, set, &j)?;
    Ok(LiveReport {
        disks: reports,
        repaired,
    })
}

/// The disks to back up: those named, or all.
fn choose(qmp: &mut Qmp, req: &LiveRequest) -> Result<Vec<Disk>, LiveError> {
    let all = disks::list(qmp)?;
    let socket = req.qmp.display().to_string();
    if all.is_empty() {
        return Err(LiveError::NoDisks(socket));
    }
    if req.disks.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in &req.disks {
        let Some(d) = all
            .iter()
            .find(|d| d.node == *name || d.device.as_deref() == Some(name))
        else {
            let known: Vec<String> = all
                .iter()
                .map(|d| match &d.device {
                    Some(dev) => format!("{dev} (node {})", d.node),
                    None => d.node.clone(),
                })
                .collect();
            return Err(LiveError::NoSuchDisk {
                socket,
                name: name.clone(),
                known: known.join(", "),
            });
        };
        if !chosen.iter().any(|c: &Disk| c.node == d.node) {
            chosen.push(d.clone());
        }
    }
    Ok(chosen)
}

/// One disk's pull: where from, where to, how.
pub struct Pull<'a> {
    /// The disk's name in the set (for messages).
    pub disk: &'a str,
    /// The NBD URI of its frozen view (with the frozen bitmap, if any).
    pub uri: String,
    /// This cycle's backup file.
    pub target: &'a Path,
    /// The backup's identity (chosen before, so the file is named by it).
    pub id: &'a str,
    /// Full, by bitmap or by content.
    pub mode: &'a Mode,
}

/// Pulls one disk's frozen view into its backup file (shared by every way
/// of freezing a VM: QMP here, libvirt's backup API).
pub fn pull(
    options: &BackupRequest,
    opener: &dyn Opener,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &Cancel,
    what: Pull<'_>,
) -> Result<BackupReport, LiveError> {
    let mut r = options
        .clone()
        .retarget(what.uri, what.target)
        .id(what.id.to_string());
    r = match what.mode {
        Mode::Full => r.sync(SyncMode::Full),
        Mode::Bitmap { previous, bitmap } => r
            .sync(SyncMode::Incremental)
            .backing(previous.path.display().to_string())
            .bitmap(bitmap.clone())
            .bitmap_mode(BitmapMode::Never)
            .require_bitmap(true),
        Mode::Content { previous } => r
            .sync(SyncMode::Incremental)
            .backing(previous.path.display().to_string()),
    };
    let cfg = r.validate().map_err(|source| LiveError::Request {
        disk: what.disk.to_string(),
        source,
    })?;
    backup::run(&cfg, opener, Vec::new(), progress, on_plan, cancel).map_err(|source| {
        LiveError::Backup {
            disk: what.disk.to_string(),
            source: Box::new(source),
        }
    })
}

/// Removes a failed cycle's backup files and their manifests (those that
/// were published before the failure).
pub fn remove_backups<'a>(targets: impl IntoIterator<Item = &'a Path>) -> Result<(), LiveError> {
    for target in targets {
        for path in [target.to_path_buf(), manifest::path_for(target)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LiveError::File {
                        path,
                        action: "remove this cycle's backup",
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Reserves every fleecing file's space (the disk's size), so the guest's
/// writes never fail for lack of room in it.
fn reserve(j: &Journal, planned: &[Planned]) -> Result<(), LiveError> {
    for (d, p) in j.disks.iter().zip(planned) {
        let size = p.disk.virtual_size;
        let fail = |source| LiveError::Reserve {
            path: d.fleece.clone(),
            disk: d.name.clone(),
            bytes: size,
            source,
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&d.fleece)
            .map_err(fail)?;
        if size > 0 {
            rustix::fs::fallocate(f.as_fd(), rustix::fs::FallocateFlags::empty(), 0, size)
                .map_err(|e| fail(e.into()))?;
        }
        f.sync_all().map_err(fail)?;
    }
    Ok(())
}

/// Undoes a failed cycle: QEMU's nodes, this cycle's backups, the
/// bitmaps, the files; the journal goes last, only if all of it worked.
fn undo(qmp: &mut Qmp, set: &Path, j: &Journal, error: LiveError) -> LiveError {
    match roll_back(qmp, set, j) {
        Ok(()) => error,
        Err(undo) => LiveError::Undo {
            error: Box::new(error),
            undo: Box::new(undo),
            journal: journal::path(set),
        },
    }
}

fn roll_back(qmp: &mut Qmp, set: &Path, j: &Journal) -> Result<(), LiveError> {
    let torn = fleece::teardown(qmp, j);
    remove_backups(j.disks.iter().map(|d| d.target.as_path()))?;
    torn?;
    fleece::roll_back_bitmaps(qmp, j)?;
    remove_files(j);
    journal::remove(set)?;
    Ok(())
}

/// Commits a cycle whose backups are durable: drops the frozen bitmaps,
/// removes qbackup's nodes, then the journal.
fn finish(qmp: &mut Qmp, set: &Path, j: &Journal) -> Result<(), LiveError> {
    // The exports hold the frozen bitmaps: they go first.
    fleece::teardown(qmp, j)?;
    fleece::commit_bitmaps(qmp, j)?;
    remove_files(j);
    journal::remove(set)?;
    Ok(())
}

/// Repairs what a killed cycle left, from its journal; returns the line
/// that says what was done.
fn repair(qmp: &mut Qmp, set: &Path, mut j: Journal) -> Result<String, LiveError> {
    // A QEMU restarted since may have given a disk another node name
    // (`-drive` names them `#blockNNN` per start): find it by its name.
    let now = disks::list(qmp)?;
    let names = disks::node_names(qmp)?;
    for d in &mut j.disks {
        if !names.contains(&d.node) {
            if let Some(found) = now.iter().find(|n| n.name() == d.name) {
                d.node = found.node.clone();
            }
        }
    }
    let disks: Vec<&str> = j.disks.iter().map(|d| d.name.as_str()).collect();
    match j.state {
        State::Committed => {
            finish(qmp, set, &j)?;
            Ok(format!(
                "finished a live backup cycle of {} that was interrupted after its backups were durable",
                disks.join(", ")
            ))
        }
        State::Prepared => {
            roll_back(qmp, set, &j)?;
            Ok(format!(
                "rolled back a live backup cycle of {} that was interrupted before its backups were all durable: its partial backups removed, its bitmaps merged back, its nodes removed from QEMU",
                disks.join(", ")
            ))
        }
    }
}

/// Removes the fleecing files and the socket directory (best effort:
/// they hold no data anyone needs).
fn remove_files(j: &Journal) {
    for d in &j.disks {
        let _ = std::fs::remove_file(&d.fleece);
    }
    let _ = std::fs::remove_dir_all(&j.socket_dir);
}

/// `path` made absolute (it exists).
fn absolute(path: &Path) -> Result<PathBuf, LiveError> {
    std::fs::canonicalize(path).map_err(|source| LiveError::File {
        path: path.to_path_buf(),
        action: "resolve",
        source,
    })
}

fn new_id(set: &Path) -> Result<String, LiveError> {
    manifest::new_id().map_err(|source| LiveError::File {
        path: set.to_path_buf(),
        action: "read /dev/urandom for a backup identity for",
        source,
    })
}
