//! libFuzzer entry for [`openagi_fuzz::consensus_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::consensus_message(data));
