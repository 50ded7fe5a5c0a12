//! Property test of backup sets: random sequences of writes to a source,
//! backups into a set (auto, by bitmap, full), prunes with random rules,
//! and `kill -9` at random points of backups and prunes. After every step
//! `list` works and shows no damage (a killed backup's manifest-less
//! leftover aside), and every backup listed restores to exactly the
//! source's state when it was made (reference copies kept), its file
//! `qemu-img check` clean. The sequences are seeded, so a failure
//! reproduces; QBACKUP_SET_PROP_SEQUENCES sets how many run (default 6),
//! QBACKUP_SET_PROP_FIRST_SEED the first seed (default 1).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::oracle::qemu_img_in;
use common::run::{qbackup_in, spawn_qbackup};
use common::scratch::Scratch;
use common::set::{assert_restores, list};
use common::MIB;

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SIZE: u64 = 8 * MIB;
const CLUSTER: u64 = 64 * 1024;
/// Steps per sequence.
const STEPS: usize = 20;

/// Runs qbackup with `args`, killed with SIGKILL after `kill_after` when
/// given; true when it was killed before it ended.
fn run_maybe_killed(s: &Scratch, args: &[&str], kill_after: Option<Duration>) -> bool {
    let Some(delay) = kill_after else {
        qbackup_in(s.dir(), args).assert_ok();
        return false;
    };
    let (mut child, cmd) = spawn_qbackup(s.dir(), args);
    let started = Instant::now();
    while started.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "`{cmd}` failed: {out:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    status.code().is_none()
}

/// Checks the set: no damage but killed backups' leftovers, and the
/// listed backups (all, or only `only`) restore to their references.
fn check(s: &Scratch, refs: &HashMap<String, String>, only: Option<&str>) {
    for row in list(s.dir(), "set") {
        let problems = row["problems"].as_array().unwrap();
        if row["kind"] == "unknown" {
            // A backup killed between publishing its image and manifest.
            continue;
        }
        assert!(problems.is_empty(), "damage after a step: {row}");
        let id = row["id"].as_str().unwrap();
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let reference = refs
            .get(id)
            .unwrap_or_else(|| panic!("{id} has no reference: {row}"));
        assert_restores(s.dir(), "set", id, reference);
    }
}

fn sequence(seed: u64, steps: usize, kills: &mut usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let s = Scratch::new();
    // The source starts with compressed clusters, which backups and
    // consolidations pass through.
    s.create("start.raw", "raw", SIZE, "");
    s.io(
        "start.raw",
        "raw",
        &["write -P 0x5a 0 2M", "write -P 0x6b 4M 1M"],
    );
    qemu_img_in(
        s.dir(),
        &["convert", "-c", "-O", "qcow2", "start.raw", "src.qcow2"],
    );
    qemu_img_in(s.dir(), &["bitmap", "--add", "src.qcow2", "b"]);
    let mut refs: HashMap<String, String> = HashMap::new();
    let mut n = 0;
    for step in 0..steps {
        match rng.below(10) {
            0..=2 => {
                let mut cmds = Vec::new();
                for _ in 0..=rng.below(3) {
                    let len = (1 + rng.below(6)) * CLUSTER;
                    let off = rng.below((SIZE - len) / CLUSTER) * CLUSTER;
                    let cmd = match rng.below(4) {
                        0 => format!("write -z {off} {len}"),
                        _ => format!("write -P {} {off} {len}", rng.below(255) + 1),
                    };
                    cmds.push(cmd);
                }
                s.io_all("src.qcow2", "qcow2", &cmds);
            }
            3..=6 => {
                let reference = format!("ref-{n}.raw");
                n += 1;
                qemu_img_in(s.dir(), &["convert", "-O", "raw", "src.qcow2", &reference]);
                let mut args = vec!["backup", "src.qcow2", "set/", "-q"];
                match rng.below(3) {
                    0 => args.extend(["--bitmap", "b"]),
                    1 if step % 4 == 0 => args.extend(["--sync", "full"]),
                    _ => {}
                }
                let kill = (rng.below(3) == 0).then(|| Duration::from_millis(rng.below(30)));
                if run_maybe_killed(&s, &args, kill) {
                    *kills += 1;
                }
                // Whatever was published reads as the source did. (A backup
                // killed at its start may not have made the set yet.)
                let rows = if s.path("set").exists() {
                    list(s.dir(), "set")
                } else {
                    vec![]
                };
                for row in rows {
                    let id = row["id"].as_str().unwrap().to_string();
                    if row["kind"] != "unknown" && !refs.contains_key(&id) {
                        refs.insert(id.clone(), reference.clone());
                        check(&s, &refs, Some(&id));
                    }
                }
            }
            // (No set before the first backup: prune refuses what is not one.)
            _ if !s.path("set").exists() => {}
            _ => {
                let last = (1 + rng.below(3)).to_string();
                let mut args = vec!["prune", "set", "--keep-last", &last];
                if rng.below(2) == 0 {
                    args.extend(["--keep-daily", "1"]);
                }
                let kill = (rng.below(2) == 0).then(|| Duration::from_millis(rng.below(40)));
                if run_maybe_killed(&s, &args, kill) {
                    *kills += 1;
                }
                check(&s, &refs, None);
            }
        }
    }
    // A last prune finishes whatever was cut short; the set verifies.
    if s.path("set").exists() && !list(s.dir(), "set").is_empty() {
        qbackup_in(s.dir(), &["prune", "set", "--keep-last", "2"]).assert_ok();
        check(&s, &refs, None);
        let v = qbackup_in(s.dir(), &["verify", "set"]);
        assert_eq!(v.code, Some(0), "seed {seed}: {}", v.describe());
        assert!(!s.path("set/.qbackup-prune.json").exists());
    }
}

#[test]
fn random_backups_prunes_and_kills_keep_every_backup_restorable() {
    let sequences: u64 = std::env::var("QBACKUP_SET_PROP_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let first: u64 = std::env::var("QBACKUP_SET_PROP_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut kills = 0;
    for seed in first..first + sequences {
        sequence(seed, STEPS, &mut kills);
    }
    eprintln!(
        "set property test: {sequences} sequences of {STEPS} steps, {kills} processes killed"
    );
}
