//! Images in formats QEMU knows and qbackup does not read (VMDK, VHDX, VHD,
//! VDI, QED, Parallels, Bochs, cloop, DMG, LUKS, qcow v1) are refused by
//! name, never copied as raw bytes. The format is probed as qemu-img probes
//! it (`qbackup_formats::probe`); qemu-img is the oracle for what each test
//! image is.
//!
//! For every probed command (`info`, `map --output=json`, `backup`) the
//! contract is: exit status 1, exactly one stderr line starting `qbackup: `
//! that contains
//!
//! ```text
//! {path}: {fmt} images are not supported (convert with qemu-img, or pass -f raw to copy the file's bytes)
//! ```
//!
//! where `{path}` is the image as given (or the backing file as resolved) and
//! `{fmt}` is qemu-img's format name; `backup` leaves nothing at its target.
//! With `-f raw` the same file is backed up as the plain bytes it is.
//!
//! The samples from QEMU's test suite are read in place, never copied into
//! the project (they are GPL reference data): from the directory named by
//! `QBACKUP_QEMU_SAMPLES`, or else `../shared/qemu-sample-images` beside the
//! checkout, as on the development machines and in CI (`*.bz2`, decompressed
//! here with `bzip2 -dc`).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::compare::assert_image_matches;
use common::oracle::{assert_identical, qemu_img_in, qemu_img_status, qemu_info_json};
use common::qcow2::{ext, patch_u32, qcow2_header_extension};
use common::run::{
    assert_no_leftovers, qbackup_info_human, qbackup_info_json, qbackup_info_ok, qbackup_map_json,
    run_checked, Run,
};
use common::scratch::Scratch;
use common::{test_cases, KIB, MIB};

/// The refusal, after `qbackup: ` and any context the tool adds: the
/// library's words, then the CLI's hint naming its option.
fn refusal(path: &str, fmt: &str) -> String {
    format!(
        "{path}: {fmt} images are not supported \
         (convert it with qemu-img, or copy the file's bytes as a raw image: pass -f raw)"
    )
}

/// `run` failed by the error contract with the refusal of `path` as `fmt`.
fn assert_refusal(run: &Run, path: &str, fmt: &str) {
    run.assert_clean_failure(&[path]);
    let want = refusal(path, fmt);
    assert!(
        run.stderr.contains(&want),
        "expected the line to contain `{want}`\n{}",
        run.describe()
    );
}

/// `info` (JSON and human), `map --output=json` and `backup` each refuse
/// `name` (a file in the scratch dir, given relative to it, as a user would)
/// as a `fmt` image, and the backup leaves nothing behind. Forcing `-f qcow2`
/// fails cleanly too.
fn assert_refused(s: &Scratch, name: &str, fmt: &str) {
    let dir = s.dir();
    assert_refusal(&qbackup_info_json(dir, name, None), name, fmt);
    assert_refusal(&qbackup_info_human(dir, name, None), name, fmt);
    assert_refusal(&qbackup_map_json(dir, name, None), name, fmt);
    let out = s.mkdir("out");
    let target = "out/refused.qcow2";
    assert_refusal(&s.backup(&[name, target]), name, fmt);
    assert!(
        !s.path(target).exists(),
        "a refused backup of {name} created its target"
    );
    assert_no_leftovers(&out);
    assert_no_leftovers(dir);
    qbackup_info_json(dir, name, Some("qcow2")).assert_clean_failure(&[name]);
}

/// `backup -f raw` copies the file's bytes: qemu-img compares the target,
/// read as qcow2, with the source read as raw.
fn assert_raw_copy(s: &Scratch, name: &str) {
    let out = s.mkdir("out");
    let target = format!("out/{name}.raw-copy.qcow2");
    s.backup(&["-f", "raw", name, &target]).assert_ok();
    assert_identical(s.dir(), name, "raw", &target, "qcow2");
    assert_no_leftovers(&out);
}

/// The format qemu-img probes for `name` (in the scratch dir).
fn qemu_probed(s: &Scratch, name: &str) -> String {
    let v = qemu_info_json(s.dir(), name, None);
    v["format"]
        .as_str()
        .expect("format in qemu-img info")
        .to_owned()
}

// ---------------------------------------------------------------------------
// Formats qemu-img creates
// ---------------------------------------------------------------------------

/// A 4 MiB `fmt` image made by qemu-img (creation options `opts`), 64 KiB
/// written by qemu-io: refused by name, copied as bytes with `-f raw`.
fn created_case(fmt: &str, opts: &str) {
    let s = Scratch::new();
    let name = format!("disk.{fmt}");
    s.create(&name, fmt, 4 * MIB, opts);
    s.io(&name, fmt, &["write -P 0x5a 0 64k"]);
    assert_eq!(qemu_probed(&s, &name), fmt, "test premise");
    assert_refused(&s, &name, fmt);
    assert_raw_copy(&s, &name);
}

test_cases! { created_case =>
    vmdk_monolithic_sparse("vmdk", "");
    vmdk_stream_optimized("vmdk", "subformat=streamOptimized");
    vhdx("vhdx", "");
    vpc_dynamic("vpc", "");
    vdi("vdi", "");
    qed("qed", "");
    parallels("parallels", "");
    qcow_v1("qcow", "");
}

/// A VMDK descriptor is a text file: recognised as QEMU recognises it, and
/// so are the extents with the binary magic; a flat extent is a raw disk.
#[test]
fn vmdk_descriptor_files() {
    let s = Scratch::new();
    s.create(
        "split.vmdk",
        "vmdk",
        4 * MIB,
        "subformat=twoGbMaxExtentSparse",
    );
    s.io("split.vmdk", "vmdk", &["write -P 0x5a 0 64k"]);
    let text = std::fs::read(s.path("split.vmdk")).unwrap();
    assert!(
        text.starts_with(b"# Disk DescriptorFile\n"),
        "test premise: a descriptor text file"
    );
    assert_eq!(qemu_probed(&s, "split.vmdk"), "vmdk", "test premise");
    assert_refused(&s, "split.vmdk", "vmdk");
    assert_raw_copy(&s, "split.vmdk");
    // The sparse extent alone (qemu-img probes it as vmdk, then cannot open
    // it without its descriptor).
    assert_refused(&s, "split-s001.vmdk", "vmdk");

    s.create("flat.vmdk", "vmdk", 4 * MIB, "subformat=monolithicFlat");
    s.io("flat.vmdk", "vmdk", &["write -P 0x5a 1M 64k"]);
    assert_refused(&s, "flat.vmdk", "vmdk");
    assert_eq!(qemu_probed(&s, "flat-flat.vmdk"), "raw", "test premise");
    assert_eq!(
        qbackup_info_ok(s.dir(), "flat-flat.vmdk", None)["format"],
        "raw"
    );
}

/// A fixed-size VHD keeps its `conectix` footer only at the end, where
/// QEMU's probe does not look: qemu-img reads it as raw, and so do we.
#[test]
fn vpc_fixed_is_raw_as_for_qemu_img() {
    let s = Scratch::new();
    s.create("fixed.vhd", "vpc", 4 * MIB, "subformat=fixed");
    s.io("fixed.vhd", "vpc", &["write -P 0x5a 0 64k"]);
    assert_eq!(qemu_probed(&s, "fixed.vhd"), "raw", "test premise");
    assert_image_matches(s.dir(), "fixed.vhd", None);
}

const LUKS_SECRET: &str = "secret,id=sec0,data=abc";

#[test]
fn luks() {
    let s = Scratch::new();
    s.img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        LUKS_SECRET,
        "-o",
        "key-secret=sec0,iter-time=10",
        "disk.luks",
        "4M",
    ]);
    // qemu-io needs the key: open with --image-opts.
    let out = run_checked(Command::new("qemu-io").current_dir(s.dir()).args([
        "--object",
        LUKS_SECRET,
        "--image-opts",
        "-c",
        "write -P 0x5a 0 64k",
        "driver=luks,key-secret=sec0,file.filename=disk.luks",
    ]));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("wrote 65536/65536 bytes"),
        "qemu-io write failed:\n{said}"
    );
    assert_eq!(qemu_probed(&s, "disk.luks"), "luks", "test premise");
    assert_refused(&s, "disk.luks", "luks");
    assert_raw_copy(&s, "disk.luks");
}

// ---------------------------------------------------------------------------
// Formats qemu-img only reads: minimal images built here
// ---------------------------------------------------------------------------

/// `len` zero bytes with `parts` written at their offsets.
fn bytes_with(len: usize, parts: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (at, b) in parts {
        v[*at..*at + b.len()].copy_from_slice(b);
    }
    v
}

/// An empty 1 MiB Bochs growing redolog: a 512-byte header, then a catalog
/// of 256 unallocated 4 KiB extents.
fn bochs_image() -> Vec<u8> {
    let mut v = bytes_with(
        512,
        &[
            (0, b"Bochs Virtual HD Image"),
            (32, b"Redolog"),
            (48, b"Growing"),
            (64, &0x0002_0000u32.to_le_bytes()), // version
            (68, &512u32.to_le_bytes()),         // header size
            (72, &256u32.to_le_bytes()),         // catalog entries
            (76, &1u32.to_le_bytes()),           // bitmap size
            (80, &4096u32.to_le_bytes()),        // extent size
            (88, &MIB.to_le_bytes()),            // disk size
        ],
    );
    v.extend_from_slice(&[0xff; 256 * 4]);
    v
}

/// An empty cloop V2.0 image: the shell-script header, 64 KiB blocks, no
/// blocks (one offset, the end of the table).
fn cloop_image() -> Vec<u8> {
    let script: &[u8] = b"#!/bin/sh\n#V2.0 Format\n\
        modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n";
    bytes_with(
        512,
        &[
            (0, script),
            (128, &65536u32.to_be_bytes()), // block size
            (132, &0u32.to_be_bytes()),     // blocks
            (136, &144u64.to_be_bytes()),   // offsets[0]
        ],
    )
}

/// An empty UDIF (DMG) image: a property list with no partitions, then the
/// 512-byte `koly` trailer pointing at it.
fn dmg_image() -> Vec<u8> {
    let plist: &[u8] =
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\"><dict/></plist>\n";
    let mut v = bytes_with(512, &[(0, plist)]);
    v.extend(bytes_with(
        512,
        &[
            (0, b"koly"),
            (4, &4u32.to_be_bytes()),                    // version
            (8, &512u32.to_be_bytes()),                  // trailer size
            (0xd8, &0u64.to_be_bytes()),                 // XML offset
            (0xe0, &(plist.len() as u64).to_be_bytes()), // XML length
        ],
    ));
    v
}

/// Written as `name`, the bytes probe as `fmt` for qemu-img and are refused
/// as `fmt` by qbackup.
fn built_case(s: &Scratch, name: &str, bytes: &[u8], fmt: &str) {
    s.write_file(name, bytes);
    assert_eq!(qemu_probed(s, name), fmt, "test premise");
    assert_refused(s, name, fmt);
    assert_raw_copy(s, name);
}

#[test]
fn bochs() {
    built_case(&Scratch::new(), "disk.bochs", &bochs_image(), "bochs");
}

#[test]
fn cloop() {
    built_case(&Scratch::new(), "disk.cloop", &cloop_image(), "cloop");
}

#[test]
fn dmg_by_name_and_by_trailer() {
    let s = Scratch::new();
    built_case(&s, "disk.dmg", &dmg_image(), "dmg");
    // QEMU goes by the name alone: a raw file named .dmg is a DMG for it.
    let plain = bytes_with(4096, &[(0, b"just some bytes\n")]);
    s.write_file("plain.dmg", &plain);
    let (code, said) = qemu_img_status(s.dir(), &["info", "plain.dmg"]);
    assert!(
        code != Some(0) && said.contains("UDIF"),
        "test premise: qemu-img opens plain.dmg as a DMG and fails:\n{said}"
    );
    assert_refused(&s, "plain.dmg", "dmg");
    // qbackup also knows the trailer: the same image under another name is
    // still refused, where qemu-img would call it raw.
    s.write_file("udif.img", &dmg_image());
    assert_eq!(qemu_probed(&s, "udif.img"), "raw", "test premise");
    assert_refused(&s, "udif.img", "dmg");
}

// ---------------------------------------------------------------------------
// Raw stays raw
// ---------------------------------------------------------------------------

/// A raw disk that starts with text, or with a near miss of a magic, is raw
/// for qemu-img and for qbackup.
#[test]
fn text_and_near_misses_stay_raw() {
    let s = Scratch::new();
    let cases: [(&str, &[u8]); 6] = [
        ("text.img", b"hello, world\nversion=1\n"),
        ("comment.img", b"# not a descriptor\n\nversion=1\n"),
        ("script.img", b"#!/bin/sh\necho hello\n"),
        ("vhdx-ish.img", b"vhdxfilf"),
        ("qed-ish.img", b"QED\x01"),
        ("parallels-version1.img", b"WithoutFreeSpace\x01\0\0\0"),
    ];
    for (name, head) in cases {
        s.write_file(name, &bytes_with(64 * KIB as usize, &[(0, head)]));
        assert_eq!(qemu_probed(&s, name), "raw", "test premise: {name}");
        assert_eq!(
            qbackup_info_ok(s.dir(), name, None)["format"],
            "raw",
            "{name}"
        );
        assert_image_matches(s.dir(), name, None);
    }
}

// ---------------------------------------------------------------------------
// Backing files
// ---------------------------------------------------------------------------

/// A qcow2 overlay on a VMDK: refused whether the backing format is recorded
/// in the overlay or probed.
#[test]
fn qcow2_overlay_on_vmdk() {
    let s = Scratch::new();
    s.create("base.vmdk", "vmdk", 4 * MIB, "");
    s.io("base.vmdk", "vmdk", &["write -P 0x5a 0 64k"]);
    let out = s.mkdir("out");

    // Recorded: the overlay says its backing file is a vmdk.
    s.overlay("top.qcow2", "base.vmdk", "vmdk", None, "");
    s.io("top.qcow2", "qcow2", &["write -P 0x33 1M 64k"]);
    for run in [
        qbackup_map_json(s.dir(), "top.qcow2", None),
        s.backup(&["top.qcow2", "out/top.qcow2"]),
    ] {
        run.assert_clean_failure(&["top.qcow2", "base.vmdk"])
            .assert_clean_failure_mentioning(&["vmdk"]);
    }
    assert!(!out.join("top.qcow2").exists());

    // Probed: qemu-img 10 will not write a backing file name without its
    // format, so turn the backing-format extension into an unknown one.
    let p = s.overlay("probed.qcow2", "base.vmdk", "vmdk", None, "");
    patch_u32(
        &p,
        qcow2_header_extension(&p, ext::BACKING_FORMAT),
        0x7777_0001,
    );
    let q = qemu_info_json(s.dir(), "probed.qcow2", None);
    assert!(q.get("backing-filename-format").is_none(), "test premise");
    let chain = qemu_img_in(
        s.dir(),
        &["info", "--backing-chain", "--output=json", "probed.qcow2"],
    );
    let chain: serde_json::Value = serde_json::from_str(&chain).unwrap();
    assert_eq!(
        chain[1]["format"], "vmdk",
        "test premise: qemu-img probes vmdk"
    );
    for run in [
        qbackup_map_json(s.dir(), "probed.qcow2", None),
        s.backup(&["probed.qcow2", "out/probed.qcow2"]),
    ] {
        assert_refusal(&run, "base.vmdk", "vmdk");
    }
    assert!(!out.join("probed.qcow2").exists());
    assert_no_leftovers(&out);
}

// ---------------------------------------------------------------------------
// QEMU's sample images
// ---------------------------------------------------------------------------

/// QEMU's tests/qemu-iotests/sample_images, and what qemu-img 10.0 probes
/// each one as (several of them it then fails to open: fuzzed or with a
/// dirty log; the probe is what matters here).
const SAMPLES: &[(&str, &str)] = &[
    ("afl5.img", "vpc"),
    ("afl9.vmdk", "vmdk"),
    ("d2v-zerofilled.vhd", "vpc"),
    ("empty.bochs", "bochs"),
    ("fake.parallels", "parallels"),
    ("grub_mbr.raw", "raw"),
    ("hyperv2012r2-dynamic.vhd", "vpc"),
    ("iotest-dirtylog-10G-4M.vhdx", "vhdx"),
    ("iotest-dynamic-1G.vhdx", "vhdx"),
    ("iotest-version3.vmdk", "vmdk"),
    ("parallels-v1", "parallels"),
    ("parallels-v2", "parallels"),
    ("parallels-with-bitmap", "parallels"),
    ("simple-dmg.dmg", "dmg"),
    ("simple-pattern.cloop", "cloop"),
    ("test-disk2vhd.vhdx", "vhdx"),
    ("virtualpc-dynamic.vhd", "vpc"),
];

/// Decompressed samples larger than this are cut to [`SAMPLE_PREFIX`]
/// bytes: the probe reads only the first 512 (and DMG's last 512, but the
/// DMG sample is small), and some samples expand to hundreds of MiB.
const SAMPLE_MAX: u64 = 4 * MIB;
const SAMPLE_PREFIX: usize = MIB as usize;

fn samples_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("QBACKUP_QEMU_SAMPLES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/qemu-sample-images"),
    };
    dir.is_dir().then_some(dir)
}

/// `bzip2 -dc BZ2 > OUT`, cut to [`SAMPLE_PREFIX`] bytes when the whole
/// would exceed [`SAMPLE_MAX`].
fn decompress(bz2: &Path, out: &Path) {
    let mut child = Command::new("bzip2")
        .arg("-dc")
        .arg(bz2)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bzip2: {e}"));
    let mut bytes = Vec::new();
    child
        .stdout
        .take()
        .expect("bzip2 stdout")
        .take(SAMPLE_MAX + 1)
        .read_to_end(&mut bytes)
        .expect("read bzip2 output");
    // Dropping the pipe above ends a bzip2 that still had more to write.
    let status = child.wait().expect("wait for bzip2");
    if bytes.len() as u64 > SAMPLE_MAX {
        bytes.truncate(SAMPLE_PREFIX);
    } else {
        assert!(status.success(), "bzip2 -dc {} failed", bz2.display());
    }
    std::fs::write(out, bytes).expect("write decompressed sample");
}

#[test]
fn qemu_sample_images() {
    let Some(dir) = samples_dir() else {
        eprintln!(
            "qemu_sample_images: skipped, no ../shared/qemu-sample-images and no QBACKUP_QEMU_SAMPLES"
        );
        return;
    };
    let s = Scratch::new();
    let mut seen = 0;
    for &(name, fmt) in SAMPLES {
        let bz2 = dir.join(format!("{name}.bz2"));
        if !bz2.is_file() {
            continue;
        }
        seen += 1;
        decompress(&bz2, &s.path(name));
        if fmt == "raw" {
            assert_eq!(qbackup_info_ok(s.dir(), name, None)["format"], "raw");
            assert_image_matches(s.dir(), name, None);
        } else {
            assert_refused(&s, name, fmt);
        }
    }
    assert!(seen > 0, "no known sample image in {}", dir.display());
}
