//! What `backup` tells its caller: the result (a summary line on stderr,
//! `--output=json` on stdout, checked against the real file sizes and
//! qemu-img's map of source and target), progress in a piped run (plain
//! lines and JSON lines), and every exit status (0, 1, 2, 128 + signal;
//! compare's 0/1/2).

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::backup::{compressed_source, standard_content};
use common::oracle::{assert_check_clean, assert_identical};
use common::run::{
    assert_no_leftovers, leftovers, qbackup_bin, qbackup_in, qbackup_within, spawn_qbackup,
    wait_qbackup, Run, QBACKUP_TIMEOUT,
};
use common::scratch::Scratch;
use common::{KIB, MIB};
use serde_json::Value;

const CLUSTER: u64 = 64 * KIB;

/// Guest bytes of the 64 KiB clusters of `name` that hold data in
/// qemu-img's map (what a full backup reads), up to the disk's end.
fn data_cluster_bytes(s: &Scratch, name: &str, size: u64) -> u64 {
    let map = s.qemu_map(name, "qcow2");
    (0..size.div_ceil(CLUSTER))
        .filter(|c| {
            let (a, b) = (c * CLUSTER, (c + 1) * CLUSTER);
            map.iter().any(|e| e.data && e.start < b && e.end() > a)
        })
        .map(|c| CLUSTER.min(size - c * CLUSTER))
        .sum()
}

/// Sum of the lengths qemu-img's map reports as data in `name`.
fn mapped_data_bytes(s: &Scratch, name: &str, fmt: &str) -> u64 {
    s.qemu_map(name, fmt)
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("key {key} missing or not an integer in {v}"))
}

/// The standard content plus one cluster written as explicit zeros (data
/// in the map, stored as a zero cluster by the backup).
fn source(s: &Scratch, name: &str, opts: &str) {
    s.create(name, "qcow2", 4 * MIB, opts);
    let mut cmds = standard_content(s);
    cmds.push("write -P 0 3200k 64k".into());
    s.io_all(name, "qcow2", &cmds);
}

#[test]
fn json_result_matches_sizes_and_maps() {
    let s = Scratch::new();
    compressed_source(&s, "src.qcow2", "zstd");
    let run = s.backup(&["--output=json", "src.qcow2", "out.qcow2"]);
    run.assert_ok();
    assert_eq!(run.stderr, "", "--output=json prints no summary line");
    assert_eq!(run.stdout.lines().count(), 1, "one JSON object, one line");
    let v = run.json();
    let size = 4 * MIB;
    assert_eq!(u(&v, "virtual-size"), size);
    assert_eq!(u(&v, "cluster-size"), CLUSTER);
    assert_eq!(
        u(&v, "guest-bytes-read"),
        data_cluster_bytes(&s, "src.qcow2", size)
    );
    let file_len = std::fs::metadata(s.path("out.qcow2")).unwrap().len();
    assert_eq!(u(&v, "target-size"), file_len);
    let written = u(&v, "bytes-written");
    assert!(written > 0 && written < file_len, "{v}");
    // Every compressed source cluster is passed through (same codec and
    // cluster size).
    let compressed: u64 = s
        .qemu_map("src.qcow2", "qcow2")
        .iter()
        .filter(|e| e.compressed)
        .map(|e| e.length)
        .sum();
    let c = &v["clusters"];
    assert_eq!(u(c, "passed-through") * CLUSTER, compressed, "{v}");
    let stored = u(c, "data") + u(c, "compressed") + u(c, "passed-through");
    assert_eq!(stored * CLUSTER, u(&v, "data-guest-bytes"), "{v}");
    assert_eq!(
        u(&v, "data-guest-bytes") + u(c, "zero") * CLUSTER,
        u(&v, "guest-bytes-read"),
        "{v}"
    );
    let ratio = v["compression-ratio"].as_f64().expect("ratio");
    let expected = u(&v, "data-guest-bytes") as f64 / written as f64;
    assert!((ratio - expected).abs() < 0.001, "{v}");
    assert!(v["elapsed-seconds"].as_f64().expect("elapsed") >= 0.0);
    assert!(v["bytes-per-second"].is_u64(), "{v}");
    assert_eq!(
        u(c, "unchanged"),
        0,
        "a full backup stores every cluster: {v}"
    );
    let manifest = v["manifest"].as_str().expect("a manifest path");
    assert!(s.dir().join(manifest).is_file(), "{v}");
    assert_eq!(v["bitmap-cleared"], false);
    assert_check_clean(s.dir(), "out.qcow2");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
}

#[test]
fn json_result_uncompressed_and_raw_equal_what_the_target_maps() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let read = data_cluster_bytes(&s, "src.qcow2", 4 * MIB);

    let v = s
        .backup(&[
            "--output=json",
            "--compress",
            "none",
            "src.qcow2",
            "o.qcow2",
        ])
        .assert_ok()
        .json();
    let c = &v["clusters"];
    assert_eq!(u(&v, "guest-bytes-read"), read);
    assert_eq!(u(c, "zero"), 1, "the explicit zero cluster: {v}");
    assert_eq!(u(c, "compressed") + u(c, "passed-through"), 0, "{v}");
    assert_eq!(u(&v, "bytes-written"), u(c, "data") * CLUSTER);
    assert_eq!(
        u(&v, "bytes-written"),
        mapped_data_bytes(&s, "o.qcow2", "qcow2")
    );
    assert_eq!(v["compression-ratio"].as_f64(), Some(1.0));

    let v = s
        .backup(&["--output=json", "-O", "raw", "src.qcow2", "o.raw"])
        .assert_ok()
        .json();
    assert_eq!(u(&v, "guest-bytes-read"), read);
    assert_eq!(u(&v, "target-size"), 4 * MIB);
    assert_eq!(
        u(&v, "bytes-written"),
        mapped_data_bytes(&s, "o.raw", "raw")
    );
    assert_identical(s.dir(), "src.qcow2", "qcow2", "o.raw", "raw");
}

#[test]
fn summary_line_and_quiet() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let run = s.backup(&["src.qcow2", "a.qcow2"]);
    run.assert_ok();
    assert_eq!(run.stdout, "");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.describe());
    let l = lines[0];
    assert!(l.starts_with("qbackup: backup done: read "), "{l}");
    for part in [
        "of 4.00 MiB",
        "wrote ",
        "ratio ",
        "clusters passed through",
        " s, ",
        "/s",
    ] {
        assert!(l.contains(part), "summary lacks {part:?}: {l}");
    }
    for q in ["-q", "--quiet"] {
        let run = s.backup(&[q, "src.qcow2", &format!("q{q}.qcow2")]);
        run.assert_ok();
        assert_eq!((run.stdout.as_str(), run.stderr.as_str()), ("", ""), "{q}");
    }
}

/// The percentages of `qbackup: progress: N% ...` lines.
fn plain_percentages(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("qbackup: progress: "))
        .map(|r| r.split('%').next().unwrap().parse().expect("a percentage"))
        .collect()
}

#[test]
fn progress_in_a_piped_run_is_plain_lines() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 32 * MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x61 0 32M"]);
    // stderr is a pipe here, as in a log: -p writes lines, not a bar.
    let run = s.backup(&["-p", "src.qcow2", "out.qcow2"]);
    run.assert_ok();
    assert!(!run.stderr.contains('\r') && !run.stderr.contains('\x1b'));
    let pct = plain_percentages(&run.stderr);
    assert_eq!(pct.first(), Some(&0), "{}", run.stderr);
    assert_eq!(pct.last(), Some(&100), "{}", run.stderr);
    assert!(pct.windows(2).all(|w| w[0] < w[1]), "{pct:?}");
    // Every 10 % (or 10 s): about a dozen lines, not thousands.
    assert!((3..=13).contains(&pct.len()), "{pct:?}");
    let last = run.stderr.lines().last().unwrap();
    assert!(last.starts_with("qbackup: backup done:"), "{}", run.stderr);
    let end = run
        .stderr
        .lines()
        .find(|l| l.starts_with("qbackup: progress: 100%"))
        .unwrap();
    assert!(
        end.contains("of 32.00 MiB in ") && end.contains(" s"),
        "{end}"
    );
    // The same with stderr redirected to a file by a shell.
    let sh = format!("{} backup -q -p src.qcow2 out2.qcow2 2>log", qbackup_bin());
    let st = Command::new("sh")
        .args(["-c", &sh])
        .current_dir(s.dir())
        .status()
        .unwrap();
    assert!(st.success());
    let log = std::fs::read_to_string(s.path("log")).unwrap();
    let pct = plain_percentages(&log);
    assert_eq!((pct.first(), pct.last()), (Some(&0), Some(&100)), "{log}");
    assert_eq!(pct.len(), log.lines().count(), "-q: only progress\n{log}");
}

#[test]
fn progress_json_lines_parse() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 16 * MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x61 0 12M"]);
    let run = s.backup(&["-q", "--progress=json", "src.qcow2", "out.qcow2"]);
    run.assert_ok();
    let objs: Vec<Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(objs.len() >= 2, "{}", run.stderr);
    let total = 12 * MIB;
    let mut prev = 0;
    for o in &objs {
        assert_eq!(u(o, "total"), total, "{o}");
        let done = u(o, "done");
        assert!(done >= prev && done <= total, "{o}");
        prev = done;
        assert_eq!(u(o, "percent"), done * 100 / total, "{o}");
        assert!(o["elapsed-seconds"].is_f64() && o["bytes-per-second"].is_u64());
    }
    assert_eq!(u(&objs[0], "done"), 0);
    assert_eq!(u(objs.last().unwrap(), "done"), total);
    assert_eq!(objs.last().unwrap()["eta-seconds"].as_f64(), Some(0.0));
}

// ---------------------------------------------------------------------------
// Exit statuses
// ---------------------------------------------------------------------------

#[test]
fn exit_status_0_and_1() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    s.backup(&["-q", "src.qcow2", "out.qcow2"]).assert_ok();
    // An error found by looking at files: 1.
    s.backup(&["missing.qcow2", "x.qcow2"])
        .assert_clean_failure(&["missing.qcow2"]);
    s.backup(&["src.qcow2", "out.qcow2"])
        .assert_clean_failure(&["out.qcow2"]);
}

#[test]
fn exit_status_2_for_usage_errors() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let bad: &[(&[&str], &[&str])] = &[
        // clap's own errors, in one line.
        (
            &["backup", "--frobnicate", "src.qcow2", "o"],
            &["--frobnicate"],
        ),
        (&["backup", "src.qcow2"], &["required"]),
        (
            &["backup", "--sync", "sideways", "src.qcow2", "o"],
            &["sideways"],
        ),
        (&["map", "--output=xml", "src.qcow2"], &["xml"]),
        (&["nonsense"], &["nonsense"]),
        // Validation: values and combinations.
        (&["backup", "--level", "-1", "src.qcow2", "o"], &["--level"]),
        (
            &[
                "backup",
                "--compress",
                "none",
                "--level",
                "5",
                "src.qcow2",
                "o",
            ],
            &["--level"],
        ),
        (
            &[
                "backup",
                "-O",
                "raw",
                "--compress",
                "zlib",
                "src.qcow2",
                "o",
            ],
            &["raw"],
        ),
        (
            &["backup", "-O", "raw", "--recompress", "src.qcow2", "o"],
            &["raw", "qcow2"],
        ),
        (
            &["backup", "--threads", "0", "src.qcow2", "o"],
            &["--threads"],
        ),
        (
            &["backup", "--cluster-size", "3000", "src.qcow2", "o"],
            &["cluster"],
        ),
        (
            &["backup", "--sync", "incremental", "src.qcow2", "o"],
            &["--backing"],
        ),
    ];
    for (args, mention) in bad {
        qbackup_within(s.dir(), args, QBACKUP_TIMEOUT).assert_usage_error(mention);
        assert!(!s.path("o").exists());
    }
    // Missing pieces, in one line that names them.
    qbackup_within(s.dir(), &[], QBACKUP_TIMEOUT).assert_usage_error(&["a command is needed"]);
    qbackup_within(s.dir(), &["backup", "src.qcow2"], QBACKUP_TIMEOUT)
        .assert_usage_error(&["<TARGET>"]);
    qbackup_within(
        s.dir(),
        &["map", "--output=xml", "src.qcow2"],
        QBACKUP_TIMEOUT,
    )
    .assert_usage_error(&["possible values: human, json"]);
    // A misspelt option: one line, then clap's suggestion.
    let run = qbackup_within(
        s.dir(),
        &["backup", "--forse", "src.qcow2", "o"],
        QBACKUP_TIMEOUT,
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines[0].starts_with("qbackup: ") && lines[0].contains("--forse"),
        "{lines:?}"
    );
    assert!(
        lines[1..].iter().all(|l| l.starts_with("tip:")),
        "{lines:?}"
    );
    assert!(run.stderr.contains("--force"), "{lines:?}");
    // compare keeps qemu-img's statuses: 2 for what it cannot compare.
    let run = qbackup_within(s.dir(), &["compare", "--bogus", "a", "b"], QBACKUP_TIMEOUT);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    // --help documents the statuses and exits 0.
    let run = qbackup_within(s.dir(), &["--help"], QBACKUP_TIMEOUT);
    assert_eq!(run.code, Some(0));
    assert!(
        run.stdout.contains("Exit status:") && run.stdout.contains("130"),
        "{}",
        run.stdout
    );
}

/// Starts a speed-limited backup of a 32 MiB image, waits until it is
/// copying, sends `signal`, and returns the run.
fn interrupt_with(signal: &str) -> (Scratch, Run) {
    let s = Scratch::new();
    s.create("large.qcow2", "qcow2", 32 * MIB, "");
    s.io("large.qcow2", "qcow2", &["write -P 0x5c 0 32M"]);
    s.mkdir("out");
    let started = Instant::now();
    let (child, cmdline) = spawn_qbackup(
        s.dir(),
        &["backup", "--speed", "8M", "large.qcow2", "out/large.qcow2"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&s.path("out")).is_empty() {
        assert!(Instant::now() < deadline, "no temporary file appeared");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(300));
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let run = wait_qbackup(child, cmdline, started, Duration::from_secs(30));
    assert!(!s.path("out/large.qcow2").exists(), "{}", run.describe());
    assert_no_leftovers(&s.path("out"));
    (s, run)
}

#[test]
fn exit_status_130_on_sigint() {
    interrupt_with("INT").1.assert_interrupted(130);
}

#[test]
fn exit_status_143_on_sigterm() {
    interrupt_with("TERM").1.assert_interrupted(143);
}

#[test]
fn exit_status_129_on_sighup() {
    interrupt_with("HUP").1.assert_interrupted(129);
}

// ---------------------------------------------------------------------------
// Completions and manual pages, generated from the clap definitions
// ---------------------------------------------------------------------------

#[test]
fn completions_and_manual_pages() {
    let s = Scratch::new();
    for shell in ["bash", "zsh", "fish"] {
        let run = qbackup_in(s.dir(), &["completions", shell]);
        run.assert_ok();
        for word in ["backup", "no-create", "backing-chain", "start-offset"] {
            assert!(run.stdout.contains(word), "{shell} completion lacks {word}");
        }
    }
    // bash can load the script.
    let run = qbackup_in(s.dir(), &["completions", "bash"]);
    std::fs::write(s.path("qbackup.bash"), &run.stdout).unwrap();
    let st = Command::new("bash")
        .args(["-c", "source ./qbackup.bash && complete -p qbackup"])
        .current_dir(s.dir())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    qbackup_in(s.dir(), &["completions", "tcsh"]).assert_usage_error(&["tcsh"]);

    let run = qbackup_in(s.dir(), &["manpage"]);
    run.assert_ok();
    assert!(run.stdout.starts_with(".ie") || run.stdout.contains(".TH qbackup 1"));
    assert!(
        run.stdout.contains("Exit status"),
        "the statuses are in the page"
    );
    s.mkdir("man");
    qbackup_in(s.dir(), &["manpage", "--dir", "man"]).assert_ok();
    for page in [
        "qbackup.1",
        "qbackup-backup.1",
        "qbackup-map.1",
        "qbackup-info.1",
    ] {
        let text = std::fs::read_to_string(s.path("man").join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let backup = std::fs::read_to_string(s.path("man/qbackup-backup.1")).unwrap();
    assert!(backup.contains("no\\-create"), "backup page documents -n");
}

/// A signal that was ignored when qbackup started (`nohup`: SIGHUP) stays
/// ignored: the backup runs to its end.
#[test]
fn an_ignored_sighup_stays_ignored() {
    let s = Scratch::new();
    s.create("large.qcow2", "qcow2", 32 * MIB, "");
    s.io("large.qcow2", "qcow2", &["write -P 0x5c 0 32M"]);
    s.mkdir("out");
    let started = Instant::now();
    let script = format!(
        "trap '' HUP; exec {} backup -q --speed 32M large.qcow2 out/large.qcow2",
        qbackup_bin()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .current_dir(s.dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&s.path("out")).is_empty() {
        assert!(Instant::now() < deadline, "no temporary file appeared");
        thread::sleep(Duration::from_millis(10));
    }
    let st = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let run = wait_qbackup(child, script, started, Duration::from_secs(30));
    run.assert_ok();
    assert_identical(s.dir(), "large.qcow2", "qcow2", "out/large.qcow2", "qcow2");
}

/// On a terminal (a pty made by util-linux `script`), `-p` draws the bar:
/// percentage, throughput and ETA while it runs, then a last state with the
/// elapsed time; no log lines.
#[test]
fn progress_on_a_terminal_is_a_bar() {
    let s = Scratch::new();
    s.create("src.qcow2", "qcow2", 16 * MIB, "");
    s.io("src.qcow2", "qcow2", &["write -P 0x61 0 16M"]);
    let inner = format!(
        "{} backup -p --speed 32M src.qcow2 out.qcow2",
        qbackup_bin()
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .current_dir(s.dir())
        .stdin(std::process::Stdio::null())
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "skipped: script cannot run a pty here: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: no util-linux script ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("qbackup: progress:"),
        "a bar, not lines: {text}"
    );
    assert!(text.contains("% ") && text.contains("ETA"), "{text}");
    assert!(text.contains("/s"), "throughput: {text}");
    assert!(
        text.contains("100% 16.00 MiB in "),
        "the final state: {text}"
    );
    assert!(text.contains("qbackup: backup done:"), "{text}");
    assert_identical(s.dir(), "src.qcow2", "qcow2", "out.qcow2", "qcow2");
}

/// Regression (issue 18): `verify --output=json` uses kebab-case keys, as
/// `backup`'s result does; every key of the report is listed here.
#[test]
fn verify_json_keys_are_kebab_case() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    s.backup(&["-q", "src.qcow2", "out.qcow2"]).assert_ok();
    let run = qbackup_in(s.dir(), &["verify", "--output=json", "out.qcow2"]);
    run.assert_ok();
    let v = run.json();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "backup",
            "chain-problems",
            "clusters-checked",
            "clusters-not-covered",
            "damaged",
            "damaged-count",
            "manifest",
            "result",
        ],
        "{v:#}"
    );
    assert!(u(&v, "clusters-checked") > 0);
    assert_eq!(
        (u(&v, "damaged-count"), u(&v, "clusters-not-covered")),
        (0, 0)
    );
}

/// The `{"error": {...}}` object a failed `--output=json` run printed on
/// stdout, checked against its exit status and its one stderr line.
fn json_error(run: &Run, status: i32) -> Value {
    assert_eq!(run.code, Some(status), "{}", run.describe());
    let v = run.json();
    let e = &v["error"];
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    assert_eq!(e["exit-status"], status, "{v}");
    let message = e["message"].as_str().expect("message");
    assert_eq!(
        run.stderr,
        format!("qbackup: {message}\n"),
        "the same message as the line on stderr\n{}",
        run.describe()
    );
    e.clone()
}

/// Regression (issue 18): with `--output=json`, a failure prints one JSON
/// object on stdout (class, message, exit status) besides the line on
/// stderr, for every command with JSON output; without it, stdout stays
/// empty.
#[test]
fn json_output_failures_print_an_error_object() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let json_run = |args: &[&str]| qbackup_in(s.dir(), args);
    // A missing file: the user's to fix (class usage), status 1.
    for cmd in ["info", "map"] {
        let run = json_run(&[cmd, "--output=json", "missing.qcow2"]);
        let e = json_error(&run, 1);
        assert_eq!(e["class"], "usage", "{cmd}: {e}");
        assert!(e["message"].as_str().unwrap().contains("missing.qcow2"));
    }
    let e = json_error(
        &json_run(&["backup", "--output=json", "missing.qcow2", "o.qcow2"]),
        1,
    );
    assert_eq!(e["class"], "usage", "{e}");
    // verify cannot verify: 2, as compare.
    let e = json_error(&json_run(&["verify", "--output=json", "missing.qcow2"]), 2);
    assert!(
        e["message"].as_str().unwrap().contains("missing.qcow2"),
        "{e}"
    );
    // A refused combination of options: status 2, the usage line.
    let run = json_run(&[
        "backup",
        "--output=json",
        "--speed",
        "0",
        "src.qcow2",
        "o.qcow2",
    ]);
    let e = json_error(&run, 2);
    assert_eq!(e["class"], "usage");
    assert_eq!(e["message"], "--speed must be positive");
    // An existing target: status 1.
    s.backup(&["-q", "src.qcow2", "out.qcow2"]).assert_ok();
    let run = json_run(&["backup", "--output=json", "src.qcow2", "out.qcow2"]);
    json_error(&run, 1);
    assert!(!s.path("o.qcow2").exists());
    // Human output: nothing on stdout.
    let run = json_run(&["backup", "src.qcow2", "out.qcow2"]);
    run.assert_clean_failure(&["out.qcow2"]);
    assert_eq!(run.stdout, "");
}

/// Regression (issue 18): `--bitmap-mode` offers only the values it
/// accepts (help, completions), and still explains why `always` is
/// refused when it is passed.
#[test]
fn bitmap_mode_always_is_not_offered_but_explained() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let help = qbackup_in(s.dir(), &["backup", "--help"]);
    help.assert_ok();
    assert!(
        help.stdout.contains("[possible values: on-success, never]"),
        "{}",
        help.stdout
    );
    let completions = qbackup_in(s.dir(), &["completions", "bash"]);
    completions.assert_ok();
    assert!(completions.stdout.contains("\"on-success never\""));
    assert!(!completions.stdout.contains("always"));
    let args = [
        "backup",
        "--bitmap",
        "b",
        "--bitmap-mode",
        "always",
        "src.qcow2",
        "o",
    ];
    qbackup_in(s.dir(), &args)
        .assert_usage_error(&["--bitmap-mode always is refused: a failed backup leaves no target"]);
}

/// Regression (issue 18): every size option reads qemu-img's sizes (hex,
/// fractions before a unit), as `map -s/-l` does; a cluster size that is
/// not a power of two is still refused by the request's rule.
#[test]
fn size_options_read_qemu_img_sizes() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    let run = s.backup(&[
        "--output=json",
        "--speed",
        "1.5G",
        "--cluster-size",
        "0x20000",
        "src.qcow2",
        "a.qcow2",
    ]);
    run.assert_ok();
    assert_eq!(u(&run.json(), "cluster-size"), 128 * KIB);
    s.backup(&["-q", "--speed", "0x400000", "src.qcow2", "b.qcow2"])
        .assert_ok();
    s.backup(&["--cluster-size", "1.5M", "src.qcow2", "c.qcow2"])
        .assert_usage_error(&["--cluster-size 1572864 must be a power of two"]);
    s.backup(&["--speed", "1.5", "src.qcow2", "c.qcow2"])
        .assert_usage_error(&["invalid speed '1.5'"]);
}

/// Regression (issue 18): the line about a removed leftover temporary file
/// gives its size in human units, as the result line does.
#[test]
fn removed_leftover_size_is_human() {
    let s = Scratch::new();
    source(&s, "src.qcow2", "");
    s.mkdir("out");
    s.write_file("out/.qbackup-abc123.tmp", &vec![7u8; 3 << 20]);
    let run = s.backup(&["-q", "src.qcow2", "out/b.qcow2"]);
    run.assert_ok();
    assert!(
        run.stderr.contains(
            "out/.qbackup-abc123.tmp: removed the temporary file of an interrupted backup (3.00 MiB)\n"
        ),
        "{}",
        run.describe()
    );
    assert!(!s.path("out/.qbackup-abc123.tmp").exists());
}
