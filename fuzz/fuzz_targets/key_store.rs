//! libFuzzer entry for [`openagi_fuzz::key_store`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::key_store(data));
