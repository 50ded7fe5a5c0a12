//! `qbackup compare`: do two images hold the same guest data? qemu-img
//! compare's lines and exit statuses (0 identical, 1 different, 2 error).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use qbackup::{compare, source};

use qbackup_formats::open::CacheOpener;

use super::backup::CacheArg;
use super::FormatArg;

// `compare`'s options (its help text is the `Command::Compare` doc comment).
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
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
    /// TLS settings of nbds:// sources.
    #[command(flatten)]
    tls: super::tls::TlsArgs,
    /// Print nothing; only the exit status tells.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The page cache: drop (default) leaves it as found; keep leaves what
    /// was read cached.
    #[arg(long, value_enum, default_value_t)]
    cache: CacheArg,
    /// An image file or NBD URI.
    a: PathBuf,
    /// An image file or NBD URI.
    b: PathBuf,
}

/// Compares; the exit status says the outcome.
pub fn run(args: CompareArgs) -> Result<u8> {
    let files = super::Files::new(args.force_share, &args.tls);
    let opener = CacheOpener::new(files.opener(), args.cache.into());
    let open =
        |p: &PathBuf, f: Option<FormatArg>| source::open(&opener, p, f.map(Into::into), None);
    let sa = open(&args.a, args.format_a)?;
    let sb = open(&args.b, args.format_b)?;
    super::warn_marked_corrupt(sa.as_ref());
    super::warn_marked_corrupt(sb.as_ref());
    let outcome = compare::compare(sa.as_ref(), sb.as_ref(), args.strict)?;
    files.warn_in_use();
    super::warn_harmless_damage(sa.as_ref());
    super::warn_harmless_damage(sb.as_ref());
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
    if !args.quiet {
        let mut out = std::io::stdout().lock();
        for l in lines {
            writeln!(out, "{l}")?;
        }
    }
    Ok(status)
}
