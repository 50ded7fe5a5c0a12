//! `qbackup list SET`: every backup of a backup set, one row each (a
//! table, or a JSON array with `--output=json`), then the damage found,
//! each with the backups it affects.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use qbackup::set::catalog::{self, Backup, Catalog};
use qbackup::set::layout::utc_stamp;
use serde_json::{json, Value};

use super::{size, OutputArg};

// `list`'s options (its help text is the `Command::List` doc comment).
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// The backup set (a directory).
    set: PathBuf,
}

/// `secs` as ISO 8601 UTC (`2026-12-02T16:20:00Z`).
pub fn iso_time(secs: u64) -> String {
    let s = utc_stamp(secs);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

/// One backup as JSON.
pub fn row_json(c: &Catalog, b: &Backup) -> Value {
    let meta = b.meta.as_ref();
    json!({
        "id": b.id,
        "time": meta.map(|m| iso_time(m.created)),
        "created": meta.map(|m| m.created),
        "disk": b.disk,
        "kind": b.kind.text(),
        "parent": b.parent.map(|p| c.backups[p].id.clone()),
        "virtual-size": meta.map(|m| m.virtual_size),
        "bytes-stored": b.bytes_stored,
        "chain-depth": b.depth,
        "file": b.path.display().to_string(),
        "last-verify": b.last_verify.as_ref().map(|v| json!({"result": v.result, "time": iso_time(v.time)})),
        "problems": b.problems,
    })
}

/// Lists the set.
pub fn run(a: ListArgs) -> Result<u8> {
    let c = catalog::read(&a.set)?;
    let mut out = std::io::stdout().lock();
    match a.output {
        OutputArg::Json => {
            let rows: Vec<Value> = c.backups.iter().map(|b| row_json(&c, b)).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        }
        OutputArg::Human => {
            let short = |id: &str| id.chars().take(8).collect::<String>();
            let mut rows = vec![[
                "ID", "TIME", "DISK", "KIND", "PARENT", "VIRTUAL", "STORED", "DEPTH", "VERIFIED",
            ]
            .map(String::from)];
            for b in &c.backups {
                let meta = b.meta.as_ref();
                rows.push([
                    short(&b.id),
                    meta.map_or("-".into(), |m| iso_time(m.created)),
                    b.disk.clone(),
                    b.kind.text().into(),
                    b.parent.map_or("-".into(), |p| short(&c.backups[p].id)),
                    meta.map_or("-".into(), |m| size::human(m.virtual_size)),
                    size::human(b.bytes_stored),
                    b.depth.map_or("-".into(), |d| d.to_string()),
                    if b.problems.is_empty() {
                        b.last_verify
                            .as_ref()
                            .map_or("-".into(), |v| v.result.clone())
                    } else {
                        "DAMAGED".into()
                    },
                ]);
            }
            let widths: Vec<usize> = (0..9)
                .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                .collect();
            for r in &rows {
                let line: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .map(|(cell, w)| format!("{cell:<w$}"))
                    .collect();
                writeln!(out, "{}", line.join("  ").trim_end())?;
            }
            for d in c.damage() {
                writeln!(out, "damaged: {d}")?;
            }
            if a.set.join(qbackup::set::intent::INTENT_FILE).exists() {
                writeln!(out, "note: a prune was cut short; the next prune (or backup into the set) finishes or undoes it")?;
            }
        }
    }
    out.flush()?;
    Ok(super::status::SUCCESS)
}
