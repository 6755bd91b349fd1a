//! libFuzzer entry for [`openagi_fuzz::invite`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::invite(data));
