//! A QMP client: one Unix-socket connection to a QEMU monitor, commands
//! sent one at a time, their replies matched, events set aside.
//!
//! QEMU serves one client per QMP socket: while another holds it, the
//! greeting never comes, so connecting waits at most [`GREETING_WAIT`]
//! and then says the socket is busy. Every reply is awaited at most
//! [`REPLY_WAIT`] (a command that drains I/O can take seconds, never
//! minutes): a monitor that stops answering fails the backup, it never
//! hangs it. Spec: QEMU's docs/interop/qmp-spec.rst.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the greeting may take (another client may hold the socket).
pub const GREETING_WAIT: Duration = Duration::from_secs(15);
/// How long one command's reply may take.
pub const REPLY_WAIT: Duration = Duration::from_secs(120);

/// A failed QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("{}: cannot connect to QEMU's QMP socket: {}", path.display(), qbackup_formats::error::io_text(source))]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No greeting: another client holds the socket.
    #[error("{}: QEMU did not greet within {}s: another client (a qbackup still running, a libvirt or a shell) holds this QMP socket, and QEMU serves one at a time", path.display(), GREETING_WAIT.as_secs())]
    Busy {
        /// The socket.
        path: PathBuf,
    },
    /// The connection broke or timed out.
    #[error("{}: QMP connection lost while running {command}: {}", path.display(), qbackup_formats::error::io_text(source))]
    Lost {
        /// The socket.
        path: PathBuf,
        /// The command in flight.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU sent something that is not QMP.
    #[error("{}: not a QMP reply to {command}: {what}", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The command in flight.
        command: String,
        /// What was wrong.
        what: String,
    },
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

impl QmpError {
    /// QEMU answered that what the command names does not exist (used by
    /// teardown, which is idempotent).
    pub fn is_not_found(&self) -> bool {
        match self {
            QmpError::Refused { class, desc, .. } => {
                class == "DeviceNotFound"
                    || desc.contains("not found")
                    || desc.contains("Cannot find")
                    || desc.contains("Failed to find")
                    || desc.contains("No active block job")
                    || desc.contains("not running")
                    || desc.contains("not exist")
            }
            _ => false,
        }
    }
}

impl qbackup_formats::Classify for QmpError {
    fn class(&self) -> qbackup_formats::ErrorClass {
        use qbackup_formats::ErrorClass;
        match self {
            QmpError::Connect { source, .. } | QmpError::Lost { source, .. } => {
                ErrorClass::of_io(source)
            }
            QmpError::Busy { .. } => ErrorClass::Io,
            QmpError::Protocol { .. } | QmpError::Refused { .. } => ErrorClass::Unsupported,
        }
    }
}

/// One QMP connection in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
    /// The id of the next command (replies are matched by it).
    next_id: u64,
    /// Set once a reply did not come in time or the connection broke: a
    /// late reply could otherwise be taken for the next command's.
    dead: bool,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            next_id: 0,
            dead: false,
        };
        let greeting = match qmp.read_message("the greeting", GREETING_WAIT) {
            Ok(v) => v,
            Err(QmpError::Lost { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QmpError::Busy {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(e),
        };
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("the greeting", "no QMP greeting"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let result = self.exchange(command, arguments);
        if matches!(
            result,
            Err(QmpError::Lost { .. } | QmpError::Protocol { .. })
        ) {
            self.dead = true;
        }
        result
    }

    fn exchange(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if self.dead {
            return Err(self.lost(
                command,
                std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "an earlier command got no reply in time, so this connection is no longer used",
                ),
            ));
        }
        self.next_id += 1;
        let id = format!("qbackup-{}", self.next_id);
        let request = json!({"execute": command, "arguments": arguments, "id": id});
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.lost(command, source))?;
        let deadline = Instant::now() + REPLY_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self.read_message(command, left.max(Duration::from_millis(1)))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            // A reply to an earlier command (none is outstanding: each
            // waits for its reply, and a timeout ends the connection).
            if msg
                .get("id")
                .is_some_and(|v| v.as_str() != Some(id.as_str()))
            {
                continue;
            }
            if let Some(v) = msg.get("return") {
                return Ok(v.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(self.protocol(command, "neither return, error nor event"));
        }
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self, command: &str, wait: Duration) -> Result<Value, QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(|source| self.lost(command, source))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.lost(
                command,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
            )),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.protocol(command, &format!("invalid JSON: {e}"))),
            Err(source) => Err(self.lost(command, source)),
        }
    }

    fn lost(&self, command: &str, source: std::io::Error) -> QmpError {
        QmpError::Lost {
            path: self.path.clone(),
            command: command.to_string(),
            source,
        }
    }

    fn protocol(&self, command: &str, what: &str) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            command: command.to_string(),
            what: what.to_string(),
        }
    }
}
