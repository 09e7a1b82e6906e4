//! Codec benchmark on the typical IM message (SPEC 9), plus the raw-TCP frame decoder.
//!
//! `cargo bench --bench codecs` runs criterion, then prints the table (format, bytes, encode
//! ns, decode ns, the seed's Go figures and the speed-ups) and writes it as JSON to
//! bench/results/codecs.json. Figures are criterion's median estimates.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use criterion::{Criterion, Throughput};
use imgw::codec::CodecId;
use imgw::protocol::frame::{write_frame, FrameDecoder};
use imgw::protocol::samples::typical_deliver;

/// The seed's Go figures (bytes, encode us, decode us); FlatBuffers has none.
fn seed(codec: CodecId) -> Option<(u32, f64, f64)> {
    match codec {
        CodecId::Json => Some((156, 1.85, 2.10)),
        CodecId::Protobuf => Some((89, 0.42, 0.58)),
        CodecId::MessagePack => Some((92, 0.51, 0.65)),
        CodecId::Hessian => Some((118, 0.93, 1.10)),
        CodecId::FlatBuffers => None,
    }
}

const FRAMES_PER_ITER: usize = 1000;

fn benches(c: &mut Criterion) {
    let env = typical_deliver();
    let mut g = c.benchmark_group("codec");
    for codec in CodecId::ALL {
        let mut bytes = Vec::new();
        codec.encode(&env, &mut bytes).unwrap();
        // Received payloads are `Bytes` slices of the read buffer; decode shares their memory.
        let bytes = bytes::Bytes::from(bytes);
        let mut out = Vec::with_capacity(1024);
        g.bench_function(format!("{}/encode", codec.name()), |b| {
            b.iter(|| {
                out.clear();
                codec.encode(black_box(&env), &mut out).unwrap();
                black_box(out.len())
            })
        });
        g.bench_function(format!("{}/decode", codec.name()), |b| {
            b.iter(|| codec.decode_bytes(black_box(&bytes)).unwrap())
        });
    }
    g.finish();

    // Frame decoder: a buffer of many coalesced frames, split into frames (payloads sliced).
    let mut stream = Vec::new();
    for _ in 0..FRAMES_PER_ITER {
        write_frame(&mut stream, CodecId::Protobuf, &[], &env).unwrap();
    }
    let dec = FrameDecoder::default();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("decode_1000", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0;
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                n += f.payload.len();
            }
            black_box(n)
        })
    });
    g.finish();
}

fn median_ns(criterion_dir: &Path, group: &str, id: &str) -> Option<f64> {
    let p = criterion_dir
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn report(criterion_dir: &Path, out: &Path) {
    let env = typical_deliver();
    let mut rows = Vec::new();
    println!(
        "\n{:<12} {:>6} {:>10} {:>10} {:>8} {:>12} {:>12} {:>9} {:>9}",
        "format", "bytes", "enc ns", "dec ns", "Go B", "Go enc ns", "Go dec ns", "enc x", "dec x"
    );
    for codec in CodecId::ALL {
        let mut bytes = Vec::new();
        codec.encode(&env, &mut bytes).unwrap();
        let id = |op: &str| format!("{}_{}", codec.name(), op);
        let enc = median_ns(criterion_dir, "codec", &id("encode"));
        let dec = median_ns(criterion_dir, "codec", &id("decode"));
        let s = seed(codec);
        let speedup = |ours: Option<f64>, go_us: Option<f64>| match (ours, go_us) {
            (Some(o), Some(g)) if o > 0.0 => Some(g * 1000.0 / o),
            _ => None,
        };
        let enc_x = speedup(enc, s.map(|s| s.1));
        let dec_x = speedup(dec, s.map(|s| s.2));
        let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "{:<12} {:>6} {:>10} {:>10} {:>8} {:>12} {:>12} {:>9} {:>9}",
            codec.name(),
            bytes.len(),
            f(enc, 1),
            f(dec, 1),
            s.map_or("-".into(), |s| s.0.to_string()),
            f(s.map(|s| s.1 * 1000.0), 0),
            f(s.map(|s| s.2 * 1000.0), 0),
            f(enc_x, 1),
            f(dec_x, 1),
        );
        rows.push(serde_json::json!({
            "format": codec.name(),
            "bytes": bytes.len(),
            "encode_ns": enc,
            "decode_ns": dec,
            "seed_go": s.map(|s| serde_json::json!({"bytes": s.0, "encode_ns": s.1 * 1000.0, "decode_ns": s.2 * 1000.0})),
            "encode_speedup": enc_x,
            "decode_speedup": dec_x,
        }));
    }
    let frame_ns = median_ns(criterion_dir, "frame", "decode_1000");
    let mut stream = Vec::new();
    write_frame(&mut stream, CodecId::Protobuf, &[], &env).unwrap();
    let frame_len = stream.len();
    let per_frame = frame_ns.map(|n| n / FRAMES_PER_ITER as f64);
    if let Some(pf) = per_frame {
        println!(
            "\nframe decoder: {pf:.1} ns per {frame_len}-byte frame, {:.1} M frames/s, {:.0} MB/s",
            1e3 / pf,
            frame_len as f64 * 1e3 / pf
        );
    }
    let doc = serde_json::json!({
        "message": "samples::typical_deliver (sender, timestamp, text body, extras map)",
        "statistic": "criterion median",
        "codecs": rows,
        "frame_decoder": {"frame_bytes": frame_len, "ns_per_frame": per_frame},
    });
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(out, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    println!("written to {}", out.display());
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    // `cargo test`/nextest run benches once as a smoke test, without `--bench`: no report then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    report(
        &target.join("criterion"),
        &root.join("bench/results/codecs.json"),
    );
}
