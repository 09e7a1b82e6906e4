//! The `imgw` binary (SPEC 7): `imgw serve` and `imgw preflight`.
//!
//! This file owns process concerns only: logging set-up, signals, exit codes and the order of
//! start-up. The parts live in the library: `imgw::cli` (flags, merge over the file),
//! `imgw::preflight` (host checks), `imgw::admin` (the admin port) and `imgw::runtime` (shards).
//!
//! Exit codes: 0 after a clean drain; 1 a runtime failure or a FAIL-level host check; 2 a usage
//! or configuration error (including backends that are not available yet); 130 a second
//! SIGINT/SIGTERM during a drain.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use imgw::cli::{self, Cli, Command, PreflightArgs, ServeArgs, EXIT_USAGE};
use imgw::config::Config;
use imgw::control::Control;
use imgw::metrics::Metrics;
use imgw::preflight::{self, HostFacts, Level, Target};

const EXIT_FAIL: u8 = 1;
/// Exit status on the second SIGINT/SIGTERM (128 + SIGINT, as shells report an interrupt).
const EXIT_SIGNAL: i32 = 130;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Preflight(args) => preflight_cmd(&args),
    }
}

/// The gateway itself: blocks until drained.
fn run_gateway(
    config: Config,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    imgw::runtime::run(config, control, metrics).map_err(Into::into)
}

fn serve(args: &ServeArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log.as_deref()) {
        eprintln!("imgw: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut config = match cli::serve_config(args, &|var| std::env::var(var).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgw: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let host = HostFacts::read();
    let target = Target::from_config(&config, None);
    let checks = preflight::start_checks(&host, &target);
    if preflight::worst(&checks) == Level::Fail {
        for c in checks.iter().filter(|c| c.level == Level::Fail) {
            eprintln!("{c}");
        }
        eprintln!("imgw: refusing to start: host checks failed (`imgw preflight` runs them all)");
        return ExitCode::from(EXIT_FAIL);
    }
    for c in checks.iter().filter(|c| c.level == Level::Warn) {
        tracing::warn!("{c}");
    }
    match preflight::raise_nofile() {
        Ok(n) => tracing::info!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the soft RLIMIT_NOFILE"),
    }

    if config.auth.insecure_dev_auth {
        let msg = "INSECURE DEV AUTH: any client can log in as any user (token = user id, \
                   tenant \"dev\"); never use this outside a demo";
        tracing::warn!("{msg}");
        eprintln!("\n!!! {msg} !!!\n");
    }

    let shards = config.shard_count();
    let control = Arc::new(Control::new(shards));
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        match imgw::tls::Certs::load(cert, key) {
            Ok(certs) => control.set_tls(Arc::new(certs)),
            Err(e) => {
                eprintln!("imgw: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let metrics = Arc::new(Metrics::new(shards));
    if let Err(e) = install_signals(Arc::clone(&control), Arc::clone(&metrics)) {
        eprintln!("imgw: installing signal handlers: {e}");
        return ExitCode::from(EXIT_FAIL);
    }
    let admin = match start_admin(&config, &control, &metrics) {
        Ok(addr) => {
            // The bound address (port 0 resolved), for the ports file.
            config.server.admin_listen = addr;
            if config.server.web && !config.ws.allowed_origins.iter().any(|o| o == "*") {
                // The pages served on the admin port open WebSockets from its origin.
                let origins = imgw::web::page_origins(addr);
                tracing::info!(?origins, "--web: chat page at http://{addr}/chat, dashboard at /dashboard; their origin may open WebSockets");
                config.ws.allowed_origins.extend(origins);
            }
            addr
        }
        Err(e) => {
            eprintln!("imgw: admin listener {}: {e}", config.server.admin_listen);
            return ExitCode::from(EXIT_FAIL);
        }
    };
    tracing::info!(
        ws = %config.server.ws_listen,
        tcp = %config.server.tcp_listen,
        wss = ?config.server.wss_listen,
        tls = ?config.server.tls_listen,
        admin = %admin,
        shards,
        durability = ?config.server.durability,
        "starting imgw {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("IMGW_GIT_COMMIT")
    );

    match run_gateway(config, control, metrics) {
        Ok(()) => {
            tracing::info!("drained; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("imgw: {e}");
            ExitCode::from(EXIT_FAIL)
        }
    }
}

/// Binds the admin port (bind errors surface here) and serves it on its own thread.
fn start_admin(
    config: &Config,
    control: &Arc<Control>,
    metrics: &Arc<Metrics>,
) -> std::io::Result<std::net::SocketAddr> {
    let web = config.server.web.then(|| imgw::web::WebConfig {
        ws_path: config.ws.path.clone(),
        dev_auth: config.auth.insecure_dev_auth,
    });
    let server = imgw::admin::AdminServer::bind(config.server.admin_listen)?
        .with_token(config.auth.admin_token.clone())
        .with_web(web);
    let addr = server.local_addr()?;
    server.spawn(Arc::clone(control), Arc::clone(metrics))?;
    Ok(addr)
}

fn preflight_cmd(args: &PreflightArgs) -> ExitCode {
    let config = match cli::preflight_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgw: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let host = HostFacts::read();
    let target = Target::from_config(&config, args.conns);
    println!(
        "imgw preflight: target {} connections, {} shard(s), io_memory {} KiB per shard, \
         backlog {}",
        target.conns,
        target.shards,
        target.io_memory_bytes / 1024,
        target.backlog
    );
    let mut checks = preflight::run_all(&host, &target);
    let dir = preflight::DataDir::read(&config);
    checks.push(preflight::check_store(
        config.server.durability,
        dir.as_ref(),
    ));
    for c in &checks {
        println!("{c}");
    }
    match preflight::ceiling(&host, &target) {
        Some(c) => println!("{c}"),
        None => println!("connection ceiling implied: unknown (no limit could be read)"),
    }
    println!(
        "configured limits.max_conns: {} (imgw's own cap; per-connection memory: see README)",
        config.limits.max_conns
    );
    if preflight::worst(&checks) == Level::Fail {
        ExitCode::from(EXIT_FAIL)
    } else {
        ExitCode::SUCCESS
    }
}

/// Log level from `--log`, else `RUST_LOG`, else info; logs go to stderr.
fn init_logging(flag: Option<&str>) -> Result<(), String> {
    let env = std::env::var("RUST_LOG").ok();
    let (level, warning) = match cli::log_level(flag, env.as_deref()) {
        Ok(level) => (level, None),
        Err((_, message)) if flag.is_some() => return Err(message),
        Err((level, message)) => (level, Some(message)),
    };
    // Fails only if a subscriber is already installed, which nothing else here does.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// SIGTERM/SIGINT start a drain; a second one exits at once with status 130.
/// SIGHUP: reads the TLS certificate and key again; a refused pair leaves the old one.
fn reload_tls(control: &Control, metrics: &Metrics) {
    let Some(certs) = control.tls() else {
        tracing::info!("SIGHUP: no TLS listener, nothing to reload");
        return;
    };
    match certs.reload(&metrics.tls) {
        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded; new connections get it"),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: TLS certificate refused; keeping the old one")
        }
    }
}

fn install_signals(control: Arc<Control>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let armed = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // Order matters: the exit action runs before the flag is set, so the first signal only
        // arms it and the second one exits (inside the handler: works even if a thread hangs).
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_SIGNAL, Arc::clone(&armed))?;
        signal_hook::flag::register(sig, Arc::clone(&armed))?;
    }
    // SIGHUP reloads the TLS certificate (and is otherwise ignored rather than fatal).
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("imgw-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    reload_tls(&control, &metrics);
                    continue;
                }
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                tracing::warn!(
                    signal = name,
                    "draining: no new connections, goaway to clients; send it again to exit now"
                );
                control.start_drain();
            }
        })?;
    Ok(())
}
