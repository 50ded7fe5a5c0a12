//! A qcow2 image from bytes: header and extensions, L1, bitmaps directory
//! and tables, then L2 walking, block status, reads (compressed clusters
//! included) and dirty bitmaps, as `qbackup_fuzz::exercise_image` does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qbackup_fuzz::exercise_image(data);
});
