//! libFuzzer entry for [`openagi_fuzz::pbft_replica`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::pbft_replica(data));
