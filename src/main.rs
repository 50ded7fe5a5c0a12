//! The `qbackup` command line: parse, validate into a config, run, map
//! errors to exit statuses (see `cli/status.rs`). All work happens in the
//! library.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
            eprintln!("qbackup: {msg}");
            ExitCode::from(cli::status::of_error(&e, failure))
        }
    }
}
