//! Fuzz the flatbuffers decoder: any input gives a message or an error, never a panic; the
//! zero-copy conversion gives the same message as the copying one; a decoded message
//! re-encodes and decodes to itself.
#![no_main]

use bytes::Bytes;
use imgw::codec::{flatbuf, CodecId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let decoded = CodecId::FlatBuffers.decode_bytes(&bytes);
    assert_eq!(decoded, flatbuf::view(data).and_then(|v| v.to_envelope()));
    if let Ok(env) = decoded {
        let mut out = Vec::new();
        if CodecId::FlatBuffers.encode(&env, &mut out).is_ok() {
            assert_eq!(CodecId::FlatBuffers.decode(&out).ok(), Some(env));
        }
    }
});
