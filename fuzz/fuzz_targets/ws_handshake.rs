//! Fuzz the WebSocket upgrade request parser with arbitrary bytes and an arbitrary prefix of
//! them: never a panic; an accepted request consumed no more than it was given, its response
//! is well formed and a `hello` from its target is within the bound; a refusal always writes
//! a response.
#![no_main]

use imgw::ws::{accept, Handshake, HandshakeConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = HandshakeConfig {
        allowed_origins: vec!["https://example.com".into()],
        max_header_bytes: 2048,
        ..HandshakeConfig::default()
    };
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let prefix = &input[..input.len().min(usize::from(cut) * 16)];
    for bytes in [prefix, input] {
        let mut out = Vec::new();
        match accept(&cfg, bytes, &mut out) {
            Handshake::Incomplete => {
                assert!(out.is_empty());
                assert!(bytes.len() <= cfg.max_header_bytes);
            }
            Handshake::Accepted(up) => {
                assert!(up.consumed <= bytes.len());
                assert!(out.starts_with(b"HTTP/1.1 101 "));
                assert!(out.ends_with(b"\r\n\r\n"));
                if let Some(hello) = &up.hello {
                    assert!(
                        !hello.is_empty()
                            && cfg.max_hello_bytes.is_some_and(|max| hello.len() <= max)
                    );
                }
            }
            Handshake::Rejected(_) => assert!(out.starts_with(b"HTTP/1.1 4")),
        }
    }
});
