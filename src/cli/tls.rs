//! `--tls-certs` and `--tls-hostname`: the TLS settings of `nbds://`
//! sources, for every command that reads an NBD export. An `nbds` URI's
//! own `tls-certificates=`/`tls-hostname=` parameters win over them.

use std::path::PathBuf;

use qbackup_formats::nbd::TlsConfig;

/// The TLS options (flattened into each command's options).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// For nbds:// sources: the directory of TLS certificates in QEMU's
    /// tls-creds-x509 layout (ca-cert.pem; client-cert.pem and
    /// client-key.pem for a server that verifies clients).
    #[arg(long = "tls-certs", value_name = "DIR")]
    tls_certs: Option<PathBuf>,
    /// For nbds:// sources: the name the server's certificate must carry,
    /// instead of the URI's host (localhost for a Unix socket).
    #[arg(long = "tls-hostname", value_name = "NAME")]
    tls_hostname: Option<String>,
}

impl TlsArgs {
    /// The library's settings.
    pub fn config(&self) -> TlsConfig {
        TlsConfig {
            certs_dir: self.tls_certs.clone(),
            hostname: self.tls_hostname.clone(),
        }
    }
}
