//! Backup sets end to end, with qemu-img as the oracle: backups into a
//! set (`--sync auto`), `list`, `verify SET`, `restore --at`, `prune`
//! with consolidation, the set's lock, and damaged sets.

mod common;

use std::time::Duration;

use common::oracle::qemu_img_in;
use common::run::{qbackup_in, qbackup_within, spawn_qbackup, wait_qbackup};
use common::scratch::Scratch;
use common::set::{assert_restores, ids, list};
use common::MIB;

/// A 16 MiB source `vm.qcow2` and `n` backups of it into `set/`, each
/// after a write; `ref-I.raw` is the source's state at backup I.
fn set_with_backups(s: &Scratch, n: usize) -> Vec<String> {
    s.create("vm.qcow2", "qcow2", 16 * MIB, "");
    let mut ids = Vec::new();
    for i in 0..n {
        let off = i as u64 * MIB;
        s.io(
            "vm.qcow2",
            "qcow2",
            &[
                &format!("write -P {} {off} 512k", i + 1),
                "write -P 0xee 15M 64k",
            ],
        );
        qemu_img_in(
            s.dir(),
            &["convert", "-O", "raw", "vm.qcow2", &format!("ref-{i}.raw")],
        );
        let r = qbackup_in(s.dir(), &["backup", "vm.qcow2", "set/", "--output=json"]);
        r.assert_ok();
        let v = r.json();
        let id = v["id"].as_str().expect("id").to_string();
        let target = v["target"].as_str().expect("target");
        assert!(
            target.starts_with("set/vm/") && target.ends_with(&format!("-{}.qcow2", &id[..8])),
            "{target}"
        );
        assert_eq!(
            v["sync"],
            if i == 0 {
                "full"
            } else {
                "incremental-by-content"
            }
        );
        ids.push(id);
    }
    ids
}

#[test]
fn backups_list_verify_restore_and_prune() {
    let s = Scratch::new();
    let made = set_with_backups(&s, 5);
    let rows = list(s.dir(), "set");
    assert_eq!(ids(s.dir(), "set"), made);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["disk"], "vm");
        assert_eq!(r["chain-depth"], i + 1);
        assert_eq!(r["virtual-size"], 16 * MIB);
        assert_eq!(
            r["kind"],
            if i == 0 {
                "full"
            } else {
                "incremental (by content)"
            }
        );
        let parent = if i == 0 {
            None
        } else {
            Some(made[i - 1].as_str())
        };
        assert_eq!(r["parent"].as_str(), parent);
        assert!(r["bytes-stored"].as_u64().unwrap() > 0);
        assert!(r["problems"].as_array().unwrap().is_empty());
    }
    // Human output: a header and one row per backup.
    let human = qbackup_in(s.dir(), &["list", "set"]);
    human.assert_ok();
    assert_eq!(human.stdout.lines().count(), 6, "{}", human.stdout);
    assert!(human.stdout.starts_with("ID "));

    let v = qbackup_in(s.dir(), &["verify", "set"]);
    assert_eq!(v.code, Some(0), "{}", v.describe());
    assert_eq!(v.stdout.matches(": OK: ").count(), 5, "{}", v.stdout);
    assert!(list(s.dir(), "set")
        .iter()
        .all(|r| r["last-verify"]["result"] == "ok"));

    for (i, id) in made.iter().enumerate() {
        assert_restores(s.dir(), "set", &id[..6], &format!("ref-{i}.raw"));
    }
    // Default: the newest.
    qbackup_in(s.dir(), &["restore", "set", "newest.raw"]).assert_ok();
    common::oracle::assert_identical(s.dir(), "ref-4.raw", "raw", "newest.raw", "raw");

    // The dry run says what happens, and changes nothing.
    let dry = qbackup_in(
        s.dir(),
        &[
            "prune",
            "set",
            "--keep-last",
            "2",
            "--dry-run",
            "--output=json",
        ],
    );
    dry.assert_ok();
    let plan = dry.json();
    let kept: Vec<&str> = plan["keep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [made[3].as_str(), made[4].as_str()]);
    assert_eq!(
        plan["merge"][0]["run"],
        serde_json::json!([made[2], made[1], made[0]])
    );
    assert_eq!(plan["merge"][0]["child"], made[3].as_str());
    assert_eq!(plan["delete"], serde_json::json!([made[1], made[0]]));
    assert_eq!(ids(s.dir(), "set"), made);

    let p = qbackup_in(
        s.dir(),
        &["prune", "set", "--keep-last", "2", "--output=json"],
    );
    p.assert_ok();
    let done = p.json();
    assert_eq!(done["deleted"], serde_json::json!([made[1], made[0]]));
    // The consolidation passed every compressed cluster through as it was.
    let clusters = &done["merged"][0]["clusters"];
    assert_eq!(clusters["compressed"], 0, "{done}");
    assert!(clusters["passed-through"].as_u64().unwrap() >= 24, "{done}");
    let rows = list(s.dir(), "set");
    assert_eq!(ids(s.dir(), "set"), made[2..].to_vec());
    assert_eq!(rows[0]["kind"], "consolidated");
    // Its old verify result was the pruned file's: forgotten.
    assert!(rows[0]["last-verify"].is_null(), "{}", rows[0]);
    assert_eq!(rows[1]["last-verify"]["result"], "ok");
    assert_eq!(rows[0]["chain-depth"], 1);
    assert_eq!(rows[1]["parent"], made[2].as_str());
    // Every kept backup (and the consolidated point in time) restores
    // exactly, and QEMU opens each file as it is.
    for (i, id) in made.iter().enumerate().skip(2) {
        assert_restores(s.dir(), "set", id, &format!("ref-{i}.raw"));
    }
    let v = qbackup_in(s.dir(), &["verify", "set"]);
    assert_eq!(v.code, Some(0), "{}", v.describe());
    // No leftovers of the prune.
    let names: Vec<String> = std::fs::read_dir(s.path("set/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(!s.path("set/.qbackup-prune.json").exists());

    // The next backup builds on the newest, and a second prune with the
    // same policy only drops what is no longer kept.
    s.io("vm.qcow2", "qcow2", &["write -P 0x77 8M 1M"]);
    qemu_img_in(s.dir(), &["convert", "-O", "raw", "vm.qcow2", "ref-5.raw"]);
    qbackup_in(s.dir(), &["backup", "vm.qcow2", "set"]).assert_ok();
    let rows = list(s.dir(), "set");
    assert_eq!(rows[3]["parent"], made[4].as_str());
    qbackup_in(s.dir(), &["prune", "set", "--keep-last", "2"]).assert_ok();
    let rows = list(s.dir(), "set");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["kind"], "consolidated");
    assert_eq!(rows[0]["id"], made[3].as_str());
    assert_restores(s.dir(), "set", &made[3], "ref-3.raw");
    assert_restores(s.dir(), "set", &made[4], "ref-4.raw");
    let newest = rows[2]["id"].as_str().unwrap().to_string();
    assert_restores(s.dir(), "set", &newest, "ref-5.raw");
}

#[test]
fn bitmap_incrementals_and_set_options() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 8 * MIB, "");
    qemu_img_in(s.dir(), &["bitmap", "--add", "d.qcow2", "b"]);
    s.io("d.qcow2", "qcow2", &["write -P 1 0 1M"]);
    qbackup_in(
        s.dir(),
        &[
            "backup",
            "d.qcow2",
            "set/",
            "--bitmap",
            "b",
            "--disk-name",
            "vda",
        ],
    )
    .assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 2 4M 64k"]);
    qemu_img_in(s.dir(), &["convert", "-O", "raw", "d.qcow2", "ref.raw"]);
    let r = qbackup_in(
        s.dir(),
        &[
            "backup",
            "d.qcow2",
            "set",
            "--bitmap",
            "b",
            "--disk-name",
            "vda",
            "--output=json",
        ],
    );
    r.assert_ok();
    let v = r.json();
    assert_eq!(v["sync"], "incremental");
    assert_eq!(
        v["clusters"]["data"].as_u64().unwrap() + v["clusters"]["compressed"].as_u64().unwrap(),
        1
    );
    let rows = list(s.dir(), "set");
    assert_eq!(rows[1]["kind"], "incremental (bitmap)");
    assert_eq!(rows[1]["disk"], "vda");
    assert_restores(s.dir(), "set", rows[1]["id"].as_str().unwrap(), "ref.raw");
    // --sync full starts a new chain.
    qbackup_in(
        s.dir(),
        &[
            "backup",
            "d.qcow2",
            "set",
            "--disk-name",
            "vda",
            "--sync",
            "full",
        ],
    )
    .assert_ok();
    assert_eq!(list(s.dir(), "set")[2]["chain-depth"], 1);
    // What the set decides itself is refused, and --sync auto needs a set.
    for (args, words) in [
        (&["--sync", "top"][..], "--sync top"),
        (&["--backing", "x.qcow2"], "--backing"),
        (&["--force"], "--force"),
        (&["-O", "raw"], "-O raw"),
        (&["--no-manifest"], "--no-manifest"),
    ] {
        let all = [&["backup", "d.qcow2", "set"][..], args].concat();
        qbackup_in(s.dir(), &all).assert_usage_error(&[words]);
    }
    qbackup_in(s.dir(), &["backup", "--sync", "auto", "d.qcow2", "f.qcow2"])
        .assert_usage_error(&["--sync auto"]);
    qbackup_in(
        s.dir(),
        &["backup", "--disk-name", "x", "d.qcow2", "f.qcow2"],
    )
    .assert_usage_error(&["--disk-name"]);
    // Several disks: restore needs --disk.
    s.create("e.qcow2", "qcow2", 8 * MIB, "");
    qbackup_in(s.dir(), &["backup", "e.qcow2", "set"]).assert_ok();
    qbackup_in(s.dir(), &["restore", "set", "x.raw"]).assert_clean_failure_mentioning(&["--disk"]);
    qbackup_in(s.dir(), &["restore", "set", "--disk", "e", "x.raw"]).assert_ok();
    qbackup_in(
        s.dir(),
        &[
            "restore",
            "set",
            "--disk",
            "vda",
            "--at",
            "1999-01-01",
            "y.raw",
        ],
    )
    .assert_clean_failure_mentioning(&["no backup made at or before"]);
    qbackup_in(s.dir(), &["prune", "set"]).assert_usage_error(&["policy"]);
}

#[test]
fn the_set_lock_serialises_commands() {
    let s = Scratch::new();
    s.create("big.qcow2", "qcow2", 32 * MIB, "");
    s.io("big.qcow2", "qcow2", &["write -P 0x11 0 32M"]);
    qbackup_in(
        s.dir(),
        &["backup", "big.qcow2", "set/", "--compress", "none"],
    )
    .assert_ok();
    // A slow backup holds the set (32 MiB at 16 MiB/s).
    let started = std::time::Instant::now();
    let (child, cmd) = spawn_qbackup(
        s.dir(),
        &[
            "backup",
            "big.qcow2",
            "set",
            "--sync",
            "full",
            "--speed",
            "16M",
        ],
    );
    let lock = s.path("set/.qbackup-set.lock");
    // Wait until it holds the lock (it shows in /proc/locks by inode).
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&lock).unwrap().ino()
    };
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .contains(&format!(":{ino} "))
    {
        std::thread::sleep(Duration::from_millis(10));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    qbackup_in(s.dir(), &["prune", "set", "--keep-last", "1"])
        .assert_clean_failure_mentioning(&["another qbackup process"]);
    qbackup_in(s.dir(), &["restore", "set", "r.raw"])
        .assert_clean_failure_mentioning(&["another qbackup process"]);
    // --wait waits for it.
    let waited = qbackup_within(
        s.dir(),
        &["prune", "set", "--keep-last", "1", "--wait"],
        Duration::from_secs(60),
    );
    waited.assert_ok();
    let first = wait_qbackup(child, cmd, started, Duration::from_secs(60));
    first.assert_ok();
    assert!(started.elapsed() > Duration::from_millis(1500));
    assert_eq!(list(s.dir(), "set").len(), 1);
}

#[test]
fn damaged_sets_are_named_and_not_pruned() {
    let s = Scratch::new();
    let made = set_with_backups(&s, 4);
    let file = |i: usize| {
        list(s.dir(), "set")
            .into_iter()
            .find(|r| r["id"] == made[i].as_str())
            .map(|r| r["file"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (f1, f2, f3) = (file(1), file(2), file(3));
    let damaged_ok = |what: &str, affected: &[usize]| {
        let l = qbackup_in(s.dir(), &["list", "set"]);
        l.assert_ok();
        let line = l
            .stdout
            .lines()
            .find(|x| x.starts_with("damaged: ") && x.contains(what))
            .unwrap_or_else(|| panic!("no damage line with {what}:\n{}", l.stdout));
        for &i in affected {
            assert!(line.contains(&made[i]), "{line} should name {}", made[i]);
        }
        let v = qbackup_in(s.dir(), &["verify", "set"]);
        assert_eq!(v.code, Some(1), "{}", v.describe());
        assert!(v.stdout.contains("DAMAGED"), "{}", v.stdout);
        qbackup_in(s.dir(), &["prune", "set", "--keep-last", "1"])
            .assert_clean_failure_mentioning(&["damaged"]);
        qbackup_in(s.dir(), &["restore", "set", "--at", &made[3], "x.raw"])
            .assert_clean_failure_mentioning(&["cannot be restored"]);
        // What is not affected still restores.
        assert_restores(s.dir(), "set", &made[0], "ref-0.raw");
    };
    // A truncated manifest: its backup and everything above it.
    let m3 = s.path(&format!("{f3}.manifest"));
    let keep3 = std::fs::read(&m3).unwrap();
    std::fs::write(&m3, &keep3[..keep3.len() / 2]).unwrap();
    damaged_ok("does not read", &[]);
    std::fs::write(&m3, &keep3).unwrap();
    // A missing middle file.
    let moved = s.path("moved.qcow2");
    std::fs::rename(s.path(&f2), &moved).unwrap();
    std::fs::rename(
        s.path(&format!("{f2}.manifest")),
        s.path("moved.qcow2.manifest"),
    )
    .unwrap();
    damaged_ok("missing", &[3]);
    // A swapped parent: backup 1's files where backup 2's were.
    std::fs::copy(s.path(&f1), s.path(&f2)).unwrap();
    std::fs::copy(
        s.path(&format!("{f1}.manifest")),
        s.path(&format!("{f2}.manifest")),
    )
    .unwrap();
    let l = qbackup_in(s.dir(), &["list", "set"]);
    assert!(l.stdout.contains("swapped"), "{}", l.stdout);
    damaged_ok("swapped", &[3]);
    // Put back, the set is whole again.
    std::fs::rename(&moved, s.path(&f2)).unwrap();
    std::fs::rename(
        s.path("moved.qcow2.manifest"),
        s.path(&format!("{f2}.manifest")),
    )
    .unwrap();
    let v = qbackup_in(s.dir(), &["verify", "set"]);
    assert_eq!(v.code, Some(0), "{}", v.describe());
}

#[test]
fn a_prune_killed_at_any_point_is_finished_or_undone_by_the_next() {
    let s = Scratch::new();
    // 48 MiB of poorly compressible data, so a consolidation takes a while.
    s.create("vm.qcow2", "qcow2", 48 * MIB, "");
    let noise: Vec<u8> = (0..48 * MIB as usize)
        .map(|i| {
            (i as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(17) as u8
        })
        .collect();
    s.write_file("noise.bin", &noise);
    s.io("vm.qcow2", "qcow2", &["write -s noise.bin 0 48M"]);
    qbackup_in(s.dir(), &["backup", "vm.qcow2", "orig/", "-q"]).assert_ok();
    for i in 0..3u64 {
        s.io(
            "vm.qcow2",
            "qcow2",
            &[&format!("write -P {} {} 4M", i + 1, i * 8 * MIB)],
        );
        qbackup_in(s.dir(), &["backup", "vm.qcow2", "orig", "-q"]).assert_ok();
    }
    qemu_img_in(s.dir(), &["convert", "-O", "raw", "vm.qcow2", "ref.raw"]);
    let newest = ids(s.dir(), "orig").pop().unwrap();
    let (mut finished, mut rolled_back) = (0, 0);
    for step in 0..12u64 {
        let set = format!("set{step}");
        let cp = std::process::Command::new("cp")
            .args(["-a", "orig", &set])
            .current_dir(s.dir())
            .status()
            .unwrap();
        assert!(cp.success());
        let (mut child, _) = spawn_qbackup(s.dir(), &["prune", &set, "--keep-last", "1"]);
        std::thread::sleep(Duration::from_millis(step * 25));
        let _ = child.kill();
        let _ = child.wait();
        // Right after the kill: listed without damage, the kept backup restores.
        for row in list(s.dir(), &set) {
            assert!(row["problems"].as_array().unwrap().is_empty(), "{row}");
        }
        assert_restores(s.dir(), &set, &newest, "ref.raw");
        // The next prune finishes or undoes what the killed one started.
        let next = qbackup_in(s.dir(), &["prune", &set, "--keep-last", "1"]);
        next.assert_ok();
        finished += usize::from(next.stderr.contains("finished the consolidation"));
        rolled_back += usize::from(next.stderr.contains("rolled back"));
        assert!(!s.path(&format!("{set}/.qbackup-prune.json")).exists());
        let rows = list(s.dir(), &set);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0]["kind"], "consolidated");
        assert_restores(s.dir(), &set, &newest, "ref.raw");
        let v = qbackup_in(s.dir(), &["verify", &set]);
        assert_eq!(v.code, Some(0), "{}", v.describe());
        let hidden: Vec<String> = std::fs::read_dir(s.path(&format!("{set}/vm")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "left behind: {hidden:?}");
        std::fs::remove_dir_all(s.path(&set)).unwrap();
    }
    eprintln!("killed prunes: {finished} finished, {rolled_back} rolled back by the next");
}

#[test]
fn commands_on_what_is_not_a_set_change_nothing() {
    let s = Scratch::new();
    s.mkdir("empty");
    let v = qbackup_in(s.dir(), &["verify", "empty"]);
    assert_eq!(v.code, Some(2), "{}", v.describe());
    assert!(v.stderr.contains("no backups"), "{}", v.describe());
    qbackup_in(s.dir(), &["restore", "empty", "x.raw"])
        .assert_clean_failure_mentioning(&["no backups"]);
    qbackup_in(s.dir(), &["prune", "absent", "--keep-last", "1"])
        .assert_clean_failure_mentioning(&["not a backup set"]);
    qbackup_in(s.dir(), &["list", "absent"]).assert_clean_failure_mentioning(&["not a backup set"]);
    assert!(!s.path("absent").exists());
    assert_eq!(std::fs::read_dir(s.path("empty")).unwrap().count(), 0);
}
