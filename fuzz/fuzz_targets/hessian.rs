//! Fuzz the hessian decoder: any input gives a message or an error, never a panic; the direct
//! reader plus fallback gives exactly what the general serde path gives; a decoded message
//! re-encodes and decodes to itself.
#![no_main]

use bytes::Bytes;
use imgw::codec::{hessian, CodecId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let decoded = CodecId::Hessian.decode_bytes(&bytes);
    assert_eq!(decoded, hessian::decode_serde(&bytes));
    if let Ok(env) = decoded {
        let mut out = Vec::new();
        if CodecId::Hessian.encode(&env, &mut out).is_ok() {
            assert_eq!(CodecId::Hessian.decode(&out).ok(), Some(env));
        }
    }
});
