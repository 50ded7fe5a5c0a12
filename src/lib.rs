//! qbackup: back up qcow2 and raw disk images the way QEMU's backup job
//! does, as a standalone program.
//!
//! Layers go one way: `qbackup_formats` (storage I/O and format drivers) →
//! [`source`] (what the commands read: a chain now, an NBD export next) →
//! this crate's commands (`map`, `info`, the backup planner and copier) →
//! `main.rs` (command line). Nothing below `main.rs` parses arguments or
//! decides exit codes.

pub mod backup;
pub mod compare;
pub mod info;
pub mod live;
pub mod manifest;
pub mod map;
pub mod set;
pub mod source;
pub mod verify;
