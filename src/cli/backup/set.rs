//! `qbackup backup SOURCE SET/`: a directory TARGET is a backup set. The
//! set's lock is taken, the library plans the new backup
//! ([`qbackup::set::add::plan`]: its file, identity, mode and parent), and
//! the flags that the set decides itself are refused with the reason.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use qbackup::backup::SyncMode;
use qbackup::set::add::{self, AddSync};
use qbackup::set::{LockMode, SetLock};

use super::super::status::UsageError;
use super::super::FormatArg;
use super::{BackupArgs, SyncArg};

/// True when `target` is a backup set: an existing directory, or a name
/// ending with `/`.
pub(super) fn is_set(target: &Path) -> bool {
    target.is_dir() || target.as_os_str().as_bytes().ends_with(b"/")
}

/// Refuses, for a file TARGET, the options only a set takes.
pub(super) fn refuse_set_options(args: &BackupArgs) -> Result<()> {
    if args.sync == Some(SyncArg::Auto) {
        return Err(UsageError(
            "--sync auto applies to a backup set (a directory TARGET): for a file, pass --sync full or incremental --backing PREV".into(),
        )
        .into());
    }
    if args.disk_name.is_some() || args.wait {
        return Err(UsageError(
            "--disk-name and --wait apply to a backup set (a directory TARGET)".into(),
        )
        .into());
    }
    Ok(())
}

/// The usage error for a flag the set decides itself.
fn refused(target: &Path, what: &str) -> anyhow::Error {
    UsageError(format!(
        "{} is a directory, so a backup set: {what}",
        target.display()
    ))
    .into()
}

/// Backs up into the set at `args.target`.
pub(super) fn run(mut args: BackupArgs) -> Result<u8> {
    let set = args.target.clone().expect("a set TARGET");
    if args.force {
        return Err(refused(
            &set,
            "--force does not apply (every backup is a new file)",
        ));
    }
    if args.no_create {
        return Err(refused(&set, "-n writes into a block device, not a set"));
    }
    if matches!(args.target_format, FormatArg::Raw) {
        return Err(refused(
            &set,
            "its backups are qcow2 (-O raw cannot hold a chain)",
        ));
    }
    if args.no_manifest {
        return Err(refused(
            &set,
            "--no-manifest does not apply (a set lists and chains its backups by their manifests)",
        ));
    }
    if args.backing.is_some() || args.backing_unchecked {
        return Err(refused(
            &set,
            "the set picks the previous backup itself (no --backing)",
        ));
    }
    let sync = match args.sync {
        None | Some(SyncArg::Auto) => AddSync::Auto,
        Some(SyncArg::Full) => AddSync::Full,
        Some(SyncArg::Incremental) => AddSync::Incremental,
        Some(SyncArg::Top) => {
            return Err(refused(
                &set,
                "--sync top does not apply (use auto, full or incremental)",
            ))
        }
    };
    let disk = match &args.disk_name {
        Some(d) => d.clone(),
        None => add::disk_name_of(&args.source),
    };
    let _lock = SetLock::acquire(&set, LockMode::Exclusive, args.wait)?;
    let plan = add::plan(&set, &disk, sync, SystemTime::now())?;
    if let Some(what) = super::super::prune::recovered_text(&plan.recovered) {
        eprintln!("qbackup: {what}");
    }
    // The request as the flags make it, then what the set decided.
    args.target = Some(plan.target.clone());
    args.sync = Some(match plan.sync {
        SyncMode::Incremental => SyncArg::Incremental,
        _ => SyncArg::Full,
    });
    args.backing = plan.parent.as_ref().map(|p| p.path.display().to_string());
    let request = args.request().id(plan.id.clone());
    super::execute(&args, request)
}
