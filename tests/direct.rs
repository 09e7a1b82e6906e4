//! The hand-written encoders and direct decoders of the named-map codecs (JSON, MessagePack,
//! Hessian) against their general serde paths.
//!
//! - Encoding: MessagePack and Hessian write exactly the bytes of rmp-serde / the Hessian serde
//!   format for the `Serialize` impl.
//! - Decoding: `decode_bytes` (direct reader first, general path when it gives up) returns
//!   exactly what the general path alone returns, errors included, for encodings of arbitrary
//!   messages with bytes flipped, inserted or cut, and for generated maps that reach the
//!   direct reader's corners: keys in any order, repeated or unknown, values of the wrong
//!   type, `null`s, nested maps with extra or missing keys, non-ASCII and escaped strings.

mod common;

use bytes::Bytes;
use imgw::codec::{hessian, json, msgpack, CodecId, DecodeError};
use imgw::protocol::{Envelope, ErrorCode, Op, Status};
use proptest::prelude::*;
use serde::ser::{SerializeMap, SerializeSeq};

type Decoder = fn(&Bytes) -> Result<Envelope, DecodeError>;

const NAMED: [(CodecId, Decoder); 3] = [
    (CodecId::Json, json::decode_serde),
    (CodecId::MessagePack, msgpack::decode_serde),
    (CodecId::Hessian, hessian::decode_serde),
];

fn same_as_general(codec: CodecId, general: Decoder, bytes: &[u8]) -> Result<(), TestCaseError> {
    let b = Bytes::copy_from_slice(bytes);
    let both = codec.decode_bytes(&b);
    let slow = general(&b);
    prop_assert_eq!(&both, &slow, "{} on {:02x?}", codec.name(), bytes);
    Ok(())
}

/// A value of the self-describing formats, serialized through serde (map order kept).
#[derive(Clone, Debug)]
enum V {
    Nil,
    Bool(bool),
    U(u64),
    I(i64),
    F(f64),
    S(String),
    Bin(Vec<u8>),
    L(Vec<V>),
    M(Vec<(String, V)>),
}

impl serde::Serialize for V {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            V::Nil => s.serialize_unit(),
            V::Bool(b) => s.serialize_bool(*b),
            V::U(n) => s.serialize_u64(*n),
            V::I(n) => s.serialize_i64(*n),
            V::F(f) => s.serialize_f64(*f),
            V::S(x) => s.serialize_str(x),
            V::Bin(b) => s.serialize_bytes(b),
            V::L(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            V::M(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

const U64_FIELDS: &[&str] = &[
    "ref",
    "session",
    "heartbeat_ms",
    "server_time_ms",
    "ts",
    "mid",
    "seq",
    "inbox_seq",
    "after_inbox_seq",
    "up_to",
    "retry_after_ms",
    "reconnect_ms",
];
const STR_FIELDS: &[&str] = &[
    "token", "device", "user", "cmid", "type", "body", "from", "group", "message", "reason",
];
const OTHER_FIELDS: &[&str] = &[
    "version", "limit", "codecs", "users", "groups", "resume", "limits", "to", "ext", "more",
    "status", "code", "op",
];
const UNKNOWN: &[&str] = &["x", "trace", "é", "op2", ""];

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z0-9_]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(20).collect()),
        1 => Just("a\"b\\c\u{1}d".to_string()),
        1 => Just("😀 ok".to_string()),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<V> {
    prop_oneof![
        Just(V::Nil),
        any::<bool>().prop_map(V::Bool),
        prop_oneof![0..300u64, any::<u64>()].prop_map(V::U),
        prop_oneof![-40i64..0, i64::MIN..0].prop_map(V::I),
        prop_oneof![Just(1.0f64), Just(-0.5), any::<f64>()].prop_map(V::F),
        text().prop_map(V::S),
        proptest::collection::vec(any::<u8>(), 0..4).prop_map(V::Bin),
    ]
    .boxed()
}

fn any_value() -> BoxedStrategy<V> {
    leaf()
        .prop_recursive(3, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(V::L),
                proptest::collection::vec((text(), inner), 0..4).prop_map(V::M),
            ]
        })
        .boxed()
}

/// Mostly the right type for the field, sometimes anything.
fn value_for(name: &'static str) -> BoxedStrategy<V> {
    let right: BoxedStrategy<V> = if U64_FIELDS.contains(&name) {
        prop_oneof![0..300u64, 0..=i64::MAX as u64]
            .prop_map(V::U)
            .boxed()
    } else if STR_FIELDS.contains(&name) {
        text().prop_map(V::S).boxed()
    } else {
        match name {
            "version" => (0..300u64).prop_map(V::U).boxed(),
            "limit" => prop_oneof![0..300u64, any::<u64>()].prop_map(V::U).boxed(),
            "more" => any::<bool>().prop_map(V::Bool).boxed(),
            "status" => prop_oneof![
                proptest::sample::select(Status::ALL.to_vec()).prop_map(|s| s.name().to_string()),
                text()
            ]
            .prop_map(V::S)
            .boxed(),
            "code" => prop_oneof![
                proptest::sample::select(ErrorCode::ALL.to_vec())
                    .prop_map(|c| c.name().to_string()),
                text()
            ]
            .prop_map(V::S)
            .boxed(),
            "op" => op_name().prop_map(V::S).boxed(),
            "codecs" | "users" | "groups" => proptest::collection::vec(text().prop_map(V::S), 0..10)
                .prop_map(V::L)
                .boxed(),
            "ext" => proptest::collection::vec((text(), text().prop_map(V::S)), 0..4)
                .prop_map(V::M)
                .boxed(),
            "to" => proptest::collection::vec(
                (
                    prop_oneof![Just("user".to_string()), Just("group".to_string()), text()],
                    prop_oneof![4 => text().prop_map(V::S), 1 => leaf()],
                ),
                0..3,
            )
            .prop_map(V::M)
            .boxed(),
            "resume" => proptest::collection::vec(
                (
                    prop_oneof![Just("inbox_seq".to_string()), text()],
                    prop_oneof![4 => (0..300u64).prop_map(V::U), 1 => leaf()],
                ),
                0..3,
            )
            .prop_map(V::M)
            .boxed(),
            "limits" => proptest::collection::vec(
                (
                    prop_oneof![
                        Just("max_frame_bytes".to_string()),
                        Just("sends_per_sec".to_string()),
                        Just("window".to_string()),
                        text()
                    ],
                    prop_oneof![4 => prop_oneof![0..300u64, any::<u64>()].prop_map(V::U), 1 => leaf()],
                ),
                0..4,
            )
            .prop_map(V::M)
            .boxed(),
            _ => any_value(),
        }
    };
    prop_oneof![8 => right, 1 => leaf(), 1 => any_value()].boxed()
}

fn op_name() -> BoxedStrategy<String> {
    prop_oneof![
        8 => proptest::sample::select(Op::ALL.to_vec()).prop_map(|o| o.name().to_string()),
        1 => text(),
    ]
    .boxed()
}

fn field_name() -> BoxedStrategy<&'static str> {
    let known: Vec<&'static str> = U64_FIELDS
        .iter()
        .chain(STR_FIELDS)
        .chain(OTHER_FIELDS)
        .copied()
        .collect();
    prop_oneof![6 => proptest::sample::select(known), 1 => proptest::sample::select(UNKNOWN.to_vec())]
        .boxed()
}

/// A frame's map: usually `op` first, then most of the op's own fields (so that many frames
/// are accepted), in any order, plus sometimes a repeated field, `ref`, an unknown key or
/// another op's field.
fn frame_map() -> BoxedStrategy<V> {
    (
        proptest::sample::select(Op::ALL.to_vec()),
        prop_oneof![8 => Just(None), 1 => text().prop_map(Some)],
        any::<u16>(),
        proptest::collection::vec(
            prop_oneof![
                2 => Just("ref"),
                1 => field_name(),
                1 => Just("<dup>"),
            ],
            0..3,
        ),
        prop_oneof![8 => Just(0usize), 1 => 0..8usize],
    )
        .prop_flat_map(|(op, odd_op, keep, extras, op_at)| {
            let mut names: Vec<&'static str> = imgw::codec::map_keys(op)
                .iter()
                .enumerate()
                .filter(|(i, _)| keep & (1 << i) != 0 || keep % 5 != 0)
                .map(|(_, n)| *n)
                .collect();
            for e in extras {
                match (e, imgw::codec::map_keys(op).first()) {
                    ("<dup>", Some(first)) => names.push(first),
                    ("<dup>", None) => {}
                    (n, _) => names.push(n),
                }
            }
            let values: Vec<BoxedStrategy<(String, V)>> = names
                .into_iter()
                .map(|n| value_for(n).prop_map(move |v| (n.to_string(), v)).boxed())
                .collect();
            let op_name = odd_op.unwrap_or_else(|| op.name().to_string());
            (values.prop_shuffle(), Just(op_name), Just(op_at))
        })
        .prop_map(|(mut entries, op, op_at)| {
            let at = op_at.min(entries.len());
            entries.insert(at, ("op".to_string(), V::S(op)));
            V::M(entries)
        })
        .boxed()
}

/// `v` in the codec's format; `None` when the format cannot carry it (a Hessian integer
/// above `i64::MAX`).
fn encode_value(codec: CodecId, v: &V) -> Option<Vec<u8>> {
    match codec {
        CodecId::Json => serde_json::to_vec(v).ok(),
        CodecId::MessagePack => rmp_serde::to_vec(v).ok(),
        CodecId::Hessian => {
            let mut out = Vec::new();
            hessian::to_writer(v, &mut out).ok().map(|()| out)
        }
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn msgpack_encoder_matches_rmp_serde(env in common::envelope()) {
        let mut ours = Vec::new();
        CodecId::MessagePack.encode(&env, &mut ours).unwrap();
        let mut theirs = Vec::new();
        msgpack::encode_serde(&env, &mut theirs).unwrap();
        prop_assert_eq!(ours, theirs);
    }

    #[test]
    fn hessian_encoder_matches_serde_format(env in common::envelope()) {
        let mut ours = Vec::new();
        CodecId::Hessian.encode(&env, &mut ours).unwrap();
        let mut theirs = Vec::new();
        hessian::encode_serde(&env, &mut theirs).unwrap();
        prop_assert_eq!(ours, theirs);
    }

    /// Encodings of arbitrary messages, then bytes flipped, inserted or cut off.
    #[test]
    fn direct_decoders_match_general_on_mutated_frames(
        env in common::envelope(),
        flips in proptest::collection::vec((any::<usize>(), prop_oneof![1u8..8, any::<u8>()]), 0..3),
        insert in proptest::option::of((any::<usize>(), proptest::collection::vec(any::<u8>(), 1..4))),
        cut in proptest::option::of(any::<usize>()),
    ) {
        for (codec, general) in NAMED {
            let mut bytes = Vec::new();
            codec.encode(&env, &mut bytes).unwrap();
            same_as_general(codec, general, &bytes)?;
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
            same_as_general(codec, general, &bytes)?;
        }
    }

    /// Generated maps with the direct reader's corner cases.
    #[test]
    fn direct_decoders_match_general_on_generated_maps(v in frame_map()) {
        for (codec, general) in NAMED {
            if let Some(bytes) = encode_value(codec, &v) {
                same_as_general(codec, general, &bytes)?;
            }
        }
    }
}

/// The generated maps do reach the direct readers' success path (not only their give-ups):
/// a well-formed `deliver` written in another key order decodes to the same message.
#[test]
fn reordered_keys_decode_the_same() {
    let v = V::M(vec![
        ("op".into(), V::S("deliver".into())),
        ("body".into(), V::S("hi".into())),
        ("ts".into(), V::U(5)),
        ("x".into(), V::L(vec![V::M(vec![("k".into(), V::Nil)])])),
        ("inbox_seq".into(), V::U(7)),
        ("from".into(), V::S("bob".into())),
        ("mid".into(), V::U(1 << 40)),
        (
            "ext".into(),
            V::M(vec![
                ("b".into(), V::S("2".into())),
                ("a".into(), V::S("1".into())),
            ]),
        ),
    ]);
    for (codec, general) in NAMED {
        let bytes = Bytes::from(encode_value(codec, &v).unwrap());
        let env = codec.decode_bytes(&bytes).unwrap();
        assert_eq!(Ok(env.clone()), general(&bytes), "{}", codec.name());
        let imgw::protocol::Message::Deliver(d) = env.msg else {
            panic!()
        };
        assert_eq!((d.mid, &*d.from, d.ext.len()), (1 << 40, "bob", 2));
    }
}
