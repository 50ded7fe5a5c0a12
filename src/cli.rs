//! Command-line definitions (clap) and the glue that turns them into calls
//! into the library. Output forms live beside it: `progress` (`-p`),
//! `report` (the backup's result), `status` (exit statuses).

pub mod progress;
pub mod report;
pub mod size;
pub mod status;

use std::io::Write;
use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use qbackup::{backup, compare, info, map, source, verify};
use qbackup_formats::codec::CompressionType;
use qbackup_formats::open::{nbd_uri, FileOpener, ForceShareOpener, Opener};
use qbackup_formats::{ClusterSize, Format};

use progress::{ProgressArg, Reporter};
use status::usage;

/// Back up qcow2 and raw disk images like QEMU's backup job.
#[derive(Parser, Debug)]
#[command(name = "qbackup", version, about, after_help = status::HELP)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, Default)]
enum OutputArg {
    #[default]
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what qemu-img info shows about an image.
    Info {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<FormatArg>,
        /// Read even if another process writes the image (ignores QEMU's
        /// image locks; the result may be inconsistent).
        #[arg(short = 'U', long)]
        force_share: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputArg,
        /// Show every image of the backing chain, top first.
        #[arg(long)]
        backing_chain: bool,
        /// The image.
        image: PathBuf,
    },
    /// Back up an image into a compressed qcow2 (or sparse raw) file.
    Backup(BackupArgs),
    /// Check that two images hold the same guest data, like qemu-img
    /// compare (exit 0 identical, 1 different, 2 error).
    Compare {
        /// First image's format (probed when omitted).
        #[arg(short = 'f')]
        format_a: Option<FormatArg>,
        /// Second image's format (probed when omitted).
        #[arg(short = 'F')]
        format_b: Option<FormatArg>,
        /// Strict: sizes, allocation, zero and data flags must match too.
        #[arg(short = 's', long)]
        strict: bool,
        /// Read even if another process writes the images (ignores QEMU's
        /// image locks; the result may be inconsistent).
        #[arg(short = 'U', long)]
        force_share: bool,
        /// Print nothing; only the exit status tells.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// An image file or NBD URI.
        a: PathBuf,
        /// An image file or NBD URI.
        b: PathBuf,
    },
    /// Check a backup against the manifest beside it, without the source
    /// (exit 0 good, 1 damaged or not the recorded chain, 2 error).
    Verify {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputArg,
        /// The backup (its manifest is BACKUP.manifest).
        backup: PathBuf,
    },
    /// Show the allocation map of an image and its backing chain.
    Map {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<FormatArg>,
        /// Read even if another process writes the image (ignores QEMU's
        /// image locks; the result may be inconsistent).
        #[arg(short = 'U', long)]
        force_share: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputArg,
        /// Start the map at this guest offset (qemu-img's sizes: 1M, 0x400...).
        #[arg(short = 's', long, value_name = "OFFSET", value_parser = |s: &str| size::parse_qemu_size(s, "start offset"))]
        start_offset: Option<u64>,
        /// Map at most this many bytes.
        #[arg(short = 'l', long, value_name = "LEN", value_parser = |s: &str| size::parse_qemu_size(s, "max length"))]
        max_length: Option<u64>,
        /// The image.
        image: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout, or write one page per
    /// command into a directory.
    Manpage {
        /// Write qbackup.1 and qbackup-COMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SyncArg {
    Full,
    Top,
    Incremental,
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
    Always,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CompressArg {
    Zstd,
    Zlib,
    None,
}

#[derive(clap::Args, Debug)]
#[command(after_help = status::HELP)]
struct BackupArgs {
    /// Source image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<FormatArg>,
    /// What to copy: everything, only the top layer of the chain, or only
    /// what changed since the previous backup (--backing PREV): what the
    /// source's dirty bitmap marks (--bitmap), or else every cluster whose
    /// content differs from PREV's manifest.
    #[arg(long, value_enum, default_value = "full")]
    sync: SyncArg,
    /// The source's persistent dirty bitmap (or an NBD export's
    /// qemu:dirty-bitmap:NAME context). --sync incremental copies what it
    /// marks; --sync full starts a new cycle by clearing it.
    #[arg(long)]
    bitmap: Option<String>,
    /// What happens to --bitmap in an image file SOURCE: on-success
    /// (default) clears it once the backup is durable; never leaves it.
    /// always is refused (a failed backup leaves no target, so it would
    /// lose writes). NBD exports: never (their server owns the bitmap).
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
    #[arg(long, value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// Worker threads, 1 to 4 per core (at least 8, at most 256); default:
    /// all cores. Fewer run when more would not fit in 64 MiB of memory
    /// (large clusters, or very many threads).
    #[arg(long)]
    threads: Option<usize>,
    /// Rate limit in bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
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
    output: OutputArg,
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
    /// The image to back up.
    source: PathBuf,
    /// Where to write the backup.
    target: PathBuf,
}

/// Parses a size like qemu-img: a number with an optional k/M/G/T suffix
/// (powers of 1024) or a plain byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("unknown size suffix '{c}'")),
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size '{s}'"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// The most worker threads `--threads` accepts on any machine.
const MAX_THREADS: usize = 256;

/// The most worker threads `--threads` accepts with `cores` cores: four
/// per core (threads beyond the cores only help while others wait for
/// I/O, e.g. on a slow NBD server), at least 8, at most [`MAX_THREADS`].
/// The copier then starts as many of them as fit its memory budget (see
/// `backup/budget.rs`).
fn thread_limit(cores: usize) -> usize {
    cores.saturating_mul(4).clamp(8, MAX_THREADS)
}

impl BackupArgs {
    /// Validates the arguments into a backup configuration.
    /// Validates the arguments into a backup configuration; a wrong
    /// combination is a [`status::UsageError`].
    fn into_config(self) -> Result<backup::BackupConfig> {
        let raw = matches!(self.target_format, FormatArg::Raw);
        if raw {
            // Options that only a qcow2 target uses are refused, not ignored.
            if self.compress.is_some_and(|c| c != CompressArg::None) || self.level.is_some() {
                usage!("--compress and --level apply to qcow2 targets only (a raw target is not compressed)");
            }
            if self.recompress {
                usage!("--recompress applies to qcow2 targets only");
            }
            if self.sync != SyncArg::Full {
                usage!("--sync top and incremental need a qcow2 target: a raw file cannot refer to a backing file");
            }
        }
        if self.no_create && !raw {
            usage!("-n (--no-create) restores raw bytes onto a block device: add -O raw");
        }
        if self.no_create && self.force {
            usage!("-n (--no-create) writes into TARGET in place, --force replaces a file: pass one of them");
        }
        let compression = match self.compress.unwrap_or(CompressArg::Zstd) {
            CompressArg::None => None,
            CompressArg::Zstd => Some((CompressionType::Zstd, self.level.unwrap_or(3))),
            CompressArg::Zlib => Some((CompressionType::Zlib, self.level.unwrap_or(6))),
        };
        match compression {
            Some((CompressionType::Zstd, l)) if !(1..=19).contains(&l) => {
                usage!("--level for zstd must be 1 to 19")
            }
            Some((CompressionType::Zlib, l)) if !(1..=9).contains(&l) => {
                usage!("--level for zlib must be 1 to 9")
            }
            None if self.level.is_some() => usage!("--level needs --compress zstd or zlib"),
            _ => {}
        }
        if let Some(c) = self.cluster_size {
            if ClusterSize::new(c).is_none() {
                usage!("--cluster-size {c} must be a power of two from 512 to 2M");
            }
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let max_threads = thread_limit(cores);
        match self.threads {
            Some(0) => usage!("--threads must be at least 1"),
            Some(n) if n > max_threads => usage!(
                "--threads {n} is above the limit of {max_threads} (4 per core, at least 8, at most {MAX_THREADS}): more threads only add memory"
            ),
            _ => {}
        }
        if self.speed == Some(0) {
            usage!("--speed must be positive");
        }
        if self.backing.is_some() && self.sync == SyncArg::Full {
            usage!("--backing only applies to --sync top and incremental");
        }
        if self.backing_unchecked && (self.sync != SyncArg::Top || self.backing.is_none()) {
            usage!("--backing-unchecked only applies to --sync top --backing NAME");
        }
        let clear_bitmap = self.bitmap_policy()?;
        let threads = self.threads.unwrap_or(cores.min(MAX_THREADS));
        Ok(backup::BackupConfig {
            source: self.source,
            source_format: self.format.map(Into::into),
            target: self.target,
            target_format: self.target_format.into(),
            sync: match self.sync {
                SyncArg::Full => backup::SyncMode::Full,
                SyncArg::Top => backup::SyncMode::Top,
                SyncArg::Incremental => backup::SyncMode::Incremental,
            },
            bitmap: self.bitmap,
            clear_bitmap,
            allow_disabled_bitmap: self.allow_disabled_bitmap,
            bitmap_fallback: !self.require_bitmap,
            no_manifest: self.no_manifest,
            allow_corrupt: self.allow_corrupt,
            on_source_error: match self.on_source_error {
                SourceErrorArg::Report => backup::policy::OnSourceError::Report,
                SourceErrorArg::Retry => backup::policy::OnSourceError::Retry,
                SourceErrorArg::Ignore => backup::policy::OnSourceError::Ignore,
            },
            on_target_error: match self.on_target_error {
                TargetErrorArg::Report => backup::policy::OnTargetError::Report,
                TargetErrorArg::Retry => backup::policy::OnTargetError::Retry,
            },
            compression,
            cluster_size: self.cluster_size,
            threads,
            speed: self.speed,
            force: self.force,
            in_place: self.no_create,
            recompress: self.recompress,
            backing: self.backing,
            backing_unchecked: self.backing_unchecked,
        })
    }
}

impl BackupArgs {
    /// Checks --sync, --bitmap, --bitmap-mode and --backing together;
    /// returns whether the bitmap is to be cleared after the backup.
    fn bitmap_policy(&self) -> Result<bool> {
        let nbd = nbd_uri(&self.source).is_some();
        if self.bitmap.is_none() && self.bitmap_mode.is_some() {
            usage!("--bitmap-mode needs --bitmap NAME");
        }
        if self.allow_disabled_bitmap && self.sync != SyncArg::Incremental {
            usage!("--allow-disabled-bitmap only applies to --sync incremental");
        }
        if self.require_bitmap && (self.sync != SyncArg::Incremental || self.bitmap.is_none()) {
            usage!("--require-bitmap only applies to --sync incremental --bitmap NAME");
        }
        let mode = match self.bitmap_mode {
            Some(BitmapModeArg::Always) => usage!("--bitmap-mode always is refused: a failed backup leaves no target, so clearing the bitmap anyway would lose the writes it recorded; use on-success"),
            Some(BitmapModeArg::OnSuccess) if nbd => usage!("--bitmap-mode on-success: an NBD export's bitmap belongs to its server; after the backup, clear or merge it over QMP (block-dirty-bitmap-clear, block-dirty-bitmap-merge), and pass --bitmap-mode never"),
            Some(m) => m,
            None if nbd => BitmapModeArg::Never,
            None => BitmapModeArg::OnSuccess,
        };
        match (self.sync, &self.bitmap, &self.backing) {
            (SyncArg::Incremental, _, None) => {
                usage!("--sync incremental needs --backing PREV (the previous backup)")
            }
            (SyncArg::Top, Some(_), _) => usage!("--bitmap applies to --sync incremental (copy what it marks) and --sync full (clear it: a new cycle)"),
            (SyncArg::Full, Some(_), _) if nbd => usage!("--sync full --bitmap clears the bitmap, but an NBD export's bitmap belongs to its server: clear it over QMP (block-dirty-bitmap-clear)"),
            (SyncArg::Full, Some(_), _) if mode == BitmapModeArg::Never => {
                usage!("--sync full --bitmap only clears the bitmap; with --bitmap-mode never it would do nothing")
            }
            _ => {}
        }
        let clear = self.bitmap.is_some() && mode == BitmapModeArg::OnSuccess;
        if clear && self.force_share {
            usage!("-U/--force-share only reads; clearing the bitmap needs the image to itself (stop what holds it, or pass --bitmap-mode never)");
        }
        Ok(clear)
    }
}

/// The opener for a command: QEMU's image locks honoured, or ignored with
/// `-U`.
enum Files {
    Locked(FileOpener),
    Shared(ForceShareOpener),
}

impl Files {
    fn new(force_share: bool) -> Files {
        if force_share {
            Files::Shared(ForceShareOpener::default())
        } else {
            Files::Locked(FileOpener)
        }
    }

    fn opener(&self) -> &dyn Opener {
        match self {
            Files::Locked(o) => o,
            Files::Shared(o) => o,
        }
    }

    /// After a command that read files with `-U`: warns about each one
    /// another process was writing.
    fn warn_in_use(&self) {
        if let Files::Shared(o) = self {
            for p in o.in_use() {
                eprintln!(
                    "qbackup: warning: {}: another process held it for writing (--force-share); what was read may be inconsistent",
                    p.display()
                );
            }
        }
    }
}

fn run_backup(args: BackupArgs) -> Result<u8> {
    let (quiet, output) = (args.quiet, args.output);
    let files = Files::new(args.force_share);
    let reporter = Reporter::new(args.progress);
    let cfg = args.into_config()?;
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
    let result = backup::run(&cfg, files.opener(), &reporter, &mut on_plan, &cancel);
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

/// The names of the commands, for a command line without one.
pub fn commands() -> Vec<String> {
    Args::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect()
}

/// Exit status of `compare` when it cannot compare (qemu-img's).
pub const COMPARE_ERROR: u8 = 2;

/// The exit status a failed command gets: `compare` reserves 1 for
/// "different", as qemu-img does.
pub fn failure_status(args: &Args) -> u8 {
    match args.command {
        Command::Compare { .. } | Command::Verify { .. } => COMPARE_ERROR,
        _ => status::ERROR,
    }
}

fn run_verify(output: OutputArg, backup: PathBuf) -> Result<u8> {
    let report = verify::verify(&FileOpener, &backup)?;
    let mut out = std::io::stdout().lock();
    match output {
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

/// One warning line per image of `source` that QEMU marked corrupt: it is
/// read as QEMU reads it read-only, but its metadata was found inconsistent.
fn warn_marked_corrupt(source: &dyn source::SourceChecks) {
    for f in source.marked_corrupt() {
        eprintln!(
            "qbackup: warning: {}: image is marked corrupt (QEMU found its metadata inconsistent); showing what it reads, as qemu-img does",
            f.display()
        );
    }
}

/// One warning line per image in which reading found damage that does not
/// change what the guest reads (damaged refcounts).
fn warn_harmless_damage(source: &dyn source::SourceChecks) {
    for (f, what) in source.harmless_damage() {
        eprintln!(
            "qbackup: warning: {}: {}",
            f.display(),
            backup::harmless_damage_text(&what)
        );
    }
}

fn run_compare(
    (format_a, format_b): (Option<FormatArg>, Option<FormatArg>),
    strict: bool,
    force_share: bool,
    quiet: bool,
    (a, b): (PathBuf, PathBuf),
) -> Result<u8> {
    let files = Files::new(force_share);
    let sa = source::open(files.opener(), &a, format_a.map(Into::into), None)?;
    let sb = source::open(files.opener(), &b, format_b.map(Into::into), None)?;
    warn_marked_corrupt(sa.as_ref());
    warn_marked_corrupt(sb.as_ref());
    let outcome = compare::compare(sa.as_ref(), sb.as_ref(), strict)?;
    files.warn_in_use();
    warn_harmless_damage(sa.as_ref());
    warn_harmless_damage(sb.as_ref());
    let mut lines = Vec::new();
    let status = match outcome {
        compare::Outcome::Identical { sizes_differ } => {
            if sizes_differ {
                lines.push("Warning: Image size mismatch!".to_string());
            }
            lines.push("Images are identical.".to_string());
            0
        }
        compare::Outcome::ContentMismatch {
            offset,
            sizes_differ,
        } => {
            if sizes_differ {
                lines.push("Warning: Image size mismatch!".to_string());
            }
            lines.push(format!("Content mismatch at offset {offset}!"));
            1
        }
        compare::Outcome::SizeMismatch => {
            lines.push("Strict mode: Image size mismatch!".to_string());
            1
        }
        compare::Outcome::StatusMismatch { offset } => {
            lines.push(format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
    };
    if !quiet {
        let mut out = std::io::stdout().lock();
        for l in lines {
            writeln!(out, "{l}")?;
        }
    }
    Ok(status)
}

/// Runs the parsed command; returns the exit status of a command that ran
/// to its end (only `compare` has one other than 0).
pub fn run(args: Args) -> Result<u8> {
    let stdout = std::io::stdout();
    match args.command {
        Command::Compare {
            format_a,
            format_b,
            strict,
            force_share,
            quiet,
            a,
            b,
        } => return run_compare((format_a, format_b), strict, force_share, quiet, (a, b)),
        Command::Verify { output, backup } => return run_verify(output, backup),
        Command::Info {
            format,
            force_share,
            output,
            backing_chain,
            image,
        } => {
            let files = Files::new(force_share);
            let format = format.map(Into::into);
            let text = if backing_chain {
                let chain = info::chain_json(files.opener(), &image, format)?;
                match output {
                    OutputArg::Json => serde_json::to_string_pretty(&chain)? + "\n",
                    OutputArg::Human => {
                        let blocks: Vec<String> = chain.iter().map(info::info_human).collect();
                        blocks.join("\n")
                    }
                }
            } else {
                let v = info::info_json(files.opener(), &image, format)?;
                match output {
                    OutputArg::Json => serde_json::to_string_pretty(&v)? + "\n",
                    OutputArg::Human => info::info_human(&v),
                }
            };
            files.warn_in_use();
            stdout.lock().write_all(text.as_bytes())?;
        }
        Command::Backup(b) => return run_backup(b),
        Command::Completions { shell } => {
            let mut out = stdout.lock();
            clap_complete::generate(shell, &mut Args::command(), "qbackup", &mut out);
            out.flush()?;
        }
        Command::Manpage { dir: None } => {
            let mut out = stdout.lock();
            clap_mangen::Man::new(Args::command()).render(&mut out)?;
            out.flush()?;
        }
        Command::Manpage { dir: Some(dir) } => {
            clap_mangen::generate_to(Args::command(), &dir).map_err(|e| {
                anyhow::anyhow!("{}: cannot write the manual pages: {e}", dir.display())
            })?;
        }
        Command::Map {
            format,
            force_share,
            output,
            start_offset,
            max_length,
            image,
        } => {
            let range = map::MapRange {
                start: start_offset.unwrap_or(0),
                max_length,
            };
            let files = Files::new(force_share);
            let src = source::open(files.opener(), &image, format.map(Into::into), None)?;
            warn_marked_corrupt(src.as_ref());
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            match output {
                OutputArg::Json => map::write_json(src.as_ref(), range, &mut out)?,
                OutputArg::Human => map::write_human(src.as_ref(), range, &mut out)?,
            }
            out.flush()?;
            files.warn_in_use();
            warn_harmless_damage(src.as_ref());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, thread_limit};

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("12q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn thread_limits() {
        assert_eq!(thread_limit(1), 8);
        assert_eq!(thread_limit(2), 8);
        assert_eq!(thread_limit(3), 12);
        assert_eq!(thread_limit(64), 256);
        assert_eq!(thread_limit(1000), 256);
        assert_eq!(thread_limit(usize::MAX), 256);
    }
}
