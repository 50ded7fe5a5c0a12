//! `qbackup backup --qmp SOCKET DIR`: maps the flags to a
//! [`LiveRequest`], runs one live cycle and prints one line per disk (or
//! one JSON object with a `disks` array).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use qbackup::backup::{self, BackupError};
use qbackup::live::{self, LiveError, LiveRequest, LiveSync};
use qbackup_formats::{Classify, ErrorClass};
use serde_json::json;

use super::backup::{usage_text, BackupArgs, SyncArg};
use super::progress::Reporter;
use super::status::{self, UsageError};
use super::{report, OutputArg};

/// How long a signalled live backup gets to undo its changes in QEMU
/// before the process exits anyway (the next run then repairs them).
const GRACE: Duration = Duration::from_secs(30);

/// Runs one live backup cycle.
pub fn run(args: BackupArgs) -> Result<u8> {
    if args.target.is_some() {
        return Err(UsageError(
            "--qmp backs up into one backup set directory: give DIR only".into(),
        )
        .into());
    }
    let sync = match args.sync {
        None | Some(SyncArg::Auto) => LiveSync::Auto,
        Some(SyncArg::Full) => LiveSync::Full,
        Some(SyncArg::Incremental) => LiveSync::Incremental,
        Some(SyncArg::Top) => {
            return Err(UsageError(
                "--sync top does not apply to --qmp (a live backup copies the guest's view)".into(),
            )
            .into())
        }
    };
    if let Some(flag) = args.not_for_live() {
        return Err(UsageError(format!(
            "{flag} does not apply to --qmp: qbackup picks each disk's previous backup and bitmap itself, into qcow2 files with manifests"
        ))
        .into());
    }
    // The sync mode, backing file and bitmap are set per disk; the shared
    // options are checked as those of a full backup.
    let options = args.request().sync(backup::SyncMode::Full);
    // The per-disk requests are checked as they are made; check the
    // shared options once now, so a wrong flag is a usage error before
    // QEMU is touched.
    options
        .clone()
        .validate()
        .map_err(|e| UsageError(usage_text(&e)))?;
    let req = LiveRequest {
        qmp: args.qmp.clone().expect("--qmp given"),
        set: args.source.clone(),
        disks: args.disks.clone(),
        sync,
        scratch: args.scratch.clone(),
        options,
    };
    let ((progress, quiet), output) = (args.display(), args.output);
    let files = super::Files::new(false, &args.tls);
    let reporter = Reporter::new(progress);
    let cancel = Arc::new(backup::Cancel::new());
    super::backup::watch_signals_with_grace(&cancel, Some(GRACE))?;
    // The bar covers every disk: each disk's plan adds its bytes.
    let mut total = 0u64;
    let mut on_plan = |bytes: u64| {
        total += bytes;
        reporter.start(total);
    };
    let mut on_note = |line: &str| eprintln!("qbackup: {line}");
    let result = live::run(
        &req,
        files.opener(),
        &reporter,
        &mut on_plan,
        &cancel,
        &mut on_note,
    );
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            reporter.abandon();
            return Err(unwrap_interrupted(e));
        }
    };
    reporter.finish();
    match output {
        OutputArg::Json => {
            let disks: Vec<_> = report
                .disks
                .iter()
                .map(|d| {
                    let mut head = serde_json::Map::new();
                    head.insert("node".into(), json!(d.node));
                    head.insert("device".into(), json!(d.device));
                    head.insert("name".into(), json!(d.name));
                    head.insert("reason".into(), json!(d.reason));
                    report::disk_json(head, &d.backup)
                })
                .collect();
            let obj = json!({
                "repaired": report.repaired,
                "disks": disks,
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{obj}")?;
            out.flush()?;
        }
        OutputArg::Human if !quiet => {
            for d in &report.disks {
                let sync = d.backup.mode.name();
                eprintln!("{}", report::disk_line(&d.name, sync, &d.reason, &d.backup));
            }
        }
        OutputArg::Human => {}
    }
    Ok(status::SUCCESS)
}

/// An interrupted disk backup is reported as the interruption itself, so
/// the exit status names the signal.
fn unwrap_interrupted(e: LiveError) -> anyhow::Error {
    match e {
        LiveError::Backup { source, .. } if source.class() == ErrorClass::Interrupted => {
            anyhow::Error::new::<BackupError>(*source)
        }
        e => e.into(),
    }
}
