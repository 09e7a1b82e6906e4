//! Golden vectors: tests/vectors/<codec>.txt holds, for every sample of
//! `imgw::protocol::samples`, the complete raw-TCP frame (header, no extensions, payload) as
//! hex. Every later version must still decode each of them to the same message; a vector is
//! never edited or removed. The current encoder must also produce them byte for byte.
//! `IMGW_REGEN=1 cargo test --test vectors` writes files for samples that have none yet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use imgw::codec::CodecId;
use imgw::protocol::frame::{write_frame, FrameDecoder};
use imgw::protocol::samples;

fn path(codec: CodecId) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/vectors/{}.txt", codec.name()))
}

fn load(codec: CodecId) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path(codec)).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("line is `name hex`");
            (name.to_string(), hex.trim().to_string())
        })
        .collect()
}

fn check(codec: CodecId) {
    let mut vectors = load(codec);
    let regen = std::env::var_os("IMGW_REGEN").is_some();
    let mut added = false;
    for (name, env) in samples::all() {
        let mut frame = Vec::new();
        write_frame(&mut frame, codec, &[], &env).unwrap();
        let Some(hex) = vectors.get(name) else {
            assert!(
                regen,
                "{}: no vector for {name}; run with IMGW_REGEN=1",
                codec.name()
            );
            vectors.insert(name.to_string(), hex::encode(&frame));
            added = true;
            continue;
        };
        let bytes = hex::decode(hex).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let f = FrameDecoder::default()
            .decode(&mut buf)
            .unwrap()
            .expect("vector holds a whole frame");
        assert!(buf.is_empty(), "{name}: trailing bytes");
        assert_eq!(f.header.codec, codec);
        assert_eq!(f.header.op, env.msg.op() as u8, "{name}");
        let got = codec
            .decode(&f.payload)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, env, "{}: {name} decodes differently", codec.name());
        assert_eq!(
            hex::encode(&frame),
            *hex,
            "{}: encoder output changed for {name}",
            codec.name()
        );
    }
    if added {
        let mut text = format!(
            "# Golden raw-TCP frames, codec {} (id {}). Never edit or remove a line.\n",
            codec.name(),
            codec as u8
        );
        for (name, hex) in &vectors {
            text.push_str(&format!("{name} {hex}\n"));
        }
        std::fs::write(path(codec), text).unwrap();
    }
}

#[test]
fn json_vectors() {
    check(CodecId::Json);
}

#[test]
fn protobuf_vectors() {
    check(CodecId::Protobuf);
}

#[test]
fn msgpack_vectors() {
    check(CodecId::MessagePack);
}

#[test]
fn flatbuffers_vectors() {
    check(CodecId::FlatBuffers);
}

#[test]
fn hessian_vectors() {
    check(CodecId::Hessian);
}
