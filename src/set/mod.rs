//! Backup sets: a directory holding, per disk, a chain of qcow2 backups
//! (a full, then incrementals on it), each with its manifest.
//!
//! The manifests are the truth: anything else kept in a set (an index, a
//! lock) is rebuilt from them, never trusted over them. [`layout`] names
//! the files; the QMP orchestrator (`crate::live`) and `qbackup backup
//! SOURCE DIR/` both write through it.

pub mod layout;

pub use layout::{DiskDir, Entry, SetError};
