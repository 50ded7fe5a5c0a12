//! `qbackup verify`: check a backup against its manifest; a report on
//! stdout (text, or JSON with kebab-case keys) and exit 0 good, 1 damaged,
//! 2 error.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use qbackup::verify;
use qbackup_formats::open::{CacheOpener, FileOpener};

use super::backup::CacheArg;
use super::OutputArg;

// `verify`'s options (its help text is the `Command::Verify` doc comment).
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// The page cache: drop (default) leaves it as found; keep leaves what
    /// was read cached.
    #[arg(long, value_enum, default_value_t)]
    cache: CacheArg,
    /// The backup (its manifest is BACKUP.manifest), or a backup set (a
    /// directory): every backup in it.
    backup: PathBuf,
}

/// Verifies; the exit status says whether the backup is good.
pub fn run(a: VerifyArgs) -> Result<u8> {
    // A backup set: every backup of it (issue 21).
    if a.backup.is_dir() {
        return super::verify_set::run(&a.backup, a.output);
    }
    let report = verify::verify(&CacheOpener::new(&FileOpener, a.cache.into()), &a.backup)?;
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputArg::Json => {
            let mut v = serde_json::to_value(&report)?;
            v["result"] = if report.ok() { "ok" } else { "damaged" }.into();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        OutputArg::Human => {
            for p in &report.chain_problems {
                writeln!(out, "{p}")?;
            }
            for d in &report.damaged {
                let file = d
                    .file
                    .as_ref()
                    .map_or(String::new(), |f| format!(" (stored in {})", f.display()));
                writeln!(
                    out,
                    "guest bytes {}..{}{file}: {}",
                    d.start,
                    d.start + d.length,
                    d.problem
                )?;
            }
            if report.damaged_count > report.damaged.len() as u64 {
                writeln!(
                    out,
                    "... and {} more damaged ranges",
                    report.damaged_count - report.damaged.len() as u64
                )?;
            }
            let covered = if report.clusters_not_covered > 0 {
                format!(
                    ", {} clusters read from backing files the manifest does not cover",
                    report.clusters_not_covered
                )
            } else {
                String::new()
            };
            let verdict = if report.ok() { "OK" } else { "DAMAGED" };
            writeln!(
                out,
                "{}: {verdict}: {} clusters checked against {}{covered}",
                report.backup.display(),
                report.clusters_checked,
                report.manifest.display()
            )?;
        }
    }
    Ok(if report.ok() { 0 } else { 1 })
}
