//! QEMU as the oracle: `qemu-img` run checked or for its status; its `map`
//! and `info` outputs parsed (as JSON or as typed [`Extent`]s); a guest's
//! bytes as `qemu-img convert` sees them; the verdicts of `qemu-img check`
//! (clean) and `compare` (identical) on a target.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::run::{all_output, args_for, run_checked, run_unchecked};

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

/// `qemu-img check` of a qcow2 target: exit 0, no errors, no leaks.
pub fn assert_check_clean(dir: &Path, target: &str) {
    let (code, out) = qemu_img_status(dir, &["check", "--output=json", "-f", "qcow2", target]);
    assert_eq!(code, Some(0), "qemu-img check {target} failed:\n{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("check JSON: {e}\n{out}"));
    for key in [
        "check-errors",
        "leaks",
        "corruptions",
        "leaks-fixed",
        "corruptions-fixed",
    ] {
        let n = v.get(key).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check {target}: {key} = {n}\n{out}");
    }
}

/// `qemu-img compare` (not strict): the guest sees identical bytes.
pub fn assert_identical(dir: &Path, a: &str, a_fmt: &str, b: &str, b_fmt: &str) {
    let (code, out) = qemu_img_status(dir, &["compare", "-f", a_fmt, "-F", b_fmt, a, b]);
    assert_eq!(
        code,
        Some(0),
        "qemu-img compare -f {a_fmt} -F {b_fmt} {a} {b} (in {}) says they differ:\n{out}",
        dir.display()
    );
}

/// `qemu-img compare -U` of two qcow2 images (for images a running VM or
/// server holds): exit code and output.
pub fn compare_force_share(dir: &Path, a: &str, b: &str) -> (Option<i32>, String) {
    qemu_img_status(dir, &["compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b])
}
