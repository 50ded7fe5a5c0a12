//! A running VM for the live backup tests: a real QEMU (`-machine pc
//! -accel tcg -S`, no guest OS) with two disks on virtio-blk devices —
//! `vd0` a qcow2 overlay on a backing file, `vd1` a raw file — and two QMP
//! sockets, one for qbackup and one for the test (QEMU serves one client
//! per socket). Guest writes go through the devices as a guest's do (HMP
//! `qemu-io -d /machine/peripheral/ID/virtio-backend`), and each one is
//! mirrored into a raw reference file per disk, so the guest's view at
//! any point is known without reading the images QEMU holds open.

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::process::{hold, Holder, Qmp};
use super::run::run_checked;
use super::scratch::Scratch;

/// The disks: device id, node name, image file, its format, size.
pub const DISKS: [(&str, &str, &str, &str, u64); 2] = [
    ("vd0", "d0", "a.qcow2", "qcow2", 64 << 20),
    ("vd1", "d1", "b.raw", "raw", 32 << 20),
];

/// The VM, its test QMP connection and the reference copies.
pub struct LiveVm {
    holder: Option<Holder>,
    /// The test's own QMP connection.
    pub qmp: Qmp,
    /// The socket qbackup uses.
    pub socket: PathBuf,
    dir: PathBuf,
}

/// Builds the images (base.qcow2 with data, a.qcow2 on it, b.raw with
/// data) and their reference copies (`ref-vd0.raw`, `ref-vd1.raw`).
pub fn make_disks(s: &Scratch) {
    let img = |args: &[&str]| {
        run_checked(Command::new("qemu-img").args(args).current_dir(s.dir()));
    };
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    super::scratch::qemu_io_in(
        s.dir(),
        "base.qcow2",
        "qcow2",
        &["write -P 0x11 0 16M", "write -P 0x12 40M 2M"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
    ]);
    img(&["create", "-q", "-f", "raw", "b.raw", "32M"]);
    super::scratch::qemu_io_in(s.dir(), "b.raw", "raw", &["write -P 0x21 0 4M"]);
    img(&["convert", "-O", "raw", "a.qcow2", "ref-vd0.raw"]);
    std::fs::copy(s.path("b.raw"), s.path("ref-vd1.raw")).unwrap();
}

impl LiveVm {
    /// Starts QEMU on the images [`make_disks`] built.
    pub fn start(s: &Scratch) -> LiveVm {
        let socket = s.path("vm.qmp");
        let test = s.path("test.qmp");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-S",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", test.display()))
        .current_dir(s.dir());
        for (id, node, file, fmt, _) in DISKS {
            cmd.arg("-blockdev").arg(format!(
                "driver={fmt},node-name={node},file.driver=file,file.filename={}",
                s.p(file)
            ));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,drive={node},id={id}"));
        }
        let holder = hold(&mut cmd, &test);
        let _ = hold_wait(&socket);
        let qmp = Qmp::connect(&test);
        LiveVm {
            holder: Some(holder),
            qmp,
            socket,
            dir: s.dir().to_path_buf(),
        }
    }

    /// A guest write of `len` bytes of `pattern` at `offset` to disk
    /// `disk` (index into [`DISKS`]), mirrored into its reference file.
    pub fn write(&mut self, disk: usize, pattern: u8, offset: u64, len: u64) {
        let id = DISKS[disk].0;
        self.qmp.qemu_io(
            &format!("-d /machine/peripheral/{id}/virtio-backend"),
            &format!("write -P {pattern} {offset} {len}"),
        );
        mirror(
            &self.dir.join(format!("ref-{id}.raw")),
            pattern,
            offset,
            len,
        );
    }

    /// Copies the reference files as `ref-ID-TAG.raw` (the guest's view
    /// now) and returns their paths.
    pub fn snapshot(&self, tag: &str) -> Vec<PathBuf> {
        DISKS
            .iter()
            .map(|(id, ..)| {
                let to = self.dir.join(format!("ref-{id}-{tag}.raw"));
                std::fs::copy(self.dir.join(format!("ref-{id}.raw")), &to).unwrap();
                to
            })
            .collect()
    }

    /// What QEMU holds that a backup must leave as it was: node names,
    /// jobs, exports.
    pub fn state(&mut self) -> (BTreeSet<String>, Value, Value) {
        let nodes = self
            .qmp
            .run("query-named-block-nodes", json!({"flat": true}));
        let names = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect();
        (
            names,
            self.qmp.run("query-block-jobs", json!({})),
            self.qmp.run("query-block-exports", json!({})),
        )
    }

    /// The bitmaps on disk `disk`'s node: (name, recording, persistent).
    pub fn bitmaps(&mut self, disk: usize) -> Vec<(String, bool, bool)> {
        let nodes = self
            .qmp
            .run("query-named-block-nodes", json!({"flat": true}));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == DISKS[disk].1)
            .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["recording"].as_bool().unwrap(),
                    b["persistent"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    /// Asserts QEMU is clean: `before`'s nodes, no job, no export, and
    /// each disk one recording bitmap of qbackup's (persistent on qcow2).
    pub fn assert_clean(&mut self, before: &BTreeSet<String>) {
        let (nodes, jobs, exports) = self.state();
        assert_eq!(&nodes, before, "QEMU's block nodes changed");
        assert_eq!(jobs, json!([]), "a block job was left");
        assert_eq!(exports, json!([]), "an export was left");
        for (i, (id, _, _, fmt, _)) in DISKS.iter().enumerate() {
            let b = self.bitmaps(i);
            assert_eq!(b.len(), 1, "{id}: bitmaps {b:?}");
            assert!(b[0].0.starts_with("qbackup-") && b[0].1, "{id}: {b:?}");
            assert_eq!(b[0].2, *fmt == "qcow2", "{id}: persistence {b:?}");
        }
    }

    /// Quits QEMU (persistent bitmaps are stored) and waits for it.
    pub fn quit(mut self) {
        let _ = self.qmp.run("quit", json!({}));
        if let Some(mut h) = self.holder.take() {
            let _ = h.0.wait();
            std::mem::forget(h);
        }
    }
}

impl LiveVm {
    /// Flushes every disk (so the images hold every write), then kills
    /// QEMU with SIGKILL: a crash, leaving its persistent bitmaps marked
    /// in use (inconsistent at the next start).
    pub fn crash(mut self) {
        for (id, ..) in DISKS {
            self.qmp.qemu_io(
                &format!("-d /machine/peripheral/{id}/virtio-backend"),
                "flush",
            );
        }
        drop(self.holder.take());
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        drop(self.holder.take());
    }
}

fn hold_wait(socket: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !super::process::listening(socket) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Writes `len` bytes of `pattern` at `offset` into `file`.
pub fn mirror(file: &Path, pattern: u8, offset: u64, len: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![pattern; len as usize]).unwrap();
}

/// The backups of disk `id` in the set `set`, by name (not by age: two
/// made within one second sort by their ids).
pub fn backups(set: &Path, id: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(set.join(id))
        .map(|r| {
            r.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asserts `backup` reads as `reference` (raw), is check-clean and
/// verifies.
pub fn assert_backup_is(backup: &Path, reference: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(backup)
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} differs from {}: {}",
        backup.display(),
        reference.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    super::oracle::assert_check_clean(
        backup.parent().unwrap(),
        backup.file_name().unwrap().to_str().unwrap(),
    );
    let v = Command::new(super::run::qbackup_bin())
        .arg("verify")
        .arg(backup)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "verify {}: {}",
        backup.display(),
        String::from_utf8_lossy(&v.stderr)
    );
}
