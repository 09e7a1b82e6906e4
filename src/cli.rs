//! The command line (SPEC 7): clap definitions of `imgw serve` and `imgw preflight`, and how
//! `serve`'s flags merge over the configuration file (file first, then flags, then
//! [`Config::validate`]). Flag names are a contract that scripts rely on: add, never rename.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use crate::config::{Config, ConfigError, Durability};

/// Exit code for usage and configuration errors (clap uses the same for bad flags).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "imgw",
    // The package version and the git commit it was built from (build.rs; "unknown" outside
    // a git checkout).
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("IMGW_GIT_COMMIT"), ")"),
    about = "Thread-per-core instant-messaging edge gateway",
    // A flag given twice takes its last value: a wrapper (`loadgen chaos` restarting the
    // gateway on the ports it bound first) appends flags to a user's command line.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run the gateway until SIGTERM/SIGINT or POST /drain (a second signal exits at once).
    Serve(ServeArgs),
    /// Check this host's kernel and limits for the target connection count; exit 1 on FAIL.
    Preflight(PreflightArgs),
}

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// WebSocket listener (upgrade at /ws) [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub ws_listen: Option<SocketAddr>,
    /// Raw-TCP listener [default: 127.0.0.1:9000].
    #[arg(long, value_name = "ADDR")]
    pub tcp_listen: Option<SocketAddr>,
    /// WebSocket over TLS listener (`wss://`); needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR")]
    pub wss_listen: Option<SocketAddr>,
    /// Raw-TCP over TLS listener; needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM), reloaded on SIGHUP (sets tls.cert_file).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM), reloaded on SIGHUP (sets tls.key_file).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Admin HTTP listener: /metrics, /healthz, /readyz, POST /drain [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Embedded store directory [default: ./imgw-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Write the bound listener addresses to FILE as JSON (`{"ws":..,"tcp":..,"admin":..}`)
    /// once bound: with port 0 in a listen address, the port the kernel chose.
    #[arg(long, value_name = "FILE")]
    pub ports_file: Option<PathBuf>,
    /// Shard executors; 0 = all cores but one.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// When a send is acknowledged [default: local: the embedded store in --data-dir].
    #[arg(long, value_name = "memory|local|backend")]
    pub durability: Option<Durability>,
    /// MySQL / MariaDB URL (mysql://user:password@host:port/db): the durable store of
    /// durability `backend` (sets mysql.url).
    #[arg(long, value_name = "URL")]
    pub mysql: Option<String>,
    /// Redis URL: presence, device routes and dedupe keys (sets redis.url).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Kafka bootstrap brokers: the messages, push and route topics (sets kafka.brokers).
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka: Option<String>,
    /// Cluster mode: this node's name (sets cluster.node_id). Needs --durability backend,
    /// --mysql, --redis and --kafka.
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Accept token = user id in tenant "dev". Demos only; loudly logged.
    #[arg(long)]
    pub insecure_dev_auth: bool,
    /// Read the HS256 JWT secret from this environment variable (never from argv).
    #[arg(long, value_name = "VAR")]
    pub jwt_secret_env: Option<String>,
    /// Read the admin API's bearer token from this environment variable (required to listen
    /// for admin requests beyond loopback).
    #[arg(long, value_name = "VAR")]
    pub admin_token_env: Option<String>,
    /// Allowed WebSocket Origin (repeatable; replaces the file's list; "*" allows all).
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// Serve the WebSocket echo endpoint at /echo (conformance testing only).
    #[arg(long)]
    pub ws_echo: bool,
    /// Serve the chat page (/chat) and the dashboard (/dashboard) on the admin listener; the
    /// pages' origin may open WebSockets without --allowed-origin (sets server.web).
    #[arg(long)]
    pub web: bool,
    /// Log level: error, warn, info, debug, trace or off [default: RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    pub log: Option<String>,
}

#[derive(Args, Debug, Default, Clone)]
pub struct PreflightArgs {
    /// Connections this host should hold [default: limits.max_conns].
    #[arg(long, value_name = "N")]
    pub conns: Option<u64>,
    /// TOML configuration file (shards, io_memory_kib, backlog, max_conns).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Shard executors to plan for; 0 = all cores but one.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// The embedded store's directory to check [default: server.data_dir, ./imgw-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The durability to check for [default: server.durability, local].
    #[arg(long, value_name = "memory|local|backend")]
    pub durability: Option<Durability>,
}

/// Why `serve` refused its command line or configuration. All map to exit code 2.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--jwt-secret-env {0}: the environment variable is unset or empty")]
    MissingSecret(String),
    #[error("--admin-token-env {0}: the environment variable is unset or empty")]
    MissingAdminToken(String),
    #[error(
        "external backends not available yet (requested: {0}); \
         durability `backend` works with --mysql"
    )]
    BackendsUnavailable(String),
}

/// Applies `serve`'s flags over `config` (a flag given wins; an absent flag leaves the file's
/// value). `env` looks up environment variables (for `--jwt-secret-env`).
pub fn apply_flags(
    config: &mut Config,
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), CliError> {
    let s = &mut config.server;
    if let Some(a) = args.ws_listen {
        s.ws_listen = a;
    }
    if let Some(a) = args.tcp_listen {
        s.tcp_listen = a;
    }
    if let Some(a) = args.admin_listen {
        s.admin_listen = a;
    }
    if let Some(a) = args.wss_listen {
        s.wss_listen = Some(a);
    }
    if let Some(a) = args.tls_listen {
        s.tls_listen = Some(a);
    }
    if let Some(f) = &args.tls_cert {
        config.tls.cert_file = Some(f.clone());
    }
    if let Some(f) = &args.tls_key {
        config.tls.key_file = Some(f.clone());
    }
    if let Some(d) = &args.data_dir {
        s.data_dir = d.clone();
    }
    if let Some(f) = &args.ports_file {
        s.ports_file = Some(f.clone());
    }
    if let Some(d) = args.durability {
        s.durability = d;
    }
    if args.ws_echo {
        s.ws_echo = true;
    }
    if args.web {
        s.web = true;
    }
    if let Some(url) = &args.mysql {
        config.mysql.url = Some(url.clone());
    }
    if let Some(n) = args.shards {
        config.runtime.shards = n;
    }
    if args.insecure_dev_auth {
        config.auth.insecure_dev_auth = true;
    }
    if let Some(var) = &args.jwt_secret_env {
        match env(var) {
            Some(secret) if !secret.is_empty() => config.auth.jwt_hs256_secret = Some(secret),
            _ => return Err(CliError::MissingSecret(var.clone())),
        }
    }
    if let Some(var) = &args.admin_token_env {
        match env(var) {
            Some(token) if !token.is_empty() => config.auth.admin_token = Some(token),
            _ => return Err(CliError::MissingAdminToken(var.clone())),
        }
    }
    if !args.allowed_origins.is_empty() {
        config.ws.allowed_origins = args.allowed_origins.clone();
    }
    if let Some(url) = &args.redis {
        config.redis.url = Some(url.clone());
    }
    if let Some(brokers) = &args.kafka {
        config.kafka.brokers = Some(brokers.clone());
    }
    if let Some(id) = &args.node_id {
        config.cluster.node_id = Some(id.clone());
    }
    Ok(())
}

/// What external backend the merged configuration asks for that this build cannot serve, if
/// any. (MySQL, Redis and Kafka are all served; `Config::validate` checks their combination.)
pub fn backends_requested(_config: &Config, _args: &ServeArgs) -> Option<String> {
    let what: Vec<&str> = Vec::new();
    (!what.is_empty()).then(|| what.join(", "))
}

/// `serve`'s configuration: the file (or defaults), then flags, then validation.
pub fn serve_config(
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, CliError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    apply_flags(&mut config, args, env)?;
    if let Some(what) = backends_requested(&config, args) {
        return Err(CliError::BackendsUnavailable(what));
    }
    config.validate()?;
    Ok(config)
}

/// `preflight`'s configuration: the file (or defaults), `--shards`, `--data-dir` and
/// `--durability`. Not validated: auth settings do not matter to host checks.
pub fn preflight_config(args: &PreflightArgs) -> Result<Config, CliError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(n) = args.shards {
        config.runtime.shards = n;
    }
    if let Some(d) = &args.data_dir {
        config.server.data_dir = d.clone();
    }
    if let Some(d) = args.durability {
        config.server.durability = d;
    }
    Ok(config)
}

/// The log level: `--log` if given (an unknown level is an error), else `RUST_LOG`, else info.
/// `RUST_LOG` directives like `imgw=debug,glommio=warn` reduce to their most verbose level;
/// an unparseable `RUST_LOG` falls back to info (`Err` carries the warning to print).
pub fn log_level(
    flag: Option<&str>,
    rust_log: Option<&str>,
) -> Result<LevelFilter, (LevelFilter, String)> {
    if let Some(f) = flag {
        return f.trim().parse().map_err(|_| {
            (
                LevelFilter::INFO,
                format!("--log {f:?}: expected error, warn, info, debug, trace or off"),
            )
        });
    }
    let Some(env) = rust_log.filter(|v| !v.trim().is_empty()) else {
        return Ok(LevelFilter::INFO);
    };
    env.split(',')
        .filter_map(|d| {
            let level = d.rsplit('=').next().unwrap_or(d);
            level.trim().parse::<LevelFilter>().ok()
        })
        .max()
        .ok_or_else(|| {
            (
                LevelFilter::INFO,
                format!("RUST_LOG={env:?} holds no level; logging at info"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["imgw", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Serve(a) => a,
            other => panic!("not serve: {other:?}"),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn merged(argv: &[&str]) -> Config {
        let mut c = Config::default();
        apply_flags(&mut c, &parse(argv), &no_env).unwrap();
        c
    }

    /// `imgw --version`: the package version and the commit (12 hex digits, or "unknown"
    /// when built outside a git checkout).
    #[test]
    fn version_names_the_commit() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let v = cmd.get_version().unwrap_or_default();
        let (pkg, rest) = v.split_once(" (commit ").unwrap();
        assert_eq!(pkg, env!("CARGO_PKG_VERSION"));
        let commit = rest.strip_suffix(')').unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{v}"
        );
    }

    #[test]
    fn no_flags_means_defaults() {
        let c = merged(&[]);
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
        assert!(backends_requested(&c, &parse(&[])).is_none());
    }

    #[test]
    fn each_flag_overrides() {
        let c = merged(&["--ws-listen", "0.0.0.0:1"]);
        assert_eq!(c.server.ws_listen.to_string(), "0.0.0.0:1");
        let c = merged(&["--tcp-listen", "[::1]:2"]);
        assert_eq!(c.server.tcp_listen.to_string(), "[::1]:2");
        let c = merged(&["--admin-listen", "127.0.0.1:3"]);
        assert_eq!(c.server.admin_listen.port(), 3);
        let c = merged(&["--data-dir", "/var/lib/imgw"]);
        assert_eq!(c.server.data_dir, PathBuf::from("/var/lib/imgw"));
        let c = merged(&["--shards", "3"]);
        assert_eq!(c.runtime.shards, 3);
        assert_eq!(c.shard_count(), 3);
        assert_eq!(
            merged(&[]).server.durability,
            Durability::Local,
            "with no backend the default is the embedded store (SPEC 1, 6)"
        );
        let c = merged(&["--durability", "memory"]);
        assert_eq!(c.server.durability, Durability::Memory);
        let c = merged(&["--insecure-dev-auth"]);
        assert!(c.auth.insecure_dev_auth);
        let c = merged(&["--ws-echo"]);
        assert!(c.server.ws_echo);
        assert!(!merged(&[]).server.web, "--web is off by default");
        let c = merged(&["--web"]);
        assert!(c.server.web);
        let c = merged(&[
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
        ]);
        assert_eq!(
            c.ws.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        let mut c = Config::default();
        let env = |k: &str| (k == "IMGW_SECRET").then(|| "s3cret".to_string());
        apply_flags(&mut c, &parse(&["--jwt-secret-env", "IMGW_SECRET"]), &env).unwrap();
        assert_eq!(c.auth.jwt_hs256_secret.as_deref(), Some("s3cret"));
        c.validate().unwrap();
    }

    #[test]
    fn bad_flag_values_are_rejected() {
        for argv in [
            &["imgw", "serve", "--durability", "cloud"][..],
            &["imgw", "serve", "--ws-listen", "nowhere"],
            &["imgw", "serve", "--shards", "-1"],
            &["imgw", "serve", "--jwt-secret"],
            &["imgw", "preflight", "--conns", "many"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn missing_secret_env_is_an_error() {
        let mut c = Config::default();
        let err = apply_flags(&mut c, &parse(&["--jwt-secret-env", "NOPE"]), &no_env);
        assert!(matches!(err, Err(CliError::MissingSecret(v)) if v == "NOPE"));
        let empty = |_: &str| Some(String::new());
        let err = apply_flags(&mut c, &parse(&["--jwt-secret-env", "E"]), &empty);
        assert!(err.is_err());
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("imgw-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("imgw.toml");
        std::fs::write(
            &file,
            "[server]\nws_listen = \"127.0.0.1:1111\"\ntcp_listen = \"127.0.0.1:2222\"\n\
             [auth]\ninsecure_dev_auth = true\n[ws]\nallowed_origins = [\"https://file\"]\n\
             [runtime]\nshards = 2\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = serve_config(&parse(&["--config", path]), &no_env).unwrap();
        assert_eq!(c.server.ws_listen.port(), 1111);
        assert_eq!(c.server.tcp_listen.port(), 2222);
        assert_eq!(c.ws.allowed_origins, ["https://file"]);
        assert_eq!(c.runtime.shards, 2);
        let c = serve_config(
            &parse(&[
                "--config",
                path,
                "--ws-listen",
                "127.0.0.1:3333",
                "--allowed-origin",
                "https://flag",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(c.server.ws_listen.port(), 3333, "flag wins over file");
        assert_eq!(c.server.tcp_listen.port(), 2222, "file kept where no flag");
        assert_eq!(c.ws.allowed_origins, ["https://flag"]);
        assert!(
            c.auth.insecure_dev_auth,
            "an absent bool flag keeps the file's true"
        );

        std::fs::write(&file, "[server]\nbogus = 1\n").unwrap();
        assert!(matches!(
            serve_config(&parse(&["--config", path]), &no_env),
            Err(CliError::Config(ConfigError::Parse { .. }))
        ));
        std::fs::write(&file, "[server]\ndurability = \"backend\"\n").unwrap();
        assert!(matches!(
            serve_config(&parse(&["--config", path, "--insecure-dev-auth"]), &no_env),
            Err(CliError::Config(ConfigError::Invalid(_)))
        ));
        let c = serve_config(
            &parse(&[
                "--config",
                path,
                "--insecure-dev-auth",
                "--mysql",
                "mysql://u@127.0.0.1/imgw",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(c.mysql.url.as_deref(), Some("mysql://u@127.0.0.1/imgw"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            serve_config(&parse(&["--config", path]), &no_env),
            Err(CliError::Config(ConfigError::Read { .. }))
        ));
    }

    #[test]
    fn validation_runs_after_merge() {
        // Defaults alone have no auth: refused; the flag makes them valid.
        assert!(matches!(
            serve_config(&parse(&[]), &no_env),
            Err(CliError::Config(ConfigError::Invalid(_)))
        ));
        serve_config(&parse(&["--insecure-dev-auth"]), &no_env).unwrap();
    }

    #[test]
    fn redis_and_kafka_flags_set_their_sections() {
        let argv = [
            "--insecure-dev-auth",
            "--durability",
            "backend",
            "--redis",
            "redis://127.0.0.1:6379",
            "--kafka",
            "127.0.0.1:9092",
        ];
        let c = serve_config(&parse(&argv), &no_env).unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.kafka.brokers.as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(c.server.durability, Durability::Backend);
        // Services run on the I/O core: not at durability memory. At the default (local)
        // they may.
        let argv = ["--insecure-dev-auth", "--redis", "redis://127.0.0.1:6379"];
        let c = serve_config(&parse(&argv), &no_env).unwrap();
        assert_eq!(c.server.durability, Durability::Local);
        let argv = [
            "--insecure-dev-auth",
            "--durability",
            "memory",
            "--redis",
            "redis://127.0.0.1:6379",
        ];
        assert!(matches!(
            serve_config(&parse(&argv), &no_env),
            Err(CliError::Config(ConfigError::Invalid(_)))
        ));
    }

    #[test]
    fn backend_durability_needs_a_backend() {
        let argv = ["--insecure-dev-auth", "--durability", "backend"];
        let err = serve_config(&parse(&argv), &no_env).unwrap_err();
        assert!(err.to_string().contains("needs a backend"), "{err}");
        for extra in [
            ["--kafka", "127.0.0.1:9092"],
            ["--mysql", "mysql://u@127.0.0.1/imgw"],
        ] {
            let mut a = argv.to_vec();
            a.extend_from_slice(&extra);
            serve_config(&parse(&a), &no_env).unwrap();
        }
    }

    #[test]
    fn preflight_args() {
        let cli =
            Cli::try_parse_from(["imgw", "preflight", "--conns", "5000", "--shards", "2"]).unwrap();
        let Command::Preflight(a) = cli.command else {
            panic!("not preflight")
        };
        assert_eq!(a.conns, Some(5000));
        assert_eq!(preflight_config(&a).unwrap().shard_count(), 2);
    }

    #[test]
    fn log_levels() {
        assert_eq!(log_level(None, None), Ok(LevelFilter::INFO));
        assert_eq!(
            log_level(Some("debug"), Some("trace")),
            Ok(LevelFilter::DEBUG)
        );
        assert_eq!(log_level(Some("WARN"), None), Ok(LevelFilter::WARN));
        assert!(log_level(Some("loud"), None).is_err());
        assert_eq!(log_level(None, Some("error")), Ok(LevelFilter::ERROR));
        assert_eq!(
            log_level(None, Some("imgw=debug,glommio=warn")),
            Ok(LevelFilter::DEBUG)
        );
        assert_eq!(log_level(None, Some("")), Ok(LevelFilter::INFO));
        assert_eq!(
            log_level(None, Some("imgw")).unwrap_err().0,
            LevelFilter::INFO
        );
    }
}
