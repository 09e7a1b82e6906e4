//! Fuzz the flatbuffers decoder: any input gives a message or an error, never a panic; a decoded
//! message re-encodes and decodes to itself.
#![no_main]

use imgw::codec::CodecId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = CodecId::FlatBuffers.decode(data) {
        let mut out = Vec::new();
        if CodecId::FlatBuffers.encode(&env, &mut out).is_ok() {
            assert_eq!(CodecId::FlatBuffers.decode(&out).ok(), Some(env));
        }
    }
});
