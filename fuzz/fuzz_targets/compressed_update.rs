//! libFuzzer entry for [`openagi_fuzz::compressed_update`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::compressed_update(data));
