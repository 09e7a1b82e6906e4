//! Fuzz the hessian decoder: any input gives a message or an error, never a panic; a decoded
//! message re-encodes and decodes to itself.
#![no_main]

use imgw::codec::CodecId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = CodecId::Hessian.decode(data) {
        let mut out = Vec::new();
        if CodecId::Hessian.encode(&env, &mut out).is_ok() {
            assert_eq!(CodecId::Hessian.decode(&out).ok(), Some(env));
        }
    }
});
