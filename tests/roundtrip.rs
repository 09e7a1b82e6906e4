//! Every message round-trips through every codec, and through the raw-TCP frame layer.

mod common;

use bytes::BytesMut;
use imgw::codec::protobuf::{decode_prost, pb, to_pb};
use imgw::codec::CodecId;
use imgw::protocol::frame::{push_extension, write_frame, FrameDecoder, EXT_TRACE_ID};
use imgw::protocol::{samples, Envelope};
use proptest::prelude::*;

fn roundtrip(codec: CodecId, env: &Envelope) {
    let mut out = Vec::new();
    codec.encode(env, &mut out).unwrap();
    let back = codec
        .decode(&out)
        .unwrap_or_else(|e| panic!("{}: {e} for {env:?}", codec.name()));
    assert_eq!(&back, env, "{}", codec.name());
}

macro_rules! codec_tests {
    ($($name:ident => $codec:expr),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn samples_roundtrip() {
                for (_, env) in samples::all() {
                    roundtrip($codec, &env);
                }
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(512))]
                #[test]
                fn any_message_roundtrips(env in common::envelope()) {
                    roundtrip($codec, &env);
                }
            }
        }
    )*};
}

codec_tests! {
    json => CodecId::Json,
    protobuf => CodecId::Protobuf,
    msgpack => CodecId::MessagePack,
    flatbuffers => CodecId::FlatBuffers,
    hessian => CodecId::Hessian,
}

proptest! {
    /// The hand-written Protobuf encoder produces exactly prost's bytes.
    #[test]
    fn protobuf_encoder_matches_prost(env in common::envelope()) {
        use prost::Message as _;
        let mut ours = Vec::new();
        CodecId::Protobuf.encode(&env, &mut ours).unwrap();
        let theirs = to_pb(&env).encode_to_vec();
        prop_assert_eq!(&ours, &theirs);
        prop_assert_eq!(pb::Frame::decode(&ours[..]).unwrap(), to_pb(&env));
    }

    /// The direct Protobuf decoder agrees with prost's generated decoder (plus conversion) on
    /// frames built to reach its merge rules: two frames concatenated (the same op merges,
    /// another op replaces), with bytes flipped, inserted or cut off. Both give the same
    /// message, or both refuse the input.
    #[test]
    fn protobuf_decoder_matches_prost(
        a in common::envelope(),
        b in proptest::option::of(common::envelope()),
        // Low bits flip a key's wire type or nudge a length; any byte for the rest.
        flips in proptest::collection::vec((any::<usize>(), prop_oneof![1u8..8, any::<u8>()]), 0..4),
        insert in proptest::option::of((any::<usize>(), proptest::collection::vec(any::<u8>(), 1..6))),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut bytes = Vec::new();
        CodecId::Protobuf.encode(&a, &mut bytes).unwrap();
        if let Some(b) = &b {
            CodecId::Protobuf.encode(b, &mut bytes).unwrap();
        }
        for (at, val) in &flips {
            let n = bytes.len();
            bytes[at % n] ^= val;
        }
        if let Some((at, extra)) = &insert {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let ours = CodecId::Protobuf.decode(&bytes);
        let theirs = decode_prost(&bytes);
        match (&ours, &theirs) {
            (Ok(x), Ok(y)) => prop_assert_eq!(x, y),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "{:02x?}: ours {:?}, prost {:?}", bytes, ours, theirs),
        }
    }

    /// Any bytes at all: both decoders accept the same inputs, with the same result.
    #[test]
    fn protobuf_decoder_matches_prost_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let ours = CodecId::Protobuf.decode(&bytes);
        let theirs = decode_prost(&bytes);
        match (&ours, &theirs) {
            (Ok(x), Ok(y)) => prop_assert_eq!(x, y),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "{:02x?}: ours {:?}, prost {:?}", bytes, ours, theirs),
        }
    }

    /// A stream of frames in any codec, cut at arbitrary points, decodes to the same messages.
    #[test]
    fn frames_survive_any_split(
        envs in proptest::collection::vec(common::envelope(), 1..6),
        codec_ix in 0..3usize,
        cuts in proptest::collection::vec(1..200usize, 1..20),
    ) {
        let codec = [CodecId::Json, CodecId::Protobuf, CodecId::MessagePack][codec_ix];
        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_TRACE_ID, b"t").unwrap();
        let mut stream = Vec::new();
        for env in &envs {
            write_frame(&mut stream, codec, &ext, env).unwrap();
        }
        let dec = FrameDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            let n = cuts[i % cuts.len()].min(stream.len() - pos);
            i += 1;
            buf.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                prop_assert_eq!(f.header.op, f.header.codec.decode(&f.payload).unwrap().msg.op() as u8);
                got.push(codec.decode(&f.payload).unwrap());
            }
        }
        prop_assert_eq!(got, envs);
    }
}
