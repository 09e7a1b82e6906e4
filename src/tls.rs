//! TLS for the client listeners (`--wss-listen`, `--tls-listen`).
//!
//! This module owns the server's certificate and key: loading them from PEM files, the rustls
//! server configuration every new TLS connection takes, its reload on SIGHUP (a bad new pair
//! is refused and the old one kept), and the process-wide TLS counters. It does no I/O on
//! connections: src/runtime drives one [`rustls::server::UnbufferedServerConnection`] per connection as a
//! sans-IO state machine between the socket and the shard, which only ever sees plaintext.
//!
//! Protocols: TLS 1.3 and 1.2, with rustls's `ring` provider (its cipher suites and key
//! exchange groups). A reload changes what *new* connections get; established ones keep the
//! configuration they were accepted with until they close.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The protocol versions served and spoken: TLS 1.3 and 1.2.
pub const BOTH_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a certificate and key pair was not taken.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("certificate {path}: {detail}")]
    Certificate { path: PathBuf, detail: String },
    /// The key file could not be read or holds no PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[error("private key {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    /// rustls refused the pair: an unsupported key type, or a key that does not match the
    /// certificate.
    #[error("certificate and key refused: {0}")]
    Refused(#[from] rustls::Error),
}

/// Process-wide TLS counters (rendered by [`crate::metrics::Metrics::render`]).
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes that failed: a protocol error, an alert, a peer that went away.
    pub handshake_failures: AtomicU64,
    /// Connections closed by `limits.handshake_timeout_ms` before their TLS handshake ended.
    pub handshake_timeouts: AtomicU64,
    /// Established TLS connections closed on a TLS error after the handshake (a bad record,
    /// a MAC failure).
    pub record_errors: AtomicU64,
    /// Certificate reloads that took effect, and reloads refused (the old pair kept).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl TlsStats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The certificate and key files and the configuration loaded from them, shared by every
/// shard and the signal thread.
#[derive(Debug)]
pub struct Certs {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Mutex<Arc<ServerConfig>>,
    /// Bumped by every reload that took effect; shards compare it on accept.
    generation: AtomicU64,
}

impl Certs {
    /// Loads the pair; an error here stops the start with a clear message.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Certs, TlsError> {
        Ok(Certs {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: Mutex::new(server_config(cert_file, key_file)?),
            generation: AtomicU64::new(0),
        })
    }

    /// Reads the files again. On success new connections get the new pair; on failure the
    /// old one stays and the error is returned (and counted in `stats`).
    pub fn reload(&self, stats: &TlsStats) -> Result<(), TlsError> {
        match server_config(&self.cert_file, &self.key_file) {
            Ok(cfg) => {
                // A poisoned lock only means a thread panicked while swapping an Arc: the
                // value inside is still a whole configuration.
                let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
                *cur = cfg;
                self.generation.fetch_add(1, Ordering::Release);
                TlsStats::add(&stats.reloads);
                Ok(())
            }
            Err(e) => {
                TlsStats::add(&stats.reload_failures);
                Err(e)
            }
        }
    }

    /// The configuration new connections get, and its generation.
    fn current(&self) -> (u64, Arc<ServerConfig>) {
        let generation = self.generation.load(Ordering::Acquire);
        let cfg = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (generation, cfg.clone())
    }
}

/// One shard's view of [`Certs`]: the configuration it hands to new connections, refreshed
/// (one atomic load per accept, a lock only after a reload) when the generation moved.
#[derive(Debug)]
pub struct ShardTls {
    certs: Arc<Certs>,
    generation: u64,
    config: Arc<ServerConfig>,
}

impl ShardTls {
    pub fn new(certs: Arc<Certs>) -> ShardTls {
        let (generation, config) = certs.current();
        ShardTls {
            certs,
            generation,
            config,
        }
    }

    /// A server-side TLS state machine for a connection just accepted.
    pub fn accept(&mut self) -> Result<rustls::server::UnbufferedServerConnection, rustls::Error> {
        if self.certs.generation.load(Ordering::Acquire) != self.generation {
            (self.generation, self.config) = self.certs.current();
        }
        rustls::server::UnbufferedServerConnection::new(self.config.clone())
    }
}

/// rustls's `ring` provider. rustls deprecates it because it has no post-quantum key
/// exchange (X25519MLKEM768 needs aws-lc-rs); we keep it because aws-lc-rs needs cmake and a
/// C build several times longer on our 2-core machines. Switching is one line here.
///
/// Key exchange prefers X25519: this provider's default list starts with P-384, whose
/// generic big-number arithmetic made a handshake cost about 0.8 ms of gateway CPU
/// (bench/tls.sh, perf: 67% in `p384_point_mul`).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

/// A rustls server configuration (TLS 1.3 and 1.2, no client certificates) for the pair.
fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |detail: String| TlsError::Certificate {
        path: cert_file.to_owned(),
        detail,
    };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: key_file.to_owned(),
        detail: e.to_string(),
    })?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(BOTH_VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts exactly the certificates in `ca_pem` (PEM) and speaks
/// `versions` (empty: TLS 1.3 and 1.2), for the loadgen and tests talking to a gateway with a
/// self-made certificate.
pub fn client_config(
    ca_pem: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cert_err = |detail: String| TlsError::Certificate {
        path: PathBuf::from("<trusted certificates>"),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| cert_err(e.to_string()))?)
            .map_err(TlsError::Refused)?;
    }
    if roots.is_empty() {
        return Err(cert_err("no PEM certificate".into()));
    }
    let versions = if versions.is_empty() {
        BOTH_VERSIONS
    } else {
        versions
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
