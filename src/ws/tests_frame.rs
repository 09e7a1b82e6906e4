//! Tests of the frame decoder and encoders (no sockets).

use proptest::collection::vec;
use proptest::prelude::*;

use super::frame::*;
use super::{respond, respond_error, Next};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// An owned copy of an [`Event`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Ev {
    fn from(e: Event<'_>) -> Ev {
        match e {
            Event::Text(t) => Ev::Text(t.to_owned()),
            Event::Binary(b) => Ev::Binary(b.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close { code, reason } => {
                Ev::Close(code.map(CloseCode::as_u16), reason.to_owned())
            }
        }
    }
}

/// Feeds `wire` in chunks of the given sizes (cycled), collecting events until the first error.
fn decode_chunked(
    dec: &mut Decoder,
    wire: &[u8],
    sizes: &[usize],
) -> (Vec<Ev>, Option<ProtocolError>) {
    let mut events = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < wire.len() {
        let n = sizes[i % sizes.len()].max(1).min(wire.len() - pos);
        i += 1;
        // A fresh copy per chunk, like a reused scratch buffer.
        let mut chunk = wire[pos..pos + n].to_vec();
        pos += n;
        let mut input = &mut chunk[..];
        loop {
            match dec.next_event(&mut input) {
                Ok(Some(ev)) => events.push(Ev::from(ev)),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        assert!(input.is_empty(), "Ok(None) with input left");
    }
    (events, None)
}

fn server() -> Decoder {
    Decoder::new(Role::Server, Limits::default())
}

fn decode(wire: &[u8]) -> (Vec<Ev>, Option<ProtocolError>) {
    decode_chunked(&mut server(), wire, &[usize::MAX])
}

fn frame(op: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    write_client_frame(&mut w, op, fin, MASK, payload);
    w
}

/// A masked frame with a raw first byte and a chosen length encoding.
fn raw_frame(b0: u8, len_enc: u8, payload: &[u8]) -> Vec<u8> {
    let mut w = vec![b0];
    match len_enc {
        0 => w.push(0x80 | payload.len() as u8),
        2 => {
            w.push(0x80 | 126);
            w.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        _ => {
            w.push(0x80 | 127);
            w.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    w.extend_from_slice(&MASK);
    let start = w.len();
    w.extend_from_slice(payload);
    apply_mask(&mut w[start..], MASK, 0);
    w
}

#[test]
fn decoder_state_is_small() {
    let size = std::mem::size_of::<Decoder>();
    println!("size_of::<Decoder>() = {size}");
    assert!(size <= 80, "decoder grew to {size} bytes");
}

#[test]
fn whole_frames_are_zero_copy_and_leave_no_allocation() {
    let mut wire = frame(OpCode::Text, true, b"hello");
    wire.extend(frame(OpCode::Binary, true, &[0, 1, 2, 255]));
    wire.extend(frame(OpCode::Ping, true, b"p"));
    wire.extend(frame(OpCode::Pong, true, b""));
    let mut dec = server();
    let mut input = &mut wire[..];
    let start = input.as_ptr() as usize;
    match dec.next_event(&mut input) {
        Ok(Some(Event::Text(t))) => {
            assert_eq!(t, "hello");
            // Borrowed from the input, not copied.
            assert_eq!(t.as_ptr() as usize, start + 6);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        dec.next_event(&mut input),
        Ok(Some(Event::Binary(&[0, 1, 2, 255])))
    );
    assert_eq!(dec.next_event(&mut input), Ok(Some(Event::Ping(b"p"))));
    assert_eq!(dec.next_event(&mut input), Ok(Some(Event::Pong(b""))));
    assert_eq!(dec.next_event(&mut input), Ok(None));
    assert_eq!(dec.heap_bytes(), 0);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn byte_at_a_time_gives_the_same_events_and_frees_after() {
    let mut wire = frame(OpCode::Text, false, "héllo ".as_bytes());
    wire.extend(frame(OpCode::Ping, true, b"mid"));
    wire.extend(frame(OpCode::Continuation, true, "wörld".as_bytes()));
    wire.extend(raw_frame(0x82, 8, &[9; 300]));
    let (whole, err) = decode(&wire);
    assert_eq!(err, None);
    assert_eq!(
        whole,
        vec![
            Ev::Ping(b"mid".to_vec()),
            Ev::Text("héllo wörld".into()),
            Ev::Binary(vec![9; 300])
        ]
    );
    let mut dec = server();
    let (bytewise, err) = decode_chunked(&mut dec, &wire, &[1]);
    assert_eq!(err, None);
    assert_eq!(bytewise, whole);
    // The last call returned Ok(None) after the final message: nothing is kept.
    let mut empty: [u8; 0] = [];
    assert_eq!(dec.next_event(&mut &mut empty[..]), Ok(None));
    assert_eq!(dec.heap_bytes(), 0);
}

#[test]
fn partial_frame_keeps_only_its_bytes() {
    let wire = frame(OpCode::Binary, true, &[7; 1000]);
    let mut dec = server();
    let mut head = wire[..100].to_vec();
    assert_eq!(dec.next_event(&mut &mut head[..]), Ok(None));
    // 4 header bytes (126 + 2 length bytes) + 4 mask bytes were consumed as the header.
    assert_eq!(dec.buffered(), 100 - 8);
    let mut tail = wire[100..].to_vec();
    assert_eq!(
        dec.next_event(&mut &mut tail[..]),
        Ok(Some(Event::Binary(&[7; 1000])))
    );
    assert_eq!(dec.next_event(&mut &mut tail[..0]), Ok(None));
    assert_eq!(dec.heap_bytes(), 0);
}

#[test]
fn masking_rules() {
    // Server role: unmasked client frame.
    let mut w = vec![0x81, 0x02, b'h', b'i'];
    assert_eq!(decode(&w).1, Some(ProtocolError::BadMask));
    assert_eq!(ProtocolError::BadMask.close_code(), CloseCode::Protocol);
    // Client role: a server frame must not be masked...
    let mut dec = Decoder::new(Role::Client, Limits::default());
    assert_eq!(
        decode_chunked(&mut dec, &frame(OpCode::Text, true, b"hi"), &[64]).1,
        Some(ProtocolError::BadMask)
    );
    // ...and an unmasked one decodes.
    let mut dec = Decoder::new(Role::Client, Limits::default());
    assert_eq!(dec.next_event(&mut &mut w[..]), Ok(Some(Event::Text("hi"))));
}

#[test]
fn reserved_bits_and_opcodes_are_protocol_errors() {
    for rsv in [0x10, 0x20, 0x40] {
        assert_eq!(
            decode(&raw_frame(0x81 | rsv, 0, b"x")).1,
            Some(ProtocolError::ReservedBits)
        );
    }
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let err = decode(&raw_frame(0x80 | op, 0, b"")).1;
        assert_eq!(err, Some(ProtocolError::ReservedOpcode(op)));
        assert_eq!(err.map(|e| e.close_code().as_u16()), Some(1002));
    }
}

#[test]
fn control_frame_rules() {
    assert_eq!(
        decode(&raw_frame(0x89, 2, &[0; 126])).1,
        Some(ProtocolError::ControlTooLong)
    );
    assert_eq!(
        decode(&raw_frame(0x89, 0, &[0; 125])).0,
        vec![Ev::Ping(vec![0; 125])]
    );
    assert_eq!(
        decode(&raw_frame(0x09, 0, b"a")).1,
        Some(ProtocolError::FragmentedControl)
    );
    assert_eq!(
        decode(&raw_frame(0x08, 0, b"")).1,
        Some(ProtocolError::FragmentedControl)
    );
    // Non-minimal length encodings of a control frame's length are fine when <= 125... but a
    // 16-bit length field on a control frame is itself "len7 = 126" and is refused.
    assert_eq!(
        decode(&raw_frame(0x8A, 2, b"x")).1,
        Some(ProtocolError::ControlTooLong)
    );
}

#[test]
fn fragmentation_rules() {
    assert_eq!(
        decode(&frame(OpCode::Continuation, true, b"x")).1,
        Some(ProtocolError::UnexpectedContinuation)
    );
    let mut w = frame(OpCode::Text, false, b"a");
    w.extend(frame(OpCode::Text, true, b"b"));
    assert_eq!(decode(&w).1, Some(ProtocolError::ExpectedContinuation));
    let mut w = frame(OpCode::Binary, false, b"a");
    w.extend(frame(OpCode::Binary, true, b"b"));
    assert_eq!(decode(&w).1, Some(ProtocolError::ExpectedContinuation));
    // A finished message lets a new one start; empty fragments are fine.
    let mut w = frame(OpCode::Text, false, b"");
    w.extend(frame(OpCode::Continuation, false, b""));
    w.extend(frame(OpCode::Pong, true, b"q"));
    w.extend(frame(OpCode::Continuation, true, b""));
    w.extend(frame(OpCode::Binary, true, b""));
    w.extend(frame(OpCode::Continuation, true, b""));
    let (evs, err) = decode(&w);
    assert_eq!(
        evs,
        vec![
            Ev::Pong(b"q".to_vec()),
            Ev::Text(String::new()),
            Ev::Binary(vec![])
        ]
    );
    assert_eq!(err, Some(ProtocolError::UnexpectedContinuation));
}

#[test]
fn length_encodings() {
    // Non-minimal encodings are accepted.
    for enc in [0u8, 2, 8] {
        assert_eq!(
            decode(&raw_frame(0x82, enc, b"abc")).0,
            vec![Ev::Binary(b"abc".to_vec())]
        );
    }
    // A 64-bit length with the top bit set is invalid, whatever the limits.
    let mut dec = Decoder::new(Role::Server, Limits::new(u32::MAX, u32::MAX));
    let mut w = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
    assert_eq!(
        dec.next_event(&mut &mut w[..]),
        Err(ProtocolError::InvalidLength)
    );
    assert!(dec.is_closed());
}

#[test]
fn oversize_frames_are_refused_before_their_payload() {
    let mut dec = Decoder::new(Role::Server, Limits::new(1000, 1500));
    // Only the header of a 1001-byte frame.
    let mut hdr = raw_frame(0x82, 2, &[0; 1001])[..8].to_vec();
    assert_eq!(
        dec.next_event(&mut &mut hdr[..]),
        Err(ProtocolError::FrameTooLarge {
            len: 1001,
            max: 1000
        })
    );
    assert_eq!(dec.heap_bytes(), 0);
    assert_eq!(
        ProtocolError::FrameTooLarge { len: 0, max: 0 }.close_code(),
        CloseCode::TooBig
    );

    // Fragments adding up past the message limit: refused at the header of the one that
    // crosses it.
    let mut dec = Decoder::new(Role::Server, Limits::new(1000, 1500));
    let mut w = frame(OpCode::Binary, false, &[1; 1000]);
    w.extend_from_slice(&frame(OpCode::Continuation, true, &[2; 501])[..8]);
    let (evs, err) = decode_chunked(&mut dec, &w, &[usize::MAX]);
    assert!(evs.is_empty());
    assert_eq!(
        err,
        Some(ProtocolError::MessageTooLarge {
            len: 1501,
            max: 1500
        })
    );
    assert_eq!(dec.heap_bytes(), 0);

    // Exactly at the limits is fine.
    let mut dec = Decoder::new(Role::Server, Limits::new(1000, 1500));
    let mut w = frame(OpCode::Binary, false, &[1; 1000]);
    w.extend(frame(OpCode::Continuation, true, &[2; 500]));
    let (evs, err) = decode_chunked(&mut dec, &w, &[usize::MAX]);
    assert_eq!(err, None);
    assert_eq!(evs.len(), 1);
}

#[test]
fn invalid_utf8_is_1007() {
    let (evs, err) = decode(&frame(OpCode::Text, true, &[b'a', 0xFF]));
    assert!(evs.is_empty());
    assert_eq!(err, Some(ProtocolError::InvalidUtf8));
    assert_eq!(ProtocolError::InvalidUtf8.close_code().as_u16(), 1007);
    // Binary is not checked.
    assert_eq!(decode(&frame(OpCode::Binary, true, &[0xFF])).1, None);
    // A code point split across fragments is fine.
    let s = "κόσμε€𝄞".as_bytes();
    for cut in 0..=s.len() {
        let mut w = frame(OpCode::Text, false, &s[..cut]);
        w.extend(frame(OpCode::Continuation, true, &s[cut..]));
        assert_eq!(
            decode(&w),
            (vec![Ev::Text("κόσμε€𝄞".into())], None),
            "cut {cut}"
        );
    }
    // A message ending inside a code point is invalid.
    let mut w = frame(OpCode::Text, false, b"ok");
    w.extend(frame(OpCode::Continuation, true, &[0xE2, 0x82]));
    assert_eq!(decode(&w).1, Some(ProtocolError::InvalidUtf8));
    assert_eq!(
        decode(&frame(OpCode::Text, true, &[0xF0, 0x9D])).1,
        Some(ProtocolError::InvalidUtf8)
    );
    // Surrogates and out-of-range code points.
    assert_eq!(
        decode(&frame(OpCode::Text, true, &[0xED, 0xA0, 0x80])).1,
        Some(ProtocolError::InvalidUtf8)
    );
    assert_eq!(
        decode(&frame(OpCode::Text, true, &[0xF4, 0x90, 0x80, 0x80])).1,
        Some(ProtocolError::InvalidUtf8)
    );
}

#[test]
fn invalid_utf8_fails_fast() {
    // First fragment invalid, message not finished: the error comes with that fragment.
    let mut dec = server();
    let mut w = frame(OpCode::Text, false, &[b'a', 0xC0, 0x80]);
    assert_eq!(
        dec.next_event(&mut &mut w[..]),
        Err(ProtocolError::InvalidUtf8)
    );

    // One frame arriving in pieces: the error comes with the first piece holding the bad byte,
    // long before the frame is complete.
    let mut payload = "valid text ".repeat(20).into_bytes();
    payload.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80]);
    payload.extend_from_slice(&[b'z'; 1000]);
    let wire = frame(OpCode::Text, true, &payload);
    let bad_at = 8 + 220 + 2; // header, valid prefix, F4 90 is already impossible
    let mut dec = server();
    let mut first = wire[..bad_at - 1].to_vec();
    assert_eq!(dec.next_event(&mut &mut first[..]), Ok(None));
    let mut second = wire[bad_at - 1..bad_at].to_vec();
    assert_eq!(
        dec.next_event(&mut &mut second[..]),
        Err(ProtocolError::InvalidUtf8)
    );
}

#[test]
fn close_frames() {
    let (evs, err) = decode(&frame(OpCode::Close, true, b""));
    assert_eq!((evs, err), (vec![Ev::Close(None, String::new())], None));
    assert_eq!(
        decode(&frame(OpCode::Close, true, &[0x03])).1,
        Some(ProtocolError::ClosePayloadTooShort)
    );
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            decode(&frame(OpCode::Close, true, &p)),
            (vec![Ev::Close(Some(code), "bye ✓".into())], None),
            "code {code}"
        );
    }
    for code in [
        0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let err = decode(&frame(OpCode::Close, true, &code.to_be_bytes())).1;
        assert_eq!(err, Some(ProtocolError::InvalidCloseCode(code)));
        assert_eq!(err.map(|e| e.close_code()), Some(CloseCode::Protocol));
    }
    let err = decode(&frame(OpCode::Close, true, &[0x03, 0xE8, 0xFF])).1;
    assert_eq!(err, Some(ProtocolError::InvalidCloseReason));
    assert_eq!(err.map(|e| e.close_code()), Some(CloseCode::InvalidPayload));
    assert_eq!(
        decode(&raw_frame(0x88, 0, &[b'x'; 126])).1,
        Some(ProtocolError::ControlTooLong)
    );

    // Everything after a Close is discarded, even garbage.
    let mut w = frame(OpCode::Close, true, &1000u16.to_be_bytes());
    w.extend(frame(OpCode::Text, true, b"after"));
    w.extend([0xFF; 10]);
    let mut dec = server();
    let (evs, err) = decode_chunked(&mut dec, &w, &[3]);
    assert_eq!(
        (evs, err),
        (vec![Ev::Close(Some(1000), String::new())], None)
    );
    assert!(dec.is_closed());
    assert_eq!(dec.heap_bytes(), 0);
}

#[test]
fn close_code_values_round_trip() {
    for n in 0..=u16::MAX {
        if let Some(c) = CloseCode::from_u16(n) {
            assert_eq!(c.as_u16(), n);
        }
    }
    assert_eq!(CloseCode::Private(17).as_u16(), 1008);
    assert_eq!(CloseCode::Registered(4000).as_u16(), 1008);
    assert_eq!(CloseCode::Normal.to_string(), "1000");
}

#[test]
fn after_an_error_input_is_discarded() {
    let mut dec = server();
    let mut w = [0x81, 0x01, b'x'];
    assert_eq!(dec.next_event(&mut &mut w[..]), Err(ProtocolError::BadMask));
    let mut more = frame(OpCode::Text, true, b"ok");
    let mut input = &mut more[..];
    assert_eq!(dec.next_event(&mut input), Ok(None));
    assert!(input.is_empty());
}

/// Decodes server frames with a client-role decoder.
fn client_decode(wire: &[u8]) -> Vec<Ev> {
    let mut dec = Decoder::new(Role::Client, Limits::new(1 << 20, 1 << 20));
    let (evs, err) = decode_chunked(&mut dec, wire, &[7]);
    assert_eq!(err, None);
    evs
}

#[test]
fn encoder_round_trips_all_length_forms() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut w = Vec::new();
        write_binary(&mut w, &payload);
        assert_eq!(w.len(), header_len_for(len) + len);
        assert_eq!(client_decode(&w), vec![Ev::Binary(payload.clone())]);

        let mut v = b"prefix".to_vec();
        write_message_with(&mut v, OpCode::Binary, |out| {
            out.extend_from_slice(&payload);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(&v[..6], b"prefix");
        assert_eq!(&v[6..], &w[..], "len {len}");
    }
    let mut v = b"keep".to_vec();
    let r = write_message_with(&mut v, OpCode::Text, |out| {
        out.extend_from_slice(b"partial");
        Err("codec failed")
    });
    assert_eq!(r, Err("codec failed"));
    assert_eq!(v, b"keep");
}

#[test]
fn encoder_control_frames() {
    let mut w = Vec::new();
    write_text(&mut w, "hi");
    write_ping(&mut w, &[1; 200]); // truncated to 125
    write_pong(&mut w, b"p");
    write_close(&mut w, Some(CloseCode::GoingAway), &"é".repeat(100)); // cut at a char boundary
    write_close(&mut w, None, "ignored");
    let evs = client_decode(&w);
    assert_eq!(evs[0], Ev::Text("hi".into()));
    assert_eq!(evs[1], Ev::Ping(vec![1; 125]));
    assert_eq!(evs[2], Ev::Pong(b"p".to_vec()));
    assert_eq!(evs[3], Ev::Close(Some(1001), "é".repeat(61)));
    assert_eq!(evs.len(), 4, "nothing after the first close");
    let mut c = Vec::new();
    write_close(&mut c, None, "ignored");
    assert_eq!(c, [0x88, 0x00]);
}

#[test]
fn client_encoder_masks() {
    let mut w = Vec::new();
    write_client_close(&mut w, MASK, Some(CloseCode::Normal), "done");
    assert_eq!(w[1], 0x80 | 6);
    assert_eq!(decode(&w).0, vec![Ev::Close(Some(1000), "done".into())]);
}

#[test]
fn respond_answers_the_protocol_part() {
    let mut out = Vec::new();
    assert_eq!(
        respond(&Event::Ping(b"abc"), false, &mut out),
        Next::Continue
    );
    assert_eq!(client_decode(&out), vec![Ev::Pong(b"abc".to_vec())]);

    let mut out = Vec::new();
    assert_eq!(respond(&Event::Text("x"), false, &mut out), Next::Continue);
    assert_eq!(respond(&Event::Pong(b""), false, &mut out), Next::Continue);
    assert!(out.is_empty());

    let close = Event::Close {
        code: Some(CloseCode::Private(4001)),
        reason: "r",
    };
    assert_eq!(respond(&close, false, &mut out), Next::Close);
    assert_eq!(
        client_decode(&out),
        vec![Ev::Close(Some(4001), String::new())]
    );

    let mut out = Vec::new();
    let empty = Event::Close {
        code: None,
        reason: "",
    };
    assert_eq!(respond(&empty, false, &mut out), Next::Close);
    assert_eq!(
        client_decode(&out),
        vec![Ev::Close(Some(1000), String::new())]
    );

    // After our own Close, the peer's answer needs no reply.
    let mut out = Vec::new();
    assert_eq!(respond(&empty, true, &mut out), Next::Close);
    assert_eq!(respond(&Event::Ping(b""), true, &mut out), Next::Continue);
    assert!(out.is_empty());

    assert_eq!(
        respond_error(ProtocolError::InvalidUtf8, &mut out),
        Next::Close
    );
    assert_eq!(
        client_decode(&out),
        vec![Ev::Close(Some(1007), "invalid utf-8".into())]
    );
}

/// Splits `len` at the given cut points (taken modulo len + 1, sorted).
fn fragments(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points {
        out.push((start, p));
        start = p;
    }
    out.push((start, len));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any message, split into any fragments (with pings between them) and fed in any chunk
    /// sizes, decodes to the same message.
    #[test]
    fn fragments_and_chunks_reassemble(
        text in any::<bool>(),
        s in "\\PC{0,400}",
        bin in vec(any::<u8>(), 0..1200),
        cuts in vec(any::<usize>(), 0..8),
        pings in vec(any::<bool>(), 8),
        sizes in vec(1usize..300, 1..20),
        mask in any::<[u8; 4]>(),
    ) {
        let payload: &[u8] = if text { s.as_bytes() } else { &bin };
        let frags = fragments(payload.len(), &cuts);
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for (i, &(a, b)) in frags.iter().enumerate() {
            let op = if i > 0 { OpCode::Continuation } else if text { OpCode::Text } else { OpCode::Binary };
            write_client_frame(&mut wire, op, i + 1 == frags.len(), mask, &payload[a..b]);
            if i + 1 < frags.len() && pings[i % pings.len()] {
                write_client_frame(&mut wire, OpCode::Ping, true, mask, &[i as u8; 3]);
                expected.push(Ev::Ping(vec![i as u8; 3]));
            }
        }
        expected.push(if text { Ev::Text(s.clone()) } else { Ev::Binary(bin.clone()) });
        // A second message right behind, to check the state resets.
        write_client_frame(&mut wire, OpCode::Binary, true, mask, b"next");
        expected.push(Ev::Binary(b"next".to_vec()));

        let mut dec = server();
        let (evs, err) = decode_chunked(&mut dec, &wire, &sizes);
        prop_assert_eq!(err, None);
        prop_assert_eq!(evs, expected);
        let mut nothing: [u8; 0] = [];
        prop_assert_eq!(dec.next_event(&mut &mut nothing[..]), Ok(None));
        prop_assert_eq!(dec.heap_bytes(), 0);
    }

    /// Garbage never panics, whatever the role, limits and chunking; the decoder consumes all
    /// input and keeps no more than the input's size.
    #[test]
    fn garbage_never_panics(
        bytes in vec(any::<u8>(), 0..2000),
        sizes in vec(1usize..100, 1..10),
        client in any::<bool>(),
        max in 0u32..5000,
    ) {
        let role = if client { Role::Client } else { Role::Server };
        let mut dec = Decoder::new(role, Limits::new(max, max));
        let (_, err) = decode_chunked(&mut dec, &bytes, &sizes);
        if err.is_none() {
            prop_assert!(dec.buffered() <= bytes.len());
        }
    }

    /// Garbage after a valid prefix never panics either (exercises mid-message states).
    #[test]
    fn garbage_after_valid_frames(
        tail in vec(any::<u8>(), 0..500),
        sizes in vec(1usize..50, 1..10),
    ) {
        let mut wire = frame(OpCode::Text, false, "fragment ".as_bytes());
        wire.extend(frame(OpCode::Ping, true, b"x"));
        wire.extend(tail);
        let _ = decode_chunked(&mut server(), &wire, &sizes);
    }

    /// A declared length above the limit is refused from the header alone, nothing buffered.
    #[test]
    fn hostile_lengths_refused_before_buffering(
        len in 1025u64..(1 << 63),
        enc16 in any::<bool>(),
        op in prop_oneof![Just(0x81u8), Just(0x82u8), Just(0x01u8), Just(0x02u8)],
    ) {
        let mut dec = Decoder::new(Role::Server, Limits::new(1024, 1024));
        let mut hdr = vec![op];
        if enc16 && len <= 0xFFFF {
            hdr.push(0x80 | 126);
            hdr.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            hdr.push(0x80 | 127);
            hdr.extend_from_slice(&len.to_be_bytes());
        }
        hdr.extend_from_slice(&MASK);
        let r = dec.next_event(&mut &mut hdr[..]);
        prop_assert!(
            matches!(r, Err(ProtocolError::FrameTooLarge { .. })),
            "{:?}", r
        );
        prop_assert_eq!(dec.heap_bytes(), 0);
    }
}
