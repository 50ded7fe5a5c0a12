//! One cycle after recovery: plan each disk, freeze and export (running
//! domain) or open the image files (shut off), pull every disk into the
//! set, then commit (end the job, drop superseded checkpoints) or roll
//! back (end the job, delete this cycle's checkpoint and files). The
//! libvirt-specific steps are `begin`, `end_job` and the checkpoint calls;
//! `pull` is the generic per-disk backup.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::SystemTime;

use super::plan::{self, Mode};
use super::{
    api, domain_err, io_err, sync_dir, write_durably, xml, DiskResult, LibvirtError, LibvirtReport,
    LibvirtRequest, PENDING,
};
use crate::backup::{self, Cancel};
use crate::set::layout::{DiskDir, Entry};
use qbackup_formats::open::FileOpener;
use virt::domain::Domain;

/// A cycle in progress: what rollback must undo.
pub(super) struct Cycle<'a> {
    pub req: &'a LibvirtRequest,
    pub dom: &'a Domain,
    /// This cycle's backups' identity (and checkpoint's name).
    pub id: String,
    /// Backups this cycle wrote.
    pub files: Vec<PathBuf>,
    pub running: bool,
    /// Whether `begin` asked for the checkpoint `qbackup-ID` (not when no
    /// chosen disk can hold a bitmap).
    pub checkpoint_made: bool,
}

/// One disk's plan.
struct Planned {
    disk: xml::DomainDisk,
    latest: Option<Entry>,
    mode: Mode,
    reason: String,
}

impl Cycle<'_> {
    pub fn run(
        &mut self,
        all: &[xml::DomainDisk],
        chosen: &[xml::DomainDisk],
        progress: &dyn backup::Progress,
        on_plan: &mut dyn FnMut(u64),
        cancel: &Cancel,
        note: &mut dyn FnMut(String),
    ) -> Result<LibvirtReport, LibvirtError> {
        let name = &self.req.domain;
        let checkpoints = if self.running {
            api::checkpoints(self.dom).map_err(domain_err(name, "list its checkpoints"))?
        } else {
            vec![]
        };
        let mut planned = Vec::new();
        for d in chosen {
            let latest = DiskDir::new(&self.req.set, &d.target).latest()?;
            let size = self.size(d)?;
            let covered = match &latest {
                Some(e) if self.running => {
                    let cp = plan::checkpoint_name(&e.meta.id);
                    api::checkpoint_xml(self.dom, &cp)
                        .map_err(domain_err(name, "read a checkpoint"))?
                        .and_then(|x| xml::checkpoint_disks(&x).ok())
                        .is_some_and(|ds| ds.contains(&d.target))
                }
                _ => false,
            };
            let state = plan::DiskState {
                disk: &d.target,
                latest: latest.as_ref(),
                size,
                running: self.running,
                checkpoints: &checkpoints,
                covered,
                can_hold_bitmaps: d.format.as_deref() == Some("qcow2"),
            };
            let (mode, reason) = plan::decide(self.req.sync, &state).map_err(|reason| {
                LibvirtError::NoIncremental {
                    disk: d.target.clone(),
                    reason,
                }
            })?;
            planned.push(Planned {
                disk: d.clone(),
                latest,
                mode,
                reason,
            });
        }
        write_durably(&self.req.set.join(PENDING), &format!("{}\n", self.id))?;
        let started = SystemTime::now();
        let mut sources: Vec<(String, Option<String>)> = Vec::new();
        let mut socket = None;
        if self.running {
            let (sock, exports) = self.begin(all, &mut planned, note)?;
            for p in &planned {
                let e = exports.iter().find(|e| e.disk == p.disk.target);
                let Some(e) = e else {
                    return Err(LibvirtError::Domain {
                        domain: name.clone(),
                        action: format!("export {}", p.disk.target),
                        message: "libvirt's backup job does not export it".into(),
                    });
                };
                sources.push((
                    format!("nbd+unix:///{}?socket={}", e.name, sock.display()),
                    e.bitmap.clone(),
                ));
            }
            socket = Some(sock);
        } else {
            for p in &planned {
                let src = p.disk.source.clone().expect("chosen disks have an image");
                sources.push((src.to_string_lossy().into_owned(), None));
            }
        }
        let mut disks = Vec::new();
        for (p, (source, bitmap)) in planned.iter().zip(sources) {
            let (report, mode_word, reason) =
                self.pull(p, source, bitmap, started, progress, on_plan, cancel)?;
            disks.push(DiskResult {
                disk: p.disk.target.clone(),
                sync: mode_word,
                reason,
                report,
            });
        }
        // Every disk is durable: the cycle commits here.
        let record = self.req.set.join(PENDING);
        std::fs::remove_file(&record).map_err(io_err(&record, "remove"))?;
        sync_dir(&self.req.set)?;
        self.files.clear();
        let checkpoint = if self.running {
            self.end_job(note);
            if let Some(s) = socket {
                let _ = std::fs::remove_file(s);
            }
            self.drop_superseded(note);
            self.checkpoint_made
                .then(|| plan::checkpoint_name(&self.id))
        } else {
            None
        };
        Ok(LibvirtReport {
            domain: name.clone(),
            running: self.running,
            checkpoint,
            disks,
        })
    }

    /// The disk's size now.
    fn size(&self, d: &xml::DomainDisk) -> Result<u64, LibvirtError> {
        if self.running {
            let info = self
                .dom
                .block_info(&d.target, 0)
                .map_err(domain_err(&self.req.domain, "read a disk's size"))?;
            return Ok(info.capacity);
        }
        let src = d.source.as_deref().expect("chosen disks have an image");
        let format = match d.format.as_deref() {
            Some("raw") => Some(qbackup_formats::Format::Raw),
            Some("qcow2") => Some(qbackup_formats::Format::Qcow2),
            _ => None,
        };
        let chain =
            qbackup_formats::Chain::open(src, format).map_err(|e| LibvirtError::Request {
                disk: d.target.clone(),
                message: e.to_string(),
            })?;
        Ok(chain.virtual_size())
    }

    /// Starts the pull-mode job with this cycle's checkpoint; an
    /// incremental libvirt refuses (an inconsistent bitmap after a crash)
    /// is retried as a comparison by content. Returns the socket and the
    /// exports.
    fn begin(
        &mut self,
        all: &[xml::DomainDisk],
        planned: &mut [Planned],
        note: &mut dyn FnMut(String),
    ) -> Result<(PathBuf, Vec<xml::Export>), LibvirtError> {
        let name = self.req.domain.clone();
        let scratch = self.scratch_dir(planned)?;
        let short: String = self.id.chars().take(8).collect();
        let socket = scratch.join(format!("{}{short}.sock", plan::PREFIX));
        let chosen: Vec<String> = planned.iter().map(|p| p.disk.target.clone()).collect();
        // Every other disk is named, so that libvirt skips it (an empty
        // CD-ROM would fail the job otherwise).
        let others: Vec<String> = all
            .iter()
            .filter(|d| !chosen.contains(&d.target))
            .map(|d| d.target.clone())
            .collect();
        // Bitmaps live in qcow2 images only: a raw disk gets none (its
        // next backup compares by content).
        let (with_bitmap, without): (Vec<&Planned>, Vec<&Planned>) = planned
            .iter()
            .partition(|p| p.disk.format.as_deref() == Some("qcow2"));
        let no_bitmap: Vec<String> = others
            .iter()
            .cloned()
            .chain(without.iter().map(|p| p.disk.target.clone()))
            .collect();
        let with_bitmap: Vec<String> = with_bitmap.iter().map(|p| p.disk.target.clone()).collect();
        let checkpoint = (!with_bitmap.is_empty())
            .then(|| xml::checkpoint(&plan::checkpoint_name(&self.id), &with_bitmap, &no_bitmap));
        self.checkpoint_made = checkpoint.is_some();
        let job_disks = |planned: &[Planned]| -> Vec<xml::JobDisk> {
            planned
                .iter()
                .map(|p| xml::JobDisk {
                    name: p.disk.target.clone(),
                    incremental: match &p.mode {
                        Mode::Bitmap { checkpoint } => Some(checkpoint.clone()),
                        _ => None,
                    },
                    scratch: scratch.join(format!(
                        "{}{short}-{}.qcow2",
                        plan::PREFIX,
                        p.disk.target
                    )),
                })
                .collect()
        };
        let first = api::backup_begin(
            self.dom,
            &xml::backup(&socket, &job_disks(planned), &others),
            checkpoint.as_deref(),
        );
        if let Err(e) = first {
            let by_bitmap = planned
                .iter()
                .any(|p| matches!(p.mode, Mode::Bitmap { .. }));
            if !by_bitmap {
                return Err(domain_err(&name, "start the backup job")(e));
            }
            for p in planned.iter_mut() {
                if let Mode::Bitmap { checkpoint } = &p.mode {
                    p.reason = format!(
                        "libvirt refused the incremental from {checkpoint} ({}): compared by content",
                        e.message()
                    );
                    note(format!("{}: {}", p.disk.target, p.reason));
                    p.mode = Mode::Content;
                }
            }
            api::backup_begin(
                self.dom,
                &xml::backup(&socket, &job_disks(planned), &others),
                checkpoint.as_deref(),
            )
            .map_err(domain_err(&name, "start the backup job"))?;
        }
        let x = api::backup_xml(self.dom)
            .map_err(domain_err(&name, "read its backup job"))?
            .unwrap_or_default();
        let job = xml::job(&x).map_err(|message| LibvirtError::Domain {
            domain: name.clone(),
            action: "read its backup job".into(),
            message,
        })?;
        Ok((socket, job.exports))
    }

    /// The scratch directory: `--scratch`, or `SET/.qbackup-scratch`
    /// made private (0700) and, when run as root, given to the owner of
    /// the domain's first image (QEMU's user under libvirt), who must
    /// write the scratch files and the socket there.
    fn scratch_dir(&self, planned: &[Planned]) -> Result<PathBuf, LibvirtError> {
        if let Some(s) = &self.req.scratch {
            return Ok(s.clone());
        }
        let dir = self.req.set.join(".qbackup-scratch");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create the scratch directory"))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&dir, "make the scratch directory private"))?;
            let owner = planned.iter().find_map(|p| {
                p.disk
                    .source
                    .as_deref()
                    .and_then(|s| std::fs::metadata(s).ok())
            });
            if let Some(m) = owner {
                if rustix::process::geteuid().is_root() && m.uid() != 0 {
                    std::os::unix::fs::chown(&dir, Some(m.uid()), Some(m.gid()))
                        .map_err(io_err(&dir, "give the scratch directory to QEMU's user"))?;
                }
            }
        }
        Ok(dir)
    }

    /// Backs up one disk from `source` into the set.
    #[allow(clippy::too_many_arguments)]
    fn pull(
        &mut self,
        p: &Planned,
        source: String,
        bitmap: Option<String>,
        started: SystemTime,
        progress: &dyn backup::Progress,
        on_plan: &mut dyn FnMut(u64),
        cancel: &Cancel,
    ) -> Result<(backup::BackupReport, &'static str, String), LibvirtError> {
        use crate::live::cycle::{pull, Pull};
        use crate::live::plan::Mode as Shared;
        let dir = DiskDir::new(&self.req.set, &p.disk.target);
        dir.create()?;
        let target = dir.backup_path(started, &self.id);
        let previous = || {
            p.latest
                .clone()
                .expect("an incremental has a previous backup")
        };
        let mode = match &p.mode {
            Mode::Full => Shared::Full,
            Mode::Bitmap { checkpoint } => Shared::Bitmap {
                previous: previous(),
                bitmap: bitmap.ok_or_else(|| LibvirtError::Domain {
                    domain: self.req.domain.clone(),
                    action: format!("export {}'s changes since {checkpoint}", p.disk.target),
                    message: "libvirt's backup job names no bitmap for it".into(),
                })?,
            },
            Mode::Content => Shared::Content {
                previous: previous(),
            },
        };
        let mut options = self.req.options.clone();
        if !self.running && p.disk.format.as_deref() == Some("raw") {
            options = options.source_format(qbackup_formats::Format::Raw);
        }
        self.files.push(target.clone());
        let what = Pull {
            disk: &p.disk.target,
            uri: source,
            target: &target,
            id: &self.id,
            mode: &mode,
        };
        let report = pull(&options, &FileOpener, progress, on_plan, cancel, what)?;
        Ok((report, p.mode.word(), p.reason.clone()))
    }

    /// Ends the backup job (the export and scratch files go; the new
    /// checkpoint stays). A failure is reported, not fatal: the backups
    /// are durable.
    fn end_job(&self, note: &mut dyn FnMut(String)) {
        if let Err(e) = api::abort_job(self.dom) {
            note(format!(
                "domain {}: could not end the backup job: {} (virsh domjobabort {} ends it)",
                self.req.domain,
                e.message(),
                self.req.domain
            ));
        }
    }

    /// Deletes the qbackup checkpoints no disk's newest backup is named
    /// after.
    fn drop_superseded(&self, note: &mut dyn FnMut(String)) {
        let name = &self.req.domain;
        let Ok(cps) = api::checkpoints(self.dom) else {
            return;
        };
        let mut keep = vec![self.id.clone()];
        if let Ok(dirs) = std::fs::read_dir(&self.req.set) {
            for d in dirs.flatten() {
                let fname = d.file_name().to_string_lossy().into_owned();
                if fname.starts_with('.') || !d.path().is_dir() {
                    continue;
                }
                if let Ok(Some(e)) = DiskDir::new(&self.req.set, &fname).latest() {
                    keep.push(e.meta.id);
                }
            }
        }
        for cp in plan::stale(&cps, &keep) {
            let Err(e) = api::delete_checkpoint(self.dom, &cp) else {
                continue;
            };
            // Its bitmaps are broken (a crash): nothing to merge, so only
            // libvirt's record of it goes.
            match api::forget_checkpoint(self.dom, &cp) {
                Ok(_) => note(format!(
                    "domain {name}: superseded checkpoint {cp} removed from libvirt's records only ({})",
                    e.message()
                )),
                Err(e2) => note(format!(
                    "domain {name}: could not delete superseded checkpoint {cp}: {}; {}",
                    e.message(),
                    e2.message()
                )),
            }
        }
    }

    /// Undoes the cycle: ends the job, deletes its checkpoint (its bitmap
    /// merges into the parent's) and its files, then the record.
    pub fn rollback(&mut self, note: &mut dyn FnMut(String)) {
        let name = &self.req.domain;
        if self.running {
            if let Ok(Some(_)) = api::backup_xml(self.dom) {
                self.end_job(note);
            }
            let cp = plan::checkpoint_name(&self.id);
            if let Err(e) = api::delete_checkpoint(self.dom, &cp) {
                note(format!(
                    "domain {name}: could not delete checkpoint {cp} of the failed run: {} (the next run retries)",
                    e.message()
                ));
                return;
            }
        }
        let files = std::mem::take(&mut self.files);
        if let Err(e) = crate::live::cycle::remove_backups(files.iter().map(PathBuf::as_path)) {
            note(format!("{e} (the next run retries)"));
            return;
        }
        let _ = std::fs::remove_file(self.req.set.join(PENDING));
    }
}
