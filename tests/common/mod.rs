//! Shared helpers for the end-to-end tests: build images with qemu-img and
//! qemu-io, run `qbackup` with a time limit, and compare what it does with
//! qemu-img, which is the oracle for everything here.
//!
//! Every helper panics with a readable message on failure, so a test body is
//! a short list of "build this image, then check that".
//!
//! - [`compare`]: `map` and `info` against qemu-img's.
//! - [`qcow2`]: byte patching and reading, header fields, the L1/L2 walk.
//! - [`content`]: deterministic compressible and random test content.
//! - [`backup`]: checks and source images shared by the backup tests.
//! - [`map_info`]: fixtures shared by the `map` and `info` tests.
//! - [`process`]: qemu-nbd and QEMU started by tests, and a QMP client.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

mod backup;
mod compare;
mod content;
mod map_info;
mod process;
mod qcow2;

// Not every test crate uses every part.
#[allow(unused_imports)]
pub use {backup::*, compare::*, content::*, map_info::*, process::*, qcow2::*};

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one `qbackup` run may take before the test calls it a hang.
pub const QBACKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The time limit of [`Scratch::backup`]. Every backup in the tests takes a
/// few seconds at most (the slow, speed-limited ones are interrupted early),
/// so 20 s is ample even for debug builds.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(20);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// The `qbackup` binary built by cargo for this test run.
pub fn qbackup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qbackup")
}

/// One `#[test]` per row, each calling `case` with the row's arguments:
///
/// ```ignore
/// test_cases! { cluster_size_case =>
///     /// Doc comments and other attributes are kept.
///     qcow2_cluster_512(512);
///     qcow2_cluster_4096(4096);
/// }
/// ```
#[allow(unused_macros)]
macro_rules! test_cases {
    ($case:path => $($(#[$attr:meta])* $name:ident($($arg:expr),* $(,)?);)*) => {
        $(
            $(#[$attr])*
            #[test]
            fn $name() {
                $case($($arg),*);
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use test_cases;

// ---------------------------------------------------------------------------
// Scratch directories and image building
// ---------------------------------------------------------------------------

/// A scratch directory, removed when dropped. Images are named relative to it.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qbackup-test-")
            .tempdir()
            .expect("create temp dir");
        Scratch { dir }
    }

    /// The directory itself (absolute).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Absolute path of `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Absolute path of `name` as a `String` (for command lines).
    pub fn p(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }

    /// Create a subdirectory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// Write `bytes` to a new (or truncated) file `name`.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write file");
        p
    }

    /// `qemu-img ARGS` run in the scratch dir, checked; returns stdout.
    pub fn img(&self, args: &[&str]) -> String {
        qemu_img_in(self.dir(), args)
    }

    /// `qemu-img create -q -f FMT [-o OPTS] NAME SIZE`, run in the scratch dir.
    pub fn create(&self, name: &str, fmt: &str, size: u64, opts: &str) -> PathBuf {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size.as_str()]);
        self.img(&args);
        self.path(name)
    }

    /// Create a qcow2 overlay `name` on top of `backing` (the name as stored
    /// in the header, so relative to the overlay's directory). Without a size,
    /// qemu-img opens the backing file to take its size.
    pub fn overlay(
        &self,
        name: &str,
        backing: &str,
        backing_fmt: &str,
        size: Option<u64>,
        opts: &str,
    ) -> PathBuf {
        self.overlay_impl(name, backing, backing_fmt, size, opts, false)
    }

    /// Like [`Scratch::overlay`] with `-u`: the backing file is not opened, so
    /// it may be missing or form a loop.
    pub fn overlay_unchecked(
        &self,
        name: &str,
        backing: &str,
        backing_fmt: &str,
        size: u64,
    ) -> PathBuf {
        self.overlay_impl(name, backing, backing_fmt, Some(size), "", true)
    }

    fn overlay_impl(
        &self,
        name: &str,
        backing: &str,
        backing_fmt: &str,
        size: Option<u64>,
        opts: &str,
        unsafe_: bool,
    ) -> PathBuf {
        let size = size.map(|s| s.to_string());
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            backing_fmt,
        ];
        if unsafe_ {
            args.push("-u");
        }
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(name);
        if let Some(s) = &size {
            args.push(s);
        }
        self.img(&args);
        self.path(name)
    }

    /// Run qemu-io commands (`-c CMD` each) on `name` opened with format `fmt`.
    pub fn io(&self, name: &str, fmt: &str, cmds: &[&str]) {
        qemu_io_in(self.dir(), name, fmt, cmds);
    }

    /// [`Scratch::io`] with commands built at run time.
    pub fn io_all(&self, name: &str, fmt: &str, cmds: &[String]) {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        self.io(name, fmt, &cmds);
    }

    /// `qemu-img info --output=json -f FMT NAME` in the scratch dir, parsed.
    pub fn qemu_info(&self, name: &str, fmt: &str) -> Value {
        qemu_info_json(self.dir(), name, Some(fmt))
    }

    /// `qemu-img map --output=json -f FMT NAME` in the scratch dir, as extents.
    pub fn qemu_map(&self, name: &str, fmt: &str) -> Vec<Extent> {
        qemu_map_extents(self.dir(), name, Some(fmt))
    }

    /// `qbackup backup ARGS` run in the scratch dir, killed (and the test
    /// failed) after [`BACKUP_TIMEOUT`].
    pub fn backup(&self, args: &[&str]) -> Run {
        let args = [&["backup"], args].concat();
        qbackup_within(self.dir(), &args, BACKUP_TIMEOUT)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// External commands
// ---------------------------------------------------------------------------

/// Render a command for messages.
fn render(cmd: &Command) -> String {
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
fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img ARGS` in directory `cwd`, checked; returns stdout.
pub fn qemu_img_in(cwd: &Path, args: &[&str]) -> String {
    let out = run_checked(Command::new("qemu-img").args(args).current_dir(cwd));
    String::from_utf8(out.stdout).expect("qemu-img stdout is utf-8")
}

/// `qemu-img ARGS` in directory `cwd`, not checked: (exit code, stdout +
/// stderr).
pub fn qemu_img_status(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = run_unchecked(Command::new("qemu-img").args(args).current_dir(cwd));
    (out.status.code(), all_output(&out))
}

/// `qemu-io -f FMT -c CMD... IMG` in directory `cwd`, checked. qemu-io exits
/// 0 even when a command fails, so its output is scanned for failures too.
pub fn qemu_io_in(cwd: &Path, img: &str, fmt: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(cwd).args(["-f", fmt]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(img);
    let shown = render(&cmd);
    let all = all_output(&run_checked(&mut cmd));
    for bad in [
        "failed",
        "error",
        "Error",
        "invalid",
        "Invalid",
        "Pattern verification",
    ] {
        assert!(
            !all.contains(bad),
            "`{shown}` reported a failure ({bad:?}):\n{all}"
        );
    }
}

// ---------------------------------------------------------------------------
// Running qbackup
// ---------------------------------------------------------------------------

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
fn truncate_for_msg(s: &str, max: usize) -> String {
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
fn args_for<'a>(
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

// ---------------------------------------------------------------------------
// The qemu-img side
// ---------------------------------------------------------------------------

/// `qemu-img map --output=json [-f FMT] IMAGE`, parsed.
pub fn qemu_map_json(cwd: &Path, image: &str, fmt: Option<&str>) -> Value {
    let out = qemu_img_in(cwd, &args_for("map", fmt, &["--output=json"], image));
    serde_json::from_str(&out).expect("qemu-img map JSON")
}

/// `qemu-img map [-f FMT] IMAGE` (human output): Ok(stdout) on success,
/// Err(stderr) when it fails (it refuses compressed clusters).
pub fn qemu_map_human(cwd: &Path, image: &str, fmt: Option<&str>) -> Result<String, String> {
    let out = run_unchecked(
        Command::new("qemu-img")
            .args(args_for("map", fmt, &[], image))
            .current_dir(cwd),
    );
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `qemu-img info --output=json [-f FMT] IMAGE`, parsed.
pub fn qemu_info_json(cwd: &Path, image: &str, fmt: Option<&str>) -> Value {
    let out = qemu_img_in(cwd, &args_for("info", fmt, &["--output=json"], image));
    serde_json::from_str(&out).expect("qemu-img info JSON")
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// `qemu-img map --output=json [-f FMT] IMAGE`, as typed extents.
pub fn qemu_map_extents(cwd: &Path, image: &str, fmt: Option<&str>) -> Vec<Extent> {
    let v = qemu_map_json(cwd, image, fmt);
    let u = |e: &Value, k: &str| {
        e[k].as_u64()
            .unwrap_or_else(|| panic!("map field {k}: {e}"))
    };
    let b = |e: &Value, k: &str| {
        e[k].as_bool()
            .unwrap_or_else(|| panic!("map field {k}: {e}"))
    };
    extents(&v)
        .iter()
        .map(|e| Extent {
            start: u(e, "start"),
            length: u(e, "length"),
            depth: u(e, "depth"),
            present: b(e, "present"),
            zero: b(e, "zero"),
            data: b(e, "data"),
            // Older qemu-img (Debian 12's 7.2) has no "compressed" key:
            // such a map says nothing about compression; read it as false.
            compressed: e.get("compressed").is_some_and(|_| b(e, "compressed")),
            offset: e.get("offset").and_then(Value::as_u64),
        })
        .collect()
}

/// The extents of `map` that overlap `[start, end)`.
pub fn extents_in(map: &[Extent], start: u64, end: u64) -> Vec<&Extent> {
    map.iter()
        .filter(|e| e.start < end && e.end() > start)
        .collect()
}

/// The extents of a parsed map, for assertions about what an image contains.
pub fn extents(map: &Value) -> &Vec<Value> {
    map.as_array().expect("map is an array")
}

/// Count extents of a parsed map matching a predicate.
pub fn count_extents(map: &Value, pred: impl Fn(&Value) -> bool) -> usize {
    extents(map).iter().filter(|e| pred(e)).count()
}

/// `qemu-img convert -O raw` of an image, read into memory.
pub fn guest_bytes(cwd: &Path, img: &str, fmt: &str) -> Vec<u8> {
    let tmp = tempfile::Builder::new()
        .prefix("guest-")
        .suffix(".raw")
        .tempfile_in(cwd)
        .expect("temp file");
    let out = tmp.path().to_str().expect("utf-8").to_owned();
    qemu_img_in(cwd, &["convert", "-f", fmt, "-O", "raw", img, &out]);
    std::fs::read(&out).expect("read converted image")
}
