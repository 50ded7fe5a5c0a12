//! Helpers for `tests/backup.rs`: scratch directories, qemu-img/qemu-io
//! wrappers, running `qbackup` with a time limit, deterministic test content,
//! parsed `qemu-img map` extents, and just enough raw qcow2 parsing to
//! corrupt an image on purpose or look at its compressed streams.
//!
//! Deliberately self-contained (it does not use `tests/common`), so that the
//! backup tests keep working while the shared helpers change.

// Not every test uses every helper.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long one `qbackup` run may take before the test calls it a hang.
/// Every backup here takes a few seconds at most (the slow, speed-limited
/// ones are interrupted early), so 20 s is ample even for debug builds.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The `qbackup` binary built by cargo for this test run.
pub fn qbackup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qbackup")
}

// ---------------------------------------------------------------------------
// Scratch directory
// ---------------------------------------------------------------------------

/// A temporary directory, removed when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qbackup-backup-test-")
            .tempdir()
            .expect("create temp dir");
        Scratch { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Absolute path as a `String`, for command lines.
    pub fn p(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }

    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// `qemu-img ARGS` run in the scratch directory, checked.
    pub fn img(&self, args: &[&str]) -> String {
        qemu_img(self.dir(), args)
    }

    /// `qemu-io -f FMT -c CMD... IMG` run in the scratch directory, checked.
    pub fn io(&self, img: &str, fmt: &str, cmds: &[&str]) {
        qemu_io(self.dir(), img, fmt, cmds);
    }

    /// `qbackup ARGS` run in the scratch directory.
    pub fn qbackup(&self, args: &[&str]) -> Run {
        qbackup(self.dir(), args)
    }

    /// A text file of `len` bytes (realistic, compressible content) named
    /// `text-LEN.txt`, created on first use; returns its name.
    pub fn text_file(&self, len: u64) -> String {
        let name = format!("text-{len}.txt");
        if !self.path(&name).exists() {
            std::fs::write(self.path(&name), text_bytes(len as usize, 7)).expect("write text");
        }
        name
    }

    /// A file of `len` random bytes named `random-LEN.bin`, created on first use.
    pub fn random_file(&self, len: u64) -> String {
        let name = format!("random-{len}.bin");
        if !self.path(&name).exists() {
            std::fs::write(self.path(&name), random_bytes(len as usize, 99)).expect("write random");
        }
        name
    }

    /// The qemu-io command writing `len` bytes of text at `off` (`-c` for a
    /// compressed write).
    pub fn text_cmd(&self, flags: &str, off: u64, len: u64) -> String {
        format!("write {flags} -s {} {off} {len}", self.text_file(len))
    }

    /// The qemu-io command writing `len` random bytes at `off`.
    pub fn random_cmd(&self, flags: &str, off: u64, len: u64) -> String {
        format!("write {flags} -s {} {off} {len}", self.random_file(len))
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
}

// ---------------------------------------------------------------------------
// External commands
// ---------------------------------------------------------------------------

pub fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run to completion whatever the status.
pub fn run_unchecked(cmd: &mut Command) -> Output {
    let shown = render(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e} (are qemu-utils installed?)"))
}

/// Run to completion; panic with the output unless it exits 0.
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

/// `qemu-img ARGS` in `cwd`, checked; returns stdout.
pub fn qemu_img(cwd: &Path, args: &[&str]) -> String {
    let out = run_checked(Command::new("qemu-img").args(args).current_dir(cwd));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `qemu-img ARGS` in `cwd`: (exit code, stdout + stderr).
pub fn qemu_img_status(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = run_unchecked(Command::new("qemu-img").args(args).current_dir(cwd));
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-io -f FMT -c CMD... IMG` in `cwd`. qemu-io exits 0 even when a
/// command fails, so its output is scanned too.
pub fn qemu_io(cwd: &Path, img: &str, fmt: &str, cmds: &[&str]) {
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
    for bad in [
        "failed",
        "error",
        "Error",
        "invalid",
        "Invalid",
        "Pattern verification",
    ] {
        assert!(!all.contains(bad), "`{shown}` reported a failure:\n{all}");
    }
}

/// `qemu-img info --output=json` of an image.
pub fn info(cwd: &Path, img: &str, fmt: &str) -> Value {
    let out = qemu_img(cwd, &["info", "--output=json", "-f", fmt, img]);
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

/// `qemu-img map --output=json -f FMT IMG`, parsed.
pub fn map(cwd: &Path, img: &str, fmt: &str) -> Vec<Extent> {
    let out = qemu_img(cwd, &["map", "--output=json", "-f", fmt, img]);
    let v: Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let u = |e: &Value, k: &str| {
        e[k].as_u64()
            .unwrap_or_else(|| panic!("map field {k}: {e}"))
    };
    let b = |e: &Value, k: &str| {
        e[k].as_bool()
            .unwrap_or_else(|| panic!("map field {k}: {e}"))
    };
    v.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| Extent {
            start: u(e, "start"),
            length: u(e, "length"),
            depth: u(e, "depth"),
            present: b(e, "present"),
            zero: b(e, "zero"),
            data: b(e, "data"),
            compressed: b(e, "compressed"),
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

/// `qemu-img convert -O raw` of an image, read into memory.
pub fn guest_bytes(cwd: &Path, img: &str, fmt: &str) -> Vec<u8> {
    let tmp = tempfile::Builder::new()
        .prefix("guest-")
        .suffix(".raw")
        .tempfile_in(cwd)
        .expect("temp file");
    let out = tmp.path().to_str().expect("utf-8").to_owned();
    qemu_img(cwd, &["convert", "-f", fmt, "-O", "raw", img, &out]);
    std::fs::read(&out).expect("read converted image")
}

// ---------------------------------------------------------------------------
// Running qbackup
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct Run {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            self.elapsed,
            truncate(&self.stdout, 4000),
            truncate(&self.stderr, 4000)
        )
    }

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

    pub fn assert_ok(&self) -> &Self {
        self.assert_no_panic();
        assert_eq!(self.code, Some(0), "expected success\n{}", self.describe());
        self
    }

    /// Exit status 1 and exactly one stderr line `qbackup: ...` that
    /// contains (case-insensitively) at least one of `any_of`.
    pub fn assert_clean_failure(&self, any_of: &[&str]) -> &Self {
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
        let lower = body.to_lowercase();
        assert!(
            any_of.iter().any(|n| lower.contains(&n.to_lowercase())),
            "the error should mention one of {any_of:?}\n{}",
            self.describe()
        );
        self
    }
}

/// At most `max` bytes of `s` (on a character boundary), for messages.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} more bytes]", &s[..end], s.len() - end)
}

/// Start `qbackup ARGS` in `cwd` with piped output.
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

/// Wait for a spawned qbackup (killing it after `limit`) and collect its output.
pub fn wait_qbackup(mut child: Child, cmdline: String, started: Instant, limit: Duration) -> Run {
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
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

/// Run `qbackup ARGS` in `cwd` to completion (a hang fails the test).
pub fn qbackup(cwd: &Path, args: &[&str]) -> Run {
    let started = Instant::now();
    let (child, cmdline) = spawn_qbackup(cwd, args);
    wait_qbackup(child, cmdline, started, TIMEOUT)
}

// ---------------------------------------------------------------------------
// Test content
// ---------------------------------------------------------------------------

/// A deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `len` bytes of English-like text (compresses about 3:1 with zlib).
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "backup",
        "of",
        "a",
        "virtual",
        "machine",
        "disk",
        "image",
        "is",
        "copied",
        "cluster",
        "by",
        "into",
        "compressed",
        "file",
        "and",
        "every",
        "guest",
        "byte",
        "must",
        "read",
        "back",
        "exactly",
        "as",
        "it",
        "was",
        "written",
        "when",
        "storage",
        "fails",
        "operator",
        "restores",
        "from",
        "yesterday",
        "snapshot",
        "kernel",
        "logs",
        "show",
        "that",
        "network",
        "interface",
        "came",
        "up",
        "after",
        "service",
        "started",
        "with",
        "configuration",
        "options",
        "for",
        "database",
        "tables",
        "indexes",
        "were",
        "rebuilt",
        "overnight",
        "without",
        "errors",
        "warnings",
        "users",
        "reported",
        "slow",
        "queries",
    ];
    let mut rng = Rng::new(seed);
    let mut s = Vec::with_capacity(len + 64);
    let mut line = 0usize;
    let mut sentence_start = true;
    while s.len() < len {
        let r = rng.next_u64();
        let w = WORDS[(r % WORDS.len() as u64) as usize];
        if sentence_start {
            let mut cap = w.to_owned();
            cap[..1].make_ascii_uppercase();
            s.extend_from_slice(cap.as_bytes());
            sentence_start = false;
        } else {
            s.extend_from_slice(w.as_bytes());
        }
        line += w.len() + 1;
        match (r >> 32) % 16 {
            0 => {
                s.extend_from_slice(b". ");
                sentence_start = true;
            }
            1 => s.extend_from_slice(b", "),
            2 => {
                s.extend_from_slice(format!(" {} ", (r >> 40) % 10_000).as_bytes());
            }
            _ => s.push(b' '),
        }
        if line > 72 {
            s.push(b'\n');
            line = 0;
        }
    }
    s.truncate(len);
    s
}

/// Order-0 entropy of `buf` in bits per byte.
pub fn entropy(buf: &[u8]) -> f64 {
    if buf.is_empty() {
        return 0.0;
    }
    let mut counts = [0u64; 256];
    for &b in buf {
        counts[b as usize] += 1;
    }
    let n = buf.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// How a guest cluster's content must be stored by a compressing backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All zeros: not stored as data.
    Zero,
    /// Clearly compressible (entropy well below 8 bits/byte): compressed.
    Compressible,
    /// Random: stored as an uncompressed data cluster.
    Incompressible,
    /// In between: no expectation beyond "data".
    Other,
}

/// Classify a cluster's guest bytes. Uniformly random bytes fall short of
/// 8 bits/byte of order-0 entropy by about 184/n bits for n bytes, so the
/// thresholds scale with the cluster size.
pub fn classify(buf: &[u8]) -> Kind {
    if buf.iter().all(|&b| b == 0) {
        return Kind::Zero;
    }
    let h = entropy(buf);
    let deficit = 184.0 / buf.len() as f64;
    if h < 7.0 && h < 7.0 - 3.0 * deficit {
        Kind::Compressible
    } else if buf.len() >= 512 && h > 8.0 - 3.0 * deficit {
        Kind::Incompressible
    } else {
        Kind::Other
    }
}

// ---------------------------------------------------------------------------
// Raw qcow2 parsing (for corrupting images and reading compressed streams)
// ---------------------------------------------------------------------------

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read image bytes");
    buf
}

pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for writing");
    f.write_all_at(bytes, offset).expect("patch image");
}

/// The parts of a qcow2 header needed to walk L1/L2.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub extended_l2: bool,
}

impl Layout {
    pub fn read(path: &Path) -> Layout {
        let h = read_at(path, 0, 104);
        assert_eq!(&h[..4], b"QFI\xfb", "{} is not qcow2", path.display());
        let version = be32(&h, 4);
        let incompatible = if version >= 3 { be64(&h, 72) } else { 0 };
        Layout {
            cluster_bits: be32(&h, 20),
            l1_size: be32(&h, 36),
            l1_offset: be64(&h, 40),
            extended_l2: incompatible & (1 << 4) != 0,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// File offset of the L2 entry that maps guest `offset`, or `None` when
    /// its L2 table is not allocated.
    pub fn l2_entry_pos(&self, path: &Path, guest: u64) -> Option<u64> {
        let l2_entries = self.cluster_size() / self.entry_bytes();
        let cluster = guest >> self.cluster_bits;
        let l1_index = cluster / l2_entries;
        assert!(l1_index < u64::from(self.l1_size), "guest offset past L1");
        let l1 = be64(&read_at(path, self.l1_offset + 8 * l1_index, 8), 0);
        let l2_offset = l1 & 0x00ff_ffff_ffff_fe00;
        if l2_offset == 0 {
            return None;
        }
        Some(l2_offset + (cluster % l2_entries) * self.entry_bytes())
    }

    /// The (first 64 bits of the) L2 entry for guest `offset` (0 if none).
    pub fn l2_entry(&self, path: &Path, guest: u64) -> u64 {
        match self.l2_entry_pos(path, guest) {
            Some(pos) => be64(&read_at(path, pos, 8), 0),
            None => 0,
        }
    }

    /// For a compressed L2 entry: (host offset, bytes from it to the end of
    /// the last 512-byte sector the descriptor covers).
    pub fn compressed_span(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & (1 << 62) == 0 {
            return None;
        }
        let x = 62 - (self.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let extra_sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
        let end = (host & !511) + (extra_sectors + 1) * 512;
        Some((host, end - host))
    }
}
