//! Backups that prove themselves: the manifest beside every backup,
//! `qbackup verify` (exit 0 good, 1 damaged, 2 error) on every kind of
//! backup and against each kind of damage, and incremental backups made
//! by content (no dirty bitmap) from the previous backup's manifest.

mod common;

use common::backup::{backup_incremental, own_ranges, standard_content, Round};
use common::oracle::{assert_check_clean, assert_identical};
use common::qcow2::{file_len, mark_first_bitmap_in_use, patch_u8, read_bytes, set_len, Layout};
use common::run::qbackup_in;
use common::scratch::Scratch;
use common::{KIB, MIB};
use serde_json::Value;

/// `qbackup verify --output=json BACKUP`: (exit status, report).
fn verify(s: &Scratch, backup: &str) -> (Option<i32>, Value) {
    let run = qbackup_in(s.dir(), &["verify", "--output=json", backup]);
    let v = if run.code == Some(2) {
        Value::Null
    } else {
        run.json()
    };
    (run.code, v)
}

fn assert_verified(s: &Scratch, backup: &str) {
    let (code, v) = verify(s, backup);
    assert_eq!(code, Some(0), "verify {backup}: {v:#}");
    assert_eq!(v["result"], "ok");
    assert!(v["clusters-checked"].as_u64().unwrap() > 0);
}

/// A disk with data, zeros, compressed and plain clusters.
fn disk(s: &Scratch) {
    s.create("d.qcow2", "qcow2", 16 * MIB, "");
    s.io_all("d.qcow2", "qcow2", &standard_content(s));
    s.io(
        "d.qcow2",
        "qcow2",
        &["write -P 0x21 8M 1M", "write -c -P 0x22 12M 256k"],
    );
}

#[test]
fn fresh_backups_of_every_kind_verify() {
    let s = Scratch::new();
    disk(&s);
    for (name, opts) in [
        ("zstd.qcow2", &[][..]),
        ("zlib.qcow2", &["--compress", "zlib"][..]),
        ("plain.qcow2", &["--compress", "none"][..]),
        ("small.qcow2", &["--cluster-size", "4k"][..]),
        ("raw.img", &["-O", "raw"][..]),
    ] {
        s.backup(&[opts, &["d.qcow2", name]].concat()).assert_ok();
        assert!(s.path(&format!("{name}.manifest")).exists());
        assert_verified(&s, name);
    }
    // --sync top over a base without a manifest: what the overlay holds is
    // checked, the rest is reported as not covered.
    s.overlay("top.qcow2", "d.qcow2", "qcow2", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 0x33 1M 128k"]);
    s.backup(&["--sync", "top", "top.qcow2", "delta.qcow2"])
        .assert_ok();
    let (code, v) = verify(&s, "delta.qcow2");
    assert_eq!(code, Some(0), "{v:#}");
    assert!(v["clusters-not-covered"].as_u64().unwrap() > 0);
    // Incremental chains, by bitmap and by content, verify at every step.
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.backup(&["--bitmap", "bm0", "d.qcow2", "full.qcow2"])
        .assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x44 2M 64k"]);
    backup_incremental(&s, &[], ("bm0", "full.qcow2"), "d.qcow2", "inc1.qcow2").assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x45 3M 64k"]);
    s.backup(&[
        "--sync",
        "incremental",
        "--backing",
        "inc1.qcow2",
        "d.qcow2",
        "inc2.qcow2",
    ])
    .assert_ok();
    for b in ["full.qcow2", "inc1.qcow2", "inc2.qcow2"] {
        assert_verified(&s, b);
        assert_check_clean(s.dir(), b);
    }
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc2.qcow2", "qcow2");
}

/// Flips one byte of a file.
fn flip(path: &std::path::Path, at: u64) {
    let b = read_bytes(path, at, 1)[0];
    patch_u8(path, at, b ^ 0x40);
}

#[test]
fn damage_is_found_and_located() {
    let s = Scratch::new();
    disk(&s);
    // A flipped byte in an uncompressed cluster: guest 8 MiB.
    s.backup(&["--compress", "none", "d.qcow2", "plain.qcow2"])
        .assert_ok();
    let p = s.path("plain.qcow2");
    let host = Layout::read(&p).l2_entry(&p, 8 * MIB) & 0x00ff_ffff_ffff_fe00;
    flip(&p, host + 100);
    let (code, v) = verify(&s, "plain.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["result"], "damaged");
    let d = &v["damaged"][0];
    assert_eq!(d["start"], 8 * MIB);
    assert_eq!(d["length"], 64 * KIB);
    assert!(d["file"].as_str().unwrap().ends_with("plain.qcow2"));
    assert_eq!(v["damaged-count"], 1);
    // Inside a compressed cluster: decoding fails or gives other bytes.
    s.backup(&["d.qcow2", "z.qcow2"]).assert_ok();
    let z = s.path("z.qcow2");
    let layout = Layout::read(&z);
    let (host, len) = layout
        .compressed_span(layout.l2_entry(&z, 8 * MIB))
        .expect("compressed");
    flip(&z, host + len / 3);
    let (code, v) = verify(&s, "z.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["damaged"][0]["start"], 8 * MIB);
    // A truncated file: the clusters past the cut cannot be read.
    s.backup(&["--compress", "none", "d.qcow2", "cut.qcow2"])
        .assert_ok();
    let c = s.path("cut.qcow2");
    set_len(&c, file_len(&c) / 2);
    let (code, v) = verify(&s, "cut.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    assert!(v["damaged-count"].as_u64().unwrap() > 0);
    // Human output names the range and the file, and says DAMAGED.
    let run = qbackup_in(s.dir(), &["verify", "plain.qcow2"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout.contains("guest bytes 8388608..8454144"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("DAMAGED"), "{}", run.stdout);
}

#[test]
fn wrong_parent_and_wrong_manifest_are_caught() {
    let s = Scratch::new();
    disk(&s);
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.backup(&["--compress", "zlib", "d.qcow2", "other.qcow2"])
        .assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x55 5M 64k"]);
    s.backup(&[
        "--sync",
        "incremental",
        "--backing",
        "full.qcow2",
        "d.qcow2",
        "inc.qcow2",
    ])
    .assert_ok();
    assert_verified(&s, "inc.qcow2");
    // The parent replaced by another backup of the same disk (same bytes,
    // even): not the one the incremental was made on.
    std::fs::rename(s.path("full.qcow2"), s.path("full.orig")).unwrap();
    std::fs::rename(s.path("full.qcow2.manifest"), s.path("full.orig.manifest")).unwrap();
    std::fs::copy(s.path("other.qcow2"), s.path("full.qcow2")).unwrap();
    std::fs::copy(
        s.path("other.qcow2.manifest"),
        s.path("full.qcow2.manifest"),
    )
    .unwrap();
    let (code, v) = verify(&s, "inc.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    assert!(v["chain-problems"][0]
        .as_str()
        .unwrap()
        .contains("not the backup this one was made on"));
    // A manifest that belongs to another backup: its bytes do not match.
    std::fs::copy(s.path("inc.qcow2.manifest"), s.path("other.qcow2.manifest")).unwrap();
    let (code, v) = verify(&s, "other.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    // An edited manifest: refused as such (exit 2, one line).
    let m = s.path("full.orig.manifest");
    let len = file_len(&m);
    flip(&m, len - 40);
    let run = qbackup_in(s.dir(), &["verify", "full.orig"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("full.orig.manifest"), "{}", run.stderr);
    assert!(
        run.stderr.contains("checksum does not match"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    // No manifest at all: exit 2.
    s.backup(&["--no-manifest", "d.qcow2", "bare.qcow2"])
        .assert_ok();
    assert!(!s.path("bare.qcow2.manifest").exists());
    assert_eq!(qbackup_in(s.dir(), &["verify", "bare.qcow2"]).code, Some(2));
}

/// Incremental backups without a bitmap (a raw disk cannot hold one):
/// each equals the source and allocates exactly the clusters changed.
#[test]
fn incremental_by_content_allocates_only_changed_clusters() {
    let s = Scratch::new();
    s.create("d.raw", "raw", 16 * MIB, "");
    s.io(
        "d.raw",
        "raw",
        &["write -P 0x01 0 4M", "write -P 0x02 10M 1M"],
    );
    s.backup(&["d.raw", "full.qcow2"]).assert_ok();
    let rounds: [Round; 2] = [
        (
            &[
                "write -P 0x11 1M 64k",
                "write -z 10M 64k",
                "write -P 0x12 14M 4k",
            ],
            vec![(MIB, 64 * KIB), (10 * MIB, 64 * KIB), (14 * MIB, 64 * KIB)],
        ),
        (
            // Rewriting the same bytes changes nothing.
            &["write -P 0x01 0 64k", "write -P 0x13 2M 128k"],
            vec![(2 * MIB, 128 * KIB)],
        ),
    ];
    let mut prev = "full.qcow2".to_string();
    for (k, (writes, want)) in rounds.iter().enumerate() {
        s.io("d.raw", "raw", writes);
        let inc = format!("inc{}.qcow2", k + 1);
        s.backup(&["--sync", "incremental", "--backing", &prev, "d.raw", &inc])
            .assert_ok();
        assert_identical(s.dir(), "d.raw", "raw", &inc, "qcow2");
        assert_check_clean(s.dir(), &inc);
        assert_eq!(&own_ranges(&s, &inc), want, "round {k}");
        assert_verified(&s, &inc);
        prev = inc;
    }
    s.img(&["convert", "-O", "raw", "inc2.qcow2", "restored.raw"]);
    assert_identical(s.dir(), "d.raw", "raw", "restored.raw", "raw");
}

/// A bitmap left in use falls back to the incremental by content, with a
/// warning; --require-bitmap fails instead.
#[test]
fn unusable_bitmap_falls_back_with_a_warning() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 8 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.backup(&["--bitmap", "bm0", "d.qcow2", "full.qcow2"])
        .assert_ok();
    s.io("d.qcow2", "qcow2", &["write -P 0x07 1M 64k"]);
    let img = s.path("d.qcow2");
    mark_first_bitmap_in_use(&img);
    backup_incremental(
        &s,
        &["--require-bitmap"],
        ("bm0", "full.qcow2"),
        "d.qcow2",
        "inc.qcow2",
    )
    .assert_clean_failure_mentioning(&["marked in use"]);
    // -q: no summary line, so the warning is all there is on stderr.
    let run = backup_incremental(&s, &["-q"], ("bm0", "full.qcow2"), "d.qcow2", "inc.qcow2");
    run.assert_ok();
    assert!(run.stderr.contains("warning"), "{}", run.stderr);
    assert!(run.stderr.contains("by content"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    assert_verified(&s, "inc.qcow2");
}

/// Issue 19: only the direct parent's manifest was checked, so a
/// grandparent swapped for another backup of the same size (manifest and
/// all) verified OK. Every ancestor is checked now.
#[test]
fn a_replaced_grandparent_is_reported() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io("d.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    for (i, prev) in [(1, "full.qcow2"), (2, "inc1.qcow2")] {
        s.io("d.qcow2", "qcow2", &[&format!("write -P 0x2{i} {i}M 64k")]);
        let inc = format!("inc{i}.qcow2");
        s.backup(&["--sync", "incremental", "--backing", prev, "d.qcow2", &inc])
            .assert_ok();
    }
    assert_eq!(verify(&s, "inc2.qcow2").0, Some(0));
    // Another disk's full backup of the same size takes full.qcow2's place.
    s.create("other.qcow2", "qcow2", 4 * MIB, "");
    s.io("other.qcow2", "qcow2", &["write -P 0x99 0 2M"]);
    s.backup(&["other.qcow2", "o.qcow2"]).assert_ok();
    std::fs::rename(s.path("o.qcow2"), s.path("full.qcow2")).unwrap();
    std::fs::rename(s.path("o.qcow2.manifest"), s.path("full.qcow2.manifest")).unwrap();
    let (code, v) = verify(&s, "inc2.qcow2");
    assert_eq!(code, Some(1), "{v:#}");
    let problems = v["chain-problems"].to_string();
    assert!(
        problems.contains("full.qcow2: not the backup inc1.qcow2 was made on"),
        "{v:#}"
    );
}
