//! Regressions of the "rough edges" found by trying qbackup as an admin
//! scripting a nightly cycle would (issue 18): each case once failed
//! silently or misled.

mod common;

use common::oracle::assert_identical;
use common::run::qbackup_bin;
use common::scratch::Scratch;
use common::MIB;

/// `--backing` with `--sync top` on an image that has no backing file was
/// silently ignored; it is refused, naming the image, and nothing is
/// written.
#[test]
fn backing_for_an_image_without_a_backing_file_is_refused() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io("d.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    s.backup(&[
        "--sync",
        "top",
        "--backing",
        "/nonexistent/x.qcow2",
        "d.qcow2",
        "t.qcow2",
    ])
    .assert_clean_failure_mentioning(&["d.qcow2: this image has no backing file"]);
    assert!(!s.path("t.qcow2").exists());
    // Without --backing it is a plain (full) top-layer backup.
    s.backup(&["--sync", "top", "d.qcow2", "t.qcow2"])
        .assert_ok();
    assert_identical(s.dir(), "d.qcow2", "qcow2", "t.qcow2", "qcow2");
}

/// `backup disk disk` told the user to pass --force, which was then
/// refused because TARGET is the source: the real reason comes first.
#[test]
fn target_that_is_the_source_is_refused_as_such() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    let run = s.backup(&["d.qcow2", "d.qcow2"]);
    run.assert_clean_failure_mentioning(&["which the source reads"]);
    assert!(
        !run.stderr.contains("--force"),
        "suggests --force: {}",
        run.stderr
    );
}

/// A restore (a backup, which has a manifest, written out as a raw disk)
/// left a `disk.raw.manifest` beside the restored disk: a disk is not a
/// backup, so none is written. A raw backup of a disk still gets one.
#[test]
fn a_restore_into_a_raw_file_writes_no_manifest() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io("d.qcow2", "qcow2", &["write -P 0x22 1M 1M"]);
    s.backup(&["d.qcow2", "b.qcow2"]).assert_ok();
    assert!(s.path("b.qcow2.manifest").exists());
    let run = s.backup(&["-O", "raw", "--output=json", "b.qcow2", "disk.raw"]);
    run.assert_ok();
    assert!(!s.path("disk.raw.manifest").exists());
    assert!(run.json()["manifest"].is_null(), "{}", run.json());
    assert_identical(s.dir(), "d.qcow2", "qcow2", "disk.raw", "raw");
    // The disk itself, backed up raw, is a backup: it keeps its manifest.
    s.backup(&["-O", "raw", "d.qcow2", "copy.raw"]).assert_ok();
    assert!(s.path("copy.raw.manifest").exists());
}

/// The JSON result says which mode ran and why: a typo in the bitmap's
/// name falls back to an incremental by content, and says so.
#[test]
fn json_result_says_which_sync_ran_and_why() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "nightly"]);
    let full = s.backup(&[
        "--output=json",
        "--bitmap",
        "nightly",
        "d.qcow2",
        "full.qcow2",
    ]);
    full.assert_ok();
    let v = full.json();
    assert_eq!(v["sync"], "full", "{v}");
    assert!(v["fallback"].is_null(), "{v}");
    assert_eq!(v["target"], "full.qcow2", "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let manifest = std::fs::read(s.path("full.qcow2.manifest")).unwrap();
    assert!(
        !id.is_empty() && manifest.windows(id.len()).any(|w| w == id.as_bytes()),
        "id {id} not in the manifest"
    );
    s.io("d.qcow2", "qcow2", &["write -P 0x33 0 64k"]);
    let inc = |name: &str, target: &str| {
        s.backup(&[
            "--output=json",
            "--sync",
            "incremental",
            "--bitmap",
            name,
            "--backing",
            "full.qcow2",
            "d.qcow2",
            target,
        ])
    };
    let typo = inc("nighty", "inc1.qcow2");
    typo.assert_ok();
    let v = typo.json();
    assert_eq!(v["sync"], "incremental-by-content", "{v}");
    // The reason names the bitmap asked for and the ones that exist.
    assert!(
        v["fallback"]
            .as_str()
            .is_some_and(|f| f.contains("'nighty'") && f.contains("it has 'nightly'")),
        "{v}"
    );
    assert!(typo.stderr.contains("it has 'nightly'"), "{}", typo.stderr);
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc1.qcow2", "qcow2");
    let good = inc("nightly", "inc2.qcow2");
    good.assert_ok();
    let v = good.json();
    assert_eq!(v["sync"], "incremental", "{v}");
    assert!(v["fallback"].is_null(), "{v}");
    assert_identical(s.dir(), "d.qcow2", "qcow2", "inc2.qcow2", "qcow2");
}

/// Messages say OS errors in plain words, without Rust's "(os error N)".
#[test]
fn os_errors_in_plain_words() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    let run = s.backup(&["d.qcow2", "no/such/dir/b.qcow2"]);
    run.assert_clean_failure_mentioning(&["No such file or directory"]);
    assert!(!run.stderr.contains("os error"), "{}", run.stderr);
    let run = s.backup(&["missing.qcow2", "b.qcow2"]);
    run.assert_clean_failure_mentioning(&["missing.qcow2"]);
    assert!(!run.stderr.contains("os error"), "{}", run.stderr);
}

/// A reader that closes the pipe early (`| head`) gets no panic and no
/// "Broken pipe" message: qbackup ends by SIGPIPE, as GNU tools do.
#[test]
fn a_closed_pipe_is_quiet() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.backup(&["d.qcow2", "b.qcow2"]).assert_ok();
    for args in [
        &["completions", "bash"][..],
        &["map", "--output=json", "b.qcow2"][..],
        &["verify", "--output=json", "b.qcow2"][..],
        &["manpage"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(qbackup_bin())
            .args(args)
            .current_dir(s.dir())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
    }
}

/// Found trying the tool as a new user: `--backing` naming the source
/// itself made an overlay on the live disk (with `--bitmap-mode never`)
/// or blamed "another process" for qbackup's own lock.
#[test]
fn previous_backup_that_is_the_source_is_refused() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    for extra in [&[][..], &["--bitmap-mode", "never"][..]] {
        let args = [
            &[
                "--sync",
                "incremental",
                "--bitmap",
                "bm0",
                "--backing",
                "d.qcow2",
            ][..],
            extra,
            &["d.qcow2", "x.qcow2"][..],
        ]
        .concat();
        s.backup(&args).assert_clean_failure_mentioning(&[
            "the previous backup is d.qcow2, which the source reads",
        ]);
        assert!(!s.path("x.qcow2").exists());
    }
}

/// A raw backup cannot start a cycle of incrementals, so `--bitmap` with
/// `-O raw` (which cleared the bitmap) is refused as a usage error.
#[test]
fn bitmap_with_a_raw_target_is_refused() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    let before = std::fs::read(s.path("d.qcow2")).unwrap();
    s.backup(&["--bitmap", "bm0", "-O", "raw", "d.qcow2", "f.raw"])
        .assert_usage_error(&["--bitmap with -O raw"]);
    assert_eq!(std::fs::read(s.path("d.qcow2")).unwrap(), before);
}

/// With `--output=json`, even a command line clap cannot parse gives the
/// JSON error object on stdout.
#[test]
fn json_error_for_a_command_line_that_does_not_parse() {
    let s = Scratch::new();
    for args in [
        &["backup", "--output=json", "--bogus", "a", "b"][..],
        &["backup", "--output", "json", "--sync", "toop", "a", "b"][..],
        &["verify", "--output=json"][..],
    ] {
        let run = common::run::qbackup_in(s.dir(), args);
        assert_eq!(run.code, Some(2), "{}", run.describe());
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("JSON");
        assert_eq!(v["error"]["class"], "usage", "{v}");
        assert_eq!(v["error"]["exit-status"], 2, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
}

/// The previous backup of another size is named in the refusal.
#[test]
fn previous_backup_of_another_size_is_named() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.create("small.qcow2", "qcow2", 2 * MIB, "");
    s.backup(&[
        "--sync",
        "incremental",
        "--backing",
        "small.qcow2",
        "d.qcow2",
        "i.qcow2",
    ])
    .assert_clean_failure_mentioning(&["small.qcow2: the previous backup is 2097152 bytes"]);
}

/// A typo in `--bitmap` onto a previous backup without a manifest: the
/// refusal says first what is wrong with the bitmap, then why the fallback
/// cannot run.
#[test]
fn fallback_without_a_manifest_names_the_bitmap_problem_first() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.img(&["bitmap", "--add", "d.qcow2", "bm0"]);
    s.backup(&["--no-manifest", "d.qcow2", "nm.qcow2"])
        .assert_ok();
    let run = s.backup(&[
        "--sync",
        "incremental",
        "--bitmap",
        "bmX",
        "--backing",
        "nm.qcow2",
        "d.qcow2",
        "i.qcow2",
    ]);
    run.assert_clean_failure_mentioning(&["no persistent dirty bitmap named 'bmX'"]);
    assert!(
        run.stderr.contains("it has 'bm0'") && run.stderr.contains("nm.qcow2.manifest is missing"),
        "{}",
        run.stderr
    );
}

/// `--force` over an earlier backup with a manifest, by a restore that
/// keeps none: the old manifest goes too (it would vouch for other data).
#[test]
fn a_forced_restore_removes_the_replaced_manifest() {
    let s = Scratch::new();
    s.create("d.qcow2", "qcow2", 4 * MIB, "");
    s.io("d.qcow2", "qcow2", &["write -P 0x31 0 1M"]);
    s.backup(&["-O", "raw", "d.qcow2", "r.raw"]).assert_ok();
    assert!(s.path("r.raw.manifest").exists());
    s.backup(&["d.qcow2", "b.qcow2"]).assert_ok();
    s.backup(&["--force", "-O", "raw", "b.qcow2", "r.raw"])
        .assert_ok();
    assert!(!s.path("r.raw.manifest").exists());
}
