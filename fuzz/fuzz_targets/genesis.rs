//! libFuzzer entry for [`openagi_fuzz::genesis`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::genesis(data));
