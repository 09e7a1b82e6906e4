//! The `imgw` command line as scripts see it (SPEC 7): flag names, exit codes, preflight lines.

use std::process::{Command, Output};

fn imgw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run imgw")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serve_help_lists_the_contract_flags() {
    let out = imgw(&["serve", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--config",
        "--ws-listen",
        "--tcp-listen",
        "--admin-listen",
        "--data-dir",
        "--shards",
        "--durability",
        "--mysql",
        "--redis",
        "--kafka",
        "--insecure-dev-auth",
        "--jwt-secret-env",
        "--admin-token-env",
        "--allowed-origin",
        "--ws-echo",
        "--ports-file",
        "--log",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    let help = text(&imgw(&["preflight", "--help"]).stdout);
    assert!(help.contains("--conns") && help.contains("--config"));
}

#[test]
fn external_backends_exit_2_with_a_clear_message() {
    for (flags, says) in [
        (&["--durability", "backend"][..], "needs a backend"),
        // Redis and Kafka need the I/O core: not at durability memory (the default, local,
        // has one).
        (
            &["--durability", "memory", "--kafka", "127.0.0.1:9092"],
            "use durability local or backend",
        ),
        (
            &["--durability", "memory", "--redis", "redis://127.0.0.1"],
            "use durability local or backend",
        ),
    ] {
        let mut argv = vec![
            "serve",
            "--insecure-dev-auth",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        argv.extend_from_slice(flags);
        let out = imgw(&argv);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    }
}

/// The admin API is not served beyond loopback without a bearer token, and a token variable
/// that is unset or short is refused, all before anything listens.
#[test]
fn an_admin_port_beyond_loopback_needs_a_token() {
    let out = imgw(&[
        "serve",
        "--insecure-dev-auth",
        "--admin-listen",
        "0.0.0.0:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("beyond loopback") && err.contains("--admin-token-env"),
        "{err}"
    );
    let out = imgw(&[
        "serve",
        "--insecure-dev-auth",
        "--admin-listen",
        "0.0.0.0:0",
        "--admin-token-env",
        "IMGW_TEST_ADMIN_TOKEN_UNSET",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("IMGW_TEST_ADMIN_TOKEN_UNSET"));
    let out = Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--admin-listen",
            "0.0.0.0:0",
            "--admin-token-env",
            "IMGW_TEST_ADMIN_TOKEN",
        ])
        .env("IMGW_TEST_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("at least 16 bytes"));
}

#[test]
fn backend_durability_needs_a_backend() {
    let out = imgw(&[
        "serve",
        "--insecure-dev-auth",
        "--admin-listen",
        "127.0.0.1:0",
        "--durability",
        "backend",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("durability `backend` needs a backend") && err.contains("--mysql"),
        "{err}"
    );
}

#[test]
fn usage_and_config_errors_exit_2() {
    let out = imgw(&["serve", "--admin-listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no authentication configured"));
    assert_eq!(imgw(&["serve", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        imgw(&["serve", "--durability", "cloud"]).status.code(),
        Some(2)
    );
    let out = imgw(&["serve", "--insecure-dev-auth", "--log", "loud"]);
    assert_eq!(out.status.code(), Some(2));
    let out = imgw(&["serve", "--jwt-secret-env", "IMGW_TEST_UNSET_SECRET_VAR"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("IMGW_TEST_UNSET_SECRET_VAR"));
    let out = imgw(&["serve", "--config", "/nonexistent/imgw.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn preflight_prints_one_line_per_check_and_the_ceiling() {
    let out = imgw(&["preflight", "--conns", "100", "--shards", "1"]);
    let stdout = text(&out.stdout);
    for name in [
        "io_uring",
        "memlock",
        "nofile",
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "data directory",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.get(5..).is_some_and(|rest| rest.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} line in\n{stdout}"));
        assert!(
            ["OK ", "WARN", "FAIL"].iter().any(|p| line.starts_with(p)),
            "{line}"
        );
        if !line.starts_with("OK") {
            assert!(line.contains(" | fix: "), "{line}");
        }
    }
    assert!(stdout.contains("connection ceiling implied: "), "{stdout}");
    let any_fail = stdout.lines().any(|l| l.starts_with("FAIL"));
    assert_eq!(
        out.status.code(),
        Some(if any_fail { 1 } else { 0 }),
        "{stdout}"
    );
}

/// Where acked messages would be kept: a data directory on tmpfs (here /dev/shm, as on
/// Debian) is a warning, and so is durability memory; neither fails the run by itself.
#[test]
fn preflight_warns_of_a_store_that_keeps_nothing() {
    let line = |args: &[&str]| {
        let mut argv = vec!["preflight", "--conns", "100", "--shards", "1"];
        argv.extend_from_slice(args);
        let stdout = text(&imgw(&argv).stdout);
        stdout
            .lines()
            .find(|l| l.contains("data directory"))
            .unwrap_or_else(|| panic!("no data directory line in\n{stdout}"))
            .to_string()
    };
    let shm = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/dev/shm") && l.contains(" - tmpfs "));
    assert!(
        shm,
        "this test needs /dev/shm on tmpfs, as Debian mounts it"
    );
    let l = line(&["--data-dir", "/dev/shm/imgw-preflight-test/data"]);
    assert!(l.starts_with("WARN") && l.contains("on tmpfs"), "{l}");
    let dir = std::env::temp_dir().join(format!("imgw-preflight-{}", std::process::id()));
    let l = line(&["--data-dir", dir.to_str().unwrap()]);
    assert!(l.starts_with("OK") && l.contains("writable"), "{l}");
    let l = line(&["--durability", "memory"]);
    assert!(
        l.starts_with("WARN") && l.contains("durability memory"),
        "{l}"
    );
}

/// A data directory written by the fjall store of earlier builds is refused at start with one
/// line naming the way out, instead of serving beside it as if every message were gone.
#[test]
fn a_data_directory_of_the_previous_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    std::fs::write(dir.path().join("store").join("version"), b"old").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgw"))
        .args([
            "serve",
            "--insecure-dev-auth",
            "--durability",
            "local",
            "--data-dir",
        ])
        .arg(dir.path())
        .args([
            "--ws-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("imgw served a data directory holding the previous store");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("holds the fjall store") && err.contains("empty --data-dir"),
        "{err}"
    );
    assert!(
        !dir.path().join("log").exists(),
        "a log store was created beside it"
    );
}
