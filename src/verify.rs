//! `qbackup verify BACKUP`: does a backup still hold what it was made with?
//! Checked without the source, against the manifest beside it:
//! - the manifest is intact (its own BLAKE3) and describes this image
//!   (virtual size, the backing file name the image records, and the image
//!   file's identity when the manifest records it: another image beside a
//!   manifest is never taken for its pair);
//! - each parent is the backup it was made on: the parent's manifest is
//!   the one recorded (its BLAKE3), so a parent swapped for another backup
//!   of the same disk, or edited, is caught even where bytes agree;
//! - every cluster reads (through the chain, compressed clusters decoded)
//!   with the CRC32 the manifest records; ranges recorded as zeros are
//!   checked from block status and only read where data is stored.
//!
//! Clusters are read and checked in parallel, in windows of bounded size.
//! A cluster that cannot be read (a truncated file, a broken table) is a
//! mismatch like one whose bytes differ: the backup is damaged there.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use qbackup_formats::open::Opener;
use qbackup_formats::qcow2::Qcow2Image;
use qbackup_formats::storage::Storage;
use qbackup_formats::{Classify, ClusterIndex, ClusterSize, ErrorClass, GuestOffset};

use crate::backup::copier::is_zero;
use crate::manifest::{self, Entry, ManifestError, ManifestReader};
use crate::source::{self, Source, SourceChecks, SourceError};

/// Clusters checked per window (bounded memory: one read buffer each).
const WINDOW: u64 = 256;

/// At most this many damaged ranges are listed.
const MAX_LISTED: usize = 100;

/// A damaged guest range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Damage {
    /// First guest byte.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// The file of the chain that holds it, when known.
    pub file: Option<PathBuf>,
    /// What is wrong.
    pub problem: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The backup.
    pub backup: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// Clusters whose content was checked (data and zeros).
    pub clusters_checked: u64,
    /// Clusters the manifest does not cover (read from a backing file it
    /// has no manifest for).
    pub clusters_not_covered: u64,
    /// Problems with the manifest or the chain itself (not with data).
    pub chain_problems: Vec<String>,
    /// Damaged ranges, in guest order (at most [`MAX_LISTED`]).
    pub damaged: Vec<Damage>,
    /// Damaged ranges in all.
    pub damaged_count: u64,
}

impl Report {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.chain_problems.is_empty() && self.damaged_count == 0
    }
}

/// Errors that stop a verification (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The backup cannot be opened.
    #[error(transparent)]
    Open(#[from] SourceError),
    /// The manifest cannot be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl qbackup_formats::Classify for VerifyError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        match self {
            VerifyError::Open(e) => e.class(),
            VerifyError::Manifest(e) => e.class(),
        }
    }
}

/// Verifies `backup` against its manifest.
pub fn verify(opener: &dyn Opener, backup: &Path) -> Result<Report, VerifyError> {
    let manifest_path = manifest::path_for(backup);
    let mut reader = ManifestReader::open(&manifest_path)?;
    let mut report = Report {
        backup: backup.to_path_buf(),
        manifest: manifest_path,
        ..Report::default()
    };
    // A backup that exists but cannot be opened (a truncated file, a
    // broken header) is damaged, not a reason to give up.
    let source = match source::open(opener, backup, None, None) {
        Ok(s) => s,
        Err(e) if matches!(e.class(), ErrorClass::Corrupt | ErrorClass::Io) => {
            report.chain_problems.push(e.to_string());
            report.damaged_count = reader
                .meta()
                .virtual_size
                .div_ceil(reader.meta().cluster_size);
            return Ok(report);
        }
        Err(e) => return Err(e.into()),
    };
    check_chain(source.as_ref(), &reader, &mut report);
    let (backup, manifest_path) = (report.backup.clone(), report.manifest.clone());
    let top = source.files().into_iter().next();
    check_image_identity(
        (&backup, &manifest_path),
        reader.image(),
        top.as_deref(),
        &mut report,
    );
    for file in source.files() {
        check_metadata(opener, file, &mut report);
    }
    if !report.chain_problems.is_empty() && reader.meta().virtual_size != source.virtual_size() {
        return Ok(report);
    }
    let cs =
        ClusterSize::new(reader.meta().cluster_size).ok_or_else(|| ManifestError::Invalid {
            path: report.manifest.clone(),
            why: "cluster size is not a power of two from 512 to 2M".into(),
        })?;
    let names = source.layer_names();
    let mut index = 0u64;
    let mut window: Vec<(u64, Entry)> = Vec::new();
    loop {
        let next = reader.take(WINDOW)?;
        let flush = match next {
            None => true,
            Some((_, Entry::Data(_))) => window.len() as u64 >= WINDOW,
            Some(_) => true,
        };
        if flush && !window.is_empty() {
            check_data(source.as_ref(), cs, &window, &names, &mut report);
            window.clear();
        }
        let Some((n, entry)) = next else { break };
        match entry {
            Entry::Data(_) => {
                for k in 0..n {
                    window.push((index + k, entry));
                }
            }
            Entry::Zero => check_zero(source.as_ref(), cs, index, n, &names, &mut report),
            Entry::Unknown => report.clusters_not_covered += n,
        }
        if entry != Entry::Unknown {
            report.clusters_checked += n;
        }
        index += n;
    }
    Ok(report)
}

/// The manifest describes this image, and each parent is the recorded one.
fn check_chain(source: &dyn SourceChecks, reader: &ManifestReader, report: &mut Report) {
    let meta = reader.meta();
    if meta.virtual_size != source.virtual_size() {
        report.chain_problems.push(format!(
            "{}: the manifest describes a {}-byte disk, the image is {} bytes",
            report.backup.display(),
            meta.virtual_size,
            source.virtual_size()
        ));
    }
    let named = source.top_backing_name();
    if meta.backing != named {
        report.chain_problems.push(format!(
            "{}: the manifest was made for backing file {:?}, the image names {:?}",
            report.backup.display(),
            meta.backing,
            named
        ));
        return;
    }
    if meta.backing_manifest.is_none() || named.is_none() {
        return;
    }
    // Every ancestor, not just the parent: each must be the backup its
    // child was made on, be the image the chain really opens at that
    // depth, and be the image its own manifest was written for.
    let layers = source.layer_names();
    let files = source.files();
    for (i, ancestor) in manifest::ancestry::ancestors(&report.backup, reader).enumerate() {
        let ancestor = match ancestor {
            Ok(a) => a,
            Err(e) => {
                report.chain_problems.push(e.to_string());
                return;
            }
        };
        let opened = layers.get(i + 1);
        let same = opened.is_some_and(|l| {
            l == &ancestor.backup
                || std::fs::canonicalize(l).ok() == std::fs::canonicalize(&ancestor.backup).ok()
        });
        if !same {
            report.chain_problems.push(format!(
                "{}: the manifests name {} at depth {}, but the chain opens {}",
                report.backup.display(),
                ancestor.backup.display(),
                i + 1,
                opened.map_or("nothing".to_string(), |l| l.display().to_string())
            ));
            return;
        }
        let file = files
            .iter()
            .find(|f| Some(&f.name().to_path_buf()) == opened);
        let manifest_path = manifest::path_for(&ancestor.backup);
        check_image_identity(
            (&ancestor.backup, &manifest_path),
            ancestor.manifest.image(),
            file.map(|f| f.as_ref()),
            report,
        );
    }
}

/// The image `file` of `backup` is the one its manifest (`manifest`, which
/// recorded `recorded`) was written for (see [`manifest::ImageIdentity`]);
/// nothing to check when either is missing.
fn check_image_identity(
    (backup, manifest): (&Path, &Path),
    recorded: Option<&manifest::ImageIdentity>,
    file: Option<&dyn Storage>,
    report: &mut Report,
) {
    let (Some(recorded), Some(file)) = (recorded, file) else {
        return;
    };
    let problem = match manifest::ImageIdentity::read(file) {
        Ok(found) => recorded.difference(&found),
        Err(e) => Some(format!("it cannot be read: {e}")),
    };
    if let Some(why) = problem {
        report.chain_problems.push(format!(
            "{}: not the image {} was written for: {why}",
            backup.display(),
            manifest.display()
        ));
    }
}

/// Runs the qcow2 metadata check on `file` when it is a qcow2 image (the
/// chain's raw files and data files have no metadata).
fn check_metadata(opener: &dyn Opener, file: std::sync::Arc<dyn Storage>, report: &mut Report) {
    let mut magic = [0u8; 4];
    if file.len() < 4
        || file
            .read_exact_at("header", &mut magic, qbackup_formats::HostOffset(0))
            .is_err()
        || magic != *b"QFI\xfb"
    {
        return;
    }
    let name = file.name().to_path_buf();
    let result = Qcow2Image::open(file, opener).and_then(|image| image.check_metadata());
    match result {
        Ok(m) => {
            for p in &m.problems {
                report
                    .chain_problems
                    .push(format!("{}: {p}", name.display()));
            }
            if m.count > m.problems.len() as u64 {
                report.chain_problems.push(format!(
                    "{}: ... and {} more metadata problems",
                    name.display(),
                    m.count - m.problems.len() as u64
                ));
            }
        }
        Err(e) => report.chain_problems.push(format!(
            "{}: cannot check its metadata: {e}",
            name.display()
        )),
    }
}

fn file_at(source: &dyn Source, names: &[PathBuf], offset: GuestOffset) -> Option<PathBuf> {
    let (e, _) = source.status(offset, 1).ok()?;
    names.get(e.depth as usize).cloned()
}

fn damage(report: &mut Report, d: Damage) {
    report.damaged_count += 1;
    if let Some(last) = report.damaged.last_mut() {
        if last.start + last.length == d.start && last.file == d.file && last.problem == d.problem {
            last.length += d.length;
            report.damaged_count -= 1;
            return;
        }
    }
    if report.damaged.len() < MAX_LISTED {
        report.damaged.push(d);
    }
}

/// Reads the clusters of `window` in parallel and compares their CRC32.
fn check_data(
    source: &dyn Source,
    cs: ClusterSize,
    window: &[(u64, Entry)],
    names: &[PathBuf],
    report: &mut Report,
) {
    let size = source.virtual_size();
    let results: Vec<Option<String>> = window
        .par_iter()
        .map(|&(index, entry)| {
            let Entry::Data(digest) = entry else {
                return None;
            };
            let index = ClusterIndex(index);
            let mut buf = vec![0u8; cs.usize()];
            let valid = cs.bytes_below(index, size) as usize;
            match source.read(cs.start_of(index), &mut buf[..valid]) {
                Ok(()) if crc32fast::hash(&buf) == digest.crc32 => None,
                Ok(()) => Some("its bytes differ from the manifest".to_string()),
                Err(e) => Some(format!("cannot be read: {e}")),
            }
        })
        .collect();
    for (&(index, _), problem) in window.iter().zip(results) {
        if let Some(problem) = problem {
            let start = cs.start_of(ClusterIndex(index));
            let length = cs.bytes_below(ClusterIndex(index), size);
            let file = file_at(source, names, start);
            damage(
                report,
                Damage {
                    start: start.0,
                    length,
                    file,
                    problem,
                },
            );
        }
    }
}

/// Checks that `count` clusters from `first` read as zeros: from block
/// status, reading only where data is stored.
fn check_zero(
    source: &dyn Source,
    cs: ClusterSize,
    first: u64,
    count: u64,
    names: &[PathBuf],
    report: &mut Report,
) {
    let size = source.virtual_size();
    let mut pos = cs.start_of(ClusterIndex(first)).0;
    let end = cs.start_of(ClusterIndex(first + count)).0.min(size);
    let mut buf = Vec::new();
    while pos < end {
        let problem = match source.status(GuestOffset(pos), end - pos) {
            Ok((e, len)) if e.zero || !e.data => {
                pos += len;
                continue;
            }
            Ok((_, len)) => {
                // Stored data: read it, a cluster at a time.
                let len = len.min(cs.bytes() - pos % cs.bytes());
                buf.resize(len as usize, 0);
                match source.read(GuestOffset(pos), &mut buf) {
                    Ok(()) if is_zero(&buf) => {
                        pos += len;
                        continue;
                    }
                    Ok(()) => "holds data where the manifest records zeros".to_string(),
                    Err(e) => format!("cannot be read: {e}"),
                }
            }
            Err(e) => format!("cannot be read: {e}"),
        };
        let c = cs.index_of(GuestOffset(pos));
        let start = cs.start_of(c);
        let file = file_at(source, names, start);
        damage(
            report,
            Damage {
                start: start.0,
                length: cs.bytes_below(c, size),
                file,
                problem,
            },
        );
        pos = cs.start_of(c + 1).0;
    }
}
