//! `qbackup backup --qmp SOCKET DIR` against a real QEMU 10 with two disks
//! on virtio-blk devices (a qcow2 overlay on a backing file, and a raw
//! file): guest writes go through the devices; each backup must equal the
//! guest's view at its freeze point (one point for both disks), be
//! check-clean and verify; and QEMU must be left as it was after every
//! run, killed or not.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::live::{assert_backup_is, backups, make_disks, LiveVm, DISKS};
use common::run::{qbackup_bin, qbackup_in, Run};
use common::scratch::Scratch;
use serde_json::Value;

/// One live cycle into `set`; returns the run (asserted successful) and
/// its JSON result.
fn cycle(s: &Scratch, vm: &LiveVm, extra: &[&str]) -> (Run, Value) {
    let socket = vm.socket.display().to_string();
    let mut args = vec!["backup", "--qmp", &socket, "--output=json"];
    args.extend(extra);
    // Relative to qbackup's working directory (the scratch dir), which is
    // not QEMU's: the fleecing files must still be found (regression).
    args.push("set");
    let run = qbackup_in(s.dir(), &args);
    run.assert_ok();
    let json = run.json();
    (run, json)
}

/// The per-disk results of a cycle's JSON, by device id.
fn disk<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no disk {id} in {json}"))
}

#[test]
fn three_cycles_each_equal_their_freeze_point() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    let (before, ..) = vm.state();
    vm.write(0, 0x31, 1 << 20, 1 << 20);
    vm.write(1, 0x32, 8 << 20, 1 << 20);
    let (_, j) = cycle(&s, &vm, &[]);
    for (id, node, ..) in DISKS {
        let d = disk(&j, id);
        assert_eq!(d["sync"], "full", "{d}");
        assert_eq!(d["node"], node);
        assert_eq!(d["reason"], "first backup of this disk");
        assert_eq!(d["id"].as_str().unwrap().len(), 32);
    }
    let refs = vm.snapshot("1");
    vm.assert_clean(&before);
    for (i, (id, ..)) in DISKS.iter().enumerate() {
        assert_backup_is(&backups(&s.path("set"), id)[0], &refs[i]);
    }
    for round in 2..=3u8 {
        vm.write(0, 0x40 + round, (u64::from(round) * 5) << 20, 3 << 20);
        vm.write(0, 0x50 + round, 40 << 20, 64 << 10);
        vm.write(1, 0x60 + round, u64::from(round) << 20, 128 << 10);
        // Regression: --sync incremental was refused as a request without
        // a previous backup.
        let sync: &[&str] = if round == 3 {
            &["--sync", "incremental"]
        } else {
            &[]
        };
        let (_, j) = cycle(&s, &vm, sync);
        let refs = vm.snapshot(&round.to_string());
        for (i, (id, ..)) in DISKS.iter().enumerate() {
            let d = disk(&j, id);
            assert_eq!(d["sync"], "incremental", "{d}");
            assert!(d["reason"]
                .as_str()
                .unwrap()
                .contains("has recorded every write"));
            // Only what the guest wrote was read.
            assert!(d["guest-bytes-read"].as_u64().unwrap() <= 4 << 20, "{d}");
            assert_eq!(backups(&s.path("set"), id).len(), usize::from(round));
            assert_backup_is(Path::new(d["target"].as_str().unwrap()), &refs[i]);
        }
        vm.assert_clean(&before);
    }
}

/// The prefix property: a writer alternates logged writes between the two
/// disks (write k to disk k % 2, region k) while a cycle freezes them;
/// the backups together must hold exactly writes 0..m for some m.
#[test]
fn one_point_in_time_across_disks() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    const LEN: u64 = 16 << 10;
    // Write k goes to disk k % 2, region k / 2 from 8 MiB: 3000 writes fit
    // in the raw disk's last 24 MiB.
    const MAX: u64 = 3000;
    let region = |k: u64| -> (usize, u64) { ((k % 2) as usize, (8 << 20) + (k / 2) * LEN) };
    let pattern = |k: u64| (0x80 + k % 100) as u8;
    let socket = vm.socket.display().to_string();
    let set = s.p("set");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let runner = {
        let (dir, stop, done) = (s.dir().to_path_buf(), stop.clone(), done.clone());
        let (socket, set) = (socket.clone(), set.clone());
        std::thread::spawn(move || {
            // Freeze once the writer is going; it keeps going until the
            // cycle ends, so the freeze falls among its writes.
            while done.load(std::sync::atomic::Ordering::SeqCst) < 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let run = qbackup_in(&dir, &["backup", "--qmp", &socket, "--output=json", &set]);
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            run
        })
    };
    let mut written = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && written < MAX {
        let (d, off) = region(written);
        vm.write(d, pattern(written), off, LEN);
        written += 1;
        done.store(written, std::sync::atomic::Ordering::SeqCst);
    }
    let run = runner.join().unwrap();
    run.assert_ok();
    // Read both backups as raw and find which writes they hold.
    let raw: Vec<Vec<u8>> = DISKS
        .iter()
        .map(|(id, ..)| {
            let b = &backups(&s.path("set"), id)[0];
            let out = s.path(&format!("{id}-restored.raw"));
            let st = Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(b)
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read(out).unwrap()
        })
        .collect();
    let held: Vec<bool> = (0..written)
        .map(|k| {
            let (d, off) = region(k);
            let bytes = &raw[d][off as usize..(off + LEN) as usize];
            if bytes.iter().all(|&b| b == pattern(k)) {
                true
            } else {
                // Absent: the region still holds what was there before.
                let before = if d == 0 { 0x11u8 } else { 0 };
                let was = |b: &u8| *b == before || (d == 0 && *b == 0);
                assert!(bytes.iter().all(was), "write {k} half present in disk {d}");
                false
            }
        })
        .collect();
    let m = held.iter().take_while(|&&h| h).count();
    assert!(
        held[m..].iter().all(|&h| !h),
        "not a prefix of the writes: held {:?}",
        held.iter()
            .enumerate()
            .filter(|(_, &h)| h)
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    );
    assert!(
        m > 0 && (m as u64) < written,
        "the freeze fell outside the writes ({m} of {written}): the test did not test"
    );
    let (before, ..) = vm.state();
    vm.assert_clean(&before);
}

/// Spawns a cycle that stops at `step` (or, for "mid-pull", once its
/// temporary backup file exists), then kills it with SIGKILL.
fn kill_at(s: &Scratch, vm: &LiveVm, step: &str) {
    let socket = vm.socket.display().to_string();
    let mut cmd = Command::new(qbackup_bin());
    cmd.args(["backup", "--qmp", &socket])
        .current_dir(s.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if step == "mid-pull" {
        cmd.args(["--speed", "1M"]);
    } else {
        cmd.env("QBACKUP_TEST_HOLD", step);
    }
    cmd.arg(s.p("set"));
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    if step == "mid-pull" {
        let tmp_exists = |dir: PathBuf| {
            std::fs::read_dir(dir).is_ok_and(|r| {
                r.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with(".qbackup-"))
            })
        };
        while !DISKS
            .iter()
            .any(|(id, ..)| tmp_exists(s.path("set").join(id)))
        {
            assert!(Instant::now() < deadline, "the pull never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
    } else {
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(
            line.contains(&format!("test hold at {step}")),
            "{step}: {line}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn kill_9_at_every_step_loses_nothing_and_leaves_qemu_clean() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    let (before, ..) = vm.state();
    cycle(&s, &vm, &[]);
    let steps = [
        "before-freeze",
        "after-freeze",
        "exported",
        "mid-pull",
        "pulled-one",
        "before-commit",
        "committed",
    ];
    for (n, step) in steps.iter().enumerate() {
        let n = n as u64;
        // Written before the killed cycle froze (its frozen bitmap has it)
        // and after it died (its new bitmap has it): both must reach the
        // next backup.
        vm.write(0, 0x90 + n as u8, n << 20, 256 << 10);
        vm.write(1, 0xa0 + n as u8, n << 20, 256 << 10);
        kill_at(&s, &vm, step);
        vm.write(0, 0xb0 + n as u8, (20 + n) << 20, 256 << 10);
        vm.write(1, 0xc0 + n as u8, (16 + n) << 20, 256 << 10);
        let (run, j) = cycle(&s, &vm, &[]);
        assert!(
            run.stderr
                .contains("a live backup cycle of vd0, vd1 that was interrupted"),
            "{step}: no repair line: {}",
            run.stderr
        );
        let repaired = j["repaired"].as_str().unwrap();
        let expected = if *step == "committed" {
            "finished"
        } else {
            "rolled back"
        };
        assert!(repaired.starts_with(expected), "{step}: {repaired}");
        let refs = vm.snapshot(step);
        for (i, (id, ..)) in DISKS.iter().enumerate() {
            let d = disk(&j, id);
            assert_eq!(d["sync"], "incremental", "{step}: {d}");
            assert_backup_is(Path::new(d["target"].as_str().unwrap()), &refs[i]);
            // Nothing of the killed cycle is left beside the chain.
            for f in std::fs::read_dir(s.path("set").join(id)).unwrap() {
                let name = f.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!name.starts_with(".qbackup-"), "{step}: left {name}");
            }
        }
        assert!(!s.path("set/.qbackup-live.json").exists());
        vm.assert_clean(&before);
    }
}

#[test]
fn a_vm_restart_keeps_persistent_bitmaps_and_says_why_otherwise() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    cycle(&s, &vm, &[]);
    vm.write(0, 0x71, 3 << 20, 1 << 20);
    vm.write(1, 0x72, 3 << 20, 1 << 20);
    vm.quit();
    let mut vm = LiveVm::start(&s);
    let (before, ..) = vm.state();
    vm.write(0, 0x73, 9 << 20, 1 << 20);
    let (_, j) = cycle(&s, &vm, &[]);
    let refs = vm.snapshot("after-restart");
    // qcow2 stores the bitmap in the image: an exact incremental.
    assert_eq!(disk(&j, "vd0")["sync"], "incremental");
    // A raw image cannot: by content, and the reason says so.
    let d1 = disk(&j, "vd1");
    assert_eq!(d1["sync"], "incremental-by-content", "{d1}");
    assert!(
        d1["reason"]
            .as_str()
            .unwrap()
            .contains("raw image cannot keep it"),
        "{d1}"
    );
    for (i, (id, ..)) in DISKS.iter().enumerate() {
        let target = disk(&j, id)["target"].as_str().unwrap().to_string();
        assert_backup_is(Path::new(&target), &refs[i]);
    }
    vm.assert_clean(&before);
}

/// A cycle killed with its export up, then QEMU restarted before the next
/// run: cleanly (bitmaps stored: the repair merges them back, the next
/// incremental uses them) and by a crash (bitmaps inconsistent: removed,
/// the next incremental compares by content). Regressions: the repair
/// failed on "NBD server not running" and on inconsistent bitmaps, on
/// every later run.
#[test]
fn a_killed_cycle_is_repaired_after_qemu_restarts() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    cycle(&s, &vm, &[]);
    for (n, crash) in [(0u8, false), (1, true)] {
        vm.write(0, 0x21 + n, 5 << 20, 1 << 20);
        vm.write(1, 0x23 + n, 5 << 20, 1 << 20);
        kill_at(&s, &vm, "exported");
        if crash {
            vm.crash();
        } else {
            vm.quit();
        }
        vm = LiveVm::start(&s);
        vm.write(0, 0x25 + n, 7 << 20, 1 << 20);
        let (before, ..) = vm.state();
        let (run, j) = cycle(&s, &vm, &[]);
        assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
        let refs = vm.snapshot(&format!("restart-{n}"));
        let d0 = disk(&j, "vd0");
        let expected = if crash {
            "incremental-by-content"
        } else {
            "incremental"
        };
        assert_eq!(d0["sync"], expected, "{d0}");
        for (i, (id, ..)) in DISKS.iter().enumerate() {
            let target = disk(&j, id)["target"].as_str().unwrap().to_string();
            assert_backup_is(Path::new(&target), &refs[i]);
        }
        vm.assert_clean(&before);
    }
}

#[test]
fn qemu_refusing_a_step_fails_in_one_line_and_changes_nothing() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    cycle(&s, &vm, &[]);
    // A job qbackup did not start holds vd0's node.
    std::fs::write(s.path("other.raw"), []).unwrap();
    std::fs::File::options()
        .write(true)
        .open(s.path("other.raw"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    vm.qmp.run(
        "blockdev-add",
        serde_json::json!({"driver": "file", "node-name": "other", "filename": s.p("other.raw")}),
    );
    vm.qmp.run(
        "blockdev-backup",
        serde_json::json!({"job-id": "theirs", "device": "d0", "target": "other", "sync": "none"}),
    );
    let state = vm.state();
    let bitmaps = (vm.bitmaps(0), vm.bitmaps(1));
    let files = |s: &Scratch| {
        DISKS
            .iter()
            .map(|(id, ..)| backups(&s.path("set"), id))
            .collect::<Vec<_>>()
    };
    let before_files = files(&s);
    let socket = vm.socket.display().to_string();
    let run = qbackup_in(s.dir(), &["backup", "--qmp", &socket, &s.p("set")]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].starts_with("qbackup: QEMU refused transaction"),
        "{}",
        lines[0]
    );
    assert_eq!(vm.state(), state);
    assert_eq!((vm.bitmaps(0), vm.bitmaps(1)), bitmaps);
    assert_eq!(files(&s), before_files);
    assert!(!s.path("set/.qbackup-live.json").exists());
}

/// A tmpfs of `bytes` mounted on `dir` (root only), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root: mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !st.success() {
            return Err(format!("mount -t tmpfs failed: {st}"));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_scratch_file_system_never_fails_a_guest_write() {
    let s = Scratch::new();
    make_disks(&s);
    let mut vm = LiveVm::start(&s);
    let (before, ..) = vm.state();
    // Too small for the reservation: refused before QEMU is touched.
    let small = match Tmpfs::mount(&s.path("small"), 16 << 20) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let socket = vm.socket.display().to_string();
    let set = s.p("set");
    let run = qbackup_in(
        s.dir(),
        &["backup", "--qmp", &socket, "--scratch", &s.p("small"), &set],
    );
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("cannot reserve"), "{}", run.stderr);
    assert_eq!(vm.state().0, before);
    assert!(vm.bitmaps(0).is_empty() && vm.bitmaps(1).is_empty());
    assert_eq!(std::fs::read_dir(s.path("small")).unwrap().count(), 0);
    drop(small);
    // Room for the reservation only; something else fills the rest while
    // the guest overwrites what the backup has not read yet.
    let total: u64 = DISKS.iter().map(|d| d.4).sum();
    let _fits = Tmpfs::mount(&s.path("fits"), total + (1 << 20)).unwrap();
    vm.write(0, 0x15, 0, 1 << 20);
    let freeze = vm.snapshot("freeze");
    let (mut child, cmdline) = common::run::spawn_qbackup(
        s.dir(),
        &[
            "backup",
            "--qmp",
            &socket,
            "--speed",
            "8M",
            "--scratch",
            &s.p("fits"),
            &set,
        ],
    );
    let started = Instant::now();
    while !s.path("set/.qbackup-live.json").exists() || vm.state().1 == serde_json::json!([]) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cycle never froze"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Fill the file system.
    let filler = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", s.p("fits/filler")))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!filler.success(), "the filler should run out of space");
    // The guest overwrites both disks everywhere (each write copies the
    // old data to the fleecing file first): every write succeeds.
    for k in 0..8u64 {
        vm.write(0, 0xd0 + k as u8, k * (8 << 20), 4 << 20);
        vm.write(1, 0xe0 + k as u8, k * (4 << 20), 2 << 20);
    }
    let run = common::run::wait_qbackup(
        child_take(&mut child),
        cmdline,
        started,
        Duration::from_secs(60),
    );
    run.assert_ok();
    for (i, (id, ..)) in DISKS.iter().enumerate() {
        assert_backup_is(&backups(&s.path("set"), id)[0], &freeze[i]);
    }
    vm.assert_clean(&before);
}

fn child_take(c: &mut std::process::Child) -> std::process::Child {
    std::mem::replace(c, Command::new("true").spawn().unwrap())
}
