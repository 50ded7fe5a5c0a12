//! Backing up running VMs: a front end freezes every disk of a VM at one
//! point in time and exports it over NBD; the backup itself is the usual
//! [`crate::backup::run`] of each export into the set
//! ([`crate::set::layout`]).
//!
//! `libvirt` (feature `libvirt`): a libvirt domain through libvirt's
//! pull-mode backup API and checkpoints.

#[cfg(feature = "libvirt")]
pub mod libvirt;
