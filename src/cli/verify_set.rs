//! `qbackup verify SET`: every backup of a backup set, parents included;
//! one line per backup (or a JSON array), exit 0 all good, 1 any damaged,
//! 2 some could not be checked.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use qbackup::set::check::{self, Checked};
use qbackup::set::{LockMode, SetLock};
use qbackup_formats::open::FileOpener;
use serde_json::{json, Value};

use super::OutputArg;

/// Verifies the set at `set`.
pub(super) fn run(set: &Path, output: OutputArg) -> Result<u8> {
    // A directory without backups is no set to verify (and gets no lock
    // file).
    if qbackup::set::catalog::read(set)?.backups.is_empty() {
        return Err(qbackup::set::SetError::NotFound {
            set: set.to_path_buf(),
            why: "no backups to verify (not a backup set?)".into(),
        }
        .into());
    }
    let _lock = SetLock::acquire(set, LockMode::Shared, false)?;
    let mut rows: Vec<Value> = Vec::new();
    let human = output == OutputArg::Human;
    let mut out = std::io::stdout().lock();
    let (_cat, all) = check::verify_set(set, &FileOpener, &mut |cat, c: &Checked| {
        let b = &cat.backups[c.index];
        let mut problems = c.chain_problems.clone();
        let mut checked = 0;
        match &c.report {
            Some(Ok(r)) => {
                checked = r.clusters_checked;
                problems.extend(r.chain_problems.iter().cloned());
                problems.extend(r.damaged.iter().map(|d| {
                    format!(
                        "guest bytes {}..{}: {}",
                        d.start,
                        d.start + d.length,
                        d.problem
                    )
                }));
            }
            Some(Err(e)) => problems.push(format!("cannot check: {e}")),
            None => {}
        }
        let verdict = if c.ok() {
            "OK"
        } else if c.damaged() {
            "DAMAGED"
        } else {
            "ERROR"
        };
        if human {
            for p in &problems {
                let _ = writeln!(out, "{}: {p}", b.path.display());
            }
            let _ = writeln!(
                out,
                "{}: {verdict}: backup {} of disk {}, {checked} clusters checked",
                b.path.display(),
                b.id,
                b.disk
            );
        } else {
            rows.push(json!({
                "id": b.id,
                "disk": b.disk,
                "file": b.path.display().to_string(),
                "result": verdict.to_lowercase(),
                "clusters-checked": checked,
                "problems": problems,
            }));
        }
    })?;
    if !human {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    }
    out.flush()?;
    Ok(if all.iter().any(Checked::damaged) {
        1
    } else if all.iter().all(Checked::ok) {
        0
    } else {
        super::COMPARE_ERROR
    })
}
