//! Freezing a VM's disks over QMP: fleecing with QEMU's backup job in
//! `sync=none` mode, one `transaction` for all disks, and undoing all of
//! it. Spec: qapi/block-core.json (`blockdev-backup`, `snapshot-access`,
//! `block-export-add`), qapi/transaction.json, QEMU's
//! tests/qemu-iotests/tests/image-fleecing.
//!
//! Per disk, before the freeze: a fleecing node on a fresh file in the
//! scratch directory. The freeze is one transaction: per disk a
//! `blockdev-backup sync=none` job (its copy-before-write filter copies
//! every cluster the guest overwrites to the fleecing node first), the
//! new recording bitmap, and the previous one disabled. Then per disk a
//! `snapshot-access` node over the job's filter (reads the frozen view)
//! exported over NBD on a private Unix socket, with the frozen bitmap.
//!
//! Why a job and not a `copy-before-write` node with
//! `on-cbw-error=break-snapshot`: inserting such a node is `qom-set`
//! per device, outside any transaction, so disks would freeze at
//! different points; QEMU 10.0 neither sets those options on a job's
//! filter nor reopens one. A job's filter fails the guest's write if the
//! fleecing image cannot take the old data, so the fleecing file is
//! fully reserved before the freeze (`fallocate` of the disk's size):
//! with its space allocated, writes to it do not run out of space.
//!
//! Teardown is idempotent (what is already gone is skipped), so a run
//! that was killed is repaired by running the same steps from its
//! journal.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::journal::{DiskEntry, Journal};
use super::qmp::{Qmp, QmpError};

/// Adds every disk's fleecing node, then freezes all disks in one
/// transaction (jobs, new bitmaps, frozen bitmaps disabled).
pub fn freeze(qmp: &mut Qmp, journal: &Journal, persistent: &[bool]) -> Result<(), QmpError> {
    for d in &journal.disks {
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "file",
                "node-name": d.fleece_node,
                "filename": d.fleece.display().to_string(),
            }),
        )?;
    }
    let mut actions = Vec::new();
    for (d, &persistent) in journal.disks.iter().zip(persistent) {
        actions.push(json!({"type": "blockdev-backup", "data": {
            "job-id": d.job,
            "device": d.node,
            "target": d.fleece_node,
            "sync": "none",
            "filter-node-name": d.filter,
            "auto-dismiss": true,
        }}));
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": d.node,
            "name": d.new_bitmap,
            "persistent": persistent,
        }}));
        if let Some(frozen) = &d.frozen_bitmap {
            actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                "node": d.node,
                "name": frozen,
            }}));
        }
    }
    qmp.execute("transaction", json!({ "actions": actions }))?;
    Ok(())
}

/// Starts QEMU's NBD server on `socket`.
pub fn start_server(qmp: &mut Qmp, socket: &Path) -> Result<(), QmpError> {
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}}),
    )?;
    Ok(())
}

/// Exports every disk's frozen view (and its frozen bitmap).
pub fn export(qmp: &mut Qmp, journal: &Journal) -> Result<(), QmpError> {
    for d in &journal.disks {
        qmp.execute(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": d.access_node, "file": d.filter}),
        )?;
        let mut args = json!({
            "type": "nbd",
            "id": d.export,
            "node-name": d.access_node,
            "name": d.name,
            "writable": false,
        });
        if let Some(frozen) = &d.frozen_bitmap {
            args["bitmaps"] = json!([{"node": d.node, "name": frozen}]);
        }
        qmp.execute("block-export-add", args)?;
    }
    Ok(())
}

/// Removes everything `journal` added to QEMU except bitmaps: exports,
/// the server (when this cycle started it), snapshot-access nodes, jobs
/// (and their filters), fleecing nodes. What is already gone is skipped;
/// every other failure is returned after trying the rest.
pub fn teardown(qmp: &mut Qmp, journal: &Journal) -> Result<(), QmpError> {
    let mut first: Option<QmpError> = None;
    let mut note = |r: Result<Value, QmpError>| match r {
        Err(e) if !e.is_not_found() => {
            first.get_or_insert(e);
        }
        _ => {}
    };
    for d in &journal.disks {
        note(qmp.execute("block-export-del", json!({"id": d.export, "mode": "hard"})));
    }
    note(wait_gone(
        qmp,
        "query-block-exports",
        "id",
        &exports(journal),
    ));
    if journal.server {
        note(qmp.execute("nbd-server-stop", json!({})));
    }
    for d in &journal.disks {
        note(qmp.execute("blockdev-del", json!({"node-name": d.access_node})));
    }
    for d in &journal.disks {
        note(qmp.execute("block-job-cancel", json!({"device": d.job, "force": true})));
    }
    let jobs: Vec<String> = journal.disks.iter().map(|d| d.job.clone()).collect();
    note(wait_gone(qmp, "query-block-jobs", "device", &jobs));
    for d in &journal.disks {
        note(qmp.execute("blockdev-del", json!({"node-name": d.fleece_node})));
    }
    first.map_or(Ok(()), Err)
}

/// Failure: every write since the last good backup stays recorded. Per
/// disk, in one transaction, the new bitmap is merged into the frozen
/// one, which records again, and the new one is removed; a disk without
/// a frozen bitmap just loses the new one.
pub fn roll_back_bitmaps(qmp: &mut Qmp, journal: &Journal) -> Result<(), QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut actions = Vec::new();
    for d in &journal.disks {
        let has = |name: &str| bitmap(&nodes, &d.node, name);
        let new = has(&d.new_bitmap);
        let frozen = d
            .frozen_bitmap
            .as_deref()
            .and_then(|f| has(f).map(|b| (f, b)));
        let broken = |b: &Value| b["inconsistent"].as_bool().unwrap_or(false);
        match frozen {
            // QEMU died with them in use: neither can be trusted, and
            // QEMU refuses to merge or enable them. Both go; the next
            // cycle compares by content.
            Some((f, b)) if broken(b) || new.is_some_and(broken) => {
                actions.push(json!({"type": "block-dirty-bitmap-remove", "data": {
                    "node": d.node, "name": f,
                }}));
            }
            Some((f, b)) => {
                if new.is_some() {
                    actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                        "node": d.node, "target": f, "bitmaps": [d.new_bitmap],
                    }}));
                }
                if !b["recording"].as_bool().unwrap_or(false) {
                    actions.push(json!({"type": "block-dirty-bitmap-enable", "data": {
                        "node": d.node, "name": f,
                    }}));
                }
            }
            // The frozen bitmap is gone (QEMU restarted without it): the
            // new one is all there is; keeping it under its name would
            // claim a backup that does not exist, so it goes too, and
            // the next cycle compares by content.
            None => {}
        }
        if new.is_some() {
            actions.push(json!({"type": "block-dirty-bitmap-remove", "data": {
                "node": d.node, "name": d.new_bitmap,
            }}));
        }
    }
    if !actions.is_empty() {
        qmp.execute("transaction", json!({ "actions": actions }))?;
    }
    Ok(())
}

/// Success: the frozen bitmaps are dropped (the new ones record from the
/// freeze point of the backups just made), with any other bitmap of an
/// earlier qbackup cycle on the same node.
pub fn commit_bitmaps(qmp: &mut Qmp, journal: &Journal) -> Result<(), QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut actions = Vec::new();
    for d in &journal.disks {
        let Some(node) = node_entry(&nodes, &d.node) else {
            continue;
        };
        for b in node["dirty-bitmaps"].as_array().into_iter().flatten() {
            let Some(name) = b["name"].as_str() else {
                continue;
            };
            if name.starts_with(super::BITMAP_PREFIX) && name != d.new_bitmap {
                actions.push(json!({"type": "block-dirty-bitmap-remove", "data": {
                    "node": d.node, "name": name,
                }}));
            }
        }
    }
    if !actions.is_empty() {
        qmp.execute("transaction", json!({ "actions": actions }))?;
    }
    Ok(())
}

fn exports(journal: &Journal) -> Vec<String> {
    journal
        .disks
        .iter()
        .map(|d: &DiskEntry| d.export.clone())
        .collect()
}

fn node_entry<'a>(nodes: &'a Value, node: &str) -> Option<&'a Value> {
    nodes
        .as_array()?
        .iter()
        .find(|n| n["node-name"].as_str() == Some(node))
}

fn bitmap<'a>(nodes: &'a Value, node: &str, name: &str) -> Option<&'a Value> {
    node_entry(nodes, node)?["dirty-bitmaps"]
        .as_array()?
        .iter()
        .find(|b| b["name"].as_str() == Some(name))
}

/// Waits (at most 30 s) until no entry of `query` has `key` in `names`:
/// exports and cancelled jobs go away asynchronously.
fn wait_gone(qmp: &mut Qmp, query: &str, key: &str, names: &[String]) -> Result<Value, QmpError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = qmp.execute(query, json!({}))?;
        let left: Vec<&str> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[key].as_str())
            .filter(|n| names.iter().any(|m| m == n))
            .collect();
        if left.is_empty() {
            return Ok(Value::Null);
        }
        if Instant::now() > deadline {
            return Err(QmpError::Refused {
                command: query.to_string(),
                class: "Timeout".to_string(),
                desc: format!("{} still present after 30 s", left.join(", ")),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
