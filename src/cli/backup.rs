//! `qbackup backup`: maps the flags to a [`BackupRequest`] (the library
//! checks which go together), a [`RequestError`] back to the usage line
//! that names the flags, runs the backup and prints its result.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::ValueEnum;
use qbackup::backup::{
    self, policy, BackupRequest, BitmapMode, Compression, RequestError, SyncMode,
};
use qbackup_formats::storage::cache::CachePolicy;

use super::progress::{ProgressArg, Reporter};
use super::status::{self, UsageError};
use super::{report, size, FormatArg, OutputArg};

// Backup sets (a directory TARGET): see backup/set.rs.
mod set;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SyncArg {
    Full,
    Top,
    Incremental,
    /// A backup set's choice (a directory TARGET, --qmp, --libvirt): full
    /// for a disk's first backup, else incremental on its newest.
    Auto,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SourceErrorArg {
    Report,
    Retry,
    Ignore,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TargetErrorArg {
    Report,
    Retry,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BitmapModeArg {
    OnSuccess,
    Never,
    // QEMU's third mode: refused with the reason, so not offered in help
    // or completions.
    #[value(hide = true)]
    Always,
}

/// `--cache` (backup, verify, compare).
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum CacheArg {
    #[default]
    Drop,
    Keep,
}

impl From<CacheArg> for CachePolicy {
    fn from(a: CacheArg) -> CachePolicy {
        match a {
            CacheArg::Drop => CachePolicy::Drop,
            CacheArg::Keep => CachePolicy::Keep,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CompressArg {
    Zstd,
    Zlib,
    None,
}

/// A size option's value, read as qemu-img reads sizes.
fn size_arg(what: &'static str) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s: &str| size::parse_qemu_size(s, what)
}

#[derive(clap::Args, Debug)]
#[command(after_help = status::HELP)]
pub struct BackupArgs {
    /// Source image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<FormatArg>,
    /// What to copy: everything, only the top layer of the chain, or only
    /// what changed since the previous backup (--backing PREV): what the
    /// source's dirty bitmap marks (--bitmap), or else every cluster whose
    /// content differs from PREV's manifest. auto (the default for a
    /// backup set: a directory TARGET, --qmp, --libvirt; refused for a file
    /// TARGET): full for a disk's first backup in the set, else incremental
    /// on its newest. Default for a file TARGET: full.
    #[arg(long, value_enum)]
    pub(super) sync: Option<SyncArg>,
    /// Back up a running VM through QEMU's QMP socket (its -qmp
    /// unix:PATH,server=on): every disk frozen at one point in time, pulled
    /// into the backup set directory DIR (the one path argument). See
    /// docs/live-vms.md.
    #[arg(long, value_name = "SOCKET")]
    pub(super) qmp: Option<PathBuf>,
    /// With --qmp: back up this disk (a device id or node name); repeat for
    /// more. Default: every writable, non-removable disk. With --libvirt:
    /// a disk's target (vda).
    #[arg(long = "disk", value_name = "NAME")]
    pub(super) disks: Vec<String>,
    /// With --qmp: the directory for the fleecing images (default:
    /// DIR/.qbackup-scratch). It must have room for each disk's size.
    /// With --libvirt: for libvirt's scratch files and the export's socket
    /// (QEMU's user must write there).
    #[arg(long, value_name = "DIR")]
    pub(super) scratch: Option<PathBuf>,
    #[command(flatten)]
    pub(super) libvirt: Box<super::libvirt::LibvirtArgs>,
    /// The source's persistent dirty bitmap (or an NBD export's
    /// qemu:dirty-bitmap:NAME context). --sync incremental copies what it
    /// marks; --sync full starts a new cycle by clearing it.
    #[arg(long)]
    bitmap: Option<String>,
    /// What happens to --bitmap in an image file SOURCE: on-success
    /// (default) clears it once the backup is durable; never leaves it.
    /// (QEMU's always is refused: a failed backup leaves no target, so it
    /// would lose writes.) NBD exports: never (their server owns the bitmap).
    #[arg(long, value_enum)]
    bitmap_mode: Option<BitmapModeArg>,
    /// With --sync incremental: accept a disabled bitmap (one that stopped
    /// recording writes, e.g. disabled on purpose at a backup point).
    #[arg(long)]
    allow_disabled_bitmap: bool,
    /// With --sync incremental --bitmap: fail when the bitmap cannot be
    /// used (missing, in use, disabled, damaged) instead of falling back to
    /// an incremental backup by content with a warning.
    #[arg(long)]
    require_bitmap: bool,
    /// Write no manifest (TARGET.manifest) beside the backup: it then
    /// cannot be verified, nor be the previous backup of an incremental
    /// backup without a bitmap.
    #[arg(long)]
    no_manifest: bool,
    /// Back up a source image that QEMU marked corrupt (its corrupt bit
    /// set: QEMU found its metadata inconsistent), reading it as QEMU reads
    /// it, with a warning. Refused otherwise.
    #[arg(long)]
    allow_corrupt: bool,
    /// What a failed read of the source does: report (fail the backup),
    /// retry (5 attempts over 1.5 s, then fail), ignore (write the clusters
    /// that cannot be read as zeros, list them, exit status 3).
    #[arg(long, value_enum, default_value = "report")]
    on_source_error: SourceErrorArg,
    /// What a failed write or sync of the target does: report (fail the
    /// backup) or retry (5 attempts over 1.5 s, then fail).
    #[arg(long, value_enum, default_value = "report")]
    on_target_error: TargetErrorArg,
    /// Cluster compression for a qcow2 target (default zstd).
    #[arg(long, value_enum)]
    compress: Option<CompressArg>,
    /// Compression level (zstd 1-19, default 3; zlib 1-9, default 6).
    #[arg(long, allow_negative_numbers = true)]
    level: Option<i32>,
    /// Target format.
    #[arg(short = 'O', long = "target-format", default_value = "qcow2")]
    target_format: FormatArg,
    /// Target cluster size (e.g. 64k, 2M); default 64 KiB or the source's, if larger.
    #[arg(long, value_parser = size_arg("cluster size"))]
    cluster_size: Option<u64>,
    /// Worker threads, 1 to 4 per core (at least 8, at most 256); default:
    /// all cores. Fewer run when more would not fit in 64 MiB of memory
    /// (large clusters, or very many threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Rate limit in bytes per second (e.g. 100M).
    #[arg(long, value_parser = size_arg("speed"))]
    speed: Option<u64>,
    /// Show progress on stderr: a bar on a terminal, else a line every 10 %
    /// or 10 s (auto, the default with -p); or bar, lines, or json (one
    /// JSON object per line, every 1 % or 1 s).
    #[arg(short = 'p', long, value_enum, num_args = 0..=1, require_equals = true,
          default_missing_value = "auto", value_name = "MODE")]
    progress: Option<ProgressArg>,
    /// Print no result summary on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The result on success: a line on stderr (human), or one JSON object
    /// on stdout (json).
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// Replace an existing target file.
    #[arg(long)]
    force: bool,
    /// Restore: TARGET is an existing block device (an LV, a loop device),
    /// written in place with -O raw; never created or replaced. It must
    /// hold the virtual size; the rest of it is left alone.
    #[arg(short = 'n', long)]
    no_create: bool,
    /// Recompress source clusters that could be copied as they are.
    #[arg(long)]
    recompress: bool,
    /// With --sync top: the backing file name to record. With --sync
    /// incremental: the previous backup, which the new one is an overlay on.
    #[arg(long)]
    backing: Option<String>,
    /// With --sync top --backing NAME: record NAME without checking that it
    /// opens from TARGET's directory with the size of the source's backing
    /// file (like qemu-img create -u).
    #[arg(long)]
    backing_unchecked: bool,
    /// Read even if another process writes the image (ignores QEMU's image
    /// locks; the backup may be inconsistent). Back up a running VM through
    /// an NBD export instead.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The page cache: drop (default) leaves it as found, dropping what
    /// the backup read or wrote once done with it; keep leaves it cached.
    #[arg(long, value_enum, default_value_t)]
    cache: CacheArg,
    /// TLS settings of nbds:// sources.
    #[command(flatten)]
    pub(super) tls: super::tls::TlsArgs,
    // Backup sets (issue 21).
    /// With a backup set TARGET: the disk's name in the set (default:
    /// SOURCE's file name without its extension).
    #[arg(long, value_name = "NAME")]
    disk_name: Option<String>,
    /// With a backup set TARGET: wait for another qbackup process using
    /// the set instead of failing.
    #[arg(long)]
    wait: bool,
    /// The image to back up (with --qmp or --libvirt: the backup set
    /// directory).
    #[arg(value_name = "SOURCE")]
    pub(super) source: PathBuf,
    /// Where to write the backup: a file, or a backup set (an existing
    /// directory, or a name ending with /): then SET/DISK/TIME-ID.qcow2.
    /// Not with --qmp or --libvirt.
    #[arg(value_name = "TARGET")]
    pub(super) target: Option<PathBuf>,
}

impl BackupArgs {
    /// The first flag given that a live backup (--qmp) decides itself or
    /// cannot use.
    pub(super) fn not_for_live(&self) -> Option<&'static str> {
        [
            (self.backing.is_some(), "--backing"),
            (self.backing_unchecked, "--backing-unchecked"),
            (self.bitmap.is_some(), "--bitmap"),
            (self.bitmap_mode.is_some(), "--bitmap-mode"),
            (self.allow_disabled_bitmap, "--allow-disabled-bitmap"),
            (self.require_bitmap, "--require-bitmap"),
            (self.format.is_some(), "-f"),
            (self.no_create, "-n"),
            (self.force_share, "-U"),
            (self.force, "--force"),
            (self.no_manifest, "--no-manifest"),
            (matches!(self.target_format, FormatArg::Raw), "-O raw"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// The progress mode, the quiet flag.
    pub(super) fn display(&self) -> (Option<ProgressArg>, bool) {
        (self.progress, self.quiet)
    }

    /// The flags as the library's request (nothing checked yet).
    pub(super) fn request(&self) -> BackupRequest {
        let target = self.target.clone().unwrap_or_default();
        BackupRequest::new(&self.source, target)
            .source_format(self.format.map(Into::into))
            .target_format(self.target_format.into())
            .sync(match self.sync {
                None | Some(SyncArg::Full | SyncArg::Auto) => SyncMode::Full,
                Some(SyncArg::Top) => SyncMode::Top,
                Some(SyncArg::Incremental) => SyncMode::Incremental,
            })
            .bitmap(self.bitmap.clone())
            .bitmap_mode(self.bitmap_mode.map(|m| match m {
                BitmapModeArg::OnSuccess => BitmapMode::OnSuccess,
                BitmapModeArg::Never => BitmapMode::Never,
                BitmapModeArg::Always => BitmapMode::Always,
            }))
            .allow_disabled_bitmap(self.allow_disabled_bitmap)
            .require_bitmap(self.require_bitmap)
            .no_manifest(self.no_manifest)
            .allow_corrupt(self.allow_corrupt)
            .cache(self.cache.into())
            .on_source_error(match self.on_source_error {
                SourceErrorArg::Report => policy::OnSourceError::Report,
                SourceErrorArg::Retry => policy::OnSourceError::Retry,
                SourceErrorArg::Ignore => policy::OnSourceError::Ignore,
            })
            .on_target_error(match self.on_target_error {
                TargetErrorArg::Report => policy::OnTargetError::Report,
                TargetErrorArg::Retry => policy::OnTargetError::Retry,
            })
            .compression(self.compress.map(|c| match c {
                CompressArg::Zstd => Compression::Zstd,
                CompressArg::Zlib => Compression::Zlib,
                CompressArg::None => Compression::None,
            }))
            .level(self.level)
            .cluster_size(self.cluster_size)
            .threads(self.threads)
            .speed(self.speed)
            .force(self.force)
            .in_place(self.no_create)
            .recompress(self.recompress)
            .backing(self.backing.clone())
            .backing_unchecked(self.backing_unchecked)
            .force_share(self.force_share)
    }
}

/// The usage line for a refused request, in the CLI's terms (its flags).
pub fn usage_text(e: &RequestError) -> String {
    use RequestError as E;
    match e {
        E::RawCompressed => "--compress and --level apply to qcow2 targets only (a raw target is not compressed)".into(),
        E::RawRecompress => "--recompress applies to qcow2 targets only".into(),
        E::RawNotFull => "--sync top and incremental need a qcow2 target: a raw file cannot refer to a backing file".into(),
        E::RawBitmap => "--bitmap with -O raw: a raw backup cannot start a cycle of incremental backups (they are qcow2 overlays on it), so it does not clear the bitmap".into(),
        E::InPlaceNotRaw => "-n (--no-create) restores raw bytes onto a block device: add -O raw".into(),
        E::InPlaceAndForce => "-n (--no-create) writes into TARGET in place, --force replaces a file: pass one of them".into(),
        E::LevelOutOfRange { codec, min, max, .. } => {
            format!("--level for {} must be {min} to {max}", codec.name())
        }
        E::LevelWithoutCompression => "--level needs --compress zstd or zlib".into(),
        E::ClusterSize(c) => format!("--cluster-size {c} must be a power of two from 512 to 2M"),
        E::NoThreads => "--threads must be at least 1".into(),
        E::TooManyThreads { threads, limit } => format!(
            "--threads {threads} is above the limit of {limit} (4 per core, at least 8, at most {}): more threads only add memory",
            backup::request::MAX_THREADS
        ),
        E::ZeroSpeed => "--speed must be positive".into(),
        // Only library callers (a backup set, the QMP orchestrator) set it.
        E::BadId(_) => e.to_string(),
        E::BackingWithFull => "--backing only applies to --sync top and incremental".into(),
        E::BackingUncheckedMisplaced => "--backing-unchecked only applies to --sync top --backing NAME".into(),
        E::BitmapModeWithoutBitmap => "--bitmap-mode needs --bitmap NAME".into(),
        E::AllowDisabledBitmapMisplaced => "--allow-disabled-bitmap only applies to --sync incremental".into(),
        E::RequireBitmapMisplaced => "--require-bitmap only applies to --sync incremental --bitmap NAME".into(),
        E::BitmapModeAlways => "--bitmap-mode always is refused: a failed backup leaves no target, so clearing the bitmap anyway would lose the writes it recorded; use on-success".into(),
        E::NbdBitmapOnSuccess => "--bitmap-mode on-success: an NBD export's bitmap belongs to its server; after the backup, clear or merge it over QMP (block-dirty-bitmap-clear, block-dirty-bitmap-merge), and pass --bitmap-mode never".into(),
        E::IncrementalWithoutBacking => "--sync incremental needs --backing PREV (the previous backup)".into(),
        E::BitmapWithTop => "--bitmap applies to --sync incremental (copy what it marks) and --sync full (clear it: a new cycle)".into(),
        E::NbdFullClears => "--sync full --bitmap clears the bitmap, but an NBD export's bitmap belongs to its server: clear it over QMP (block-dirty-bitmap-clear)".into(),
        E::FullKeepsBitmap => "--sync full --bitmap only clears the bitmap; with --bitmap-mode never it would do nothing".into(),
        E::ClearWhileShared => "-U/--force-share only reads; clearing the bitmap needs the image to itself (stop what holds it, or pass --bitmap-mode never)".into(),
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP (less those ignored at start) to
/// `cancel`.
pub(super) fn watch_signals(cancel: &Arc<backup::Cancel>) -> Result<()> {
    watch_signals_with_grace(cancel, None)
}

/// [`watch_signals`], with `grace` instead of the default grace period.
pub(super) fn watch_signals_with_grace(
    cancel: &Arc<backup::Cancel>,
    grace: Option<std::time::Duration>,
) -> Result<()> {
    let signals: Vec<i32> = [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]
    .into_iter()
    .filter(|&s| !status::ignored_at_start(s))
    .collect();
    status::record_signals(&signals)?;
    match grace {
        None => crate::signals::watch(Arc::clone(cancel), &signals)?,
        Some(g) => crate::signals::watch_with_grace(Arc::clone(cancel), &signals, g)?,
    }
    Ok(())
}

/// Runs the backup; exit status 0, or 3 when ranges could not be read
/// (`--on-source-error ignore`).
pub fn run(args: BackupArgs) -> Result<u8> {
    if args.libvirt.libvirt.is_some() {
        return super::libvirt::run(args);
    }
    if args.qmp.is_some() {
        return super::live::run(args);
    }
    if !args.disks.is_empty() || args.scratch.is_some() {
        return Err(UsageError("--disk and --scratch apply to --qmp and --libvirt".into()).into());
    }
    if args.target.is_none() {
        return Err(UsageError(
            "the required argument <TARGET> was not given (a running VM: --qmp SOCKET DIR, or --libvirt DOMAIN DIR)".into(),
        )
        .into());
    }
    // A backup set: the set picks the file, the mode and the parent.
    if set::is_set(args.target.as_deref().expect("checked above")) {
        return set::run(args);
    }
    set::refuse_set_options(&args)?;
    let request = args.request();
    execute(&args, request)
}

/// Runs `request` with `args`' progress, output and opener.
fn execute(args: &BackupArgs, request: BackupRequest) -> Result<u8> {
    let (quiet, output) = (args.quiet, args.output);
    let files = super::Files::new(args.force_share, &args.tls);
    let reporter = Reporter::new(args.progress);
    let cfg = request.validate().map_err(|e| UsageError(usage_text(&e)))?;
    let cancel = Arc::new(backup::Cancel::new());
    watch_signals(&cancel)?;
    let mut on_plan = |total: u64| reporter.start(total);
    let after = backup::after::requested(&cfg);
    let result = backup::run(
        &cfg,
        files.opener(),
        after,
        &reporter,
        &mut on_plan,
        &cancel,
    );
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            reporter.abandon();
            return Err(e.into());
        }
    };
    reporter.finish();
    files.warn_in_use();
    for w in &report.warnings {
        eprintln!("qbackup: warning: {w}");
    }
    for (start, len) in &report.stats.unreadable {
        eprintln!(
            "qbackup: warning: {}: guest bytes {start}..{} could not be read and were written as zeros (--on-source-error ignore)",
            cfg.source.display(),
            start + len
        );
    }
    match output {
        OutputArg::Json => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", report::json(&report))?;
            out.flush()?;
        }
        OutputArg::Human if !quiet => eprintln!("{}", report::human(&report)),
        OutputArg::Human => {}
    }
    Ok(if report.stats.unreadable.is_empty() {
        status::SUCCESS
    } else {
        status::UNREADABLE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use qbackup_formats::CompressionType;

    /// `qbackup ARGS` parsed, as the backup's arguments.
    fn parse(args: &[&str]) -> Result<BackupArgs, clap::Error> {
        let mut all = vec!["qbackup", "backup"];
        all.extend(args);
        all.extend(["src.qcow2", "out.qcow2"]);
        let parsed = super::super::Args::try_parse_from(all)?;
        match parsed.command {
            super::super::Command::Backup(b) => Ok(*b),
            _ => unreachable!("parsed as backup"),
        }
    }

    #[test]
    fn every_size_option_reads_qemu_sizes() {
        let a = parse(&["--speed", "0x400", "--cluster-size", "0x10000"]).unwrap();
        assert_eq!((a.speed, a.cluster_size), (Some(1024), Some(65536)));
        let a = parse(&["--speed", "1.5M", "--cluster-size", "1.5M"]).unwrap();
        assert_eq!(a.speed, Some(3 << 19));
        // Parsed, then refused by the request's cluster-size rule.
        let e = a.request().validate().unwrap_err();
        assert_eq!(e, RequestError::ClusterSize(3 << 19));
        assert_eq!(
            usage_text(&e),
            "--cluster-size 1572864 must be a power of two from 512 to 2M"
        );
        assert!(parse(&["--speed", "12q"]).is_err());
        assert!(parse(&["--cluster-size", "1.5"]).is_err());
    }

    #[test]
    fn flags_map_to_the_request() {
        let a = parse(&["--compress", "zlib", "--level", "9", "--threads", "2", "-U"]).unwrap();
        let c = a.request().validate().unwrap();
        assert_eq!(c.compression, Some((CompressionType::Zlib, 9)));
        assert_eq!(c.threads, 2);
        let a = parse(&["-O", "raw", "-n"]).unwrap();
        let c = a.request().validate().unwrap();
        assert!(c.in_place && c.compression.is_some());
        let a = parse(&["--sync", "incremental", "--backing", "p", "--bitmap", "b"]).unwrap();
        let c = a.request().validate().unwrap();
        assert!(c.clear_bitmap && c.bitmap_fallback);
    }

    #[test]
    fn refusals_name_the_flags() {
        let refused =
            |args: &[&str]| usage_text(&parse(args).unwrap().request().validate().unwrap_err());
        assert_eq!(
            refused(&["--level", "20"]),
            "--level for zstd must be 1 to 19"
        );
        assert_eq!(
            refused(&["--compress", "zlib", "--level", "0"]),
            "--level for zlib must be 1 to 9"
        );
        assert!(refused(&["--bitmap", "b", "--bitmap-mode", "always"])
            .starts_with("--bitmap-mode always is refused"));
        assert!(refused(&["-U", "--bitmap", "b"]).starts_with("-U/--force-share only reads"));
        assert_eq!(refused(&["--speed", "0"]), "--speed must be positive");
    }

    #[test]
    fn help_offers_only_accepted_bitmap_modes() {
        use clap::CommandFactory;
        let mut cmd = super::super::Args::command();
        let backup = cmd.find_subcommand_mut("backup").unwrap();
        let help = backup.render_long_help().to_string();
        assert!(
            help.contains("[possible values: on-success, never]\n"),
            "{help}"
        );
        let mut completions = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut cmd,
            "qbackup",
            &mut completions,
        );
        let completions = String::from_utf8(completions).unwrap();
        assert!(
            completions.contains("\"on-success never\""),
            "{completions}"
        );
        assert!(!completions.contains("always"));
        // Still parsed, to be refused with the reason.
        assert!(parse(&["--bitmap", "b", "--bitmap-mode", "always"]).is_ok());
    }
}
