//! `qbackup info`: what `qemu-img info` shows, as text or JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use qbackup::info;

use super::{status, FormatArg, OutputArg};

// `info`'s options (its help text is the `Command::Info` doc comment).
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
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
    /// Show every image of the backing chain, top first.
    #[arg(long)]
    backing_chain: bool,
    /// The image.
    image: PathBuf,
}

/// Prints the image's (or its whole chain's) information on stdout.
pub fn run(a: InfoArgs) -> Result<u8> {
    let files = super::Files::new(a.force_share, &a.tls);
    let format = a.format.map(Into::into);
    let text = if a.backing_chain {
        let chain = info::chain_json(files.opener(), &a.image, format)?;
        match a.output {
            OutputArg::Json => serde_json::to_string_pretty(&chain)? + "\n",
            OutputArg::Human => {
                let blocks: Vec<String> = chain.iter().map(info::info_human).collect();
                blocks.join("\n")
            }
        }
    } else {
        let v = info::info_json(files.opener(), &a.image, format)?;
        match a.output {
            OutputArg::Json => serde_json::to_string_pretty(&v)? + "\n",
            OutputArg::Human => info::info_human(&v),
        }
    };
    files.warn_in_use();
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(status::SUCCESS)
}
