//! libFuzzer entry for [`openagi_fuzz::mesh_envelope`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::mesh_envelope(data));
