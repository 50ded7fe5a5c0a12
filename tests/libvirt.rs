//! `backup --libvirt` against a real libvirt (daemons started by the
//! tests, see `common::libvirt`) and a real QEMU domain with two disks
//! (a qcow2 overlay on a backing file, and a plain qcow2):
//! full → incremental → incremental, each equal to the disks at its freeze
//! point although the guest writes during every pull; `kill -9` mid-pull
//! then a normal run (a transient domain); the domain restarted between
//! cycles; a checkpoint deleted behind qbackup's back; the domain shut
//! off; QEMU killed (its bitmaps left in use); refusals.
//!
//! The freeze point's reference: with the guest writer paused, QEMU
//! flushes the disk (`qemu-io flush` through the device) and `qemu-img
//! convert -U` copies it; qbackup then starts, and the guest writes again
//! as soon as libvirt's backup job exists.
#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::{qemu_img, qemu_io, Domain, Libvirt};
use serde_json::Value;

const DISKS: [&str; 2] = ["vda", "vdb"];

/// The disk `dev` as the guest sees it now, flattened into `DIR/NAME`.
fn reference(lv: &Libvirt, dom: &Domain, dev: &str, name: &str, running: bool) -> PathBuf {
    if running {
        lv.guest_io(dom, dev, "flush");
    }
    let out = lv.dir().join(name);
    let img = dom.image(dev).to_str().unwrap().to_string();
    qemu_img(&["convert", "-U", "-O", "qcow2", &img, out.to_str().unwrap()]);
    out
}

/// References of both disks.
fn references(lv: &Libvirt, dom: &Domain, tag: &str, running: bool) -> Vec<PathBuf> {
    DISKS
        .iter()
        .map(|d| reference(lv, dom, d, &format!("ref-{tag}-{d}.qcow2"), running))
        .collect()
}

fn qbackup(lv: &Libvirt, dom: &Domain, set: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qbackup"));
    c.args([
        "backup",
        "--libvirt",
        &dom.name,
        "--connect",
        &lv.uri,
        "--output=json",
    ])
    .args(extra)
    .arg(set)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Waits for qbackup; it must succeed. Its JSON result and stderr.
fn finish(child: Child) -> (Value, String) {
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "qbackup failed: {err}");
    (
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}")),
        err,
    )
}

/// Runs a cycle; while it pulls (`--speed` slows it), the guest writes
/// `tag`-specific data to both disks.
fn cycle_with_writes(
    lv: &Libvirt,
    dom: &Domain,
    set: &Path,
    pattern: u8,
    extra: &[&str],
) -> (Value, String) {
    let mut args = vec!["--speed", "4M"];
    args.extend(extra);
    let child = qbackup(lv, dom, set, &args).spawn().unwrap();
    let t = Instant::now();
    while !lv.has_backup_job(dom) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no backup job appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in DISKS {
        lv.guest_io(dom, d, &format!("write -P {pattern} 0 512k"));
        lv.guest_io(dom, d, &format!("write -P {pattern} 20M 64k"));
    }
    finish(child)
}

/// Each disk's backup in `result` equals its reference and is clean.
fn assert_backups_equal(result: &Value, refs: &[PathBuf]) {
    let disks = result["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{result}");
    for (d, r) in disks.iter().zip(refs) {
        let target = d["target"].as_str().unwrap();
        qemu_img(&["check", "-q", target]);
        let o = Command::new("qemu-img")
            .args(["compare", r.to_str().unwrap(), target])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{target} differs from {}: {}{}",
            r.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn syncs(result: &Value) -> Vec<String> {
    result["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sync"].as_str().unwrap().to_string())
        .collect()
}

/// The checkpoint chain is exactly the one the newest cycle made, and no
/// job is left.
fn assert_consistent(lv: &Libvirt, dom: &Domain, result: &Value) {
    let id = result["disks"][0]["id"].as_str().unwrap();
    assert_eq!(lv.checkpoints(dom), [format!("qbackup-{id}")]);
    assert_eq!(result["checkpoint"], format!("qbackup-{id}"));
    assert!(!lv.has_backup_job(dom), "a backup job was left");
}

#[test]
fn three_cycles_equal_their_freeze_points_while_the_guest_writes() {
    let lv = Libvirt::start();
    let dom = lv.two_disk_domain("cycles");
    let set = lv.dir().join("set");
    lv.guest_io(&dom, "vda", "write -P 0x11 8M 2M");
    lv.guest_io(&dom, "vdb", "write -P 0x12 0 3M");
    for (i, pattern) in [0x21u8, 0x22, 0x23].into_iter().enumerate() {
        lv.guest_io(&dom, "vdb", &format!("write -P {} 10M 1M", pattern + 0x10));
        let refs = references(&lv, &dom, &format!("c{i}"), true);
        let (result, _) = cycle_with_writes(&lv, &dom, &set, pattern, &[]);
        let want = if i == 0 { "full" } else { "incremental" };
        assert_eq!(syncs(&result), [want, want], "{result}");
        assert_backups_equal(&result, &refs);
        assert_consistent(&lv, &dom, &result);
    }
}

#[test]
fn kill_9_mid_pull_then_a_normal_run_loses_nothing() {
    let lv = Libvirt::start();
    // A transient domain: checkpoints work the same.
    let dom = lv.two_disk_transient("killed");
    let set = lv.dir().join("set");
    let (first, _) = finish(qbackup(&lv, &dom, &set, &[]).spawn().unwrap());
    lv.guest_io(&dom, "vda", "write -P 0x31 30M 4M");
    lv.guest_io(&dom, "vdb", "write -P 0x32 2M 4M");
    let mut child = qbackup(&lv, &dom, &set, &["--speed", "1M"])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !lv.has_backup_job(&dom) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no backup job appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    // What the killed run left: its job and its checkpoint.
    assert!(lv.has_backup_job(&dom));
    assert_eq!(lv.checkpoints(&dom).len(), 2);
    lv.guest_io(&dom, "vdb", "write -P 0x33 12M 1M");
    let refs = references(&lv, &dom, "after-kill", true);
    let (result, err) = finish(qbackup(&lv, &dom, &set, &[]).spawn().unwrap());
    assert!(
        err.contains("ended the backup job a killed qbackup run left"),
        "{err}"
    );
    assert!(err.contains("killed run was undone"), "{err}");
    assert!(err.contains("no write lost"), "{err}");
    assert_eq!(syncs(&result), ["incremental", "incremental"], "{result}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
    // The chain is the first full and this incremental: no partial file.
    for d in DISKS {
        let n = std::fs::read_dir(set.join(d))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
            .count();
        assert_eq!(n, 2, "{d}: {first}");
    }
}

#[test]
fn sigterm_mid_pull_rolls_the_cycle_back() {
    let lv = Libvirt::start();
    let dom = lv.two_disk_domain("term");
    let set = lv.dir().join("set");
    let (first, _) = finish(qbackup(&lv, &dom, &set, &[]).spawn().unwrap());
    let before = lv.checkpoints(&dom);
    lv.guest_io(&dom, "vda", "write -P 0x61 30M 4M");
    let child = qbackup(&lv, &dom, &set, &["--speed", "1M"])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !lv.has_backup_job(&dom) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no backup job appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Rolled back: no job, the checkpoints as before, no file of the cycle.
    assert!(!lv.has_backup_job(&dom));
    assert_eq!(lv.checkpoints(&dom), before);
    assert!(!set.join(".qbackup-libvirt-pending").exists());
    for d in DISKS {
        let n = std::fs::read_dir(set.join(d))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
            .count();
        assert_eq!(n, 1, "{d}: {first}");
    }
    // The next incremental still has the writes of the rolled-back cycle.
    let refs = references(&lv, &dom, "after-term", true);
    let (result, err) = finish(qbackup(&lv, &dom, &set, &[]).spawn().unwrap());
    assert!(!err.contains("killed"), "nothing to repair: {err}");
    assert_eq!(syncs(&result), ["incremental", "incremental"], "{result}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
}

#[test]
fn restart_deleted_checkpoint_and_shut_off_domain() {
    let lv = Libvirt::start();
    let dom = lv.two_disk_domain("lifecycle");
    let set = lv.dir().join("set");
    let run = |extra: &[&str]| finish(qbackup(&lv, &dom, &set, extra).spawn().unwrap());
    run(&[]);

    // Restarted between cycles: the checkpoints' bitmaps are persistent.
    lv.stop(&dom);
    lv.virsh_ok(&["start", &dom.name]);
    lv.guest_io(&dom, "vda", "write -P 0x41 5M 1M");
    let refs = references(&lv, &dom, "restart", true);
    let (result, _) = run(&[]);
    assert_eq!(syncs(&result), ["incremental", "incremental"], "{result}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);

    // The checkpoint deleted behind qbackup's back: compared by content.
    let cp = result["checkpoint"].as_str().unwrap().to_string();
    lv.virsh_ok(&["checkpoint-delete", &dom.name, &cp]);
    lv.guest_io(&dom, "vdb", "write -P 0x42 7M 1M");
    let refs = references(&lv, &dom, "deleted", true);
    let (result, _) = run(&[]);
    assert_eq!(
        syncs(&result),
        ["incremental-by-content", "incremental-by-content"],
        "{result}"
    );
    let reason = result["disks"][0]["reason"].as_str().unwrap();
    assert!(reason.contains(&cp) && reason.contains("gone"), "{reason}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);

    // Shut off: read from the image files, with QEMU's locks.
    lv.stop(&dom);
    qemu_io(dom.image("vda"), "write -P 0x43 40M 1M");
    let refs = references(&lv, &dom, "off", false);
    let (result, _) = run(&[]);
    assert_eq!(result["running"], false);
    assert_eq!(result["checkpoint"], Value::Null);
    assert_backups_equal(&result, &refs);

    // Running again: the newest backup has no checkpoint, so by content,
    // then by bitmap again.
    lv.virsh_ok(&["start", &dom.name]);
    lv.guest_io(&dom, "vdb", "write -P 0x44 1M 1M");
    let refs = references(&lv, &dom, "again", true);
    let (result, _) = run(&[]);
    assert_eq!(
        syncs(&result),
        ["incremental-by-content", "incremental-by-content"],
        "{result}"
    );
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
    lv.guest_io(&dom, "vda", "write -P 0x45 9M 1M");
    let refs = references(&lv, &dom, "last", true);
    let (result, _) = run(&["--sync", "incremental"]);
    assert_eq!(syncs(&result), ["incremental", "incremental"], "{result}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
}

#[test]
fn a_crash_breaks_the_checkpoint_and_the_next_cycle_compares_by_content() {
    let lv = Libvirt::start();
    let dom = lv.two_disk_domain("crashed");
    let set = lv.dir().join("set");
    let run = |extra: &[&str]| finish(qbackup(&lv, &dom, &set, extra).spawn().unwrap());
    run(&[]);
    lv.guest_io(&dom, "vdb", "write -P 0x51 3M 1M");
    lv.guest_io(&dom, "vdb", "flush");
    lv.crash(&dom);
    lv.virsh_ok(&["start", &dom.name]);
    lv.guest_io(&dom, "vda", "write -P 0x52 6M 1M");
    let refs = references(&lv, &dom, "crash", true);
    let (result, err) = run(&[]);
    assert_eq!(
        syncs(&result),
        ["incremental-by-content", "incremental-by-content"],
        "{result}"
    );
    assert!(err.contains("libvirt refused the incremental"), "{err}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
    // And by bitmap again from the new checkpoint.
    lv.guest_io(&dom, "vdb", "write -P 0x53 9M 1M");
    let refs = references(&lv, &dom, "after-crash", true);
    let (result, _) = run(&[]);
    assert_eq!(syncs(&result), ["incremental", "incremental"], "{result}");
    assert_backups_equal(&result, &refs);
    assert_consistent(&lv, &dom, &result);
}

#[test]
fn a_raw_disk_has_no_checkpoint_and_a_cdrom_is_skipped() {
    let lv = Libvirt::start();
    let dom = lv.raw_and_cdrom_domain("rawcd");
    let set = lv.dir().join("set");
    let run = || finish(qbackup(&lv, &dom, &set, &[]).spawn().unwrap());
    lv.guest_io(&dom, "vdc", "write -P 0x71 1M 2M");
    let (result, _) = run();
    let disks = result["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{result}");
    assert_eq!(disks[0]["name"], "vdc");
    assert_eq!(disks[0]["sync"], "full");
    assert_eq!(result["checkpoint"], Value::Null, "{result}");
    assert!(lv.checkpoints(&dom).is_empty());
    lv.guest_io(&dom, "vdc", "write -P 0x72 8M 1M");
    let r = reference_raw(&lv, &dom);
    let (result, _) = run();
    assert_eq!(
        result["disks"][0]["sync"], "incremental-by-content",
        "{result}"
    );
    let target = result["disks"][0]["target"].as_str().unwrap();
    let o = Command::new("qemu-img")
        .args(["compare", "-F", "qcow2", r.to_str().unwrap(), target])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(!lv.has_backup_job(&dom));
}

/// The raw disk `vdc` flushed and copied.
fn reference_raw(lv: &Libvirt, dom: &Domain) -> PathBuf {
    lv.guest_io(dom, "vdc", "flush");
    let out = lv.dir().join("ref-vdc.qcow2");
    let img = dom.image("vdc").to_str().unwrap().to_string();
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &img,
        out.to_str().unwrap(),
    ]);
    out
}

#[test]
fn unknown_disk_and_foreign_job_are_refused_with_one_line() {
    let lv = Libvirt::start();
    let dom = lv.two_disk_domain("refusals");
    let set = lv.dir().join("set");
    let o = qbackup(&lv, &dom, &set, &["--disk", "vdz"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("has no disk vdz") && err.contains("vda, vdb"),
        "{err}"
    );
    // No libvirt at that URI: one line, class io, nothing written.
    let o = Command::new(env!("CARGO_BIN_EXE_qbackup"))
        .args(["backup", "--libvirt", "x", "--output=json", "--connect"])
        .arg(format!(
            "qemu+unix:///session?socket={}/none.sock",
            lv.dir().display()
        ))
        .arg(lv.dir().join("set-none"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(err["error"]["class"], "io", "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cannot connect to libvirt"));
    assert!(!lv.dir().join("set-none").exists());
    // A pull job someone else started is left alone.
    let scratch = lv.shared_dir("other");
    let xml = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{0}/theirs.sock'/><disks>\
         <disk name='vda' backup='yes' type='file'><scratch file='{0}/a.qcow2'/></disk>\
         <disk name='vdb' backup='no'/></disks></domainbackup>",
        scratch.display()
    );
    let f = lv.dir().join("theirs.xml");
    std::fs::write(&f, xml).unwrap();
    lv.virsh_ok(&["backup-begin", &dom.name, f.to_str().unwrap()]);
    let o = qbackup(&lv, &dom, &set, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("qbackup did not start"), "{err}");
    assert!(lv.has_backup_job(&dom), "their job must stay");
    assert!(lv.checkpoints(&dom).is_empty());
}
