//! Fuzz the admin API: its request-head parser on arbitrary bytes, then the router on what it
//! parsed (body included), with no shard behind it: never a panic, a head never claims more
//! than it was given, every answer has a real status.
#![no_main]

use imgw::admin::{parse_head, route, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use imgw::control::Control;
use imgw::metrics::Metrics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HEAD_BYTES + MAX_BODY_BYTES)];
    let head = match parse_head(data) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(refusal) => {
            assert!((400..600).contains(&refusal.status));
            return;
        }
    };
    assert!(head.head_len <= data.len());
    assert!(head.body_len <= MAX_BODY_BYTES);
    let end = (head.head_len + head.body_len).min(data.len());
    let body = &data[head.head_len..end];
    let control = Control::new(2);
    let metrics = Metrics::new(2);
    let r = route(&head.method, &head.path, body, &control, &metrics);
    assert!((200..600).contains(&r.status), "{}", r.status);
});
