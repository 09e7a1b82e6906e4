use std::sync::Arc;
fn main() {
    let mut cfg = imgw::config::Config::default();
    cfg.auth.insecure_dev_auth = true;
    cfg.runtime.shards = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    cfg.runtime.pin = false;
    cfg.server.ws_echo = true;
    let n = cfg.shard_count();
    let control = Arc::new(imgw::control::Control::new(n));
    let metrics = Arc::new(imgw::metrics::Metrics::new(n));
    let c2 = control.clone();
    std::thread::spawn(move || { std::thread::sleep(std::time::Duration::from_secs(20)); c2.start_drain(); });
    println!("{:?}", imgw::runtime::run(cfg, control, metrics.clone()));
}
