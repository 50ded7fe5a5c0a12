//! Helpers for the backup-set tests: a set's listing as JSON, restoring a
//! backup by id and comparing it with a reference copy.

use std::path::Path;

use serde_json::Value;

use super::oracle::{assert_check_clean, assert_identical};
use super::run::qbackup_in;

/// `qbackup list SET --output=json`, checked: the rows.
pub fn list(dir: &Path, set: &str) -> Vec<Value> {
    let r = qbackup_in(dir, &["list", set, "--output=json"]);
    r.assert_ok();
    match r.json() {
        Value::Array(rows) => rows,
        v => panic!("list is not an array: {v}"),
    }
}

/// The ids of the set's backups, in listing order.
pub fn ids(dir: &Path, set: &str) -> Vec<String> {
    list(dir, set)
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect()
}

/// Restores backup `id` of the set to a raw file and checks it reads as
/// the raw `reference`; also `qemu-img check`s the backup's file and
/// compares the backup's chain itself with the reference (QEMU opens it as
/// it is).
pub fn assert_restores(dir: &Path, set: &str, id: &str, reference: &str) {
    let out = format!("restored-{id}.raw");
    qbackup_in(dir, &["restore", set, "--at", id, &out, "--force", "-q"]).assert_ok();
    assert_identical(dir, reference, "raw", &out, "raw");
    std::fs::remove_file(dir.join(&out)).expect("remove restored file");
    let row = list(dir, set)
        .into_iter()
        .find(|r| r["id"].as_str().is_some_and(|x| x.starts_with(id)))
        .unwrap_or_else(|| panic!("{id} not listed"));
    let file = row["file"].as_str().expect("file").to_string();
    assert_check_clean(dir, &file);
    assert_identical(dir, reference, "raw", &file, "qcow2");
}
