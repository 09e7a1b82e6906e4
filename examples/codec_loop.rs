//! Tight loop over one codec for profiling: `cargo run --release --example codec_loop -- protobuf decode 1000000`.
//!
//! Uses mimalloc like the criterion bench (bench/codecs.rs). Prints the best of 5 rounds of
//! `N / 5` operations, which is less sensitive to a busy machine than one long round.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use imgw::codec::CodecId;
use imgw::protocol::samples::typical_deliver;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let codec = CodecId::from_name(args.get(1).map_or("protobuf", |s| s)).expect("codec name");
    let what = args.get(2).map_or("decode", |s| s.as_str()).to_string();
    let n: usize = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let env = typical_deliver();
    let mut bytes = Vec::new();
    codec.encode(&env, &mut bytes).unwrap();
    let bytes = bytes::Bytes::from(bytes);
    let strings =
        bytes::Bytes::from(b"clientiosuser_10086Are we still on for lunch today?".to_vec());
    let mut out = Vec::with_capacity(1024);
    let mut acc = 0usize;
    let rounds = 5;
    let per = (n / rounds).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per {
            if what == "floor" {
                // The part of any zero-copy decode of the typical message that parsing cannot
                // remove: four string slices of the input (a reference count each), the ext
                // vector, building the envelope, and dropping it all.
                let b = std::hint::black_box(&strings);
                let s = |i: usize, n: usize| {
                    imgw::protocol::Str::try_from(b.slice(i..i + n)).unwrap_or_default()
                };
                let mut ext = imgw::protocol::Ext::new();
                ext.insert(s(0, 6), s(6, 3));
                let e = imgw::protocol::Envelope::new(imgw::protocol::Message::Deliver(
                    imgw::protocol::Deliver {
                        mid: 1,
                        from: s(9, 10),
                        to: None,
                        inbox_seq: 2,
                        ts: 3,
                        kind: None,
                        body: s(19, 31),
                        ext,
                    },
                ));
                acc += matches!(
                    std::hint::black_box(&e).msg,
                    imgw::protocol::Message::Deliver(_)
                ) as usize;
            } else if what == "prost" {
                let e = imgw::codec::protobuf::decode_prost(std::hint::black_box(&bytes)).unwrap();
                acc += matches!(e.msg, imgw::protocol::Message::Deliver(_)) as usize;
            } else if what == "decode" {
                let e = codec.decode_bytes(std::hint::black_box(&bytes)).unwrap();
                acc += matches!(e.msg, imgw::protocol::Message::Deliver(_)) as usize;
            } else {
                out.clear();
                codec.encode(std::hint::black_box(&env), &mut out).unwrap();
                acc += out.len();
            }
        }
        best = best.min(t.elapsed().as_nanos() as f64 / per as f64);
    }
    println!(
        "{} {what}: {best:.1} ns/op best of {rounds} ({acc})",
        codec.name()
    );
}
