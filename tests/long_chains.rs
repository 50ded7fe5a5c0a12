//! Long backing chains (incremental-forever backups make them): no depth
//! limit below what QEMU opens. A 100-deep chain made by qemu-img maps as
//! qemu-img maps it and backs up (full and top) identically; a 1000-deep
//! chain reads right; running out of file descriptors says so.

mod common;

use std::process::Command;

use common::backup::backup_checked;
use common::compare::{assert_map_json_matches, map_diff};
use common::oracle::{assert_check_clean, assert_identical, qemu_map_json};
use common::run::{qbackup_bin, qbackup_map_json};
use common::scratch::Scratch;
use common::{KIB, MIB};

/// `layer-000.qcow2` .. `layer-{depth}.qcow2`, each an overlay on the one
/// before, made by qemu-img; every tenth layer writes its own 64 KiB at its
/// own place and over part of the previous writer's range, so the map has
/// data at many depths and overlaps.
fn qemu_chain(s: &Scratch, depth: usize) -> String {
    s.create("layer-000.qcow2", "qcow2", 4 * MIB, "");
    s.io("layer-000.qcow2", "qcow2", &["write -P 1 0 4M"]);
    for i in 1..=depth {
        let name = format!("layer-{i:03}.qcow2");
        let below = format!("layer-{:03}.qcow2", i - 1);
        s.overlay_unchecked(&name, &below, "qcow2", 4 * MIB);
        if i % 10 == 0 {
            let off = (i as u64 / 10) * 256 * KIB;
            s.io(
                &name,
                "qcow2",
                &[
                    &format!("write -P {} {off} 64k", i + 1),
                    &format!("write -z {} 32k", off + 160 * KIB),
                ],
            );
        }
    }
    format!("layer-{depth:03}.qcow2")
}

#[test]
fn chain_of_100_maps_and_backs_up_like_qemu() {
    let s = Scratch::new();
    let top = qemu_chain(&s, 100);
    assert_map_json_matches(s.dir(), &top, None);
    backup_checked(&s, &[], &top, "full.qcow2");
    // The top layer alone, as an overlay on the layer below it.
    s.io(&top, "qcow2", &["write -P 0xee 1M 64k"]);
    s.backup(&["--sync", "top", &top, "top.qcow2"]).assert_ok();
    assert_check_clean(s.dir(), "top.qcow2");
    assert_identical(s.dir(), &top, "qcow2", "top.qcow2", "qcow2");
    let info: serde_json::Value =
        serde_json::from_str(&s.img(&["info", "--output=json", "top.qcow2"])).unwrap();
    assert_eq!(info["backing-filename"], "layer-099.qcow2", "{info}");
}

/// `l0000.qcow2` with data, then `l0001` .. `l{depth}`, empty overlays each
/// on the one before: one qemu-img overlay, copied with the backing name
/// patched (1000 qemu-img runs would take long).
fn patched_chain(s: &Scratch, depth: usize) -> String {
    s.create("l0000.qcow2", "qcow2", MIB, "");
    s.io(
        "l0000.qcow2",
        "qcow2",
        &["write -P 7 0 64k", "write -P 9 512k 128k"],
    );
    s.overlay_unchecked("template.qcow2", "l0000.qcow2", "qcow2", MIB);
    let template = std::fs::read(s.path("template.qcow2")).unwrap();
    let at = template
        .windows(11)
        .position(|w| w == b"l0000.qcow2")
        .expect("backing name in the template");
    for i in 1..=depth {
        let mut img = template.clone();
        img[at..at + 11].copy_from_slice(format!("l{:04}.qcow2", i - 1).as_bytes());
        s.write_file(&format!("l{i:04}.qcow2"), &img);
    }
    format!("l{depth:04}.qcow2")
}

#[test]
fn chain_of_1000_reads_its_bottom_layer() {
    let s = Scratch::new();
    let top = patched_chain(&s, 1000);
    // qemu-img maps the bottom image; through 1000 empty layers the map is
    // the same with every depth 1000 deeper (qemu-img takes long on the
    // chain itself).
    let mut expected = qemu_map_json(s.dir(), "l0000.qcow2", None);
    for e in expected.as_array_mut().unwrap() {
        e["depth"] = (e["depth"].as_u64().unwrap() + 1000).into();
    }
    let run = qbackup_map_json(s.dir(), &top, None);
    run.assert_ok();
    if let Some(d) = map_diff(&expected, &run.json()) {
        panic!("map of the 1000-deep chain differs:\n{d}");
    }
    s.backup(&[&top, "full.qcow2"]).assert_ok();
    assert_check_clean(s.dir(), "full.qcow2");
    assert_identical(s.dir(), "l0000.qcow2", "qcow2", "full.qcow2", "qcow2");
}

/// With fewer file descriptors than layers, the error says that this is
/// the limit reached, and how to raise it.
#[test]
fn chain_deeper_than_the_open_file_limit() {
    let s = Scratch::new();
    let top = patched_chain(&s, 100);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n 50 && exec {} map {top}", qbackup_bin()))
        .current_dir(s.dir())
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("qbackup: l00")
            && stderr.contains("too many open files")
            && stderr.contains("ulimit -n"),
        "{stderr}"
    );
}
