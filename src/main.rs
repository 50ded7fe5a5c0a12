//! The `qbackup` command line: parse, validate into a config, run, map
//! errors to exit statuses (see `cli/status.rs`). All work happens in the
//! library.

mod cli;
mod signals;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// Raises the soft limit on open files to the hard one: every image of a
/// backing chain keeps a file open, and the usual soft limit (1024) is
/// below the depth of chains QEMU opens. When the hard limit is reached
/// too, opening says so (`StorageError::TooManyOpenFiles`).
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let args = match cli::Args::try_parse() {
        Ok(a) => a,
        Err(e) => return ExitCode::from(cli::status::clap_error(&e, &cli::commands())),
    };
    let failure = cli::failure_status(&args);
    match cli::run(args) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            let _ = std::io::stdout().flush();
            // Each error's message already says its cause: print it alone
            // (the alternate form would repeat every cause after it).
            let msg = format!("{e}").replace('\n', " ");
            // After SIGHUP the terminal may be gone: never panic on stderr.
            let _ = writeln!(std::io::stderr(), "qbackup: {msg}");
            ExitCode::from(cli::status::of_error(&e, failure))
        }
    }
}
