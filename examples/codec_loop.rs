//! Tight loop over one codec for profiling: `cargo run --release --example codec_loop -- protobuf decode 1000000`.
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
    let t = Instant::now();
    let mut out = Vec::with_capacity(1024);
    let mut acc = 0usize;
    for _ in 0..n {
        if what == "decode" {
            let e = codec.decode_bytes(std::hint::black_box(&bytes)).unwrap();
            acc += matches!(e.msg, imgw::protocol::Message::Deliver(_)) as usize;
        } else {
            out.clear();
            codec.encode(std::hint::black_box(&env), &mut out).unwrap();
            acc += out.len();
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{} {what}: {ns:.1} ns/op ({acc})", codec.name());
}
