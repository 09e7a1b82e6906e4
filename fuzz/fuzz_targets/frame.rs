//! Fuzz the raw-TCP frame decoder fed in arbitrary chunks: never a panic, never a frame above
//! the limit, never a buffer that grows past the limit.
#![no_main]

use bytes::BytesMut;
use imgw::protocol::frame::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 64 + u32::from(split) * 8;
    let dec = FrameDecoder::new(max);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(usize::from(split).max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.header.frame_len() <= u64::from(max));
                    let _ = f.extensions().count();
                    let _ = f.header.codec.decode(&f.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.len() <= max as usize + chunk.len());
    }
});
