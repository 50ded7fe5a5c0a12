//! Shared helpers for the end-to-end tests: build images with qemu-img and
//! qemu-io, run `qbackup` with a time limit, and compare what it does with
//! qemu-img, which is the oracle for everything here.
//!
//! Every helper panics with a readable message on failure, so a test body is
//! a short list of "build this image, then check that". Each test crate
//! imports the helpers it uses by their module (`use
//! common::scratch::Scratch;`): the module says what kind of helper it is.
//!
//! - [`scratch`]: temporary directories, images built with qemu-img/qemu-io.
//! - [`run`]: running commands and `qbackup` (with a time limit), its outputs
//!   and the error contract.
//! - [`oracle`]: qemu-img's `map`/`info` parsed, guest bytes, and the
//!   verdicts of `check` (clean) and `compare` (identical).
//! - [`compare`]: `map` and `info` against qemu-img's.
//! - [`qcow2`]: byte patching and reading, header fields, the L1/L2 walk.
//! - [`content`]: deterministic compressible and random test content.
//! - [`backup`]: source images and checked or incremental backups shared by
//!   the backup tests.
//! - [`map_info`]: fixtures shared by the `map` and `info` tests.
//! - [`process`]: qemu-nbd and QEMU started by tests, and a QMP client.
//! - [`tls`]: certificates made with openssl, free TCP ports.
//! - [`set`]: backup sets listed, and their backups restored and compared.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

pub mod backup;
pub mod compare;
pub mod content;
pub mod libvirt;
pub mod live;
pub mod map_info;
pub mod oracle;
pub mod parity;
pub mod process;
pub mod qcow2;
pub mod run;
pub mod scratch;
pub mod set;
pub mod tls;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// One `#[test]` per row, each calling `case` with the row's arguments:
///
/// ```ignore
/// test_cases! { cluster_size_case =>
///     /// Doc comments and other attributes are kept.
///     qcow2_cluster_512(512);
///     qcow2_cluster_4096(4096);
/// }
/// ```
#[allow(unused_macros)]
macro_rules! test_cases {
    ($case:path => $($(#[$attr:meta])* $name:ident($($arg:expr),* $(,)?);)*) => {
        $(
            $(#[$attr])*
            #[test]
            fn $name() {
                $case($($arg),*);
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use test_cases;
