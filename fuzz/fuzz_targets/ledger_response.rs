//! libFuzzer entry for [`openagi_fuzz::ledger_response`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::ledger_response(data));
