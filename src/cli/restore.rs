//! `qbackup restore SET [--disk NAME] [--at ID|TIME] TARGET`: one backup of
//! a set (a qcow2 chain, read as any source is) copied to TARGET, a new
//! file or (`-n -O raw`) a block device, as `backup` would copy it. The
//! library picks the backup ([`qbackup::set::pick`]); the set is held
//! with a shared lock so no prune removes a file of the chain meanwhile.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use qbackup::backup::{self, BackupRequest, Compression};
use qbackup::set::{catalog, pick, LockMode, SetLock};
use qbackup_formats::open::FileOpener;
use qbackup_formats::Format;

use super::progress::{ProgressArg, Reporter};
use super::status::{self, UsageError};
use super::{report, FormatArg, OutputArg};

// `restore`'s options (its help text is the `Command::Restore` doc comment).
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The disk to restore (needed when the set has several).
    #[arg(long)]
    disk: Option<String>,
    /// Which backup: an id (at least its first 4 hex digits) or a UTC time
    /// (the newest backup made at or before it: 2026-12-02T16:30:00Z,
    /// "2026-12-02 16:30", or 2026-12-02 for that day's last). Default:
    /// the newest.
    #[arg(long, value_name = "ID|TIME")]
    at: Option<String>,
    /// Target format (raw: a plain disk image; qcow2: compressed with zstd).
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    target_format: FormatArg,
    /// TARGET is an existing block device, written in place (with -O raw).
    #[arg(short = 'n', long)]
    no_create: bool,
    /// Replace an existing target file.
    #[arg(long)]
    force: bool,
    /// Wait for another qbackup process changing the set instead of failing.
    #[arg(long)]
    wait: bool,
    /// Show progress on stderr (as backup -p).
    #[arg(short = 'p', long, value_enum, num_args = 0..=1, require_equals = true,
          default_missing_value = "auto", value_name = "MODE")]
    progress: Option<ProgressArg>,
    /// Print no result summary on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The result on success: a line on stderr, or one JSON object on
    /// stdout (backup's, plus "restored-id").
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// The backup set (a directory).
    set: PathBuf,
    /// Where to restore to.
    target: PathBuf,
}

/// Restores; exit 0 (or 1 with the error).
pub fn run(a: RestoreArgs) -> Result<u8> {
    // Nothing to restore from: said before the lock file is made.
    pick::disk(&catalog::read(&a.set)?, a.disk.as_deref())?;
    let _lock = SetLock::acquire(&a.set, LockMode::Shared, a.wait)?;
    let cat = catalog::read(&a.set)?;
    let disk = pick::disk(&cat, a.disk.as_deref())?;
    let chosen = &cat.backups[pick::backup(&cat, &disk, a.at.as_deref())?];
    let format: Format = a.target_format.into();
    let cfg = BackupRequest::new(&chosen.path, &a.target)
        .target_format(format)
        .compression((format == Format::Raw).then_some(Compression::None))
        .in_place(a.no_create)
        .force(a.force)
        .validate()
        .map_err(|e| UsageError(super::backup::usage_text(&e)))?;
    let reporter = Reporter::new(a.progress);
    let cancel = Arc::new(backup::Cancel::new());
    let signals: Vec<i32> = [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]
    .into_iter()
    .filter(|&s| !status::ignored_at_start(s))
    .collect();
    status::record_signals(&signals)?;
    crate::signals::watch(Arc::clone(&cancel), &signals)?;
    let mut on_plan = |total: u64| reporter.start(total);
    let result = backup::run(&cfg, &FileOpener, vec![], &reporter, &mut on_plan, &cancel);
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            reporter.abandon();
            return Err(e.into());
        }
    };
    reporter.finish();
    match a.output {
        OutputArg::Json => {
            let mut v = report::json(&r);
            v["restored-id"] = chosen.id.clone().into();
            v["restored-file"] = chosen.path.display().to_string().into();
            let mut out = std::io::stdout().lock();
            writeln!(out, "{v}")?;
            out.flush()?;
        }
        OutputArg::Human if !a.quiet => eprintln!(
            "qbackup: restored backup {} of disk {disk} ({}) to {}",
            chosen.id,
            super::list::iso_time(chosen.created()),
            a.target.display()
        ),
        OutputArg::Human => {}
    }
    Ok(status::SUCCESS)
}
