//! The XML qbackup exchanges with libvirt: the disks of a domain's
//! definition, the backup and checkpoint descriptions it hands to
//! `virDomainBackupBegin` (formatbackup / formatcheckpoint), and what
//! libvirt reports back about a running backup job and a checkpoint.
//! Built with escaped attributes, read with a real XML parser.

use std::path::{Path, PathBuf};

/// A disk of a domain's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `<target dev>`: the name libvirt's backup XML uses (`vda`).
    pub target: String,
    /// `<disk device>`: `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// The top image (`<source file>` or `<source dev>`), if local.
    pub source: Option<PathBuf>,
    /// `<driver type>`: `qcow2`, `raw`…
    pub format: Option<String>,
    /// `<readonly/>` or `<transient/>`: never backed up.
    pub readonly: bool,
}

impl DomainDisk {
    /// A disk a backup covers by default: a writable `disk` with a local
    /// image.
    pub fn backed_up_by_default(&self) -> bool {
        self.device == "disk" && !self.readonly && self.source.is_some()
    }
}

/// The disks of a domain XML (`virDomainGetXMLDesc`), in order.
pub fn domain_disks(xml: &str) -> Result<Vec<DomainDisk>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut disks = Vec::new();
    for devices in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
    {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            let child = |tag: &str| d.children().find(|n| n.has_tag_name(tag));
            let Some(target) = child("target").and_then(|t| t.attribute("dev")) else {
                continue;
            };
            let source = child("source")
                .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                .map(PathBuf::from);
            disks.push(DomainDisk {
                target: target.to_string(),
                device: d.attribute("device").unwrap_or("disk").to_string(),
                source,
                format: child("driver")
                    .and_then(|t| t.attribute("type"))
                    .map(str::to_string),
                readonly: child("readonly").is_some() || child("transient").is_some(),
            });
        }
    }
    Ok(disks)
}

/// `s` escaped for a single-quoted XML attribute.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// One disk of a backup job.
#[derive(Debug, Clone)]
pub struct JobDisk {
    /// `<target dev>` of the disk.
    pub name: String,
    /// The checkpoint an incremental export starts from; `None`: full.
    pub incremental: Option<String>,
    /// The scratch (fleecing) file libvirt creates for the job.
    pub scratch: PathBuf,
}

/// A pull-mode backup exporting `disks` on the Unix socket `socket`;
/// every disk in `others` is left out.
pub fn backup(socket: &Path, disks: &[JobDisk], others: &[String]) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    x += &format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        attr(&socket.to_string_lossy())
    );
    for d in disks {
        let mode = match &d.incremental {
            Some(cp) => format!("backupmode='incremental' incremental='{}'", attr(cp)),
            None => "backupmode='full'".to_string(),
        };
        x += &format!(
            "    <disk name='{}' backup='yes' type='file' {mode}>\n      <scratch file='{}'/>\n    </disk>\n",
            attr(&d.name),
            attr(&d.scratch.to_string_lossy())
        );
    }
    for o in others {
        x += &format!("    <disk name='{}' backup='no'/>\n", attr(o));
    }
    x + "  </disks>\n</domainbackup>\n"
}

/// A checkpoint `name` with a bitmap on each of `disks`, none on `others`.
pub fn checkpoint(name: &str, disks: &[String], others: &[String]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        attr(name)
    );
    for d in disks {
        x += &format!("    <disk name='{}' checkpoint='bitmap'/>\n", attr(d));
    }
    for o in others {
        x += &format!("    <disk name='{}' checkpoint='no'/>\n", attr(o));
    }
    x + "  </disks>\n</domaincheckpoint>\n"
}

/// What a running backup job exports for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// `<disk name>`.
    pub disk: String,
    /// The NBD export name.
    pub name: String,
    /// The export's dirty bitmap (its `qemu:dirty-bitmap:` context), for
    /// an incremental disk.
    pub bitmap: Option<String>,
}

/// A running backup job, from `virDomainBackupGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// `pull` or `push`.
    pub mode: String,
    /// The export's Unix socket, for a pull job on one.
    pub socket: Option<PathBuf>,
    /// The exported disks.
    pub exports: Vec<Export>,
}

/// Reads a backup job's XML.
pub fn job(xml: &str) -> Result<Job, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let socket = root
        .children()
        .find(|n| n.has_tag_name("server"))
        .and_then(|s| s.attribute("socket"))
        .map(PathBuf::from);
    let mut exports = Vec::new();
    for disks in root.children().filter(|n| n.has_tag_name("disks")) {
        for d in disks.children().filter(|n| n.has_tag_name("disk")) {
            if d.attribute("backup") == Some("no") {
                continue;
            }
            let Some(disk) = d.attribute("name") else {
                continue;
            };
            exports.push(Export {
                disk: disk.to_string(),
                name: d.attribute("exportname").unwrap_or(disk).to_string(),
                bitmap: d.attribute("exportbitmap").map(str::to_string),
            });
        }
    }
    Ok(Job {
        mode: root.attribute("mode").unwrap_or("push").to_string(),
        socket,
        exports,
    })
}

/// The disks a checkpoint's XML gives a bitmap.
pub fn checkpoint_disks(xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for disks in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("disks"))
    {
        for d in disks.children().filter(|n| n.has_tag_name("disk")) {
            if d.attribute("checkpoint") == Some("bitmap") {
                if let Some(n) = d.attribute("name") {
                    out.push(n.to_string());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='qemu'><name>t</name><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><source file='/img/x.iso'/><target dev='sda'/><readonly/></disk>
      <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/lv'/><target dev='vdb'/></disk>
    </devices></domain>";

    #[test]
    fn reads_the_domain_disks() {
        let d = domain_disks(DOMAIN).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].source.as_deref(), Some(Path::new("/img/a.qcow2")));
        assert_eq!(d[0].format.as_deref(), Some("qcow2"));
        assert!(d[0].backed_up_by_default());
        assert!(!d[1].backed_up_by_default());
        assert_eq!(d[2].source.as_deref(), Some(Path::new("/dev/vg/lv")));
        assert!(d[2].backed_up_by_default());
    }

    #[test]
    fn builds_backup_and_checkpoint_xml_that_reads_back() {
        let disks = [
            JobDisk {
                name: "vda".into(),
                incremental: Some("qbackup-'1".into()),
                scratch: "/s/a".into(),
            },
            JobDisk {
                name: "vdb".into(),
                incremental: None,
                scratch: "/s/b".into(),
            },
        ];
        let x = backup(Path::new("/s/q.sock"), &disks, &["vdc".into()]);
        assert!(x.contains("incremental='qbackup-&apos;1'"), "{x}");
        assert!(x.contains("<disk name='vdc' backup='no'/>"), "{x}");
        let j = job(&x).unwrap();
        assert_eq!(j.mode, "pull");
        assert_eq!(j.socket.as_deref(), Some(Path::new("/s/q.sock")));
        assert_eq!(j.exports.len(), 2);
        assert_eq!(j.exports[0].name, "vda");
        let c = checkpoint("qbackup-1", &["vda".into()], &["vdb".into()]);
        assert_eq!(checkpoint_disks(&c).unwrap(), ["vda"]);
    }

    #[test]
    fn reads_libvirts_job_description() {
        let x = "<domainbackup mode='pull'><incremental>qbackup-1</incremental>
          <server transport='unix' socket='/tmp/n/sock'/><disks>
          <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='qbackup-1'
                exportname='vda' exportbitmap='backup-vda' index='6'><driver type='qcow2'/></disk>
          <disk name='vdb' backup='no'/></disks></domainbackup>";
        let j = job(x).unwrap();
        assert_eq!(
            j.exports,
            [Export {
                disk: "vda".into(),
                name: "vda".into(),
                bitmap: Some("backup-vda".into())
            }]
        );
    }
}
