//! Command-line definitions (clap) and the glue that turns them into calls
//! into the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use qbackup::{info, map};
use qbackup_formats::{Chain, Format};

/// Back up qcow2 and raw disk images like QEMU's backup job.
#[derive(Parser, Debug)]
#[command(name = "qbackup", version, about)]
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
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputArg,
        /// The image.
        image: PathBuf,
    },
    /// Show the allocation map of an image and its backing chain.
    Map {
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<FormatArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputArg,
        /// The image.
        image: PathBuf,
    },
}

/// Runs the parsed command.
pub fn run(args: Args) -> Result<()> {
    let stdout = std::io::stdout();
    match args.command {
        Command::Info {
            format,
            output,
            image,
        } => {
            let v = info::info_json(&image, format.map(Into::into))?;
            let text = match output {
                OutputArg::Json => serde_json::to_string_pretty(&v)? + "\n",
                OutputArg::Human => info::info_human(&v),
            };
            stdout.lock().write_all(text.as_bytes())?;
        }
        Command::Map {
            format,
            output,
            image,
        } => {
            let chain = Chain::open(&image, format.map(Into::into))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            match output {
                OutputArg::Json => map::write_json(&chain, &mut out)?,
                OutputArg::Human => map::write_human(&chain, &mut out)?,
            }
            out.flush()?;
        }
    }
    Ok(())
}
