//! The NBD client (handshake, option replies, simple/structured/extended
//! reply chunks, reads and block status, plain and shared connections)
//! against a server that sends the fuzz input; see `qbackup_fuzz::nbd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qbackup_fuzz::exercise_client(data);
});
