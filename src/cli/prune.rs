//! `qbackup prune SET --keep-*`: the retention rules mapped to a
//! [`Policy`]; `--dry-run` prints the plan (kept, merged, deleted) without
//! touching the set; otherwise the library prunes under the set's
//! exclusive lock and the result is printed the same way.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use qbackup::backup;
use qbackup::set::prune::{self, Recovered};
use qbackup::set::retention::Policy;
use qbackup::set::{catalog, LockMode, SetLock};
use qbackup_formats::open::FileOpener;
use serde_json::json;

use super::status::{self, UsageError};
use super::{size, OutputArg};

/// A rule's count: a number, or `unlimited`.
fn count(s: &str) -> Result<u32, String> {
    if s == "unlimited" {
        return Ok(u32::MAX);
    }
    s.parse::<u32>()
        .map_err(|_| format!("{s}: not a count (a number, or unlimited)"))
}

// `prune`'s options (its help text is the `Command::Prune` doc comment).
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Keep the N newest backups of each disk.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_last: Option<u32>,
    /// For the last N hours (UTC) that have backups, keep the newest of each.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_hourly: Option<u32>,
    /// For the last N days (UTC) that have backups, keep the newest of each.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_daily: Option<u32>,
    /// For the last N ISO weeks (Monday to Sunday, UTC) that have backups,
    /// keep the newest of each.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_weekly: Option<u32>,
    /// For the last N months (UTC) that have backups, keep the newest of each.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_monthly: Option<u32>,
    /// For the last N years (UTC) that have backups, keep the newest of each.
    #[arg(long, value_name = "N", value_parser = count)]
    keep_yearly: Option<u32>,
    /// Print what would be kept, merged and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Wait for another qbackup process using the set instead of failing.
    #[arg(long)]
    wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// The backup set (a directory).
    set: PathBuf,
}

/// The line saying what was done about a prune cut short, if anything.
pub fn recovered_text(r: &Recovered) -> Option<String> {
    match r {
        Recovered::Finished(p) => Some(format!(
            "finished the consolidation of {} an interrupted prune had made",
            p.display()
        )),
        Recovered::RolledBack(p) => Some(format!(
            "rolled back the unfinished consolidation of {} an interrupted prune left",
            p.display()
        )),
        Recovered::Nothing => None,
    }
}

/// Prunes (or plans, with --dry-run).
pub fn run(a: PruneArgs) -> Result<u8> {
    let policy = Policy {
        last: a.keep_last.unwrap_or(0),
        hourly: a.keep_hourly.unwrap_or(0),
        daily: a.keep_daily.unwrap_or(0),
        weekly: a.keep_weekly.unwrap_or(0),
        monthly: a.keep_monthly.unwrap_or(0),
        yearly: a.keep_yearly.unwrap_or(0),
    };
    if policy.is_empty() {
        return Err(UsageError(
            "prune needs a policy with at least one count above 0 (--keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly); an empty one would keep nothing".into(),
        )
        .into());
    }
    let mode = if a.dry_run {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    // Not a set (no such directory): said before the lock would make it.
    catalog::read(&a.set)?;
    let _lock = SetLock::acquire(&a.set, mode, a.wait)?;
    let cat = catalog::read(&a.set)?;
    let kept = prune::kept_ids(&cat, &policy)?;
    let plan = prune::plan(&cat, &kept);
    let pending = a.set.join(prune::INTENT_FILE).exists();
    let mut out = std::io::stdout().lock();
    let short = |i: usize| cat.backups[i].id.chars().take(8).collect::<String>();
    if a.dry_run {
        match a.output {
            OutputArg::Json => {
                let v = json!({
                    "dry-run": true,
                    "interrupted-prune-pending": pending,
                    "keep": plan.keep.iter().map(|(i, r)| json!({"id": cat.backups[*i].id, "reasons": r})).collect::<Vec<_>>(),
                    "held": plan.held.iter().map(|&(i, c)| json!({"id": cat.backups[i].id, "parent-of": cat.backups[c].id})).collect::<Vec<_>>(),
                    "merge": plan.merges.iter().map(|m| json!({
                        "run": m.run.iter().map(|&i| cat.backups[i].id.clone()).collect::<Vec<_>>(),
                        "onto": m.onto.map(|i| cat.backups[i].id.clone()),
                        "child": cat.backups[m.child].id,
                    })).collect::<Vec<_>>(),
                    "delete": plan.delete.iter().map(|&i| cat.backups[i].id.clone()).collect::<Vec<_>>(),
                    "space-needed": plan.space_needed,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            }
            OutputArg::Human => {
                if pending {
                    writeln!(out, "an interrupted prune is pending: the next prune finishes or undoes it first")?;
                }
                for (i, r) in &plan.keep {
                    let b = &cat.backups[*i];
                    writeln!(
                        out,
                        "keep    {} {} {} ({})",
                        short(*i),
                        b.disk,
                        super::list::iso_time(b.created()),
                        r.join(", ")
                    )?;
                }
                for &(i, c) in &plan.held {
                    writeln!(
                        out,
                        "hold    {} (not kept by the rules, but the parent of {})",
                        short(i),
                        short(c)
                    )?;
                }
                for m in &plan.merges {
                    let run: Vec<String> = m.run.iter().map(|&i| short(i)).collect();
                    writeln!(
                        out,
                        "merge   {} into one consolidated image (as {}), parent of {}{}",
                        run.join(" "),
                        run[0],
                        short(m.child),
                        m.onto
                            .map_or(String::new(), |o| format!(", on {}", short(o)))
                    )?;
                }
                for &i in &plan.delete {
                    writeln!(
                        out,
                        "delete  {} {} {}",
                        short(i),
                        cat.backups[i].disk,
                        super::list::iso_time(cat.backups[i].created())
                    )?;
                }
                writeln!(
                    out,
                    "needs at most {} of free space",
                    size::human(plan.space_needed)
                )?;
            }
        }
        out.flush()?;
        return Ok(status::SUCCESS);
    }
    drop(out);
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
    let done = prune::run(&a.set, &policy, &FileOpener, &cancel)?;
    let recovered = done.recovered.as_ref().and_then(recovered_text);
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputArg::Json => {
            let v = json!({
                "dry-run": false,
                "recovered": recovered,
                "keep": kept.iter().map(|(id, r)| json!({"id": id, "reasons": r})).collect::<Vec<_>>(),
                "merged": done.merged.iter().map(|m| json!({
                    "run": m.run,
                    "clusters": {
                        "data": m.stats.data_clusters,
                        "compressed": m.stats.compressed_clusters,
                        "passed-through": m.stats.passthrough_clusters,
                        "zero": m.stats.zero_clusters,
                    },
                    "bytes-written": m.stats.data_stored_bytes,
                })).collect::<Vec<_>>(),
                "deleted": done.deleted,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        OutputArg::Human => {
            if let Some(r) = &recovered {
                eprintln!("qbackup: {r}");
            }
            eprintln!(
                "qbackup: prune done: kept {}, merged {} runs, deleted {}",
                kept.len(),
                done.merged.len(),
                done.deleted.len()
            );
        }
    }
    out.flush()?;
    Ok(status::SUCCESS)
}
