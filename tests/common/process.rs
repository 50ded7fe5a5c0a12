//! Servers the tests start and stop: qemu-nbd and a guest-less
//! qemu-system-x86_64, each killed when its guard is dropped, and a minimal
//! QMP client for driving the VM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::scratch::Scratch;

// The formats crate's tests have the same need; one copy serves both.
#[path = "../../formats/tests/common/mod.rs"]
mod formats_common;
pub use formats_common::listening;

/// A background process killed when dropped.
pub struct Holder(pub Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits (bounded) until `socket` is listening. A socket
/// file left by an earlier server is removed first, so that it cannot be
/// taken for the new one.
pub fn hold(cmd: &mut Command, socket: &Path) -> Holder {
    let _ = std::fs::remove_file(socket);
    hold_until(cmd, &format!("{socket:?}"), || listening(socket))
}

/// Starts `cmd` and waits (bounded) until `ready()`; `what` names what it
/// should listen on, for the failure message.
pub fn hold_until(cmd: &mut Command, what: &str, ready: impl Fn() -> bool) -> Holder {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let holder = Holder(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{cmd:?} did not listen on {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holder
}

/// `qemu-nbd ARGS -k SOCK IMAGE` in the scratch dir; returns the guard and
/// the export's URI.
pub fn qemu_nbd_with(s: &Scratch, image: &str, args: &[&str]) -> (Holder, String) {
    let sock = s.path(&format!("{image}.sock"));
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(args)
        .arg("-k")
        .arg(&sock)
        .arg(s.path(image))
        .current_dir(s.dir());
    let h = hold(&mut cmd, &sock);
    (h, format!("nbd+unix:///?socket={}", sock.display()))
}

/// A minimal QMP client (one command at a time, events skipped).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(socket: &Path) -> Qmp {
        let stream = UnixStream::connect(socket).expect("connect to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        q.next_reply(); // greeting
        q.run("qmp_capabilities", json!({}));
        q
    }

    fn next_reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("QMP reply");
            assert!(!line.is_empty(), "QMP closed");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Runs `command` and returns its "return" value; panics on an error.
    pub fn run(&mut self, command: &str, args: Value) -> Value {
        let msg = json!({"execute": command, "arguments": args});
        writeln!(self.writer, "{msg}").expect("QMP write");
        let reply = self.next_reply();
        match reply.get("return") {
            Some(r) => r.clone(),
            None => panic!("QMP {command} failed: {reply}"),
        }
    }

    /// An HMP `qemu-io` command on `node`; panics unless it printed
    /// nothing but qemu-io's usual "wrote"/"read" report.
    pub fn qemu_io(&mut self, node: &str, cmd: &str) {
        let line = format!("qemu-io {node} \"{cmd}\"");
        let out = self.run("human-monitor-command", json!({ "command-line": line }));
        let text = out.as_str().unwrap_or_default();
        assert!(
            text.is_empty() || text.starts_with("wrote") || text.starts_with("read"),
            "{line}: {text}"
        );
    }
}

/// A guest-less QEMU with `image` (qcow2) as node `disk0` and QMP on a
/// socket in the scratch dir.
pub fn qemu_vm(s: &Scratch, image: &str) -> (Holder, Qmp) {
    let qmp = s.path("qmp.sock");
    let blockdev = format!(
        "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
        s.p(image)
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server,wait=off", qmp.display()))
    .args(["-blockdev", &blockdev]);
    let h = hold(&mut cmd, &qmp);
    let q = Qmp::connect(&qmp);
    (h, q)
}
