//! libFuzzer entry for [`openagi_fuzz::gossip_announce`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| openagi_fuzz::gossip_announce(data));
