//! Damaged and hostile images. For each class the contract is: exit status 1,
//! exactly one stderr line `qbackup: FILE: reason` naming the file, never a
//! panic (exit 101) and never a hang (each run is killed after 60 s).
//!
//! `map` must fail for every class below (it is what a backup reads), even
//! where qemu-img itself reads zeros or hangs. `info` must fail too where the
//! header itself is invalid (qemu-img info refuses those as well); where the
//! damage is beyond the header (tables, data, backing chain), `info` may
//! succeed, but then it must agree with qemu-img info, or fail by the contract.

mod common;

use std::path::{Path, PathBuf};

use common::compare::{
    assert_info_matches, assert_map_json_matches, check, map_diff, project_info,
};
use common::oracle::{assert_check_clean, extents, qemu_img_status, qemu_map_json};
use common::qcow2::{
    file_len, hdr, patch, patch_u32, patch_u64, read_u32, read_u64, set_len, Layout,
    ENTRY_OFFSET_MASK, OFLAG_COPIED,
};
use common::run::{
    qbackup_info_human, qbackup_info_json, qbackup_info_ok, qbackup_map_human, qbackup_map_json,
    run_unchecked, Run,
};
use common::scratch::Scratch;
use common::{GIB, KIB, MIB};

/// A valid 4 MiB qcow2 (64 KiB clusters) with data clusters at 0 and 1 MiB.
fn good_image(s: &Scratch, name: &str) -> PathBuf {
    let p = s.create(name, "qcow2", 4 * MIB, "");
    s.io(name, "qcow2", &["write -P 1 0 64k", "write -P 2 1M 64k"]);
    p
}

/// `map` (JSON and human, probed and with `-f qcow2`) fails by the contract.
fn assert_map_rejected(cwd: &Path, image: &str, names: &[&str]) -> Run {
    let run = qbackup_map_json(cwd, image, None);
    run.assert_clean_failure(names);
    qbackup_map_human(cwd, image, None).assert_clean_failure(names);
    qbackup_map_json(cwd, image, Some("qcow2")).assert_clean_failure(names);
    run
}

/// `info` (JSON and human) fails by the contract.
fn assert_info_rejected(cwd: &Path, image: &str, names: &[&str]) {
    qbackup_info_json(cwd, image, None).assert_clean_failure(names);
    qbackup_info_human(cwd, image, None).assert_clean_failure(names);
    qbackup_info_json(cwd, image, Some("qcow2")).assert_clean_failure(names);
}

/// `info` either fails by the contract or succeeds and agrees with qemu-img
/// (when qemu-img info itself succeeds).
fn assert_info_ok_or_rejected(cwd: &Path, image: &str, names: &[&str]) {
    let run = qbackup_info_json(cwd, image, None);
    run.assert_ok_or_clean_failure(names);
    if run.code == Some(0) {
        let q = run_unchecked(
            std::process::Command::new("qemu-img")
                .args(["info", "--output=json", image])
                .current_dir(cwd),
        );
        if q.status.success() {
            let expected: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
            assert_eq!(
                project_info(&run.json()),
                project_info(&expected),
                "qbackup info succeeded but disagrees with qemu-img\n{}",
                run.describe()
            );
        }
    }
    qbackup_info_human(cwd, image, None).assert_ok_or_clean_failure(names);
}

/// Header is invalid: both `info` and `map` must fail.
fn assert_rejected_everywhere(s: &Scratch, name: &str) {
    let img = s.p(name);
    assert_info_rejected(s.dir(), &img, &[name]);
    assert_map_rejected(s.dir(), &img, &[name]);
}

/// Damage beyond the header: `map` must fail; `info` may succeed.
fn assert_map_fails_info_any(s: &Scratch, name: &str) -> Run {
    let img = s.p(name);
    assert_info_ok_or_rejected(s.dir(), &img, &[name]);
    assert_map_rejected(s.dir(), &img, &[name])
}

/// A good image `name`, damaged by `damage`, is rejected by `info` and `map`.
fn damaged_rejected_everywhere(s: &Scratch, name: &str, damage: impl FnOnce(&Path)) {
    damage(&good_image(s, name));
    assert_rejected_everywhere(s, name);
}

/// A good image `name`, damaged by `damage`, is rejected by `map`; `info`
/// may succeed.
fn damaged_map_fails_info_any(s: &Scratch, name: &str, damage: impl FnOnce(&Path)) -> Run {
    damage(&good_image(s, name));
    assert_map_fails_info_any(s, name)
}

/// One good image per value, named by `name`, with the (u32) header field at
/// `field` set to that value: each is rejected by `info` and `map`.
fn header_u32_rejected(field: u64, values: &[u32], name: impl Fn(u32) -> String) {
    let s = Scratch::new();
    for &v in values {
        damaged_rejected_everywhere(&s, &name(v), |p| patch_u32(p, field, v));
    }
}

/// `info` and `map --output=json` (with format `fmt`) fail by the contract.
fn assert_info_and_map_json_rejected(cwd: &Path, image: &str, fmt: Option<&str>, names: &[&str]) {
    qbackup_info_json(cwd, image, fmt).assert_clean_failure(names);
    qbackup_map_json(cwd, image, fmt).assert_clean_failure(names);
}

/// The host offset of the first data extent, per qemu-img map.
fn first_data_offset(s: &Scratch, name: &str, from_end: bool) -> u64 {
    let map = qemu_map_json(s.dir(), &s.p(name), None);
    let mut offs: Vec<u64> = extents(&map)
        .iter()
        .filter(|e| e["data"] == true && e["compressed"] == false)
        .filter_map(|e| e["offset"].as_u64())
        .collect();
    offs.sort_unstable();
    let r = if from_end { offs.last() } else { offs.first() };
    *r.expect("a data extent")
}

/// File offset of the L2 entry for guest offset `guest` (its table must exist).
fn l2_entry_pos(p: &Path, guest: u64) -> u64 {
    Layout::read(p)
        .l2_entry_pos(p, guest)
        .unwrap_or_else(|| panic!("L2 table for {guest} of {} unallocated", p.display()))
}

/// An offset well past the end of the file, cluster aligned.
fn far_past_eof(p: &Path) -> u64 {
    (file_len(p) / (64 * KIB) + 100) * 64 * KIB
}

// ---------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------

#[test]
fn truncated_in_header() {
    let s = Scratch::new();
    for cut in [8u64, 50, 71, 104] {
        damaged_rejected_everywhere(&s, &format!("cut{cut}.qcow2"), |p| set_len(p, cut));
    }
}

#[test]
fn truncated_in_header_extensions() {
    let s = Scratch::new();
    // Inside the feature name table extension that follows the header.
    damaged_rejected_everywhere(&s, "cutext.qcow2", |p| set_len(p, 112 + 12));
}

#[test]
fn truncated_in_l1_table() {
    let s = Scratch::new();
    // 4 GiB virtual: the L1 table has 8 entries; data at 0 and 3 GiB.
    let p = s.create("cutl1.qcow2", "qcow2", 4 * GIB, "");
    s.io(
        "cutl1.qcow2",
        "qcow2",
        &["write -P 1 0 64k", "write -P 2 3G 64k"],
    );
    let l1 = Layout::read(&p).l1_offset;
    set_len(&p, l1 + 8 * 6 + 4);
    assert_map_fails_info_any(&s, "cutl1.qcow2");
}

#[test]
fn truncated_in_l2_table() {
    let s = Scratch::new();
    damaged_map_fails_info_any(&s, "cutl2.qcow2", |p| {
        let l2 = Layout::read(p)
            .l2_table(p, 0)
            .expect("L1 entry 0 allocated");
        set_len(p, l2 + 100);
    });
}

#[test]
fn truncated_in_data() {
    let s = Scratch::new();
    damaged_map_fails_info_any(&s, "cutdata.qcow2", |p| {
        let last = first_data_offset(&s, "cutdata.qcow2", true);
        assert_eq!(
            file_len(p),
            last + 64 * KIB,
            "test premise: data cluster ends the file"
        );
        set_len(p, last + 4096);
    });
}

#[test]
fn empty_file_as_qcow2() {
    let s = Scratch::new();
    s.write_file("empty.qcow2", &[]);
    let img = s.p("empty.qcow2");
    assert_info_and_map_json_rejected(s.dir(), &img, Some("qcow2"), &["empty.qcow2"]);
}

#[test]
fn nonexistent_file_and_directory() {
    let s = Scratch::new();
    let missing = s.p("no-such-image.qcow2");
    assert_info_and_map_json_rejected(s.dir(), &missing, None, &["no-such-image.qcow2"]);
    s.mkdir("a-directory");
    let dir = s.p("a-directory");
    assert_info_and_map_json_rejected(s.dir(), &dir, None, &["a-directory"]);
}

// ---------------------------------------------------------------------------
// Header fields
// ---------------------------------------------------------------------------

#[test]
fn bad_magic_is_probed_as_raw() {
    let s = Scratch::new();
    let p = good_image(&s, "nomagic.qcow2");
    patch(&p, hdr::MAGIC, b"QFJ\xfb");
    // qemu-img probes it as raw: so must we, and the raw view must match.
    check(&s, "nomagic.qcow2", None);
    let info = qbackup_info_ok(s.dir(), &s.p("nomagic.qcow2"), None);
    assert_eq!(info["format"], "raw");
    // Forcing qcow2 must fail cleanly.
    let img = s.p("nomagic.qcow2");
    assert_info_and_map_json_rejected(s.dir(), &img, Some("qcow2"), &["nomagic.qcow2"]);
}

#[test]
fn version_1_and_4() {
    header_u32_rejected(hdr::VERSION, &[1, 4, 0xffff_ffff], |v| {
        format!("version{v}.qcow2")
    });
}

#[test]
fn cluster_bits_8_and_22() {
    header_u32_rejected(hdr::CLUSTER_BITS, &[0, 8, 22, 63, 64], |bits| {
        format!("cbits{bits}.qcow2")
    });
}

#[test]
fn huge_l1_size() {
    header_u32_rejected(
        hdr::L1_SIZE,
        &[0xffff_ffff, 0x0200_0000, 0x8000_0000],
        |l1| format!("l1size{l1:x}.qcow2"),
    );
}

#[test]
fn l1_size_too_small_for_virtual_size() {
    // Every guest cluster would look unallocated: a silent all-zero backup.
    let s = Scratch::new();
    damaged_rejected_everywhere(&s, "l1small.qcow2", |p| patch_u32(p, hdr::L1_SIZE, 0));
}

#[test]
fn huge_virtual_size() {
    let s = Scratch::new();
    damaged_rejected_everywhere(&s, "hugesize.qcow2", |p| {
        patch_u64(p, hdr::SIZE, u64::MAX - 511);
    });
}

#[test]
fn l1_table_offset_unaligned() {
    let s = Scratch::new();
    damaged_rejected_everywhere(&s, "l1unaligned.qcow2", |p| {
        let l1 = Layout::read(p).l1_offset;
        patch_u64(p, hdr::L1_TABLE_OFFSET, l1 + 8);
    });
}

#[test]
fn l1_table_offset_past_eof() {
    let s = Scratch::new();
    damaged_map_fails_info_any(&s, "l1far.qcow2", |p| {
        patch_u64(p, hdr::L1_TABLE_OFFSET, far_past_eof(p));
    });
}

#[test]
fn l1_entry_past_eof() {
    let s = Scratch::new();
    damaged_map_fails_info_any(&s, "l1entry.qcow2", |p| {
        let pos = Layout::read(p).l1_entry_pos(0);
        patch_u64(p, pos, OFLAG_COPIED | far_past_eof(p));
    });
}

#[test]
fn l2_entry_past_eof() {
    let s = Scratch::new();
    let run = damaged_map_fails_info_any(&s, "l2entry.qcow2", |p| {
        // Guest cluster 16 (1 MiB) is the second data cluster.
        let pos = l2_entry_pos(p, MIB);
        let old = read_u64(p, pos);
        assert_ne!(
            old & ENTRY_OFFSET_MASK,
            0,
            "test premise: cluster 16 allocated"
        );
        patch_u64(p, pos, OFLAG_COPIED | far_past_eof(p));
    });
    assert!(
        run.stderr.contains("past the end"),
        "error should say the cluster lies past the end of the file\n{}",
        run.describe()
    );
}

#[test]
fn l2_entry_unaligned_data_offset() {
    let s = Scratch::new();
    damaged_map_fails_info_any(&s, "l2unaligned.qcow2", |p| {
        let pos = l2_entry_pos(p, 0);
        let old = read_u64(p, pos);
        patch_u64(p, pos, old + 512);
    });
}

#[test]
fn compressed_cluster_with_garbage() {
    let s = Scratch::new();
    let p = s.create("garbage.qcow2", "qcow2", 4 * MIB, "");
    s.io(
        "garbage.qcow2",
        "qcow2",
        &["write -c -P 0x5a 0 64k", "write -P 1 1M 64k"],
    );
    let layout = Layout::read(&p);
    let entry = layout.l2_entry(&p, 0);
    let (host, _) = layout
        .compressed_span(entry)
        .expect("test premise: cluster 0 compressed");
    let garbage: Vec<u8> = (0..256u32).map(|i| (i * 151 + 7) as u8).collect();
    patch(&p, host, &garbage);
    // map does not decompress: it may succeed (then it must match qemu-img) or
    // fail cleanly, but never panic or hang.
    let img = s.p("garbage.qcow2");
    let run = qbackup_map_json(s.dir(), &img, None);
    run.assert_ok_or_clean_failure(&["garbage.qcow2"]);
    if run.code == Some(0) {
        let expected = qemu_map_json(s.dir(), &img, None);
        if let Some(d) = map_diff(&expected, &run.json()) {
            panic!("map of garbage.qcow2 differs from qemu-img:\n{d}");
        }
    }
    qbackup_map_human(s.dir(), &img, None).assert_clean_failure(&["garbage.qcow2"]);
    assert_info_ok_or_rejected(s.dir(), &img, &["garbage.qcow2"]);
}

#[test]
fn unknown_incompatible_feature_bit() {
    let s = Scratch::new();
    for bit in [5u32, 40, 63] {
        damaged_rejected_everywhere(&s, &format!("incompat{bit}.qcow2"), |p| {
            let old = read_u64(p, hdr::INCOMPATIBLE_FEATURES);
            patch_u64(p, hdr::INCOMPATIBLE_FEATURES, old | (1u64 << bit));
        });
    }
}

#[test]
fn corrupt_bit_set() {
    let s = Scratch::new();
    let p = good_image(&s, "corrupt.qcow2");
    let old = read_u64(&p, hdr::INCOMPATIBLE_FEATURES);
    patch_u64(&p, hdr::INCOMPATIBLE_FEATURES, old | 2);
    // info reports it, as qemu-img does...
    let info = assert_info_matches(s.dir(), &s.p("corrupt.qcow2"), None);
    assert_eq!(info["format-specific"]["data"]["corrupt"], true);
    // map reads it as qemu-img does (read-only), with a warning line...
    assert_map_json_matches(s.dir(), &s.p("corrupt.qcow2"), None);
    let run = qbackup_map_json(s.dir(), &s.p("corrupt.qcow2"), None);
    run.assert_ok();
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("warning") && run.stderr.contains("marked corrupt"));
    // ...backup refuses it, naming the flag that allows it...
    s.backup(&["corrupt.qcow2", "out.qcow2"])
        .assert_clean_failure_mentioning(&["marked corrupt", "--allow-corrupt"]);
    assert!(!s.path("out.qcow2").exists());
    // ...which backs up what QEMU reads, with a warning.
    let run = s.backup(&["-q", "--allow-corrupt", "corrupt.qcow2", "out.qcow2"]);
    run.assert_ok();
    assert!(run.stderr.contains("marked corrupt"), "{}", run.stderr);
    let (code, out) = qemu_img_status(s.dir(), &["compare", "-U", "corrupt.qcow2", "out.qcow2"]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn refcount_order_7() {
    header_u32_rejected(hdr::REFCOUNT_ORDER, &[7, 100], |order| {
        format!("rorder{order}.qcow2")
    });
}

#[test]
fn header_length_bogus() {
    header_u32_rejected(
        hdr::HEADER_LENGTH,
        &[0, 50, 103, 0x20000, 0xffff_fff8],
        |len| format!("hlen{len:x}.qcow2"),
    );
}

#[test]
fn header_extension_runs_past_cluster() {
    let s = Scratch::new();
    for len in [0x1_0000u32, 0xfff8, 0xffff_fff0] {
        damaged_rejected_everywhere(&s, &format!("hext{len:x}.qcow2"), |p| {
            let hlen = read_u32(p, hdr::HEADER_LENGTH) as u64;
            assert_ne!(
                read_u32(p, hlen),
                0,
                "test premise: an extension follows the header"
            );
            patch_u32(p, hlen + 4, len);
        });
    }
}

#[test]
fn backing_file_name_past_cluster() {
    let s = Scratch::new();
    s.create("base.qcow2", "qcow2", 4 * MIB, "");
    let p = s.overlay("bname.qcow2", "base.qcow2", "qcow2", None, "");
    // The name would run past the first cluster.
    patch_u64(&p, hdr::BACKING_FILE_OFFSET, 64 * KIB - 4);
    assert_rejected_everywhere(&s, "bname.qcow2");
}

// ---------------------------------------------------------------------------
// Backing chains
// ---------------------------------------------------------------------------

#[test]
fn backing_loop() {
    let s = Scratch::new();
    s.create("a.qcow2", "qcow2", MIB, "");
    s.overlay("b.qcow2", "a.qcow2", "qcow2", None, "");
    // a -> b -> a (qemu-img itself hangs on this).
    s.img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    for name in ["a.qcow2", "b.qcow2"] {
        let img = s.p(name);
        assert_info_ok_or_rejected_no_oracle(s.dir(), &img, &["a.qcow2", "b.qcow2"]);
        assert_map_rejected(s.dir(), &img, &["a.qcow2", "b.qcow2"]);
    }
}

#[test]
fn backing_self_loop() {
    let s = Scratch::new();
    s.create("self.qcow2", "qcow2", MIB, "");
    s.img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    let img = s.p("self.qcow2");
    assert_info_ok_or_rejected_no_oracle(s.dir(), &img, &["self.qcow2"]);
    assert_map_rejected(s.dir(), &img, &["self.qcow2"]);
}

/// For images qemu-img cannot be trusted on (it hangs on loops): info must not
/// panic or hang, and must fail by the contract if it fails.
fn assert_info_ok_or_rejected_no_oracle(cwd: &Path, image: &str, names: &[&str]) {
    qbackup_info_json(cwd, image, None).assert_ok_or_clean_failure(names);
    qbackup_info_human(cwd, image, None).assert_ok_or_clean_failure(names);
}

#[test]
fn missing_backing_file() {
    let s = Scratch::new();
    s.create("gone.qcow2", "qcow2", 4 * MIB, "");
    s.overlay("orphan.qcow2", "gone.qcow2", "qcow2", None, "");
    s.io("orphan.qcow2", "qcow2", &["write -P 1 64k 64k"]);
    std::fs::remove_file(s.path("gone.qcow2")).unwrap();
    let img = s.p("orphan.qcow2");
    assert_info_ok_or_rejected(s.dir(), &img, &["orphan.qcow2", "gone.qcow2"]);
    assert_map_rejected(s.dir(), &img, &["orphan.qcow2", "gone.qcow2"]);
}

#[test]
fn missing_external_data_file() {
    let s = Scratch::new();
    let opts = format!("data_file={}", s.p("data.raw"));
    s.create("nodata.qcow2", "qcow2", 4 * MIB, &opts);
    s.io("nodata.qcow2", "qcow2", &["write -P 1 0 64k"]);
    std::fs::remove_file(s.path("data.raw")).unwrap();
    let img = s.p("nodata.qcow2");
    assert_map_rejected(s.dir(), &img, &["nodata.qcow2", "data.raw"]);
}

/// Deeper than the 64 images qbackup once refused: read as QEMU reads it
/// (long chains: `long_chains.rs`).
#[test]
fn backing_chain_of_70_is_fine() {
    let s = Scratch::new();
    s.create("layer-000.qcow2", "qcow2", MIB, "");
    for i in 1..=70 {
        s.overlay_unchecked(
            &format!("layer-{i:03}.qcow2"),
            &format!("layer-{:03}.qcow2", i - 1),
            "qcow2",
            MIB,
        );
    }
    let img = s.p("layer-070.qcow2");
    assert_map_json_matches(s.dir(), &img, None);
}

#[test]
fn backing_chain_of_16_is_fine() {
    // The depth limit must not bite on ordinary chains.
    let s = Scratch::new();
    s.create("layer-00.qcow2", "qcow2", 4 * MIB, "");
    s.io("layer-00.qcow2", "qcow2", &["write -P 1 0 64k"]);
    for i in 1..=16u64 {
        let name = format!("layer-{i:02}.qcow2");
        s.overlay(
            &name,
            &format!("layer-{:02}.qcow2", i - 1),
            "qcow2",
            None,
            "",
        );
        s.io(
            &name,
            "qcow2",
            &[&format!("write -P {} {} 64k", i + 1, i * 128 * KIB)],
        );
    }
    check(&s, "layer-16.qcow2", None);
}

// ---------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------

#[test]
fn encrypted_luks() {
    let s = Scratch::new();
    s.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=x",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "luks.qcow2",
        "4M",
    ]);
    let img = s.p("luks.qcow2");
    let info = assert_info_matches(s.dir(), &img, None);
    assert_eq!(info["encrypted"], true);
    assert_map_rejected(s.dir(), &img, &["luks.qcow2"]);
}

#[test]
fn encrypted_legacy_aes() {
    let s = Scratch::new();
    let p = good_image(&s, "aes.qcow2");
    patch_u32(&p, hdr::CRYPT_METHOD, 1);
    let img = s.p("aes.qcow2");
    let info = assert_info_matches(s.dir(), &img, None);
    assert_eq!(info["encrypted"], true);
    assert_map_rejected(s.dir(), &img, &["aes.qcow2"]);
}

#[test]
fn unknown_crypt_method() {
    let s = Scratch::new();
    damaged_rejected_everywhere(&s, "crypt9.qcow2", |p| patch_u32(p, hdr::CRYPT_METHOD, 9));
}

/// Damaged refcounts (a refcount table or block past the end of the file,
/// a refcount block at an unaligned offset) do not change what the guest
/// reads: QEMU maps and converts such images, and so do `map` and
/// `backup`, with one warning line naming the file.
#[test]
fn damaged_refcounts_are_read_as_qemu_reads_them() {
    let s = Scratch::new();
    type Damage = (&'static str, fn(&Path), &'static str);
    let cases: [Damage; 3] = [
        (
            "rt_eof.qcow2",
            |p| patch_u64(p, hdr::REFCOUNT_TABLE_OFFSET, 64 * MIB),
            "refcount table",
        ),
        (
            "rb_unal.qcow2",
            |p| {
                let table = read_u64(p, hdr::REFCOUNT_TABLE_OFFSET);
                let block = read_u64(p, table);
                patch_u64(p, table, block + 512);
            },
            "unaligned",
        ),
        (
            "rb_eof.qcow2",
            |p| {
                let table = read_u64(p, hdr::REFCOUNT_TABLE_OFFSET);
                patch_u64(p, table, 64 * MIB);
            },
            "refcount block",
        ),
    ];
    for (name, damage, says) in cases {
        damage(&good_image(&s, name));
        assert_map_json_matches(s.dir(), &s.p(name), None);
        let run = qbackup_map_json(s.dir(), &s.p(name), None);
        run.assert_ok();
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(
            run.stderr.contains("warning")
                && run.stderr.contains(name)
                && run.stderr.contains(says),
            "{}",
            run.stderr
        );
        let out = format!("{name}.out");
        let run = s.backup(&["-q", name, &out]);
        run.assert_ok();
        assert!(run.stderr.contains("damaged refcounts"), "{}", run.stderr);
        let (code, text) = qemu_img_status(s.dir(), &["compare", "-U", name, &out]);
        assert_eq!(code, Some(0), "{name}: {text}");
        assert_check_clean(s.dir(), &out);
    }
}
