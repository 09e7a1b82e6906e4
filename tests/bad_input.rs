//! Hostile input: every decoder returns a typed error (never panics) and never allocates more
//! than a small multiple of the input's length. A counting allocator measures each decode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use imgw::codec::{CodecId, DecodeError};
use imgw::protocol::frame::{FrameDecoder, FrameError, Header};
use imgw::protocol::samples;
use proptest::prelude::*;

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocation budget for decoding `len` bytes: a constant for fixed-size bookkeeping
/// (a B-tree node, an error message) plus a small multiple of the input.
fn budget(len: usize) -> usize {
    16 * 1024 + 32 * len
}

/// Decodes and returns the result with the bytes allocated meanwhile on this thread.
fn measured(codec: CodecId, bytes: &[u8]) -> (Result<(), DecodeError>, usize) {
    let bytes = bytes::Bytes::copy_from_slice(bytes);
    let before = ALLOCATED.with(|a| a.get());
    let r = codec.decode_bytes(&bytes).map(|_| ());
    let used = ALLOCATED.with(|a| a.get()) - before;
    (r, used)
}

fn check_bounded(codec: CodecId, bytes: &[u8]) -> Result<(), DecodeError> {
    let (r, used) = measured(codec, bytes);
    assert!(
        used <= budget(bytes.len()),
        "{} allocated {used} bytes for a {}-byte input",
        codec.name(),
        bytes.len()
    );
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn garbage_never_panics_or_overallocates(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for codec in CodecId::ALL {
            let _ = check_bounded(codec, &bytes);
        }
    }

    /// Valid encodings with some bytes flipped: close to valid, so they reach deep paths.
    #[test]
    fn mutated_samples_never_panic(ix in 0..22usize, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let all = samples::all();
        let (_, env) = &all[ix % all.len()];
        for codec in CodecId::ALL {
            let mut bytes = Vec::new();
            if codec.encode(env, &mut bytes).is_err() {
                continue;
            }
            for (at, val) in &flips {
                let n = bytes.len();
                bytes[at % n] ^= val;
            }
            let _ = check_bounded(codec, &bytes);
        }
    }

    #[test]
    fn frame_decoder_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2000), max in 12u32..4096) {
        let dec = FrameDecoder::new(max);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => prop_assert!(f.header.frame_len() <= u64::from(max)),
                Ok(None) => {
                    prop_assert!(buf.capacity() <= bytes.len().max(max as usize) * 2 + 64);
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    for (name, env) in samples::all() {
        for codec in CodecId::ALL {
            let mut bytes = Vec::new();
            codec.encode(&env, &mut bytes).unwrap();
            for cut in 0..bytes.len() {
                let r = check_bounded(codec, &bytes[..cut]);
                match codec {
                    // A Protobuf prefix that ends on a field boundary is itself a valid message.
                    CodecId::Protobuf => {}
                    // FlatBuffers has no length of its own: up to 3 trailing bytes are
                    // alignment padding, and a prefix without them is the same message.
                    CodecId::FlatBuffers if r.is_ok() => {
                        assert!(bytes.len() - cut <= 3, "{name}: {cut}-byte prefix accepted");
                        assert_eq!(codec.decode(&bytes[..cut]).unwrap(), env);
                    }
                    _ => assert!(
                        r.is_err(),
                        "{} accepted a {cut}-byte prefix of {name}",
                        codec.name()
                    ),
                }
            }
        }
    }
}

#[test]
fn lying_lengths_are_refused_without_allocating() {
    let cases: &[(CodecId, &[u8])] = &[
        // MessagePack: array32 / map32 / str32 / bin32 claiming ~4 G entries or bytes.
        (CodecId::MessagePack, &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
        (
            CodecId::MessagePack,
            &[0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'a'],
        ),
        (
            CodecId::MessagePack,
            &[
                0x81, 0xa5, b'u', b's', b'e', b'r', b's', 0xdd, 0x7f, 0xff, 0xff, 0xff, 0xa0,
            ],
        ),
        (CodecId::MessagePack, &[0xdb, 0xff, 0xff, 0xff, 0xff, b'x']),
        (CodecId::MessagePack, &[0xc6, 0xff, 0xff, 0xff, 0xff, b'x']),
        // Protobuf: field 12 (presence_sub), length-delimited, length 2^62.
        (
            CodecId::Protobuf,
            &[
                0x62, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40, 0x0a,
            ],
        ),
        // JSON: a string that never ends.
        (CodecId::Json, b"{\"op\":\"send\",\"body\":\"aaaaaaaa"),
        // FlatBuffers: root offset far past the end.
        (
            CodecId::FlatBuffers,
            &[0xff, 0xff, 0xff, 0x7f, b'I', b'M', b'G', b'W'],
        ),
        // Hessian: untyped map whose key is a string claiming 65535 UTF-16 units.
        (CodecId::Hessian, &[b'H', b'S', 0xff, 0xff, b'a']),
        // Hessian: fixed-length list claiming 2^31 elements.
        (CodecId::Hessian, &[b'X', 0x7f, 0xff, 0xff, 0xff, b'N']),
    ];
    for (codec, bytes) in cases {
        let r = check_bounded(*codec, bytes);
        assert!(r.is_err(), "{} accepted {bytes:02x?}", codec.name());
    }
}

#[test]
fn deep_nesting_is_refused() {
    let depth = 100_000;
    let mut json = b"{\"op\":\"ok\",\"x\":".to_vec();
    json.extend(std::iter::repeat_n(b'[', depth));
    assert!(check_bounded(CodecId::Json, &json).is_err());

    // MessagePack: map {"x": [[[[...]]]]}
    let mut mp = vec![0x81, 0xa1, b'x'];
    mp.extend(std::iter::repeat_n(0x91, depth));
    mp.push(0xc0);
    assert_eq!(
        check_bounded(CodecId::MessagePack, &mp),
        Err(DecodeError::TooDeep)
    );

    // Protobuf: nested unknown groups (start-group wire type 3) under field 30.
    let mut pb = Vec::new();
    for _ in 0..depth {
        pb.push((30 << 3) | 3);
    }
    assert!(check_bounded(CodecId::Protobuf, &pb).is_err());

    // Hessian: lists nested inside a map value.
    let mut h = vec![b'H', 0x01, b'x'];
    h.extend(std::iter::repeat_n(0x79, depth));
    assert!(check_bounded(CodecId::Hessian, &h).is_err());
}

#[test]
fn invalid_utf8_is_refused() {
    // JSON op with a lone 0xff byte inside a string.
    assert!(check_bounded(CodecId::Json, b"{\"op\":\"ping\",\"x\":\"\xff\"}").is_err());
    // MessagePack: {"op": <fixstr 0xff>}
    assert!(check_bounded(CodecId::MessagePack, &[0x81, 0xa2, b'o', b'p', 0xa1, 0xff]).is_err());
    // Protobuf: group_join{group: "\xff"}
    assert!(check_bounded(CodecId::Protobuf, &[0x72, 0x03, 0x0a, 0x01, 0xff]).is_err());
}

#[test]
fn unknown_op_is_reported_with_its_ref() {
    let r = CodecId::Json.decode(br#"{"op":"teleport","ref":9,"to":"mars"}"#);
    assert_eq!(
        r,
        Err(DecodeError::UnknownOp {
            op: "teleport".into(),
            reference: Some(9)
        })
    );
}

#[test]
fn oversized_frame_refused_before_body() {
    let mut head = Vec::new();
    Header {
        version: 1,
        op: 5,
        codec: CodecId::Json,
        flags: 0,
        ext_len: 0,
        payload_len: u32::MAX,
    }
    .write(&mut head);
    let before = ALLOCATED.with(|a| a.get());
    let r = FrameDecoder::new(65_536).decode(&mut BytesMut::from(&head[..]));
    assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    assert!(ALLOCATED.with(|a| a.get()) - before < 1024);
}
