//! Command-line definitions (clap) and the dispatch to one module per
//! command (`backup`, `verify`, `compare`, `info`, `map`), each of which
//! only maps its flags to a library call and prints the result. Beside
//! them: `progress` (`-p`), `report` (the backup's result), `size`
//! (qemu-img's sizes, for every size option), `status` (exit statuses and
//! the JSON error object), `hint` (the CLI's words for a library error's
//! remedy), `tls` (the TLS options of NBD sources).

pub mod backup;
pub mod compare;
pub mod hint;
pub mod info;
pub mod libvirt;
pub mod list;
pub mod live;
pub mod map;
pub mod progress;
pub mod prune;
pub mod report;
pub mod restore;
pub mod size;
pub mod status;
pub mod tls;
pub mod verify;
pub mod verify_set;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use qbackup::{backup as lib_backup, source};
use qbackup_formats::open::{FileOpener, ForceShareOpener, Opener, TlsOpener};
use qbackup_formats::Format;

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

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum OutputArg {
    #[default]
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what qemu-img info shows about an image.
    Info(info::InfoArgs),
    /// Back up an image into a compressed qcow2 (or sparse raw) file.
    Backup(Box<backup::BackupArgs>),
    /// Check that two images hold the same guest data, like qemu-img
    /// compare (exit 0 identical, 1 different, 2 error).
    Compare(compare::CompareArgs),
    /// Check a backup against the manifest beside it, without the source
    /// (exit 0 good, 1 damaged or not the recorded chain, 2 error).
    Verify(verify::VerifyArgs),
    /// Show the allocation map of an image and its backing chain.
    Map(map::MapArgs),
    /// List every backup of a backup set (a directory made by backup
    /// SOURCE DIR/), with its chain and any damage.
    List(list::ListArgs),
    /// Restore a backup of a backup set (default: the newest) to a file
    /// or, with -n -O raw, a block device.
    Restore(restore::RestoreArgs),
    /// Apply a retention policy to a backup set (restic's --keep-* rules,
    /// in UTC): delete what is not kept, consolidating pruned parents of
    /// kept backups so every kept one stays restorable.
    Prune(prune::PruneArgs),
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

/// The opener for a command: QEMU's image locks honoured, or ignored with
/// `-U`; `nbds` URIs with the TLS options.
enum Files {
    Locked(TlsOpener<FileOpener>),
    Shared(TlsOpener<ForceShareOpener>),
}

impl Files {
    fn new(force_share: bool, tls: &tls::TlsArgs) -> Files {
        if force_share {
            Files::Shared(TlsOpener::new(ForceShareOpener::default(), tls.config()))
        } else {
            Files::Locked(TlsOpener::new(FileOpener, tls.config()))
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
            for p in o.inner().in_use() {
                eprintln!(
                    "qbackup: warning: {}: another process held it for writing (--force-share); what was read may be inconsistent",
                    p.display()
                );
            }
        }
    }
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
            lib_backup::harmless_damage_text(&what)
        );
    }
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
        Command::Compare(_) | Command::Verify(_) => COMPARE_ERROR,
        _ => status::ERROR,
    }
}

/// True when the command writes its result as JSON on stdout
/// (`--output=json`): a failure is then reported there too, as one JSON
/// object (see [`status::json_error`]).
pub fn json_output(args: &Args) -> bool {
    let output = match &args.command {
        Command::Backup(a) => a.output,
        Command::Verify(a) => a.output,
        Command::Info(a) => a.output,
        Command::Map(a) => a.output,
        Command::List(a) => a.output,
        Command::Restore(a) => a.output,
        Command::Prune(a) => a.output,
        Command::Compare(_) | Command::Completions { .. } | Command::Manpage { .. } => {
            OutputArg::Human
        }
    };
    output == OutputArg::Json
}

/// Runs the parsed command; returns the exit status of a command that ran
/// to its end (0, or `compare`'s, `verify`'s and `backup`'s own).
pub fn run(args: Args) -> Result<u8> {
    match args.command {
        Command::Compare(a) => compare::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Info(a) => info::run(a),
        Command::Backup(a) => backup::run(*a),
        Command::Map(a) => map::run(a),
        Command::List(a) => list::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Completions { shell } => {
            // Generated in memory: clap_complete panics on a failed write
            // (a closed pipe), and a write error must be an error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "qbackup", &mut script);
            let mut out = std::io::stdout().lock();
            out.write_all(&script)?;
            out.flush()?;
            Ok(status::SUCCESS)
        }
        Command::Manpage { dir: None } => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(Args::command()).render(&mut out)?;
            out.flush()?;
            Ok(status::SUCCESS)
        }
        Command::Manpage { dir: Some(dir) } => {
            clap_mangen::generate_to(Args::command(), &dir).map_err(|e| {
                anyhow::anyhow!("{}: cannot write the manual pages: {e}", dir.display())
            })?;
            Ok(status::SUCCESS)
        }
    }
}
