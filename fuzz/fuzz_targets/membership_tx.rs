//! libFuzzer entry for [`openagi_fuzz::membership_tx`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::membership_tx(data));
