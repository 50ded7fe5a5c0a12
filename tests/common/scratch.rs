//! Scratch directories and image building: a [`Scratch`] directory removed
//! when dropped, images created in it with qemu-img and written with qemu-io
//! ([`qemu_io_in`], which also scans qemu-io's output, since it exits 0 when
//! a command fails).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::oracle::{qemu_img_in, qemu_info_json, qemu_map_extents, Extent};
use super::run::{all_output, qbackup_within, render, run_checked, Run, BACKUP_TIMEOUT};

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
