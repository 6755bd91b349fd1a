//! libFuzzer entry for [`openagi_fuzz::job_spec`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::job_spec(data));
