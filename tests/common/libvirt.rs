//! A private libvirt for the libvirt tests: `virtlogd` and `libvirtd` run
//! as plain daemons (no systemd) in session mode as the unprivileged user
//! `nobody`, with HOME and every XDG directory in a temporary directory,
//! so nothing outside it is read or written. qbackup (root) connects with
//! `qemu+unix:///session?socket=…`. Domains are TCG with no OS (they sit
//! in firmware); guest writes go through a disk's virtio device with HMP
//! `qemu-io -d`. Drop destroys every domain, then stops the daemons.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uid/gid the daemons (and so QEMU) run as.
pub const NOBODY: u32 = 65534;

/// A running private libvirt.
pub struct Libvirt {
    dir: tempfile::TempDir,
    /// The URI qbackup and virsh connect with.
    pub uri: String,
    daemons: Vec<Child>,
}

/// `path` (and everything under it) given to `nobody`.
pub fn give(path: &Path) {
    chown(path, Some(NOBODY), Some(NOBODY))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            give(&e.path());
        }
    }
}

impl Libvirt {
    /// Starts the daemons and waits for libvirtd's socket.
    pub fn start() -> Libvirt {
        let dir = tempfile::Builder::new()
            .prefix("qbackup-libvirt")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        let run = dir.path().join("run");
        for d in [&home, &run] {
            std::fs::create_dir(d).unwrap();
            give(d);
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = run.join("libvirt/libvirt-sock");
        let mut daemons = Vec::new();
        for daemon in ["virtlogd", "libvirtd"] {
            let child = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", daemon])
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", &home)
                .env("XDG_CONFIG_HOME", home.join("config"))
                .env("XDG_CACHE_HOME", home.join("cache"))
                .env("XDG_DATA_HOME", home.join("data"))
                .env("XDG_STATE_HOME", home.join("state"))
                .env("XDG_RUNTIME_DIR", &run)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {daemon}: {e}"));
            daemons.push(child);
            if daemon == "virtlogd" {
                wait_for(&run.join("libvirt/virtlogd-sock"));
            }
        }
        wait_for(&socket);
        let lv = Libvirt {
            uri: format!("qemu+unix:///session?socket={}", socket.display()),
            dir,
            daemons,
        };
        // The socket appears before the daemon answers.
        let t = Instant::now();
        while !lv.virsh(&["version"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "libvirtd does not answer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lv
    }

    /// The temporary directory (0755, root's).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory under it owned by `nobody` (QEMU can write there).
    pub fn shared_dir(&self, name: &str) -> PathBuf {
        let p = self.dir().join(name);
        std::fs::create_dir_all(&p).unwrap();
        give(&p);
        p
    }

    /// `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh")
    }

    /// `virsh ARGS`, which must succeed; its stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Defines and starts `name`: TCG, no OS, two virtio disks: `vda`
    /// (alias `ua-vda`) a 64 MiB qcow2 overlay on `NAME-base.qcow2`, and
    /// `vdb` (alias `ua-vdb`) a 32 MiB qcow2; images in `DIR/img`.
    pub fn two_disk_domain(&self, name: &str) -> Domain {
        self.domain_with_two_disks(name, true)
    }

    /// [`two_disk_domain`](Self::two_disk_domain), transient (created,
    /// never defined).
    pub fn two_disk_transient(&self, name: &str) -> Domain {
        self.domain_with_two_disks(name, false)
    }

    fn domain_with_two_disks(&self, name: &str, persistent: bool) -> Domain {
        let img = self.shared_dir("img");
        let base = img.join(format!("{name}-base.qcow2"));
        let a = img.join(format!("{name}-a.qcow2"));
        let b = img.join(format!("{name}-b.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", path(&base), "64M"]);
        qemu_io(&base, "write -P 0x5b 1M 3M");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path(&base),
            "-F",
            "qcow2",
            path(&a),
        ]);
        qemu_img(&["create", "-q", "-f", "qcow2", path(&b), "32M"]);
        give(&img);
        let disk = |file: &Path, dev: &str, backing: Option<&Path>| {
            let bs = backing.map_or(String::new(), |b| {
                format!(
                    "<backingStore type='file'><format type='qcow2'/><source file='{}'/><backingStore/></backingStore>",
                    b.display()
                )
            });
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>{bs}<target dev='{dev}' bus='virtio'/><alias name='ua-{dev}'/></disk>",
                file.display()
            )
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>{}{}<memballoon model='none'/></devices></domain>",
            disk(&a, "vda", Some(&base)),
            disk(&b, "vdb", None)
        );
        let file = self.dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        if persistent {
            self.virsh_ok(&["define", path(&file)]);
            self.virsh_ok(&["start", name]);
        } else {
            self.virsh_ok(&["create", path(&file)]);
        }
        Domain {
            name: name.to_string(),
            images: vec![("vda".into(), a), ("vdb".into(), b)],
        }
    }

    /// Defines and starts `name` with a 16 MiB raw disk `vdc` (alias
    /// `ua-vdc`, image `DIR/img/NAME-c.raw`) and an empty IDE CD-ROM
    /// `hdc`: libvirt can keep no bitmap for either.
    pub fn raw_and_cdrom_domain(&self, name: &str) -> Domain {
        let img = self.shared_dir("img");
        let c = img.join(format!("{name}-c.raw"));
        qemu_img(&["create", "-q", "-f", "raw", path(&c), "16M"]);
        give(&img);
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='vdc' bus='virtio'/><alias name='ua-vdc'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>\
             <memballoon model='none'/></devices></domain>",
            c.display()
        );
        let file = self.dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        self.virsh_ok(&["define", path(&file)]);
        self.virsh_ok(&["start", name]);
        Domain {
            name: name.to_string(),
            images: vec![("vdc".into(), c)],
        }
    }

    /// A guest write through disk `dev`'s device (`qemu-io` command).
    pub fn guest_io(&self, dom: &Domain, dev: &str, cmd: &str) {
        let hmp = format!("qemu-io -d /machine/peripheral/ua-{dev}/virtio-backend \"{cmd}\"");
        let out = self.virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, &hmp]);
        assert!(
            !out.contains("error") && !out.contains("failed"),
            "guest io {cmd} on {dev}: {out}"
        );
    }

    /// The names of the domain's checkpoints.
    pub fn checkpoints(&self, dom: &Domain) -> Vec<String> {
        self.virsh_ok(&["checkpoint-list", &dom.name, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Whether the domain has a backup job.
    pub fn has_backup_job(&self, dom: &Domain) -> bool {
        self.virsh(&["backup-dumpxml", &dom.name]).status.success()
    }

    /// Kills the domain's QEMU with SIGKILL (a host crash for its disks:
    /// persistent bitmaps left in use) and waits until libvirt sees it off.
    pub fn crash(&self, dom: &Domain) {
        let pid_file = self
            .dir()
            .join(format!("run/libvirt/qemu/run/{}.pid", dom.name));
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
        let st = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(st.success());
        let t = Instant::now();
        while !self.virsh_ok(&["domstate", &dom.name]).contains("shut off") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "domain still running"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the domain cleanly (QEMU gets SIGTERM and stores its
    /// persistent bitmaps).
    pub fn stop(&self, dom: &Domain) {
        self.virsh_ok(&["destroy", "--graceful", &dom.name]);
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let list = self.virsh(&["list", "--name"]);
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            let name = name.trim();
            if !name.is_empty() {
                let _ = self.virsh(&["destroy", name]);
            }
        }
        for d in self.daemons.iter_mut().rev() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// A domain of the test and its disks' top images by target.
pub struct Domain {
    /// The domain's name.
    pub name: String,
    /// (target dev, top image).
    pub images: Vec<(String, PathBuf)>,
}

impl Domain {
    /// The top image of `dev`.
    pub fn image(&self, dev: &str) -> &Path {
        &self
            .images
            .iter()
            .find(|(d, _)| d == dev)
            .expect("known disk")
            .1
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-img ARGS`, which must succeed; its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-io -c CMD IMAGE` on a qcow2 image no one else has open.
pub fn qemu_io(image: &Path, cmd: &str) {
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, path(image)])
        .output()
        .expect("run qemu-io");
    assert!(
        o.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
