//! `qbackup map`: the allocation map of an image and its backing chain,
//! like `qemu-img map` (text or JSON, streamed to stdout).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use qbackup::{map, source};

use super::{size, status, FormatArg, OutputArg};

// `map`'s options (its help text is the `Command::Map` doc comment).
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<FormatArg>,
    /// Read even if another process writes the image (ignores QEMU's
    /// image locks; the result may be inconsistent).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// TLS settings of nbds:// sources.
    #[command(flatten)]
    tls: super::tls::TlsArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(super) output: OutputArg,
    /// Start the map at this guest offset (qemu-img's sizes: 1M, 0x400...).
    #[arg(short = 's', long, value_name = "OFFSET", value_parser = |s: &str| size::parse_qemu_size(s, "start offset"))]
    start_offset: Option<u64>,
    /// Map at most this many bytes.
    #[arg(short = 'l', long, value_name = "LEN", value_parser = |s: &str| size::parse_qemu_size(s, "max length"))]
    max_length: Option<u64>,
    /// The image.
    image: PathBuf,
}

/// Streams the map to stdout.
pub fn run(a: MapArgs) -> Result<u8> {
    let range = map::MapRange {
        start: a.start_offset.unwrap_or(0),
        max_length: a.max_length,
    };
    let files = super::Files::new(a.force_share, &a.tls);
    let src = source::open(files.opener(), &a.image, a.format.map(Into::into), None)?;
    super::warn_marked_corrupt(src.as_ref());
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    match a.output {
        OutputArg::Json => map::write_json(src.as_ref(), range, &mut out)?,
        OutputArg::Human => map::write_human(src.as_ref(), range, &mut out)?,
    }
    out.flush()?;
    files.warn_in_use();
    super::warn_harmless_damage(src.as_ref());
    Ok(status::SUCCESS)
}
