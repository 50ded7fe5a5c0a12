//! Running commands: any command to completion, checked or not, and
//! `qbackup` itself with a time limit (a run past it is killed and the test
//! fails with "hang"), its outputs as a [`Run`] and the checks of the error
//! contract on it.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one `qbackup` run may take before the test calls it a hang.
pub const QBACKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The time limit of [`Scratch::backup`](super::scratch::Scratch::backup).
/// Every backup in the tests takes a few seconds at most (the slow,
/// speed-limited ones are interrupted early), so 20 s is ample even for
/// debug builds.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `qbackup` binary built by cargo for this test run.
pub fn qbackup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qbackup")
}

/// Render a command for messages.
pub(super) fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(d) = cmd.get_current_dir() {
        let _ = write!(s, "   (in {})", d.display());
    }
    s
}

/// Run a command to completion and return its output whatever the status.
pub fn run_unchecked(cmd: &mut Command) -> Output {
    let shown = render(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e} (are qemu-utils installed?)"))
}

/// Run a command to completion; panic with its output unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Output {
    let shown = render(cmd);
    let out = run_unchecked(cmd);
    assert!(
        out.status.success(),
        "`{shown}` failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// stdout followed by stderr, for messages and scanning.
pub(super) fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What one `qbackup` run did.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// From just before the start to the exit.
    pub elapsed: Duration,
}

impl Run {
    /// A summary for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            self.elapsed,
            truncate_for_msg(&self.stdout, 4000),
            truncate_for_msg(&self.stderr, 4000)
        )
    }

    /// Panic unless the run exited 0 (a panic, exit 101, is reported as such).
    pub fn assert_ok(&self) -> &Self {
        self.assert_no_panic();
        assert_eq!(self.code, Some(0), "expected success\n{}", self.describe());
        self
    }

    /// Panic if the process panicked or died from a signal.
    pub fn assert_no_panic(&self) -> &Self {
        assert!(
            self.code != Some(101) && !self.stderr.contains("panicked"),
            "qbackup panicked\n{}",
            self.describe()
        );
        assert!(
            self.code.is_some(),
            "qbackup died from a signal\n{}",
            self.describe()
        );
        self
    }

    /// The error contract, less what the line says: exit 1 and exactly one
    /// stderr line, starting with `qbackup: `. Returns that line.
    fn assert_one_error_line(&self) -> &str {
        self.assert_one_line_with_status(1)
    }

    /// Exit `status` and exactly one stderr line, starting with `qbackup: `.
    fn assert_one_line_with_status(&self, status: i32) -> &str {
        self.assert_no_panic();
        assert_eq!(
            self.code,
            Some(status),
            "expected exit status {status}\n{}",
            self.describe()
        );
        let body = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(
            !body.is_empty() && !body.contains('\n'),
            "expected exactly one line on stderr\n{}",
            self.describe()
        );
        assert!(
            body.starts_with("qbackup: "),
            "stderr must start with `qbackup: `\n{}",
            self.describe()
        );
        body
    }

    /// Check the error contract: exit 1, exactly one stderr line, starting with
    /// `qbackup: ` and naming one of `names` (file names; any one suffices).
    pub fn assert_clean_failure(&self, names: &[&str]) -> &Self {
        let body = self.assert_one_error_line();
        assert!(
            names.iter().any(|n| body.contains(n)),
            "stderr must name the file (one of {names:?})\n{}",
            self.describe()
        );
        self
    }

    /// Like [`Run::assert_clean_failure`], but the line need only contain
    /// (case-insensitively) at least one of `any_of`.
    pub fn assert_clean_failure_mentioning(&self, any_of: &[&str]) -> &Self {
        let lower = self.assert_one_error_line().to_lowercase();
        assert!(
            any_of.iter().any(|n| lower.contains(&n.to_lowercase())),
            "the error should mention one of {any_of:?}\n{}",
            self.describe()
        );
        self
    }

    /// A usage error (the command line itself is wrong): exit 2, one
    /// `qbackup: ` line on stderr mentioning (case-insensitively) one of
    /// `any_of`.
    /// clap's suggestions (`tip: ...` lines) may follow the line.
    pub fn assert_usage_error(&self, any_of: &[&str]) -> &Self {
        self.assert_no_panic();
        assert_eq!(
            self.code,
            Some(2),
            "expected exit status 2\n{}",
            self.describe()
        );
        let mut lines = self.stderr.lines();
        let first = lines.next().unwrap_or_default();
        assert!(
            first.starts_with("qbackup: ") && lines.all(|l| l.starts_with("tip: ")),
            "expected one `qbackup: ` line, then only clap's tips\n{}",
            self.describe()
        );
        let lower = first.to_lowercase();
        assert!(
            any_of.iter().any(|n| lower.contains(&n.to_lowercase())),
            "the usage error should mention one of {any_of:?}\n{}",
            self.describe()
        );
        self
    }

    /// An interrupted command: exit `status` (128 + the signal), one
    /// `qbackup: ` line on stderr that says it was interrupted.
    pub fn assert_interrupted(&self, status: i32) -> &Self {
        let lower = self.assert_one_line_with_status(status).to_lowercase();
        assert!(
            lower.contains("interrupt"),
            "the error should say the command was interrupted\n{}",
            self.describe()
        );
        self
    }

    /// Either success, or a failure that follows the error contract.
    pub fn assert_ok_or_clean_failure(&self, names: &[&str]) -> &Self {
        self.assert_no_panic();
        if self.code != Some(0) {
            self.assert_clean_failure(names);
        }
        self
    }

    /// Parse stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("qbackup stdout is not valid JSON: {e}\n{}", self.describe())
        })
    }
}

/// At most `max` bytes of `s` (on a character boundary), for messages.
pub fn truncate_for_msg(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} more bytes]", &s[..end], s.len() - end)
}

/// Start `qbackup ARGS` in `cwd` with piped output; returns the child and
/// its command line.
pub fn spawn_qbackup(cwd: &Path, args: &[&str]) -> (Child, String) {
    let mut cmd = Command::new(qbackup_bin());
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cmdline = render(&cmd);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
    (child, cmdline)
}

/// Wait for a spawned qbackup and collect its output, killing it (and
/// failing the test with "hang") once `limit` has passed since `started`.
pub fn wait_qbackup(mut child: Child, cmdline: String, started: Instant, limit: Duration) -> Run {
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = loop {
        match child.try_wait().expect("wait for qbackup") {
            Some(st) => break st,
            None if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hang: `{cmdline}` did not finish within {limit:?} and was killed");
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let elapsed = started.elapsed();
    let stdout = out_t.join().expect("stdout reader");
    let stderr = err_t.join().expect("stderr reader");
    Run {
        cmdline,
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    }
}

/// Run `qbackup ARGS` in `cwd` to completion, failing the test with "hang"
/// if it takes longer than `limit`.
pub fn qbackup_within(cwd: &Path, args: &[&str], limit: Duration) -> Run {
    let started = Instant::now();
    let (child, cmdline) = spawn_qbackup(cwd, args);
    wait_qbackup(child, cmdline, started, limit)
}

/// Run `qbackup ARGS` in `cwd` within [`QBACKUP_TIMEOUT`].
pub fn qbackup_in(cwd: &Path, args: &[&str]) -> Run {
    qbackup_within(cwd, args, QBACKUP_TIMEOUT)
}

/// Names of leftover `.qbackup-*.tmp` files in `dir`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".qbackup-") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// No leftover `.qbackup-*.tmp` file in `dir`.
pub fn assert_no_leftovers(dir: &Path) {
    let left = leftovers(dir);
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

/// Build `[SUBCOMMAND, -f FMT?, EXTRA..., IMAGE]`.
pub(super) fn args_for<'a>(
    sub: &'a str,
    fmt: Option<&'a str>,
    extra: &[&'a str],
    image: &'a str,
) -> Vec<&'a str> {
    let mut v = vec![sub];
    if let Some(f) = fmt {
        v.extend(["-f", f]);
    }
    v.extend_from_slice(extra);
    v.push(image);
    v
}

/// `qbackup map [-f FMT] --output=json IMAGE`, not checked.
pub fn qbackup_map_json(cwd: &Path, image: &str, fmt: Option<&str>) -> Run {
    qbackup_in(cwd, &args_for("map", fmt, &["--output=json"], image))
}

/// `qbackup map [-f FMT] IMAGE` (human output), not checked.
pub fn qbackup_map_human(cwd: &Path, image: &str, fmt: Option<&str>) -> Run {
    qbackup_in(cwd, &args_for("map", fmt, &[], image))
}

/// `qbackup info [-f FMT] --output=json IMAGE`, not checked.
pub fn qbackup_info_json(cwd: &Path, image: &str, fmt: Option<&str>) -> Run {
    qbackup_in(cwd, &args_for("info", fmt, &["--output=json"], image))
}

/// `qbackup info [-f FMT] --output=json IMAGE`, which must succeed; parsed.
pub fn qbackup_info_ok(cwd: &Path, image: &str, fmt: Option<&str>) -> Value {
    qbackup_info_json(cwd, image, fmt).assert_ok().json()
}

/// `qbackup info [-f FMT] IMAGE` (human output), not checked.
pub fn qbackup_info_human(cwd: &Path, image: &str, fmt: Option<&str>) -> Run {
    qbackup_in(cwd, &args_for("info", fmt, &[], image))
}
