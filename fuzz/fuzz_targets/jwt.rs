//! Fuzz `hello.token` verification: arbitrary strings, and tokens made from a valid one with
//! fuzzed header, claims or signature, against HS256 and RS256 authenticators: never a panic,
//! and a token with a changed part never verifies.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use imgw::auth::{issue_hs256, Authenticator};
use imgw::config::AuthConfig;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";
const NOW: u64 = 1_800_000_000;

fn auths() -> &'static (Authenticator, Authenticator, String) {
    static A: OnceLock<(Authenticator, Authenticator, String)> = OnceLock::new();
    A.get_or_init(|| {
        let hs = Authenticator::from_config(&AuthConfig {
            jwt_hs256_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        })
        .expect("HS256 authenticator");
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/keys/TEST_ONLY_rs256_public.pem"
        );
        let rs = Authenticator::from_config(&AuthConfig {
            jwt_rs256_public_key_file: Some(key.into()),
            ..AuthConfig::default()
        })
        .expect("RS256 authenticator");
        let valid = issue_hs256(SECRET.as_bytes(), "acme", "ann", NOW + 60);
        (hs, rs, valid)
    })
}

fuzz_target!(|data: &[u8]| {
    let (hs, rs, valid) = auths();
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let token = match how % 4 {
        // Raw bytes as a token.
        0 => String::from_utf8_lossy(rest).into_owned(),
        // One of the three parts replaced by the fuzzer's bytes, base64url-encoded.
        part => {
            let mut parts: Vec<String> = valid.split('.').map(String::from).collect();
            parts[usize::from(part - 1)] =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rest);
            parts.join(".")
        }
    };
    let ok = hs.verify(&token, NOW).is_ok();
    // Raw bytes may spell a genuine token (the seeds hold one); a changed part never verifies.
    assert!(
        how % 4 == 0 || !ok || token == *valid,
        "a changed token verified: {token}"
    );
    let _ = rs.verify(&token, NOW);
});
