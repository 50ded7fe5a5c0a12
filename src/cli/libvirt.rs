//! `qbackup backup --libvirt DOMAIN [--connect URI] [--disk DEV]...
//! [--sync auto|full|incremental] [--scratch DIR] SET`: maps the flags to a
//! libvirt cycle's request, runs one cycle and prints one line per disk
//! (or one JSON object with a `disks` array, as `--qmp` does).

#[cfg(feature = "libvirt")]
use std::io::Write;
#[cfg(feature = "libvirt")]
use std::sync::Arc;

use anyhow::Result;

use super::backup::BackupArgs;
use super::status::UsageError;

/// The `backup` flags of a libvirt domain's backup (`--disk`, `--scratch`
/// and `--sync` are shared with `--qmp`).
#[derive(clap::Args, Debug, Default)]
pub struct LibvirtArgs {
    /// Back up the libvirt domain DOMAIN into the backup set directory DIR
    /// (the one path argument): running, through libvirt's pull-mode
    /// backup and checkpoints; shut off, from its image files. See
    /// docs/libvirt.md.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "qmp")]
    pub libvirt: Option<String>,
    /// With --libvirt: libvirt's connection URI (default: libvirt's).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
}

/// Runs one cycle.
#[cfg(not(feature = "libvirt"))]
pub fn run(_args: BackupArgs) -> Result<u8> {
    Err(UsageError(
        "--libvirt: this qbackup was built without libvirt (cargo feature `libvirt`)".into(),
    )
    .into())
}

/// Runs one cycle.
#[cfg(feature = "libvirt")]
pub fn run(args: BackupArgs) -> Result<u8> {
    use qbackup::backup::{BackupError, Cancel};
    use qbackup::live::libvirt::{self, LibvirtError, LibvirtRequest, SyncPolicy};
    use qbackup::live::LiveError;
    use qbackup_formats::{Classify, ErrorClass};
    use serde_json::json;

    use super::backup::{usage_text, SyncArg};
    use super::progress::Reporter;
    use super::{report, status, OutputArg};

    if args.target.is_some() {
        return Err(UsageError(
            "--libvirt backs up into one backup set directory: give DIR only".into(),
        )
        .into());
    }
    let sync =
        match args.sync {
            None | Some(SyncArg::Auto) => SyncPolicy::Auto,
            Some(SyncArg::Full) => SyncPolicy::Full,
            Some(SyncArg::Incremental) => SyncPolicy::Incremental,
            Some(SyncArg::Top) => return Err(UsageError(
                "--sync top does not apply to --libvirt (a live backup copies the guest's view)"
                    .into(),
            )
            .into()),
        };
    if let Some(flag) = args.not_for_live() {
        return Err(UsageError(format!(
            "{flag} does not apply to --libvirt: qbackup picks each disk's previous backup and bitmap itself, into qcow2 files with manifests"
        ))
        .into());
    }
    // --sync is the cycle's (per disk); the shared options are checked
    // as a full backup's.
    let options = args.request().sync(qbackup::backup::SyncMode::Full);
    options
        .clone()
        .validate()
        .map_err(|e| UsageError(usage_text(&e)))?;
    let req = LibvirtRequest {
        uri: args.libvirt.connect.clone(),
        domain: args.libvirt.libvirt.clone().unwrap_or_default(),
        disks: args.disks.clone(),
        sync,
        set: args.source.clone(),
        scratch: args.scratch.clone(),
        options,
    };
    let ((progress, quiet), output) = (args.display(), args.output);
    let reporter = Reporter::new(progress);
    let cancel = Arc::new(Cancel::new());
    super::backup::watch_signals(&cancel)?;
    // The bar covers every disk: each disk's plan adds its bytes.
    let mut total = 0u64;
    let mut on_plan = |bytes: u64| {
        total += bytes;
        reporter.start(total);
    };
    let result = libvirt::run(&req, &reporter, &mut on_plan, &cancel, &mut |line| {
        eprintln!("qbackup: {line}")
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            reporter.abandon();
            return Err(match e {
                // The backup's own error (it names the disk's backup
                // file), so that a signal maps to its exit status.
                LibvirtError::Live(LiveError::Backup { source, .. })
                    if source.class() == ErrorClass::Interrupted =>
                {
                    anyhow::Error::new::<BackupError>(*source)
                }
                e if e.class() == ErrorClass::Usage => UsageError(e.to_string()).into(),
                e => e.into(),
            });
        }
    };
    reporter.finish();
    for d in &report.disks {
        for w in &d.report.warnings {
            eprintln!("qbackup: warning: {}: {w}", d.disk);
        }
    }
    match output {
        OutputArg::Json => {
            let disks: Vec<_> = report
                .disks
                .iter()
                .map(|d| {
                    let mut head = serde_json::Map::new();
                    head.insert("name".into(), json!(d.disk));
                    head.insert("reason".into(), json!(d.reason));
                    let mut o = report::disk_json(head, &d.report);
                    // What ran, in the cycle's words (incremental by
                    // bitmap or by content).
                    o["sync"] = json!(d.sync);
                    o
                })
                .collect();
            let obj = json!({
                "domain": report.domain,
                "running": report.running,
                "checkpoint": report.checkpoint,
                "disks": disks,
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{obj}")?;
            out.flush()?;
        }
        OutputArg::Human if !quiet => {
            for d in &report.disks {
                eprintln!(
                    "{}",
                    report::disk_line(&d.disk, d.sync, &d.reason, &d.report)
                );
            }
        }
        OutputArg::Human => {}
    }
    Ok(status::SUCCESS)
}
