//! `backup --libvirt DOMAIN`: one backup cycle of a libvirt domain into a
//! backup set, through libvirt's pull-mode backup API.
//!
//! A running domain: one `virDomainBackupBegin` freezes every chosen disk
//! at one point in time (libvirt's fleecing into scratch files), exports
//! them on a private Unix socket, and creates the checkpoint
//! `qbackup-ID` (ID: this cycle's backups' identity) that the next
//! incremental starts from. Each disk is then pulled with
//! [`crate::backup::run`] from its export (with the export's
//! `qemu:dirty-bitmap:` context for an incremental). A shut-off domain is
//! read from its image files, with QEMU's locks.
//!
//! Invariants: the cycle commits only once every disk's backup is durable;
//! until then a record (`SET/.qbackup-libvirt-pending`) names the cycle.
//! On any failure, and on the next run after a `kill -9`, the job is
//! ended, the cycle's checkpoint deleted (libvirt merges its bitmap into
//! its parent's, so the previous checkpoint still covers every write) and
//! the cycle's files removed. After a commit the checkpoints no disk's
//! newest backup is named after are deleted. One domain backs up into one
//! set.

pub mod api;
pub mod plan;
pub mod xml;

use std::path::{Path, PathBuf};

use qbackup_formats::{Classify, ErrorClass};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::backup::{BackupReport, BackupRequest, Cancel, Progress};
use crate::manifest;
use crate::set::layout::SetError;

pub use plan::{Mode, SyncPolicy};

/// The record of a cycle in progress, in the set's directory.
pub const PENDING: &str = ".qbackup-libvirt-pending";

/// Errors of a libvirt backup cycle.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// libvirt could not be reached.
    #[error("{uri}: cannot connect to libvirt: {message}")]
    Connect {
        /// The connection URI (`default` when none was given).
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// A libvirt call about the domain failed.
    #[error("domain {domain}: cannot {action}: {message}")]
    Domain {
        /// The domain.
        domain: String,
        /// What failed.
        action: String,
        /// libvirt's message.
        message: String,
    },
    /// `--disk` named no disk of the domain.
    #[error("domain {domain}: has no disk {disk} to back up (its disks: {known})")]
    NoDisk {
        /// The domain.
        domain: String,
        /// The name given.
        disk: String,
        /// The disks it has.
        known: String,
    },
    /// `--sync incremental` with nothing to be incremental on.
    #[error("{disk}: cannot take an incremental backup: {reason}")]
    NoIncremental {
        /// The disk.
        disk: String,
        /// Why.
        reason: String,
    },
    /// The domain runs a backup job qbackup did not start.
    #[error("domain {domain}: runs a backup job qbackup did not start (virsh domjobabort {domain} ends it)")]
    ForeignJob {
        /// The domain.
        domain: String,
    },
    /// A file or directory of the set or the scratch directory.
    #[error("{}: cannot {action}: {}", path.display(), qbackup_formats::error::io_text(source))]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        action: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The set's directories.
    #[error(transparent)]
    Set(#[from] SetError),
    /// A disk's backup was refused before it started.
    #[error("{disk}: {message}")]
    Request {
        /// The disk.
        disk: String,
        /// The refusal.
        message: String,
    },
    /// A disk's pull (the cycle logic shared with `--qmp`).
    #[error(transparent)]
    Live(#[from] crate::live::LiveError),
}

impl Classify for LibvirtError {
    fn class(&self) -> ErrorClass {
        match self {
            LibvirtError::Connect { .. } | LibvirtError::Domain { .. } => ErrorClass::Io,
            LibvirtError::NoDisk { .. }
            | LibvirtError::NoIncremental { .. }
            | LibvirtError::ForeignJob { .. } => ErrorClass::Usage,
            LibvirtError::Io { source, .. } => ErrorClass::of_io(source),
            LibvirtError::Set(e) => e.class(),
            LibvirtError::Request { .. } => ErrorClass::Usage,
            LibvirtError::Live(e) => e.class(),
        }
    }
}

/// One cycle of a domain into a set.
#[derive(Debug, Clone)]
pub struct LibvirtRequest {
    /// libvirt's connection URI (`None`: libvirt's default).
    pub uri: Option<String>,
    /// The domain's name.
    pub domain: String,
    /// The disks (`<target dev>`) to back up; empty: every writable disk
    /// with a local image.
    pub disks: Vec<String>,
    /// `--sync`.
    pub sync: SyncPolicy,
    /// The backup set.
    pub set: PathBuf,
    /// Where libvirt puts the scratch files and the export's socket
    /// (default `SET/.qbackup-scratch`); QEMU's user must be able to
    /// write there.
    pub scratch: Option<PathBuf>,
    /// The backup options (codec, threads, speed...); its source, target,
    /// sync, backing, bitmap and id are set per disk.
    pub options: BackupRequest,
}

/// One disk's backup in a cycle.
#[derive(Debug)]
pub struct DiskResult {
    /// `<target dev>`.
    pub disk: String,
    /// What ran: `full`, `incremental` or `incremental-by-content`.
    pub sync: &'static str,
    /// Why that mode.
    pub reason: String,
    /// The backup's result.
    pub report: BackupReport,
}

/// What a cycle did.
#[derive(Debug)]
pub struct LibvirtReport {
    /// The domain.
    pub domain: String,
    /// Whether it was running (else read from its image files).
    pub running: bool,
    /// The checkpoint the next incremental starts from (running domains).
    pub checkpoint: Option<String>,
    /// The disks, in the domain's order.
    pub disks: Vec<DiskResult>,
}

fn domain_err(domain: &str, action: &str) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let (domain, action) = (domain.to_string(), action.to_string());
    move |e| LibvirtError::Domain {
        domain,
        action,
        message: e.message().to_string(),
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> LibvirtError {
    let path = path.to_path_buf();
    move |source| LibvirtError::Io {
        path,
        action,
        source,
    }
}

/// Runs one cycle; `note` gets one line for each thing the user should
/// know that is not an error (repairs after a killed run, fallbacks).
/// `progress` and `on_plan` are the backups' (every disk's plan adds its
/// bytes).
pub fn run(
    req: &LibvirtRequest,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(u64),
    cancel: &Cancel,
    note: &mut dyn FnMut(String),
) -> Result<LibvirtReport, LibvirtError> {
    // Errors are returned, not printed by libvirt's default handler.
    virt::error::clear_error_callback();
    let conn = Connect::open(req.uri.as_deref()).map_err(|e| LibvirtError::Connect {
        uri: req.uri.clone().unwrap_or_else(|| "default".into()),
        message: e.message().to_string(),
    })?;
    let name = &req.domain;
    let dom = conn
        .lookup_domain_by_name(name)
        .map_err(domain_err(name, "look it up"))?;
    std::fs::create_dir_all(&req.set).map_err(io_err(&req.set, "create the set directory"))?;
    // libvirt takes absolute paths only (scratch files, the socket).
    let mut req = req.clone();
    req.set = std::fs::canonicalize(&req.set).map_err(io_err(&req.set, "resolve"))?;
    if let Some(s) = &req.scratch {
        std::fs::create_dir_all(s).map_err(io_err(s, "create the scratch directory"))?;
        req.scratch = Some(std::fs::canonicalize(s).map_err(io_err(s, "resolve"))?);
    }
    let req = &req;
    let _lock = crate::set::SetLock::acquire(&req.set, crate::set::LockMode::Exclusive, false)?;
    // An interrupted prune is finished or undone before a backup builds on
    // the set.
    match crate::set::intent::recover(&req.set)? {
        crate::set::intent::Recovered::Nothing => {}
        crate::set::intent::Recovered::Finished(p)
        | crate::set::intent::Recovered::RolledBack(p) => note(format!(
            "repaired the consolidation of {} an interrupted prune left",
            p.display()
        )),
    }
    let running = dom
        .is_active()
        .map_err(domain_err(name, "read its state"))?;
    recover(req, &dom, running, note)?;
    let xml = dom
        .xml_desc(0)
        .map_err(domain_err(name, "read its definition"))?;
    let all = xml::domain_disks(&xml).map_err(|message| LibvirtError::Domain {
        domain: name.clone(),
        action: "read its definition".into(),
        message,
    })?;
    let chosen = choose(req, &all)?;
    let id = manifest::new_id().map_err(io_err(Path::new("/dev/urandom"), "read"))?;
    let mut cycle = Cycle {
        req,
        dom: &dom,
        id,
        files: Vec::new(),
        running,
        checkpoint_made: false,
    };
    let result = cycle.run(&all, &chosen, progress, on_plan, cancel, note);
    if result.is_err() {
        cycle.rollback(note);
    }
    result
}

/// The disks the cycle backs up.
fn choose(
    req: &LibvirtRequest,
    all: &[xml::DomainDisk],
) -> Result<Vec<xml::DomainDisk>, LibvirtError> {
    if req.disks.is_empty() {
        return Ok(all
            .iter()
            .filter(|d| d.backed_up_by_default())
            .cloned()
            .collect());
    }
    req.disks
        .iter()
        .map(|want| {
            all.iter()
                .find(|d| d.target == *want && d.source.is_some())
                .cloned()
                .ok_or_else(|| LibvirtError::NoDisk {
                    domain: req.domain.clone(),
                    disk: want.clone(),
                    known: all
                        .iter()
                        .filter(|d| d.backed_up_by_default())
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Repairs what a killed run left: its backup job, its checkpoint and its
/// files (named by the pending record).
fn recover(
    req: &LibvirtRequest,
    dom: &Domain,
    running: bool,
    note: &mut dyn FnMut(String),
) -> Result<(), LibvirtError> {
    let name = &req.domain;
    if running {
        if let Some(x) = api::backup_xml(dom).map_err(domain_err(name, "read its backup job"))? {
            let job = xml::job(&x).unwrap_or(xml::Job {
                mode: String::new(),
                socket: None,
                exports: vec![],
            });
            let ours = job
                .socket
                .as_deref()
                .and_then(Path::file_name)
                .is_some_and(|f| f.to_string_lossy().starts_with(plan::PREFIX));
            if !ours {
                return Err(LibvirtError::ForeignJob {
                    domain: name.clone(),
                });
            }
            api::abort_job(dom)
                .map_err(domain_err(name, "end the backup job a killed run left"))?;
            note(format!(
                "domain {name}: ended the backup job a killed qbackup run left"
            ));
        }
    }
    let record = req.set.join(PENDING);
    let id = match std::fs::read_to_string(&record) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&record, "read")(e)),
    };
    let removed = remove_cycle_files(&req.set, &id)?;
    let cp = plan::checkpoint_name(&id);
    let deleted = if running {
        api::delete_checkpoint(dom, &cp)
            .map_err(domain_err(name, "delete the checkpoint of a killed run"))?
    } else {
        false
    };
    std::fs::remove_file(&record).map_err(io_err(&record, "remove"))?;
    note(format!(
        "a killed run was undone: {removed} partial backup file(s) removed{}",
        if deleted {
            format!(", checkpoint {cp} deleted (its bitmap merged into its parent: no write lost)")
        } else {
            String::new()
        }
    ));
    Ok(())
}

/// Removes every backup of identity `id` in the set's disk directories
/// (a failed cycle's); returns how many.
fn remove_cycle_files(set: &Path, id: &str) -> Result<usize, LibvirtError> {
    let short: String = id.chars().take(8).collect();
    let mut n = 0;
    let dirs = std::fs::read_dir(set).map_err(io_err(set, "list"))?;
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            let fname = f.file_name().to_string_lossy().into_owned();
            if fname.ends_with(&format!("-{short}.qcow2")) {
                let p = f.path();
                crate::live::cycle::remove_backups([p.as_path()])?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Writes `text` to `path` durably (file and directory synced).
fn write_durably(path: &Path, text: &str) -> Result<(), LibvirtError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path, "create"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(path, "write"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), LibvirtError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync"))
}

mod cycle;
use cycle::Cycle;
