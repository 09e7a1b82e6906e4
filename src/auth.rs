//! Verification of `hello.token` (SPEC 5): who a connection is.
//!
//! This module owns the decision "this token proves tenant T, user U": JWT signature checking
//! (HS256 with a shared secret and/or RS256 with a public key), the claim rules (`sub`, `tenant`,
//! `exp`, `nbf`), the clock-skew leeway, and the `--insecure-dev-auth` shortcut (token = user id).
//! It does no I/O after [`Authenticator::from_config`] (which reads the PEM file once) and never
//! reads the system clock: the caller passes the current time to [`Authenticator::verify`].
//!
//! Enforcing "a user can only send as itself" is the session's job: it must take the sender of
//! every `send` from the [`Identity`] returned here, never from the client's frame.
//!
//! Signatures are checked by the `jsonwebtoken` crate. This module only picks which key may
//! verify a token (from the header's `alg`, restricted to the configured algorithms, so an
//! HS256 token can never be checked against the RSA public key), and then checks the claims
//! itself against the injected clock.

use std::fmt;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::config::AuthConfig;
use crate::protocol::Str;

/// The line the gateway logs (at start, at error level) when insecure dev auth is on.
pub const INSECURE_WARNING: &str = "WARNING: INSECURE DEV AUTH IS ON (--insecure-dev-auth): \
    hello.token is taken as the user id in tenant \"dev\" with NO verification, so anyone can \
    connect and send as any user. Never run this outside a demo.";

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest user id (`sub`), in bytes.
pub const MAX_USER_BYTES: usize = crate::protocol::MAX_ID_BYTES;
/// Longest tenant id, in bytes.
pub const MAX_TENANT_BYTES: usize = 64;
/// Tenant of a JWT without a `tenant` claim.
pub const DEFAULT_TENANT: &str = "default";
/// Tenant of every identity admitted by insecure dev auth.
pub const DEV_TENANT: &str = "dev";
/// Default clock-skew allowance for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// Shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long as the hash.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Smallest RSA modulus accepted for RS256, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Who a verified token speaks for. Every id the session uses is scoped by `tenant`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub tenant: Str,
    pub user: Str,
}

/// Why a token (or the auth configuration) was refused.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is not a well-formed JWT: not three dot-separated parts, bad base64url, header
    /// or claims not a JSON object, or a `crit` header (no JWS extension is understood here).
    #[error("malformed token")]
    Malformed,
    /// The signature does not match the configured key for the token's algorithm.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` plus the leeway is not after the current time.
    #[error("token expired")]
    Expired,
    /// `nbf` is later than the current time plus the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// The header's `alg` is not one this gateway was configured for (`none` never is).
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    /// A required claim (`sub` or `exp`) is absent.
    #[error("missing claim {0}")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or breaks its rule (e.g. `sub` empty, too long or holding a
    /// control character; `tenant` not `[A-Za-z0-9_.-]{1,64}`; an `aud`, which no audience is
    /// configured to accept).
    #[error("invalid claim {0}")]
    InvalidClaim(&'static str),
    /// The token exceeds [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// The auth configuration is unusable (missing or weak key, unreadable or non-RSA PEM file).
    #[error("auth configuration: {0}")]
    Config(String),
}

/// Verifies `hello.token`s. Built once at start; cheap to share between shards (`Send + Sync`).
pub struct Authenticator {
    hs256: Option<Verifier>,
    rs256: Option<Verifier>,
    insecure_dev: bool,
    leeway_s: u64,
}

/// One configured algorithm: its key and a `Validation` that allows that algorithm only.
struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    fn new(key: DecodingKey, alg: Algorithm) -> Verifier {
        let mut validation = Validation::new(alg);
        // The clock is injected: jsonwebtoken must not read it, so it checks neither `exp` nor
        // `nbf` and requires no claim; `check_claims` does all of that against `now_unix_s`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // Left on: with no audience configured, a token carrying `aud` is meant for some other
        // service and is refused (RFC 7519 §4.1.3).
        validation.validate_aud = true;
        Verifier { key, validation }
    }
}

impl fmt::Debug for Authenticator {
    // Hand-written so that no key material can ever reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("insecure_dev", &self.insecure_dev)
            .field("leeway_s", &self.leeway_s)
            .finish()
    }
}

impl Authenticator {
    /// Builds the verifier from `[auth]`. Reads the RS256 PEM file once; a key that cannot be
    /// read or parsed as an RSA public key of at least [`MIN_RSA_BITS`] bits, an HS256 secret
    /// shorter than [`MIN_HS256_SECRET_BYTES`], or no key at all without insecure dev auth is
    /// an [`AuthError::Config`].
    pub fn from_config(cfg: &AuthConfig) -> Result<Authenticator, AuthError> {
        let hs256 = match &cfg.jwt_hs256_secret {
            None => None,
            Some(secret) if secret.len() < MIN_HS256_SECRET_BYTES => {
                return Err(AuthError::Config(format!(
                    "auth.jwt_hs256_secret must be at least {MIN_HS256_SECRET_BYTES} bytes \
                     (RFC 7518 §3.2)"
                )));
            }
            Some(secret) => Some(Verifier::new(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )),
        };
        let rs256 = match &cfg.jwt_rs256_public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    AuthError::Config(format!(
                        "reading auth.jwt_rs256_public_key_file {}: {e}",
                        path.display()
                    ))
                })?;
                let key = rsa_public_key_from_pem(&pem).map_err(|why| {
                    AuthError::Config(format!(
                        "auth.jwt_rs256_public_key_file {}: {why}",
                        path.display()
                    ))
                })?;
                Some(Verifier::new(key, Algorithm::RS256))
            }
        };
        if hs256.is_none() && rs256.is_none() && !cfg.insecure_dev_auth {
            return Err(AuthError::Config(
                "no authentication configured: set auth.jwt_hs256_secret or \
                 auth.jwt_rs256_public_key_file, or pass --insecure-dev-auth for a demo"
                    .into(),
            ));
        }
        Ok(Authenticator {
            hs256,
            rs256,
            insecure_dev: cfg.insecure_dev_auth,
            leeway_s: DEFAULT_LEEWAY_S,
        })
    }

    /// Sets the clock-skew allowance applied to `exp` and `nbf` (default [`DEFAULT_LEEWAY_S`]).
    pub fn with_leeway(mut self, leeway_s: u64) -> Authenticator {
        self.leeway_s = leeway_s;
        self
    }

    /// True when insecure dev auth is on: the caller must log [`INSECURE_WARNING`] at start.
    pub fn is_insecure(&self) -> bool {
        self.insecure_dev
    }

    /// Verifies one `hello.token` at time `now_unix_s` (seconds since the Unix epoch).
    ///
    /// In insecure dev mode, a token of three dot-separated parts is verified as a JWT when a
    /// key is configured (and its errors stand: no fallback); any other token, or every token
    /// when no key is configured, is the user id itself in tenant [`DEV_TENANT`], under the same
    /// rules as `sub`.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        if self.insecure_dev {
            let has_keys = self.hs256.is_some() || self.rs256.is_some();
            if !(has_keys && token.split('.').count() == 3) {
                check_user(token)?;
                return Ok(Identity {
                    tenant: Str::from_static(DEV_TENANT),
                    user: Str::from(token),
                });
            }
        }
        self.verify_jwt(token, now_unix_s)
    }

    fn verify_jwt(&self, token: &str, now_unix_s: u64) -> Result<Identity, AuthError> {
        let verifier = match peek_alg(token)?.as_str() {
            "HS256" => self.hs256.as_ref(),
            "RS256" => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or(AuthError::AlgorithmNotAllowed)?;
        let data = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        self.check_claims(data.claims, now_unix_s)
    }

    /// The claim rules, applied after the signature was found good.
    fn check_claims(&self, claims: Claims, now_unix_s: u64) -> Result<Identity, AuthError> {
        let exp = match claims.exp {
            None => return Err(AuthError::MissingClaim("exp")),
            Some(v) => numeric_date(&v).ok_or(AuthError::InvalidClaim("exp"))?,
        };
        if now_unix_s >= exp.saturating_add(self.leeway_s) {
            return Err(AuthError::Expired);
        }
        if let Some(v) = claims.nbf {
            let nbf = numeric_date(&v).ok_or(AuthError::InvalidClaim("nbf"))?;
            if nbf > now_unix_s.saturating_add(self.leeway_s) {
                return Err(AuthError::NotYetValid);
            }
        }
        let user = match claims.sub {
            None => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(s)) => s,
            Some(_) => return Err(AuthError::InvalidClaim("sub")),
        };
        check_user(&user)?;
        let tenant = match claims.tenant {
            None => Str::from_static(DEFAULT_TENANT),
            Some(Value::String(t)) if is_valid_tenant(&t) => Str::from(t),
            Some(_) => return Err(AuthError::InvalidClaim("tenant")),
        };
        Ok(Identity {
            tenant,
            user: Str::from(user),
        })
    }
}

/// Issues an HS256 token for `tenant`/`user` expiring at `exp_unix_s`: for tests and the loadgen.
pub fn issue_hs256(secret: &[u8], tenant: &str, user: &str, exp_unix_s: u64) -> String {
    // Invariant: serializing two strings and an integer to JSON cannot fail, and HMAC-SHA256
    // accepts a key of any length, so encode has no error to return here.
    issue(
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
        tenant,
        user,
        exp_unix_s,
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

/// An RS256 token with the claims [`issue_hs256`] writes, signed with the RSA private key
/// `private_pem` (PKCS#1 or PKCS#8 PEM): what a business backend using RS256 issues (the
/// gateway checks it with `auth.jwt_rs256_public_key_file`). Errors name a bad key.
pub fn issue_rs256(
    private_pem: &[u8],
    tenant: &str,
    user: &str,
    exp_unix_s: u64,
) -> Result<String, String> {
    Rs256Signer::new(private_pem)?.issue(tenant, user, exp_unix_s)
}

/// An RSA private key parsed once, for issuing many RS256 tokens (the loadgen: one per
/// connection).
pub struct Rs256Signer(EncodingKey);

impl std::fmt::Debug for Rs256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rs256Signer")
    }
}

impl Rs256Signer {
    /// Parses the PEM private key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    pub fn new(private_pem: &[u8]) -> Result<Rs256Signer, String> {
        use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
        use rsa::pkcs8::DecodePrivateKey;
        let pem = std::str::from_utf8(private_pem).map_err(|_| "not PEM text".to_string())?;
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|_| {
                "not an RSA private key in PEM (expected BEGIN PRIVATE KEY or BEGIN RSA \
                 PRIVATE KEY)"
                    .to_string()
            })?;
        let der = key
            .to_pkcs1_der()
            .map_err(|e| format!("re-encoding the RSA key: {e}"))?;
        Ok(Rs256Signer(EncodingKey::from_rsa_der(der.as_bytes())))
    }

    /// A token like [`issue_rs256`]'s.
    pub fn issue(&self, tenant: &str, user: &str, exp_unix_s: u64) -> Result<String, String> {
        issue(&self.0, Algorithm::RS256, tenant, user, exp_unix_s).map_err(|e| e.to_string())
    }
}

fn issue(
    key: &EncodingKey,
    alg: Algorithm,
    tenant: &str,
    user: &str,
    exp_unix_s: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        sub: &'a str,
        tenant: &'a str,
        exp: u64,
    }
    let claims = Out {
        sub: user,
        tenant,
        exp: exp_unix_s,
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, key)
}

/// The claims this module reads; all others are ignored. Kept as JSON values so that a claim
/// of the wrong type is reported by name rather than as a malformed token. A JSON `null` reads
/// as absent.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    tenant: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
}

/// The JOSE header fields looked at before choosing a key.
#[derive(Deserialize)]
struct PeekHeader {
    alg: String,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// Reads the header's `alg` without trusting anything else in the token yet.
fn peek_alg(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: PeekHeader = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; none is.
    if header.crit.is_some() {
        return Err(AuthError::Malformed);
    }
    Ok(header.alg)
}

/// Parses an RSA public key from PEM (`PUBLIC KEY`, i.e. SPKI, or PKCS#1 `RSA PUBLIC KEY`).
/// Private keys are refused: they do not belong in the gateway's configuration.
fn rsa_public_key_from_pem(pem: &str) -> Result<DecodingKey, String> {
    use rsa::pkcs1::{DecodeRsaPublicKey, EncodeRsaPublicKey};
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;

    let key = rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|_| {
            "not an RSA public key in PEM (expected BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY)"
                .to_string()
        })?;
    let bits = key.size() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key of {bits} bits is too small (at least {MIN_RSA_BITS})"
        ));
    }
    let der = key
        .to_pkcs1_der()
        .map_err(|e| format!("re-encoding the RSA key: {e}"))?;
    Ok(DecodingKey::from_rsa_der(der.as_bytes()))
}

/// A JWT NumericDate: a non-negative number of seconds (fractions are truncated).
fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    // `as` saturates at u64::MAX, which only makes a token live "forever" if it said so.
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

/// User ids: non-empty, at most [`MAX_USER_BYTES`] bytes, no control characters.
fn check_user(user: &str) -> Result<(), AuthError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES || user.chars().any(char::is_control) {
        return Err(AuthError::InvalidClaim("sub"));
    }
    Ok(())
}

/// Tenant ids: `[A-Za-z0-9_.-]{1,64}`.
fn is_valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_BYTES
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(claim_name(c)),
        ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaim(claim_name(c)),
        ErrorKind::InvalidAudience => AuthError::InvalidClaim("aud"),
        ErrorKind::InvalidIssuer => AuthError::InvalidClaim("iss"),
        ErrorKind::InvalidSubject => AuthError::InvalidClaim("sub"),
        // Key errors at verify time: the key was checked at start, so what fails here is the
        // signature bytes the token brought (e.g. an RSA signature of the wrong length).
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::Signing(_)
        | ErrorKind::RsaFailedSigning
        | ErrorKind::Provider(_) => AuthError::BadSignature,
        // InvalidToken, Base64, Json, Utf8, and any kind a later jsonwebtoken adds.
        _ => AuthError::Malformed,
    }
}

fn claim_name(c: &str) -> &'static str {
    match c {
        "exp" => "exp",
        "nbf" => "nbf",
        "sub" => "sub",
        "aud" => "aud",
        "iss" => "iss",
        _ => "claim",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn key_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    fn cfg(hs: bool, rs: bool, dev: bool) -> AuthConfig {
        AuthConfig {
            jwt_hs256_secret: hs.then(|| SECRET.to_string()),
            jwt_rs256_public_key_file: rs.then(|| key_path("TEST_ONLY_rs256_public.pem")),
            insecure_dev_auth: dev,
            admin_token: None,
        }
    }

    fn auth(hs: bool, rs: bool, dev: bool) -> Authenticator {
        Authenticator::from_config(&cfg(hs, rs, dev)).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs arbitrary JSON claims with the test secret.
    fn hs(claims: serde_json::Value) -> String {
        hs_with(claims, SECRET.as_bytes())
    }

    fn hs_with(claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn rs(claims: serde_json::Value) -> String {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let pem = std::fs::read_to_string(key_path("TEST_ONLY_rs256_private.pem")).unwrap();
        let der = rsa::RsaPrivateKey::from_pkcs8_pem(&pem)
            .unwrap()
            .to_pkcs1_der()
            .unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_der(der.as_bytes()),
        )
        .unwrap()
    }

    fn id(tenant: &str, user: &str) -> Identity {
        Identity {
            tenant: Str::from(tenant),
            user: Str::from(user),
        }
    }

    /// Hand-builds a token from raw header and claims JSON and a raw signature.
    fn raw(header: &str, claims: &str, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(claims.as_bytes()),
            b64(sig)
        )
    }

    #[test]
    fn valid_hs256() {
        let a = auth(true, false, false);
        assert!(!a.is_insecure());
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW + 60);
        assert_eq!(a.verify(&t, NOW), Ok(id("acme", "alice")));
        let t = hs(serde_json::json!({"sub": "bob", "exp": NOW + 60, "iat": NOW, "x": [1]}));
        assert_eq!(a.verify(&t, NOW), Ok(id(DEFAULT_TENANT, "bob")));
        // Fractional NumericDate is accepted.
        let t = hs(serde_json::json!({"sub": "bob", "exp": (NOW + 60) as f64 + 0.5}));
        assert!(a.verify(&t, NOW).is_ok());
    }

    #[test]
    fn valid_rs256() {
        let a = auth(false, true, false);
        let t = rs(serde_json::json!({"sub": "carol", "tenant": "t1", "exp": NOW + 60}));
        assert_eq!(a.verify(&t, NOW), Ok(id("t1", "carol")));
        // Both configured: each algorithm goes to its own key.
        let both = auth(true, true, false);
        assert_eq!(both.verify(&t, NOW), Ok(id("t1", "carol")));
        let t = issue_hs256(SECRET.as_bytes(), "t2", "dave", NOW + 60);
        assert_eq!(both.verify(&t, NOW), Ok(id("t2", "dave")));
    }

    #[test]
    fn wrong_secret_and_tampering() {
        let a = auth(true, false, false);
        let t = issue_hs256(
            b"another-secret-another-secret-xx",
            "acme",
            "alice",
            NOW + 60,
        );
        assert_eq!(a.verify(&t, NOW), Err(AuthError::BadSignature));
        // Claims swapped for another user's, signature kept.
        let good = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW + 60);
        let evil = issue_hs256(
            b"whatever-whatever-whatever-whate",
            "acme",
            "root",
            NOW + 60,
        );
        let g: Vec<&str> = good.split('.').collect();
        let e: Vec<&str> = evil.split('.').collect();
        let forged = format!("{}.{}.{}", g[0], e[1], g[2]);
        assert_eq!(a.verify(&forged, NOW), Err(AuthError::BadSignature));
        // RS256 signature that is garbage.
        let r = auth(false, true, false);
        let t = raw(
            r#"{"alg":"RS256"}"#,
            &format!(r#"{{"sub":"a","exp":{}}}"#, NOW + 60),
            b"nope",
        );
        assert_eq!(r.verify(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn expiry_and_leeway() {
        let a = auth(true, false, false);
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW - 10);
        assert!(a.verify(&t, NOW).is_ok(), "within the default 30 s leeway");
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW - DEFAULT_LEEWAY_S);
        assert_eq!(a.verify(&t, NOW), Err(AuthError::Expired));
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW - 3600);
        assert_eq!(a.verify(&t, NOW), Err(AuthError::Expired));

        let strict = auth(true, false, false).with_leeway(0);
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", NOW);
        assert_eq!(strict.verify(&t, NOW), Err(AuthError::Expired));
        assert!(strict.verify(&t, NOW - 1).is_ok());
        // Huge exp does not overflow.
        let t = issue_hs256(SECRET.as_bytes(), "acme", "alice", u64::MAX);
        assert!(a.verify(&t, NOW).is_ok());
    }

    #[test]
    fn nbf_in_the_future() {
        let a = auth(true, false, false);
        let t = hs(serde_json::json!({"sub": "a", "exp": NOW + 3600, "nbf": NOW + 600}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::NotYetValid));
        let t = hs(serde_json::json!({"sub": "a", "exp": NOW + 3600, "nbf": NOW + 20}));
        assert!(a.verify(&t, NOW).is_ok(), "within leeway");
        let t = hs(serde_json::json!({"sub": "a", "exp": NOW + 3600, "nbf": "soon"}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::InvalidClaim("nbf")));
    }

    #[test]
    fn missing_or_bad_exp() {
        let a = auth(true, false, false);
        let t = hs(serde_json::json!({"sub": "a"}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::MissingClaim("exp")));
        let t = hs(serde_json::json!({"sub": "a", "exp": null}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::MissingClaim("exp")));
        for bad in [
            serde_json::json!("1900000000"),
            serde_json::json!(-1),
            serde_json::json!(true),
        ] {
            let t = hs(serde_json::json!({"sub": "a", "exp": bad}));
            assert_eq!(a.verify(&t, NOW), Err(AuthError::InvalidClaim("exp")));
        }
    }

    #[test]
    fn missing_or_bad_sub() {
        let a = auth(true, false, false);
        let t = hs(serde_json::json!({"exp": NOW + 60}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::MissingClaim("sub")));
        let long = "u".repeat(MAX_USER_BYTES + 1);
        for bad in [
            serde_json::json!(""),
            serde_json::json!(42),
            serde_json::json!(long),
            serde_json::json!("a\nb"),
            serde_json::json!("a\u{7f}"),
            serde_json::json!("a\u{85}"),
        ] {
            let t = hs(serde_json::json!({"sub": bad, "exp": NOW + 60}));
            assert_eq!(a.verify(&t, NOW), Err(AuthError::InvalidClaim("sub")));
        }
        let max = "u".repeat(MAX_USER_BYTES);
        let t = issue_hs256(SECRET.as_bytes(), "acme", &max, NOW + 60);
        assert_eq!(a.verify(&t, NOW), Ok(id("acme", &max)));
        let t = issue_hs256(SECRET.as_bytes(), "acme", "Zoë ✓", NOW + 60);
        assert!(a.verify(&t, NOW).is_ok(), "non-ASCII user ids are fine");
    }

    #[test]
    fn tenant_claim_validation() {
        let a = auth(true, false, false);
        let ok_max = "t".repeat(MAX_TENANT_BYTES);
        for good in ["acme", "Acme-1.eu_west", "0", ok_max.as_str()] {
            let t = issue_hs256(SECRET.as_bytes(), good, "u", NOW + 60);
            assert_eq!(a.verify(&t, NOW), Ok(id(good, "u")), "{good}");
        }
        let too_long = "t".repeat(MAX_TENANT_BYTES + 1);
        for bad in ["", "a b", "a/b", "ténant", "a\0", "a:b", too_long.as_str()] {
            let t = issue_hs256(SECRET.as_bytes(), bad, "u", NOW + 60);
            assert_eq!(
                a.verify(&t, NOW),
                Err(AuthError::InvalidClaim("tenant")),
                "{bad:?}"
            );
        }
        let t = hs(serde_json::json!({"sub": "u", "tenant": 7, "exp": NOW + 60}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::InvalidClaim("tenant")));
        let t = hs(serde_json::json!({"sub": "u", "tenant": null, "exp": NOW + 60}));
        assert_eq!(a.verify(&t, NOW), Ok(id(DEFAULT_TENANT, "u")));
    }

    #[test]
    fn alg_none_is_refused() {
        let a = auth(true, true, false);
        let claims = format!(r#"{{"sub":"admin","exp":{}}}"#, NOW + 60);
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"None","typ":"JWT"}"#,
            r#"{"alg":"HS512"}"#,
            r#"{"alg":"ES256"}"#,
            r#"{"alg":""}"#,
        ] {
            assert_eq!(
                a.verify(&raw(header, &claims, b""), NOW),
                Err(AuthError::AlgorithmNotAllowed),
                "{header}"
            );
            // Unsigned form with the trailing dot omitted is not even a JWT.
            let two_parts = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
            assert_eq!(a.verify(&two_parts, NOW), Err(AuthError::Malformed));
        }
        // A header without alg.
        assert_eq!(
            a.verify(&raw(r#"{"typ":"JWT"}"#, &claims, b"x"), NOW),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn algorithm_confusion() {
        let claims = serde_json::json!({"sub": "alice", "exp": NOW + 60});
        // RS256 token to an HS256-only gateway, and the reverse.
        let hs_only = auth(true, false, false);
        assert_eq!(
            hs_only.verify(&rs(claims.clone()), NOW),
            Err(AuthError::AlgorithmNotAllowed)
        );
        let rs_only = auth(false, true, false);
        assert_eq!(
            rs_only.verify(&hs(claims.clone()), NOW),
            Err(AuthError::AlgorithmNotAllowed)
        );
        // The classic attack: HS256 signed with the RSA public key (PEM bytes, and DER) as the
        // HMAC secret. Refused by an RS256-only gateway, and by one with both algorithms.
        let pem = std::fs::read(key_path("TEST_ONLY_rs256_public.pem")).unwrap();
        let der = {
            use rsa::pkcs1::EncodeRsaPublicKey;
            use rsa::pkcs8::DecodePublicKey;
            rsa::RsaPublicKey::from_public_key_pem(std::str::from_utf8(&pem).unwrap())
                .unwrap()
                .to_pkcs1_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        let both = auth(true, true, false);
        for secret in [&pem[..], &der[..]] {
            let forged = hs_with(claims.clone(), secret);
            assert_eq!(
                rs_only.verify(&forged, NOW),
                Err(AuthError::AlgorithmNotAllowed)
            );
            assert_eq!(both.verify(&forged, NOW), Err(AuthError::BadSignature));
        }
    }

    #[test]
    fn oversize_and_malformed() {
        let a = auth(true, false, true);
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(a.verify(&big, NOW), Err(AuthError::TooLong));
        let pad = "p".repeat(MAX_TOKEN_BYTES);
        let t = hs(serde_json::json!({"sub": "a", "exp": NOW + 60, "pad": pad}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::TooLong));

        let strict = auth(true, false, false);
        for bad in ["", "abc", "a.b", "a.b.c", "a.b.c.d", "..", "!!!.e30.x"] {
            assert_eq!(
                strict.verify(bad, NOW),
                Err(AuthError::Malformed),
                "{bad:?}"
            );
        }
        // Header fine, claims not JSON / not an object.
        let sig = b"x";
        for claims in ["not json", "[1,2]", "\"s\""] {
            let t = raw(r#"{"alg":"HS256"}"#, claims, sig);
            assert!(strict.verify(&t, NOW).is_err());
        }
        // Correctly signed, but the claims are not a JSON object.
        let msg = format!("{}.{}", b64(br#"{"alg":"HS256"}"#), b64(b"[1]"));
        let sig = jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            strict.verify(&format!("{msg}.{sig}"), NOW),
            Err(AuthError::Malformed)
        );
        // A `crit` header is refused even when the signature is good.
        let msg = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","crit":["exp"]}"#),
            b64(format!(r#"{{"sub":"a","exp":{}}}"#, NOW + 60).as_bytes())
        );
        let sig = jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            strict.verify(&format!("{msg}.{sig}"), NOW),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn audience_is_refused() {
        let a = auth(true, false, false);
        let t = hs(serde_json::json!({"sub": "a", "exp": NOW + 60, "aud": "other-service"}));
        assert_eq!(a.verify(&t, NOW), Err(AuthError::InvalidClaim("aud")));
    }

    #[test]
    fn dev_mode_without_keys() {
        let a = auth(false, false, true);
        assert!(a.is_insecure());
        assert_eq!(a.verify("alice", NOW), Ok(id(DEV_TENANT, "alice")));
        // No key: even JWT-shaped tokens are user ids.
        assert_eq!(a.verify("a.b.c", NOW), Ok(id(DEV_TENANT, "a.b.c")));
        assert_eq!(a.verify("", NOW), Err(AuthError::InvalidClaim("sub")));
        assert_eq!(a.verify("a\tb", NOW), Err(AuthError::InvalidClaim("sub")));
        let long = "u".repeat(MAX_USER_BYTES + 1);
        assert_eq!(a.verify(&long, NOW), Err(AuthError::InvalidClaim("sub")));
    }

    #[test]
    fn dev_mode_with_keys() {
        let a = auth(true, false, true);
        assert!(a.is_insecure());
        assert_eq!(a.verify("alice", NOW), Ok(id(DEV_TENANT, "alice")));
        assert_eq!(a.verify("a.b", NOW), Ok(id(DEV_TENANT, "a.b")));
        let t = issue_hs256(SECRET.as_bytes(), "acme", "bob", NOW + 60);
        assert_eq!(a.verify(&t, NOW), Ok(id("acme", "bob")));
        // A JWT-shaped token is verified as one, with no fallback to dev identity.
        let t = issue_hs256(SECRET.as_bytes(), "acme", "bob", NOW - 3600);
        assert_eq!(a.verify(&t, NOW), Err(AuthError::Expired));
        assert_eq!(a.verify("a.b.c", NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn config_errors() {
        let err = |c: AuthConfig| match Authenticator::from_config(&c) {
            Err(AuthError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        };
        err(AuthConfig::default());
        err(AuthConfig {
            jwt_hs256_secret: Some("short".into()),
            ..AuthConfig::default()
        });
        err(AuthConfig {
            jwt_hs256_secret: Some(String::new()),
            insecure_dev_auth: true,
            ..AuthConfig::default()
        });
        let m = err(AuthConfig {
            jwt_rs256_public_key_file: Some(key_path("does-not-exist.pem")),
            ..AuthConfig::default()
        });
        assert!(m.contains("does-not-exist.pem"), "{m}");
        // A private key, or a file that is no key at all, is refused.
        err(AuthConfig {
            jwt_rs256_public_key_file: Some(key_path("TEST_ONLY_rs256_private.pem")),
            ..AuthConfig::default()
        });
        err(AuthConfig {
            jwt_rs256_public_key_file: Some(key_path("README.md")),
            ..AuthConfig::default()
        });
        // A PKCS#1 `RSA PUBLIC KEY` is accepted too.
        let dir = std::env::temp_dir().join(format!("imgw-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pkcs1 = dir.join("pkcs1.pem");
        {
            use rsa::pkcs1::{EncodeRsaPublicKey, LineEnding};
            use rsa::pkcs8::DecodePublicKey;
            let spki = std::fs::read_to_string(key_path("TEST_ONLY_rs256_public.pem")).unwrap();
            let key = rsa::RsaPublicKey::from_public_key_pem(&spki).unwrap();
            std::fs::write(&pkcs1, key.to_pkcs1_pem(LineEnding::LF).unwrap()).unwrap();
        }
        let a = Authenticator::from_config(&AuthConfig {
            jwt_rs256_public_key_file: Some(pkcs1),
            ..AuthConfig::default()
        })
        .unwrap();
        let t = rs(serde_json::json!({"sub": "x", "exp": NOW + 60}));
        assert_eq!(a.verify(&t, NOW), Ok(id(DEFAULT_TENANT, "x")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_hides_keys_and_is_shareable() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Authenticator>();
        let s = format!("{:?}", auth(true, true, false));
        assert!(!s.contains(SECRET), "{s}");
        assert!(INSECURE_WARNING.contains("INSECURE"));
    }
}
