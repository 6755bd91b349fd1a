//! libFuzzer entry for [`openagi_fuzz::sealed_envelope`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::sealed_envelope(data));
