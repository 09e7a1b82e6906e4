//! Fuzz the protobuf decoder: any input gives a message or an error, never a panic; it agrees
//! with prost's generated decoder (same message, or both refuse; the one allowed difference is
//! nesting past `MAX_DEPTH`, which only ours refuses); a decoded message re-encodes and decodes
//! to itself.
#![no_main]

use imgw::codec::{protobuf, CodecId, DecodeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = CodecId::Protobuf.decode(data);
    match (&ours, protobuf::decode_prost(data)) {
        (Ok(a), Ok(b)) => assert_eq!(a, &b),
        (Err(_), Err(_)) | (Err(DecodeError::TooDeep), Ok(_)) => {}
        (a, b) => panic!("ours {a:?}, prost {b:?}"),
    }
    if let Ok(env) = ours {
        let mut out = Vec::new();
        if CodecId::Protobuf.encode(&env, &mut out).is_ok() {
            assert_eq!(CodecId::Protobuf.decode(&out).ok(), Some(env));
        }
    }
});
