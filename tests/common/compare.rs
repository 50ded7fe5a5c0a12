//! Comparisons with qemu-img, the oracle: `map --output=json` (identical),
//! human `map` (identical text, or a clean refusal where qemu-img refuses
//! compressed clusters) and `info --output=json` (the contract's keys).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

use super::oracle::{qemu_info_json, qemu_map_human, qemu_map_json};
use super::run::{
    qbackup_info_human, qbackup_info_json, qbackup_map_human, qbackup_map_json, truncate_for_msg,
};
use super::scratch::Scratch;

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Describe how two `map --output=json` arrays differ: the first differing
/// extent with a little context from both sides.
pub fn map_diff(expected: &Value, actual: &Value) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (Some(e), Some(a)) = (expected.as_array(), actual.as_array()) else {
        return Some(format!(
            "not both arrays\nqemu-img: {}\nqbackup:  {}",
            truncate_for_msg(&compact(expected), 2000),
            truncate_for_msg(&compact(actual), 2000)
        ));
    };
    let first = (0..e.len().max(a.len()))
        .find(|&i| e.get(i) != a.get(i))
        .unwrap_or(0);
    let from = first.saturating_sub(1);
    let to = (first + 4).min(e.len().max(a.len()));
    let mut s = format!(
        "map differs at extent #{first} (qemu-img has {} extents, qbackup {})\n",
        e.len(),
        a.len()
    );
    for i in from..to {
        let mark = if i == first { ">>" } else { "  " };
        let show = |x: Option<&Value>| x.map(compact).unwrap_or_else(|| "(none)".into());
        let _ = writeln!(
            s,
            "{mark} #{i}\n   qemu-img: {}\n   qbackup:  {}",
            show(e.get(i)),
            show(a.get(i))
        );
    }
    Some(s)
}

/// `qbackup map --output=json` must equal `qemu-img map --output=json`.
pub fn assert_map_json_matches(cwd: &Path, image: &str, fmt: Option<&str>) {
    let expected = qemu_map_json(cwd, image, fmt);
    let run = qbackup_map_json(cwd, image, fmt);
    run.assert_ok();
    let actual = run.json();
    if let Some(d) = map_diff(&expected, &actual) {
        panic!(
            "`qbackup map --output=json {image}` (cwd {}) differs from qemu-img:\n{d}",
            cwd.display()
        );
    }
}

/// Human `qbackup map` must print exactly what `qemu-img map` prints, and
/// fail cleanly where qemu-img refuses (compressed clusters).
/// Returns true when qemu-img printed a table (no compressed clusters).
pub fn assert_map_human_matches(cwd: &Path, image: &str, fmt: Option<&str>) -> bool {
    let run = qbackup_map_human(cwd, image, fmt);
    match qemu_map_human(cwd, image, fmt) {
        Ok(expected) => {
            run.assert_ok();
            if run.stdout != expected {
                let first = expected
                    .lines()
                    .zip(run.stdout.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.lines().count().min(run.stdout.lines().count()));
                panic!(
                    "human `qbackup map {image}` differs from `qemu-img map` (first differing line #{first})\n\
                     --- qemu-img ---\n{}\n--- qbackup ---\n{}",
                    truncate_for_msg(&expected, 4000),
                    truncate_for_msg(&run.stdout, 4000)
                );
            }
            true
        }
        Err(qemu_err) => {
            let name = file_name(image);
            run.assert_clean_failure(&[name]);
            assert!(
                qemu_err.contains("compressed"),
                "qemu-img map failed unexpectedly: {qemu_err}"
            );
            false
        }
    }
}

/// Top-level `info` keys that must match qemu-img's.
pub const INFO_KEYS: &[&str] = &[
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "encrypted",
];

/// Keys of `format-specific.data` that must match qemu-img's.
pub const INFO_DATA_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "bitmaps",
    "data-file",
    "data-file-raw",
];

/// Keep only the keys of the contract, so that qemu-img's extras (children,
/// filename, encrypt details...) do not count. A key absent from qemu-img's
/// output must be absent from ours too.
pub fn project_info(v: &Value) -> Value {
    let mut out = Map::new();
    for k in INFO_KEYS {
        if let Some(x) = v.get(*k) {
            out.insert((*k).to_owned(), x.clone());
        }
    }
    if let Some(fs) = v.get("format-specific") {
        let mut fso = Map::new();
        if let Some(t) = fs.get("type") {
            fso.insert("type".into(), t.clone());
        }
        if let Some(data) = fs.get("data") {
            let mut d = Map::new();
            for k in INFO_DATA_KEYS {
                let Some(x) = data.get(*k) else { continue };
                let x = if *k == "bitmaps" {
                    Value::Array(
                        x.as_array()
                            .map(|bms| {
                                bms.iter()
                                    .map(|bm| {
                                        let mut b = Map::new();
                                        for bk in ["name", "granularity", "flags"] {
                                            if let Some(y) = bm.get(bk) {
                                                b.insert(bk.into(), y.clone());
                                            }
                                        }
                                        Value::Object(b)
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    )
                } else {
                    x.clone()
                };
                d.insert((*k).to_owned(), x);
            }
            fso.insert("data".into(), Value::Object(d));
        }
        out.insert("format-specific".into(), Value::Object(fso));
    }
    Value::Object(out)
}

/// List the differences between two projected info objects, key by key.
fn info_diff(expected: &Value, actual: &Value, path: &str, out: &mut String) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut keys: Vec<&String> = e.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}/{k}");
                match (e.get(k), a.get(k)) {
                    (Some(x), Some(y)) => info_diff(x, y, &p, out),
                    (Some(x), None) => {
                        let _ = writeln!(out, "  {p}: qemu-img {} / qbackup (missing)", compact(x));
                    }
                    (None, Some(y)) => {
                        let _ = writeln!(out, "  {p}: qemu-img (missing) / qbackup {}", compact(y));
                    }
                    (None, None) => {}
                }
            }
        }
        (x, y) if x != y => {
            let _ = writeln!(
                out,
                "  {path}: qemu-img {} / qbackup {}",
                compact(x),
                compact(y)
            );
        }
        _ => {}
    }
}

/// `qbackup info --output=json` must agree with `qemu-img info --output=json`
/// on every key of the contract. Returns qbackup's parsed output.
pub fn assert_info_matches(cwd: &Path, image: &str, fmt: Option<&str>) -> Value {
    let expected = qemu_info_json(cwd, image, fmt);
    let run = qbackup_info_json(cwd, image, fmt);
    run.assert_ok();
    let actual = run.json();
    let (pe, pa) = (project_info(&expected), project_info(&actual));
    if pe != pa {
        let mut d = String::new();
        info_diff(&pe, &pa, "", &mut d);
        panic!(
            "`qbackup info --output=json {image}` (cwd {}) differs from qemu-img:\n{d}",
            cwd.display()
        );
    }
    // The human form must work too.
    let human = qbackup_info_human(cwd, image, fmt);
    human.assert_ok();
    assert!(
        !human.stdout.trim().is_empty(),
        "empty human info\n{}",
        human.describe()
    );
    actual
}

/// Everything for one well-formed image: map JSON, map human (or its clean
/// refusal on compressed clusters) and info. `image` is as given on the
/// command line, relative to `cwd` or absolute.
pub fn assert_image_matches(cwd: &Path, image: &str, fmt: Option<&str>) {
    assert_map_json_matches(cwd, image, fmt);
    assert_map_human_matches(cwd, image, fmt);
    assert_info_matches(cwd, image, fmt);
}

/// Like [`assert_image_matches`] for an image in a scratch dir, by absolute path.
pub fn check(s: &Scratch, name: &str, fmt: Option<&str>) {
    assert_image_matches(s.dir(), &s.p(name), fmt);
}

/// Last path component of `p`, for matching error messages.
pub fn file_name(p: &str) -> &str {
    Path::new(p)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(p)
}
