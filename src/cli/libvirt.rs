//! `qbackup backup --libvirt DOMAIN [--connect URI] [--disk DEV]...
//! [--sync auto|full|incremental] [--scratch DIR] SET`: maps the flags to a
//! [`LibvirtRequest`], runs one cycle and prints one line per disk (or one
//! JSON object with `"disks": [...]`).

use std::path::PathBuf;

use anyhow::Result;

use super::OutputArg;

/// The `backup` flags of a libvirt domain's backup.
#[derive(clap::Args, Debug, Default)]
pub struct LibvirtArgs {
    /// Back up the libvirt domain DOMAIN (running: through libvirt's
    /// pull-mode backup and checkpoints; shut off: from its image files)
    /// into the backup set SOURCE (the only positional argument).
    #[arg(long, value_name = "DOMAIN")]
    pub libvirt: Option<String>,
    /// With --libvirt: libvirt's connection URI (default: libvirt's).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
    /// With --libvirt: a disk to back up, by target (vda); repeat for
    /// more. Default: every writable disk with a local image.
    #[arg(long = "disk", value_name = "TARGET-DEV", requires = "libvirt")]
    pub disks: Vec<String>,
    /// With --libvirt: where libvirt puts the scratch files and the
    /// export's socket (QEMU's user must write there). Default:
    /// SET/.qbackup-scratch.
    #[arg(long, value_name = "DIR", requires = "libvirt")]
    pub scratch: Option<PathBuf>,
}

/// `--sync` as the libvirt cycle reads it (`None`: auto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Incremental when possible, else full.
    Auto,
    /// Always full.
    Full,
    /// Incremental or fail.
    Incremental,
}

/// What `backup --libvirt` takes from the other backup flags.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(super) struct Common {
    /// `--sync`.
    pub(super) sync: Sync,
    /// The set directory.
    pub(super) set: PathBuf,
    /// `--threads`.
    pub(super) threads: Option<usize>,
    /// `--speed`.
    pub(super) speed: Option<u64>,
    /// `-q`.
    pub(super) quiet: bool,
    /// `--output`.
    pub(super) output: OutputArg,
}

/// Runs one cycle.
#[cfg(not(feature = "libvirt"))]
pub(super) fn run(_args: &LibvirtArgs, _common: Common) -> Result<u8> {
    Err(super::status::UsageError(
        "--libvirt: this qbackup was built without libvirt (cargo feature `libvirt`)".into(),
    )
    .into())
}

/// Runs one cycle.
#[cfg(feature = "libvirt")]
pub(super) fn run(args: &LibvirtArgs, common: Common) -> Result<u8> {
    use std::io::Write;
    use std::sync::Arc;

    use qbackup::backup::Cancel;
    use qbackup::live::libvirt::{self, LibvirtRequest, SyncPolicy};
    use serde_json::json;

    use super::status;

    let req = LibvirtRequest {
        uri: args.connect.clone(),
        domain: args.libvirt.clone().unwrap_or_default(),
        disks: args.disks.clone(),
        sync: match common.sync {
            Sync::Auto => SyncPolicy::Auto,
            Sync::Full => SyncPolicy::Full,
            Sync::Incremental => SyncPolicy::Incremental,
        },
        set: common.set,
        scratch: args.scratch.clone(),
        threads: common.threads,
        speed: common.speed,
    };
    let cancel = Arc::new(Cancel::new());
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
    let report = libvirt::run(&req, &cancel, &mut |line| eprintln!("qbackup: {line}")).map_err(
        |e| -> anyhow::Error {
            use qbackup_formats::{Classify, ErrorClass};
            match e {
                // The backup's own error (it names the disk's backup file),
                // so that a signal maps to its exit status.
                libvirt::LibvirtError::Backup { source, .. } => anyhow::Error::from(*source),
                e if e.class() == ErrorClass::Usage => status::UsageError(e.to_string()).into(),
                e => e.into(),
            }
        },
    )?;
    for d in &report.disks {
        for w in &d.report.warnings {
            eprintln!("qbackup: warning: {}: {w}", d.disk);
        }
    }
    match common.output {
        OutputArg::Json => {
            let disks: Vec<_> = report
                .disks
                .iter()
                .map(|d| {
                    let mut v = super::report::json(&d.report);
                    v["disk"] = json!(d.disk);
                    v["sync"] = json!(d.sync);
                    v["reason"] = json!(d.reason);
                    v
                })
                .collect();
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{}",
                json!({
                    "domain": report.domain,
                    "running": report.running,
                    "checkpoint": report.checkpoint,
                    "disks": disks,
                })
            )?;
            out.flush()?;
        }
        OutputArg::Human if !common.quiet => {
            for d in &report.disks {
                eprintln!(
                    "{}: {} ({}): {}",
                    d.disk,
                    d.sync,
                    d.reason,
                    super::report::human(&d.report).trim_start_matches("qbackup: ")
                );
            }
        }
        OutputArg::Human => {}
    }
    Ok(status::SUCCESS)
}
