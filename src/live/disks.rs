//! The VM's disks as QEMU reports them (`query-block`,
//! `query-named-block-nodes`): which devices qbackup backs up, the node
//! each is attached to, its size, and the dirty bitmaps on that node.
//!
//! A disk is a block device with a medium inserted that the guest can
//! write and cannot eject (`ro` false, `removable` false): CD-ROMs and
//! read-only disks hold nothing a backup must capture. Its name in the
//! backup set is the device's id (`-device ...,id=ID`), else its node
//! name; both are what `--disk` matches.

use serde_json::{json, Value};

use super::qmp::{Qmp, QmpError};

/// One dirty bitmap on a disk's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Recording guest writes (enabled).
    pub recording: bool,
    /// Stored in the image file (survives a QEMU restart).
    pub persistent: bool,
    /// In use by a job or an export.
    pub busy: bool,
    /// QEMU found it inconsistent (it was in use when QEMU died): its
    /// content cannot be trusted.
    pub inconsistent: bool,
}

/// One disk of the VM.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The node the device is attached to (what is frozen and exported).
    pub node: String,
    /// The device's id, when it has one.
    pub device: Option<String>,
    /// Guest bytes.
    pub virtual_size: u64,
    /// The node's driver (`qcow2`, `raw`, ...).
    pub driver: String,
    /// Bitmaps on the node.
    pub bitmaps: Vec<Bitmap>,
}

impl Disk {
    /// The disk's name in the backup set: its device id, else its node.
    pub fn name(&self) -> &str {
        self.device.as_deref().unwrap_or(&self.node)
    }

    /// Whether QEMU can store a bitmap on this node in the image file.
    pub fn persistent_bitmaps(&self) -> bool {
        self.driver == "qcow2"
    }

    /// The bitmap named `name`, if any.
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Every writable, non-removable disk of the VM, in QEMU's order.
pub fn list(qmp: &mut Qmp) -> Result<Vec<Disk>, QmpError> {
    let blocks = qmp.execute("query-block", json!({}))?;
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut disks = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let Some(inserted) = b.get("inserted") else {
            continue;
        };
        if b["removable"].as_bool().unwrap_or(false) || inserted["ro"].as_bool().unwrap_or(true) {
            continue;
        }
        let Some(node) = inserted["node-name"].as_str() else {
            continue;
        };
        let info = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"].as_str() == Some(node));
        disks.push(Disk {
            node: node.to_string(),
            device: device_id(b),
            virtual_size: info
                .and_then(|n| n["image"]["virtual-size"].as_u64())
                .or_else(|| inserted["image"]["virtual-size"].as_u64())
                .unwrap_or(0),
            driver: info
                .and_then(|n| n["drv"].as_str())
                .or_else(|| inserted["drv"].as_str())
                .unwrap_or("")
                .to_string(),
            bitmaps: info.map(bitmaps).unwrap_or_default(),
        });
    }
    Ok(disks)
}

/// The bitmaps of the node `node` now.
pub fn bitmaps_of(qmp: &mut Qmp, node: &str) -> Result<Vec<Bitmap>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"].as_str() == Some(node))
        .map(bitmaps)
        .unwrap_or_default())
}

/// The names of every block node.
pub fn node_names(qmp: &mut Qmp) -> Result<Vec<String>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .collect())
}

fn bitmaps(node: &Value) -> Vec<Bitmap> {
    node["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            Some(Bitmap {
                name: b["name"].as_str()?.to_string(),
                recording: b["recording"].as_bool().unwrap_or(false),
                persistent: b["persistent"].as_bool().unwrap_or(false),
                busy: b["busy"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// The device id of a `query-block` entry: the id in its qdev path
/// (`/machine/peripheral/ID/virtio-backend`), else its legacy `-drive`
/// name.
fn device_id(b: &Value) -> Option<String> {
    let from_qdev = b["qdev"]
        .as_str()
        .and_then(|q| q.strip_prefix("/machine/peripheral/"))
        .and_then(|rest| rest.split('/').next())
        .filter(|s| !s.is_empty());
    from_qdev
        .or_else(|| b["device"].as_str().filter(|d| !d.is_empty()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_come_from_the_qdev_path() {
        let b = json!({"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend"});
        assert_eq!(device_id(&b).as_deref(), Some("vd0"));
        let b = json!({"device": "drive0", "qdev": "/machine/peripheral-anon/device[0]"});
        assert_eq!(device_id(&b).as_deref(), Some("drive0"));
        // -drive if=none,id=drv0 -device ...,drive=drv0,id=vdz: the device.
        let b = json!({"device": "drv0", "qdev": "/machine/peripheral/vdz/virtio-backend"});
        assert_eq!(device_id(&b).as_deref(), Some("vdz"));
        let b = json!({"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend"});
        assert_eq!(device_id(&b), None);
    }
}
