//! Shared helpers for the end-to-end tests: build images with qemu-img and
//! qemu-io, run `qbackup` with a time limit, and compare its `info` and `map`
//! output with qemu-img's, which is the oracle for everything here.
//!
//! Every helper panics with a readable message on failure, so a test body is
//! a short list of "build this image, then check that".

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// How long one `qbackup` run may take before the test calls it a hang.
pub const QBACKUP_TIMEOUT: Duration = Duration::from_secs(60);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// The `qbackup` binary built by cargo for this test run.
pub fn qbackup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qbackup")
}

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

    /// `qemu-img create -q -f FMT [-o OPTS] NAME SIZE`, run in the scratch dir.
    pub fn create(&self, name: &str, fmt: &str, size: u64, opts: &str) -> PathBuf {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size.as_str()]);
        qemu_img_in(self.dir(), &args);
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
        qemu_img_in(self.dir(), &args);
        self.path(name)
    }

    /// Run qemu-io commands (`-c CMD` each) on `name` opened with format `fmt`.
    pub fn io(&self, name: &str, fmt: &str, cmds: &[&str]) {
        qemu_io_in(self.dir(), name, fmt, cmds);
    }

    /// Write `bytes` to a new (or truncated) file `name`.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write file");
        p
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

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

/// Run a command to completion; panic with its output unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Output {
    let shown = render(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e} (are qemu-utils installed?)"));
    if !out.status.success() {
        panic!(
            "`{shown}` failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Run a command to completion and return its output whatever the status.
pub fn run_unchecked(cmd: &mut Command) -> Output {
    let shown = render(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e} (are qemu-utils installed?)"))
}

/// `qemu-img ARGS` in directory `cwd`, checked; returns stdout.
pub fn qemu_img_in(cwd: &Path, args: &[&str]) -> String {
    let out = run_checked(Command::new("qemu-img").args(args).current_dir(cwd));
    String::from_utf8(out.stdout).expect("qemu-img stdout is utf-8")
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
    let out = run_checked(&mut cmd);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in ["failed", "error", "Error", "invalid", "Invalid"] {
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
}

impl Run {
    /// A summary for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
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

    /// Check the error contract: exit 1, exactly one stderr line, starting with
    /// `qbackup: ` and naming one of `names` (file names; any one suffices).
    pub fn assert_clean_failure(&self, names: &[&str]) -> &Self {
        self.assert_no_panic();
        assert_eq!(
            self.code,
            Some(1),
            "expected exit status 1\n{}",
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
        assert!(
            names.iter().any(|n| body.contains(n)),
            "stderr must name the file (one of {names:?})\n{}",
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

/// Run `qbackup ARGS` in `cwd`, killing it (and failing the test with "hang")
/// if it takes longer than [`QBACKUP_TIMEOUT`].
pub fn qbackup_in(cwd: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(qbackup_bin());
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cmdline = render(&cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
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
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("wait for qbackup") {
            Some(st) => break st,
            None if start.elapsed() > QBACKUP_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hang: `{cmdline}` did not finish within {} s and was killed",
                    QBACKUP_TIMEOUT.as_secs()
                );
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = out_t.join().expect("stdout reader");
    let stderr = err_t.join().expect("stderr reader");
    Run {
        cmdline,
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
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

// ---------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Describe how two `map --output=json` arrays differ: the first differing
/// extent with a little context from both sides.
pub fn map_diff(expected: &Value, actual: &Value) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (Some(e), Some(a)) = (expected.as_array(), actual.as_array()) else {
        return Some(format!(
            "not both arrays\nqemu-img: {}\nqbackup:  {}",
            truncate_for_msg(&compact(expected), 2000),
            truncate_for_msg(&compact(actual), 2000)
        ));
    };
    let first = (0..e.len().max(a.len()))
        .find(|&i| e.get(i) != a.get(i))
        .unwrap_or(0);
    let from = first.saturating_sub(1);
    let to = (first + 4).min(e.len().max(a.len()));
    let mut s = format!(
        "map differs at extent #{first} (qemu-img has {} extents, qbackup {})\n",
        e.len(),
        a.len()
    );
    for i in from..to {
        let mark = if i == first { ">>" } else { "  " };
        let show = |x: Option<&Value>| x.map(compact).unwrap_or_else(|| "(none)".into());
        let _ = writeln!(
            s,
            "{mark} #{i}\n   qemu-img: {}\n   qbackup:  {}",
            show(e.get(i)),
            show(a.get(i))
        );
    }
    Some(s)
}

/// `qbackup map --output=json` must equal `qemu-img map --output=json`.
pub fn assert_map_json_matches(cwd: &Path, image: &str, fmt: Option<&str>) {
    let expected = qemu_map_json(cwd, image, fmt);
    let run = qbackup_map_json(cwd, image, fmt);
    run.assert_ok();
    let actual = run.json();
    if let Some(d) = map_diff(&expected, &actual) {
        panic!(
            "`qbackup map --output=json {image}` (cwd {}) differs from qemu-img:\n{d}",
            cwd.display()
        );
    }
}

/// Human `qbackup map` must print exactly what `qemu-img map` prints, and
/// fail cleanly where qemu-img refuses (compressed clusters).
/// Returns true when qemu-img printed a table (no compressed clusters).
pub fn assert_map_human_matches(cwd: &Path, image: &str, fmt: Option<&str>) -> bool {
    let run = qbackup_map_human(cwd, image, fmt);
    match qemu_map_human(cwd, image, fmt) {
        Ok(expected) => {
            run.assert_ok();
            if run.stdout != expected {
                let first = expected
                    .lines()
                    .zip(run.stdout.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.lines().count().min(run.stdout.lines().count()));
                panic!(
                    "human `qbackup map {image}` differs from `qemu-img map` (first differing line #{first})\n\
                     --- qemu-img ---\n{}\n--- qbackup ---\n{}",
                    truncate_for_msg(&expected, 4000),
                    truncate_for_msg(&run.stdout, 4000)
                );
            }
            true
        }
        Err(qemu_err) => {
            let name = file_name(image);
            run.assert_clean_failure(&[name]);
            assert!(
                qemu_err.contains("compressed"),
                "qemu-img map failed unexpectedly: {qemu_err}"
            );
            false
        }
    }
}

/// Top-level `info` keys that must match qemu-img's.
pub const INFO_KEYS: &[&str] = &[
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "encrypted",
];

/// Keys of `format-specific.data` that must match qemu-img's.
pub const INFO_DATA_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "bitmaps",
    "data-file",
    "data-file-raw",
];

/// Keep only the keys of the contract, so that qemu-img's extras (children,
/// filename, encrypt details...) do not count. A key absent from qemu-img's
/// output must be absent from ours too.
pub fn project_info(v: &Value) -> Value {
    let mut out = Map::new();
    for k in INFO_KEYS {
        if let Some(x) = v.get(*k) {
            out.insert((*k).to_owned(), x.clone());
        }
    }
    if let Some(fs) = v.get("format-specific") {
        let mut fso = Map::new();
        if let Some(t) = fs.get("type") {
            fso.insert("type".into(), t.clone());
        }
        if let Some(data) = fs.get("data") {
            let mut d = Map::new();
            for k in INFO_DATA_KEYS {
                let Some(x) = data.get(*k) else { continue };
                let x = if *k == "bitmaps" {
                    Value::Array(
                        x.as_array()
                            .map(|bms| {
                                bms.iter()
                                    .map(|bm| {
                                        let mut b = Map::new();
                                        for bk in ["name", "granularity", "flags"] {
                                            if let Some(y) = bm.get(bk) {
                                                b.insert(bk.into(), y.clone());
                                            }
                                        }
                                        Value::Object(b)
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    )
                } else {
                    x.clone()
                };
                d.insert((*k).to_owned(), x);
            }
            fso.insert("data".into(), Value::Object(d));
        }
        out.insert("format-specific".into(), Value::Object(fso));
    }
    Value::Object(out)
}

/// List the differences between two projected info objects, key by key.
fn info_diff(expected: &Value, actual: &Value, path: &str, out: &mut String) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut keys: Vec<&String> = e.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}/{k}");
                match (e.get(k), a.get(k)) {
                    (Some(x), Some(y)) => info_diff(x, y, &p, out),
                    (Some(x), None) => {
                        let _ = writeln!(out, "  {p}: qemu-img {} / qbackup (missing)", compact(x));
                    }
                    (None, Some(y)) => {
                        let _ = writeln!(out, "  {p}: qemu-img (missing) / qbackup {}", compact(y));
                    }
                    (None, None) => {}
                }
            }
        }
        (x, y) if x != y => {
            let _ = writeln!(
                out,
                "  {path}: qemu-img {} / qbackup {}",
                compact(x),
                compact(y)
            );
        }
        _ => {}
    }
}

/// `qbackup info --output=json` must agree with `qemu-img info --output=json`
/// on every key of the contract. Returns qbackup's parsed output.
pub fn assert_info_matches(cwd: &Path, image: &str, fmt: Option<&str>) -> Value {
    let expected = qemu_info_json(cwd, image, fmt);
    let run = qbackup_info_json(cwd, image, fmt);
    run.assert_ok();
    let actual = run.json();
    let (pe, pa) = (project_info(&expected), project_info(&actual));
    if pe != pa {
        let mut d = String::new();
        info_diff(&pe, &pa, "", &mut d);
        panic!(
            "`qbackup info --output=json {image}` (cwd {}) differs from qemu-img:\n{d}",
            cwd.display()
        );
    }
    // The human form must work too.
    let human = qbackup_info_human(cwd, image, fmt);
    human.assert_ok();
    assert!(
        !human.stdout.trim().is_empty(),
        "empty human info\n{}",
        human.describe()
    );
    actual
}

/// Everything for one well-formed image: map JSON, map human (or its clean
/// refusal on compressed clusters) and info. `image` is as given on the
/// command line, relative to `cwd` or absolute.
pub fn assert_image_matches(cwd: &Path, image: &str, fmt: Option<&str>) {
    assert_map_json_matches(cwd, image, fmt);
    assert_map_human_matches(cwd, image, fmt);
    assert_info_matches(cwd, image, fmt);
}

/// Like [`assert_image_matches`] for an image in a scratch dir, by absolute path.
pub fn check(s: &Scratch, name: &str, fmt: Option<&str>) {
    assert_image_matches(s.dir(), &s.p(name), fmt);
}

/// The extents of a parsed map, for assertions about what an image contains.
pub fn extents(map: &Value) -> &Vec<Value> {
    map.as_array().expect("map is an array")
}

/// Count extents of a parsed map matching a predicate.
pub fn count_extents(map: &Value, pred: impl Fn(&Value) -> bool) -> usize {
    extents(map).iter().filter(|e| pred(e)).count()
}

/// Last path component of `p`, for matching error messages.
pub fn file_name(p: &str) -> &str {
    Path::new(p)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(p)
}

// ---------------------------------------------------------------------------
// Byte patching
// ---------------------------------------------------------------------------

/// Overwrite `bytes` at `offset` in an existing file.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for patching: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("patch write");
}

pub fn patch_u8(path: &Path, offset: u64, v: u8) {
    patch(path, offset, &[v]);
}

pub fn patch_u32(path: &Path, offset: u64, v: u32) {
    patch(path, offset, &v.to_be_bytes());
}

pub fn patch_u64(path: &Path, offset: u64, v: u64) {
    patch(path, offset, &v.to_be_bytes());
}

pub fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut v = vec![0; len];
    f.read_exact(&mut v).expect("read");
    v
}

pub fn read_u32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(read_bytes(path, offset, 4).try_into().unwrap())
}

pub fn read_u64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(read_bytes(path, offset, 8).try_into().unwrap())
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

pub fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for truncate")
        .set_len(len)
        .expect("truncate");
}

// qcow2 header field offsets (docs/interop/qcow2.txt).
pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// Host offset bits of an L1 or standard L2 entry.
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "COPIED" flag (refcount exactly one) of L1/L2 entries.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed-cluster flag of L2 entries.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;

/// `cluster_bits` of a qcow2 image.
pub fn qcow2_cluster_bits(path: &Path) -> u32 {
    read_u32(path, hdr::CLUSTER_BITS)
}

/// Host offset of the L1 table.
pub fn qcow2_l1_offset(path: &Path) -> u64 {
    read_u64(path, hdr::L1_TABLE_OFFSET)
}

/// Byte offset (in the file) of L1 entry `i`.
pub fn qcow2_l1_entry_pos(path: &Path, i: u64) -> u64 {
    qcow2_l1_offset(path) + 8 * i
}

/// Host offset of the L2 table that L1 entry `i` points to (panics if none).
pub fn qcow2_l2_offset(path: &Path, i: u64) -> u64 {
    let e = read_u64(path, qcow2_l1_entry_pos(path, i));
    let off = e & ENTRY_OFFSET_MASK;
    assert!(
        off != 0,
        "L1 entry {i} of {} is unallocated",
        path.display()
    );
    off
}

/// Byte offset (in the file) of the standard (non-extended) L2 entry for
/// guest cluster `c`, for an image without extended L2.
pub fn qcow2_l2_entry_pos(path: &Path, c: u64) -> u64 {
    let bits = qcow2_cluster_bits(path);
    let per_l2 = 1u64 << (bits - 3);
    qcow2_l2_offset(path, c / per_l2) + 8 * (c % per_l2)
}
