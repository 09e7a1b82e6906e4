//! Interop of the Hessian codec with an independent implementation: npm's `hessian.js` 2.11.
//!
//! Each payload we encode goes through `tests/interop/hessian_roundtrip.js`, which decodes it
//! with hessian.js, prints the value as JSON, and re-encodes it with hessian.js. We check that
//! hessian.js read the same field values as our JSON codec would write, and that our decoder
//! takes hessian.js's bytes back to an equal `Envelope`.
//!
//! Findings pinned here (hessian.js 2.11.0, `encode(value, '2.0')`):
//! - a JS number that is integral and fits 32 bits is written as an *int* (`0x80-0xd7`, `I`),
//!   a larger integral one as a *long* `L`, never as a double; our decoder takes both for any
//!   integer field, so no double-to-integer leniency is needed;
//! - a long beyond 2^53 is decoded by hessian.js as a decimal *string* (and re-encoded as one),
//!   which our decoder refuses for an integer field: JS peers must keep ids below 2^53 or send
//!   them as `{$class: 'long', $: '...'}`;
//! - objects are written as untyped maps `H` with the keys sorted; strings as CESU-8 (a
//!   character outside the BMP is two 3-byte surrogates), and hessian.js refuses standard 4-byte
//!   UTF-8, which is why our encoder writes CESU-8.
//!
//! Needs Node.js and the module: `npm ci --prefix tests/interop`. Without them the test fails,
//! unless `IMGW_SKIP_INTEROP=1` is set.

use imgw::protocol::Ext;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use imgw::codec::hessian::Hessian;
use imgw::codec::{Codec, DecodeError};
use imgw::protocol::{
    Deliver, Envelope, Error, ErrorCode, Hello, Limits, Message, Ping, PresenceSub, Resume, Send,
    Target, Welcome,
};

fn skip_allowed() -> bool {
    std::env::var("IMGW_SKIP_INTEROP").as_deref() == Ok("1")
}

/// Runs the node script over `payloads`; `None` when node or hessian.js is missing and
/// `IMGW_SKIP_INTEROP=1` allows skipping.
fn hessian_js(payloads: &[Vec<u8>]) -> Option<Vec<serde_json::Value>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/interop/hessian_roundtrip.js");
    let missing = |why: String| -> Option<Vec<serde_json::Value>> {
        if skip_allowed() {
            eprintln!("skipping the hessian.js interop test (IMGW_SKIP_INTEROP=1): {why}");
            return None;
        }
        panic!(
            "hessian.js interop cannot run: {why}\n\
             install Node.js and the module with `npm ci --prefix tests/interop`, \
             or set IMGW_SKIP_INTEROP=1 to skip this test"
        );
    };
    let child = Command::new("node")
        .arg(&script)
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return missing(format!("cannot start `node`: {e}")),
    };
    let input: String = payloads.iter().map(|p| hex::encode(p) + "\n").collect();
    // Node may exit early (module missing) and close the pipe: judge the write after the exit.
    let written = {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(input.as_bytes())
    };
    let out = child.wait_with_output().expect("wait for node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        return missing(stderr.trim().to_string());
    }
    written.expect("write the payloads to node");
    assert!(
        out.status.success(),
        "node failed: {:?}\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("node prints UTF-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("node prints JSON lines"))
        .collect();
    assert_eq!(lines.len(), payloads.len(), "one answer per payload");
    Some(lines)
}

fn encode(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::new();
    Hessian::encode(env, &mut out).expect("encode");
    out
}

fn messages() -> Vec<Envelope> {
    let ext: Ext = [
        ("lang", "fr"),
        ("reply_to", "m-12"),
        ("émoji", "😀 ok"),
        ("zz", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    vec![
        Envelope::new(Message::Deliver(Deliver {
            mid: 9_007_199_254_740_991, // 2^53 - 1, the largest a JS number holds exactly
            from: "alice".into(),
            to: Some(Target::Group("équipe-世界".into())),
            inbox_seq: 4_294_967_296,
            ts: 1_767_225_600_123,
            kind: Some("text".into()),
            body: "héllo 世界 😀 𝄞 \u{10ffff} — done".into(),
            ext,
        })),
        Envelope::with_ref(
            Message::Send(Send {
                to: Target::User("bob".into()),
                cmid: "c-1".into(),
                kind: None,
                body: ("x".repeat(40_000) + "😀" + &"y".repeat(40_000)).into(),
                ext: Ext::new(),
            }),
            3,
        ),
        Envelope::with_ref(
            Message::Welcome(Welcome {
                version: 1,
                session: 2_147_483_648,
                user: "alice".into(),
                heartbeat_ms: 30_000,
                server_time_ms: 1_767_225_600_000,
                limits: Limits {
                    max_frame_bytes: 65_536,
                    sends_per_sec: 50,
                    window: 256,
                },
            }),
            1,
        ),
        Envelope::with_ref(
            Message::PresenceSub(PresenceSub {
                users: (0..12)
                    .map(|i| imgw::protocol::Str::from(format!("user-{i}-ü")))
                    .collect(),
            }),
            7,
        ),
        Envelope::new(Message::Hello(Hello {
            version: 1,
            token: "tok.abc".into(),
            device: "phone".into(),
            codecs: vec!["hessian".into()],
            resume: Some(Resume { inbox_seq: 262_144 }),
        })),
        Envelope::with_ref(
            Message::Error(Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                cmid: Some("c-9".into()),
                retry_after_ms: Some(1500),
            }),
            10,
        ),
        Envelope::with_ref(Message::Ping(Ping { ts: 5 }), 2),
    ]
}

#[test]
fn hessian_js_reads_our_bytes_and_we_read_its_bytes() {
    let envs = messages();
    let payloads: Vec<Vec<u8>> = envs.iter().map(encode).collect();
    let Some(answers) = hessian_js(&payloads) else {
        return;
    };
    for (env, answer) in envs.iter().zip(&answers) {
        assert_eq!(answer["ok"], true, "hessian.js failed on {env:?}: {answer}");
        // The same field values as the JSON codec writes (same names, same nesting).
        let want = serde_json::to_value(env).expect("json");
        assert_eq!(
            answer["value"], want,
            "hessian.js decoded {env:?} differently"
        );
        let back = hex::decode(answer["hex"].as_str().expect("hex")).expect("hex");
        assert_eq!(
            Hessian::decode(&back).as_ref(),
            Ok(env),
            "hessian.js bytes {}",
            hex::encode(&back)
        );
    }
    // How hessian.js writes numbers: the ping's ts (5) and ref (2) come back as *ints*
    // (0x95, 0x92), where we write longs (0xe5, 0xe2); keys sorted: op, ref, ts.
    let ping = answers.last().expect("ping");
    assert_eq!(ping["hex"], "48026f700470696e670372656692027473955a");
}

#[test]
fn hessian_js_turns_longs_beyond_2_pow_53_into_strings() {
    let env = Envelope::new(Message::Ping(Ping { ts: (1 << 53) + 1 }));
    let Some(answers) = hessian_js(&[encode(&env)]) else {
        return;
    };
    assert_eq!(answers[0]["value"]["ts"], "9007199254740993");
    let back = hex::decode(answers[0]["hex"].as_str().expect("hex")).expect("hex");
    assert!(matches!(
        Hessian::decode(&back),
        Err(DecodeError::Malformed { .. })
    ));
}
