//! Clearing every persistent dirty bitmap of a fuzzed image on writable
//! memory, then reopening it, as `qbackup_fuzz::exercise_bitmap_clear` does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qbackup_fuzz::exercise_bitmap_clear(data);
});
