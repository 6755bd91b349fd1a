//! libFuzzer entry for [`openagi_fuzz::model_file`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::model_file(data));
