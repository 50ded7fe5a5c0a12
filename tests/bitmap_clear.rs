//! Clearing a qcow2 image's persistent dirty bitmap after a backup
//! (`--bitmap-mode on-success`, the default for image files): the cycle
//! full → incremental → incremental → … that admins run every day.
//!
//! QEMU is the oracle throughout: `qemu-nbd -B` + `nbdinfo --map` for the
//! dirty set (cleared after each backup, and set again by the next guest
//! writes, so QEMU keeps tracking into the bitmap), `qemu-img check` on the
//! source after every clearing and on every file of the backup chain,
//! `qemu-img compare` of each backup with the source, and `qemu-img info`
//! still listing the bitmap, enabled.

mod common;

use common::backup::{backup_incremental, dirty_ranges, own_ranges, Round};
use common::oracle::{assert_check_clean, assert_identical};
use common::process::qemu_nbd_with;
use common::qcow2::mark_first_bitmap_in_use;
use common::run::assert_no_leftovers;
use common::scratch::Scratch;
use common::{KIB, MIB};

/// The dirty ranges of `bitmap` in d.qcow2, as QEMU reports them.
fn dirty(s: &Scratch, bitmap: &str) -> Vec<(u64, u64)> {
    dirty_ranges(s, "d.qcow2", bitmap)
}

/// An 8 MiB d.qcow2 with a full backup, then bitmap bm0 and one write
/// (1 MiB + 64 KiB) it records; returns the image's bytes.
fn backed_up_with_bitmap(s: &Scratch) -> Vec<u8> {
    s.create("d.qcow2", "qcow2", 8 * MIB, "");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    guest_writes(s, &["write -P 0x07 1M 64k"]);
    std::fs::read(s.path("d.qcow2")).unwrap()
}

/// Guest writes through qemu-io (QEMU records them in enabled bitmaps).
fn guest_writes(s: &Scratch, cmds: &[&str]) {
    s.io("d.qcow2", "qcow2", cmds);
}

fn bitmap_flags(s: &Scratch, name: &str) -> Vec<String> {
    let info = s.qemu_info("d.qcow2", "qcow2");
    let list = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let b = list
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("qemu-img info lists no bitmap {name}: {info}"));
    b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn full_then_incrementals_clear_the_bitmap_and_qemu_keeps_tracking() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 32 * MIB, "");
    guest_writes(&s, &["write -P 0x01 0 4M", "write -P 0x02 20M 1M"]);
    s.img(&["bitmap", "--add", "-g", "64k", "d.qcow2", "bm0"]);
    guest_writes(&s, &["write -P 0x03 8M 128k"]);
    assert_eq!(dirty(&s, "bm0"), vec![(8 * MIB, 128 * KIB)]);

    // A full backup with --bitmap starts the cycle: the bitmap is cleared.
    s.backup(&["--bitmap", "bm0", "d.qcow2", "full.qcow2"])
        .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "full.qcow2", "qcow2");
    assert_eq!(dirty(&s, "bm0"), vec![]);
    assert_check_clean(s.dir(), "d.qcow2");

    // Each round: guest writes, and the dirty ranges QEMU must record.
    let rounds: [Round; 3] = [
        (
            &["write -P 0x11 300k 8k", "write -P 0x12 6M 1M"],
            vec![(256 * KIB, 64 * KIB), (6 * MIB, MIB)],
        ),
        (
            &["write -z 0 64k", "write -P 0x13 31M 512"],
            vec![(0, 64 * KIB), (31 * MIB, 64 * KIB)],
        ),
        (
            &["discard 20M 128k", "write -P 0x14 12M 192k"],
            vec![(12 * MIB, 192 * KIB), (20 * MIB, 128 * KIB)],
        ),
    ];
    let mut chain = vec!["full.qcow2".to_string()];
    for (k, (writes, want)) in rounds.iter().enumerate() {
        guest_writes(&s, writes);
        // QEMU tracked these writes into the bitmap qbackup cleared.
        assert_eq!(&dirty(&s, "bm0"), want, "round {k}: dirty set");
        let prev = chain.last().unwrap().clone();
        let inc = format!("inc{}.qcow2", k + 1);
        backup_incremental(&s, &[], ("bm0", &prev), "d.qcow2", &inc).assert_ok();
        assert_identical(s.dir(), "d.qcow2", "qcow2", &inc, "qcow2");
        // Exactly the changed clusters (discarded ones as zero clusters).
        assert_eq!(&own_ranges(&s, &inc), want, "round {k}: {inc} allocates");
        assert_eq!(dirty(&s, "bm0"), vec![], "round {k}: cleared");
        assert_check_clean(s.dir(), "d.qcow2");
        assert_eq!(bitmap_flags(&s, "bm0"), vec!["auto".to_string()]);
        chain.push(inc);
        for f in &chain {
            assert_check_clean(s.dir(), f);
        }
    }
    // Restore: qemu-img reads the last overlay through the whole chain.
    s.img(&["convert", "-O", "raw", "inc3.qcow2", "restored.raw"]);
    assert_identical(s.dir(), "d.qcow2", "qcow2", "restored.raw", "raw");
}

#[test]
fn bitmap_mode_never_leaves_the_source_untouched() {
    let s = Scratch::new();
    let before = backed_up_with_bitmap(&s);
    backup_incremental(
        &s,
        &["--bitmap-mode", "never"],
        ("bm0", "full.qcow2"),
        "d.qcow2",
        "inc.qcow2",
    )
    .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    assert_eq!(std::fs::read(s.path("d.qcow2")).unwrap(), before);
    assert_eq!(dirty(&s, "bm0"), vec![(MIB, 64 * KIB)]);
}

/// Every refusal: one line, exit 1 (or 2 for usage), the source's bytes
/// unchanged, nothing at TARGET.
#[test]
fn refusals_leave_source_and_target_alone() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 8 * MIB, "");
    s.backup(&["d.qcow2", "full.qcow2"]).assert_ok();
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.img(&["bitmap", "--add", "d.qcow2", "off"]);
    guest_writes(&s, &["write -P 0x07 1M 64k"]);
    // Disabled at a backup point: it holds every write up to here.
    s.img(&["bitmap", "--disable", "d.qcow2", "off"]);
    let before = std::fs::read(s.path("d.qcow2")).unwrap();
    let unchanged = |s: &Scratch| {
        assert_eq!(std::fs::read(s.path("d.qcow2")).unwrap(), before);
        assert!(!s.path("inc.qcow2").exists());
        assert_no_leftovers(s.dir());
    };
    let inc = |extra: &[&str], bitmap: &str| {
        backup_incremental(&s, extra, (bitmap, "full.qcow2"), "d.qcow2", "inc.qcow2")
    };
    for (extra, bitmap, says) in [
        (
            &["--bitmap-mode", "always"][..],
            "bm0",
            "would lose the writes",
        ),
        (&["-U"][..], "bm0", "needs the image to itself"),
        (
            &["--require-bitmap"][..],
            "nope",
            "no persistent dirty bitmap named 'nope'",
        ),
        (&["--require-bitmap"][..], "off", "is disabled"),
    ] {
        let run = inc(extra, bitmap);
        if extra == ["--require-bitmap"] {
            // Found by opening the image: an error.
            run.assert_clean_failure_mentioning(&[says]);
        } else {
            // The command line alone is wrong: a usage error.
            run.assert_usage_error(&[says]);
        }
        unchanged(&s);
    }
    for (args, says) in [
        (
            &["--sync", "top", "--bitmap", "bm0", "d.qcow2", "inc.qcow2"][..],
            "--bitmap applies to",
        ),
        (
            &[
                "--bitmap",
                "bm0",
                "--bitmap-mode",
                "never",
                "d.qcow2",
                "inc.qcow2",
            ][..],
            "would do nothing",
        ),
        (
            &["--bitmap-mode", "never", "d.qcow2", "inc.qcow2"][..],
            "needs --bitmap",
        ),
        (
            &["--allow-disabled-bitmap", "d.qcow2", "inc.qcow2"][..],
            "only applies to --sync incremental",
        ),
    ] {
        s.backup(args).assert_usage_error(&[says]);
        unchanged(&s);
    }
    // A disabled bitmap is accepted when asked for, and cleared.
    inc(&["--allow-disabled-bitmap"], "off").assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc.qcow2", "qcow2");
    assert_check_clean(s.dir(), "d.qcow2");
    assert_eq!(bitmap_flags(&s, "off"), Vec::<String>::new());
}

/// The bitmap is only cleared while no other process has the image open;
/// reading it without clearing works beside a reader.
#[test]
fn clearing_needs_the_image_to_itself() {
    let s = Scratch::new();
    let before = backed_up_with_bitmap(&s);
    let inc = |extra: &[&str]| {
        backup_incremental(&s, extra, ("bm0", "full.qcow2"), "d.qcow2", "inc.qcow2")
    };
    {
        let _reader = qemu_nbd_with(&s, "d.qcow2", &["-r", "-t", "-f", "qcow2"]);
        inc(&[]).assert_clean_failure_mentioning(&["is reading it", "d.qcow2"]);
        assert!(!s.path("inc.qcow2").exists());
        inc(&["--bitmap-mode", "never"]).assert_ok();
    }
    assert_eq!(std::fs::read(s.path("d.qcow2")).unwrap(), before);
    std::fs::remove_file(s.path("inc.qcow2")).unwrap();
    // Last: qemu-nbd killed while writable leaves the bitmap in use.
    {
        let _writer = qemu_nbd_with(&s, "d.qcow2", &["-t", "-f", "qcow2"]);
        inc(&[]).assert_clean_failure_mentioning(&["\"write\" lock", "d.qcow2"]);
    }
    assert!(!s.path("inc.qcow2").exists());
    assert_no_leftovers(s.dir());
}

/// A bitmap left in use (QEMU killed) is refused for clearing too, with
/// what to do; the image is not touched.
#[test]
fn in_use_bitmap_is_refused_for_clearing() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    let img = s.path("d.qcow2");
    mark_first_bitmap_in_use(&img);
    let before = std::fs::read(&img).unwrap();
    s.backup(&["--bitmap", "bm0", "d.qcow2", "full.qcow2"])
        .assert_clean_failure_mentioning(&["marked in use", "take a full backup"]);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert!(!s.path("full.qcow2").exists());
}
