//! Fuzz the WebSocket frame decoder (server side, so client frames must be masked) fed in
//! arbitrary chunks: never a panic, never a message above the limit, text always UTF-8, and
//! after an error or a Close the decoder takes nothing more.
#![no_main]

use imgw::ws::{Decoder, Event, Limits, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 16 + u32::from(split) * 8;
    let mut dec = Decoder::new(Role::Server, Limits::new(max, max));
    let mut owned = rest.to_vec();
    for chunk in owned.chunks_mut(usize::from(split % 97).max(1)) {
        let mut input: &mut [u8] = chunk;
        loop {
            match dec.next_event(&mut input) {
                Ok(Some(Event::Text(t))) => assert!(t.len() <= max as usize),
                Ok(Some(Event::Binary(b))) => assert!(b.len() <= max as usize),
                Ok(Some(Event::Ping(p) | Event::Pong(p))) => assert!(p.len() <= 125),
                Ok(Some(Event::Close { reason, .. })) => {
                    assert!(reason.len() <= 123);
                    assert!(dec.is_closed());
                    return;
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(dec.is_closed());
                    return;
                }
            }
        }
        // A partial message, a control frame interleaved in it (at most 125 bytes) and a
        // frame header (at most 14) are all it keeps.
        assert!(
            dec.buffered() <= max as usize + 125 + 14,
            "buffered {} max {max}",
            dec.buffered()
        );
    }
});
