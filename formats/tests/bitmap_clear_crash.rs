//! Crash safety of clearing a persistent dirty bitmap in place: power is
//! cut after every prefix of the clearing's writes (and in the middle of
//! the next one, a torn write), and the image left behind is checked with
//! QEMU: `qemu-img check` finds no corruption (leaked clusters only, which
//! `check -r leaks` reclaims), QEMU opens it, and the bitmap QEMU reads
//! marks a subset of what it marked before (bits are only ever cleared, and
//! clearing is only started once the backup holding them is durable), with
//! every bit either kept or cleared as a whole table entry at a time.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::listening;
use qbackup_formats::image::open_storage;
use qbackup_formats::open::FileOpener;
use qbackup_formats::storage::memory::MemoryStorage;
use qbackup_formats::storage::FileStorage;
use qbackup_formats::Format;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dirty byte ranges QEMU reads from bitmap `bm0` of `img`.
fn dirty_set(img: &Path) -> BTreeSet<(u64, u64)> {
    let sock = img.with_extension("sock");
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-t", "-B", "bm0", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(&sock) {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = run(Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:bm0")
        .arg(format!("nbd+unix:///?socket={}", sock.display())));
    let _ = nbd.kill();
    let _ = nbd.wait();
    out.lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().unwrap())
                .collect();
            (f[2] & 1 != 0).then_some((f[0], f[1]))
        })
        .collect()
}

/// Bytes of guest data the set covers, expanded to 512-byte chunks.
fn chunks(set: &BTreeSet<(u64, u64)>) -> BTreeSet<u64> {
    set.iter()
        .flat_map(|&(s, l)| (s / 512)..(s + l) / 512)
        .collect()
}

/// `qemu-img check` of `img`: no corruption; returns the leaked clusters.
fn leaks(img: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(img)
        .output()
        .unwrap();
    // 0: clean; 3: leaks only.
    let code = out.status.code();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(code, Some(0) | Some(3)), "check {code:?}: {text}");
    let field = |key: &str| -> u64 {
        let at = match text.find(&format!("\"{key}\":")) {
            Some(at) => at + key.len() + 3,
            None => return 0,
        };
        let digits: String = text[at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    assert_eq!(field("corruptions"), 0, "{text}");
    assert_eq!(field("check-errors"), 0, "{text}");
    field("leaks")
}

/// A 512 MiB image with 512-byte clusters and 64-bit refcounts (a refcount
/// block covers 32 KiB of the file) and a 512-byte-granularity bitmap with
/// a bit set in each of its 256 data clusters (128 KiB: several refcount
/// blocks) and a 2 KiB table (a write of several sectors, which can tear).
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg("cluster_size=512,refcount_bits=64")
        .arg(&img)
        .arg("512M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "512"])
        .arg(&img)
        .arg("bm0"));
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for i in 0..256u64 {
        io.arg("-c").arg(format!(
            "write -P {} {} 512",
            i % 250 + 1,
            i * 2 * 1024 * 1024 + 4096
        ));
    }
    run(io.arg(&img));
    img
}

/// Cuts power after `writes` writes of the clearing (the image's bytes in
/// memory, with the power-cut model of [`MemoryStorage`]: a lost or torn
/// write, then every write and sync fails) and leaves in `img` what the
/// disk holds afterwards; returns whether the clearing completed.
fn clear_with_power_cut(img: &Path, writes: usize, torn: bool) -> bool {
    let bytes = std::fs::read(img).unwrap();
    let storage = Arc::new(MemoryStorage::writable(img, bytes).power_cut_after(writes, torn));
    let layer = open_storage(&FileOpener, storage.clone(), Some(Format::Qcow2)).unwrap();
    let clear = layer.prepare_bitmap_clear("bm0").unwrap();
    let completed = clear.commit().is_ok();
    drop(layer);
    std::fs::write(img, storage.bytes()).unwrap();
    completed
}

#[test]
fn a_power_cut_at_any_write_leaves_an_image_qemu_opens_and_no_bit_gained() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = make_image(dir.path());
    let before = dirty_set(&pristine);
    assert_eq!(before.len(), 256, "one dirty range per data cluster");
    assert_eq!(leaks(&pristine), 0);
    let img = dir.path().join("crash.qcow2");
    let mut completed_at = None;
    'cuts: for writes in 0..64 {
        for torn in [false, true] {
            std::fs::copy(&pristine, &img).unwrap();
            if clear_with_power_cut(&img, writes, torn) {
                completed_at = Some(writes);
                break 'cuts;
            }
            let after = dirty_set(&img);
            assert!(
                chunks(&after).is_subset(&chunks(&before)),
                "cut after {writes} writes (torn {torn}): {after:?} not within {before:?}"
            );
            let leaked = leaks(&img);
            eprintln!(
                "cut after {writes} writes (torn {torn}): {} dirty ranges, {leaked} leaked",
                after.len()
            );
            if writes == 0 && !torn {
                assert_eq!(after, before, "nothing written, nothing changed");
                assert_eq!(leaked, 0);
            }
            // Leaks are reclaimed by QEMU's own repair.
            run(Command::new("qemu-img")
                .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
                .arg(&img));
            assert_eq!(leaks(&img), 0);
        }
    }
    let n = completed_at.expect("the clearing completes with enough writes");
    eprintln!("the clearing takes {n} writes");
    assert!(n >= 4, "a table write and several refcount blocks: {n}");
    assert_eq!(dirty_set(&img), BTreeSet::new());
    assert_eq!(leaks(&img), 0, "a complete clearing leaks nothing");
}

/// Regression (found by the `bitmap_clear` fuzz target): an inconsistent
/// image whose refcount table points a refcount block at the bitmap
/// directory. Clearing a bitmap used to rewrite that "block" and damage the
/// directory, so the image no longer opened; now a clearing whose writes
/// would overlap other metadata is refused and the file is left as it was.
#[test]
fn clearing_refuses_writes_that_overlap_other_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("overlap.qcow2");
    let original =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clear-overlap.qcow2"))
            .unwrap();
    std::fs::write(&img, &original).unwrap();
    let file = FileStorage::open_for_update(&img).unwrap();
    let layer = open_storage(&FileOpener, Arc::new(file), Some(Format::Qcow2)).unwrap();
    let names: Vec<String> = layer
        .info()
        .unwrap()
        .qcow2
        .unwrap()
        .bitmaps
        .into_iter()
        .map(|b| b.name)
        .collect();
    let mut refused = 0;
    for name in &names {
        match layer.prepare_bitmap_clear(name) {
            Ok(clear) => {
                clear.commit().unwrap();
                let again = FileStorage::open_read_only(&img).unwrap();
                open_storage(&FileOpener, Arc::new(again), Some(Format::Qcow2))
                    .expect("an image whose bitmap was cleared opens again");
            }
            Err(e) => {
                assert!(e.to_string().contains("overlaps"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the overlapping clearing is refused");
    assert_eq!(std::fs::read(&img).unwrap(), original, "nothing written");
}
