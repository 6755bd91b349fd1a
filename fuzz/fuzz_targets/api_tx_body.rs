//! libFuzzer entry for [`openagi_fuzz::api_tx_body`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::api_tx_body(data));
