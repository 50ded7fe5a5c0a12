//! The `qbackup` command line: parse, map the flags to library requests
//! (which validate themselves), run, map errors to exit statuses (see
//! `cli/status.rs`) and one line with the CLI's hint (`cli/hint.rs`), plus
//! a JSON error object on stdout with `--output=json`. All work happens in
//! the library.

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
    let json = cli::json_output(&args);
    match cli::run(args) {
        Ok(status) => ExitCode::from(status),
        // A reader that went away (`| head`) wants no more output, and no
        // message about it either: end as other command-line tools do, by
        // SIGPIPE (Rust ignores it, so it is restored first).
        Err(e) if cli::status::is_broken_pipe(&e) => {
            // SAFETY: resetting a signal to its default disposition and
            // raising it in this single-threaded tail of main.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            ExitCode::from(failure)
        }
        Err(e) => {
            let status = cli::status::of_error(&e, failure);
            let msg = cli::hint::message(&e);
            let mut out = std::io::stdout();
            if json {
                // A wrapper reading the JSON result gets the failure there.
                let obj = cli::status::json_error(cli::hint::class_of(&e), &msg, status);
                let _ = writeln!(out, "{obj}");
            }
            let _ = out.flush();
            // After SIGHUP the terminal may be gone: never panic on stderr.
            let _ = writeln!(std::io::stderr(), "qbackup: {msg}");
            ExitCode::from(status)
        }
    }
}
