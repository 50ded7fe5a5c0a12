//! Backup sets: a directory holding, per disk, a chain of qcow2 backups
//! (a full, then incrementals on it), each with its manifest.
//!
//! The manifests are the truth: anything else kept in a set (the verify
//! results, a lock, a prune's intent record) is rebuilt from them or
//! checked against them, never trusted over them. [`layout`] names the
//! files; [`add`] plans a new backup; [`lock`] serialises commands on a
//! set; [`catalog`] lists every backup with its chain and damage. The QMP
//! orchestrator (`crate::live`) and `qbackup backup SOURCE DIR/` both
//! write through [`add`] under the set's exclusive [`lock::SetLock`].

pub mod add;
pub mod catalog;
pub mod check;
pub mod intent;
pub mod layout;
pub mod lock;
pub mod pick;
pub mod prune;
pub mod retention;
pub mod rewrite;

pub use layout::{DiskDir, Entry, SetError};
pub use lock::{LockMode, SetLock};
