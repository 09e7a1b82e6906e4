//! `loadgen chaos`: a fault campaign. While a steady load runs with integrity checking (1:1
//! chat, group fan-out and reconnect churn, every connection with `--reconnect`), the
//! coordinator injects faults on a schedule drawn from `--seed`: SIGKILL and restart of the
//! gateway, SIGTERM (drain) and restart, SIGSTOP/SIGCONT of the gateway and of each backend,
//! a backend stopped and started by its own commands, and reconnect storms (every connection
//! dropped at once). After the run every client reconnects and catches up (the grace
//! period), and the verdict counts what was acked and lost, shown twice or out of order.
//!
//! This module owns the fault kinds, the seeded schedule (the same seed, duration and kinds
//! give the same schedule), the gateway process it starts and restarts (`--serve`), and the
//! state machine that runs one fault at a time from the coordinator's loop. It never blocks
//! that loop for long: commands and restarts are child processes it polls.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One kind of fault.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL the gateway; start it again after the hold.
    Kill,
    /// SIGTERM the gateway (it drains: `goaway`, close, exit); start it again once it exited.
    Term,
    /// SIGSTOP the gateway for the hold, then SIGCONT.
    Pause,
    /// Every loadgen connection dropped at once; all reconnect.
    Storm,
    /// SIGSTOP a backend (by its pid file) for the hold, then SIGCONT.
    BackendPause(String),
    /// Run a backend's stop command, wait the hold, run its start command.
    BackendRestart(String),
}

impl FaultKind {
    pub fn name(&self) -> String {
        match self {
            FaultKind::Kill => "kill".into(),
            FaultKind::Term => "term".into(),
            FaultKind::Pause => "pause".into(),
            FaultKind::Storm => "storm".into(),
            FaultKind::BackendPause(b) => format!("pause:{b}"),
            FaultKind::BackendRestart(b) => format!("restart:{b}"),
        }
    }

    fn needs_gateway(&self) -> bool {
        matches!(self, FaultKind::Kill | FaultKind::Term | FaultKind::Pause)
    }

    /// `kill`, `term`, `pause`, `storm`, `pause:NAME`, `restart:NAME`.
    pub fn parse(s: &str) -> Result<FaultKind, String> {
        Ok(match s.split_once(':') {
            None => match s {
                "kill" => FaultKind::Kill,
                "term" => FaultKind::Term,
                "pause" => FaultKind::Pause,
                "storm" => FaultKind::Storm,
                _ => return Err(format!("unknown fault {s:?}")),
            },
            Some(("pause", b)) if !b.is_empty() => FaultKind::BackendPause(b.into()),
            Some(("restart", b)) if !b.is_empty() => FaultKind::BackendRestart(b.into()),
            _ => return Err(format!("unknown fault {s:?}")),
        })
    }
}

/// A backend the campaign may pause (`--backend NAME=PIDFILE`) and restart
/// (`--backend-stop NAME=CMD`, `--backend-start NAME=CMD`).
#[derive(Clone, Debug, Default)]
pub struct Backend {
    pub name: String,
    pub pidfile: Option<PathBuf>,
    pub stop: Option<String>,
    pub start: Option<String>,
}

/// The campaign's options (see `loadgen chaos --help`).
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub seed: u64,
    pub kinds: Vec<FaultKind>,
    /// `imgw serve` arguments (without `serve`); `None`: the gateway is not ours (only
    /// storms and backend faults).
    pub serve: Option<Vec<String>>,
    pub imgw_bin: PathBuf,
    pub backends: Vec<Backend>,
    /// The quiet time between two faults, drawn from this range.
    pub gap: (Duration, Duration),
    /// How long a fault lasts (a pause, the time down), drawn from this range.
    pub hold: (Duration, Duration),
    pub gateway_log: Option<PathBuf>,
}

impl ChaosOptions {
    /// Checks that every fault kind can be carried out with what was given.
    pub fn check(&self) -> Result<(), String> {
        if self.kinds.is_empty() {
            return Err("--faults names no fault".into());
        }
        for k in &self.kinds {
            if k.needs_gateway() && self.serve.is_none() {
                return Err(format!(
                    "fault {} needs --serve (loadgen starts and restarts the gateway)",
                    k.name()
                ));
            }
            let backend = |b: &str| self.backends.iter().find(|x| x.name == b);
            match k {
                FaultKind::BackendPause(b)
                    if backend(b).and_then(|x| x.pidfile.as_ref()).is_none() =>
                {
                    return Err(format!("fault pause:{b} needs --backend {b}=PIDFILE"))
                }
                FaultKind::BackendRestart(b)
                    if backend(b).is_none_or(|x| x.stop.is_none() || x.start.is_none()) =>
                {
                    return Err(format!(
                        "fault restart:{b} needs --backend-stop {b}=CMD and --backend-start {b}=CMD"
                    ))
                }
                _ => {}
            }
        }
        if self.gap.0 > self.gap.1 || self.hold.0 > self.hold.1 || self.hold.1.is_zero() {
            return Err("--fault-gap and --fault-hold: MIN-MAX with MIN <= MAX".into());
        }
        Ok(())
    }

    /// The default faults: the gateway's (with `--serve`), storms, and each backend's pause
    /// and restart where they were given.
    pub fn default_kinds(serve: bool, backends: &[Backend]) -> Vec<FaultKind> {
        let mut v = Vec::new();
        if serve {
            v.extend([FaultKind::Kill, FaultKind::Term, FaultKind::Pause]);
        }
        v.push(FaultKind::Storm);
        for b in backends {
            if b.pidfile.is_some() {
                v.push(FaultKind::BackendPause(b.name.clone()));
            }
            if b.stop.is_some() && b.start.is_some() {
                v.push(FaultKind::BackendRestart(b.name.clone()));
            }
        }
        v
    }
}

/// `2s-5s` or one duration.
pub fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    Ok((
        crate::config::parse_duration(a)?,
        crate::config::parse_duration(b)?,
    ))
}

/// A fault at a time into the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub kind: FaultKind,
    pub hold: Duration,
}

/// splitmix64: a small deterministic generator (the schedule must replay from the seed on
/// any build; no distribution quality beyond that is needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 {
            0
        } else {
            self.next() % (span + 1)
        })
    }
}

/// The faults of a run of `duration`: one at a time, a gap before each, none starting in
/// the last second. Deterministic in its arguments.
pub fn schedule(
    seed: u64,
    kinds: &[FaultKind],
    duration: Duration,
    gap: (Duration, Duration),
    hold: (Duration, Duration),
) -> Vec<Planned> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    let mut t = rng.between(gap);
    let last = duration.saturating_sub(Duration::from_secs(1));
    while t < last {
        let kind = kinds[(rng.next() % kinds.len() as u64) as usize].clone();
        let hold = if kind == FaultKind::Storm {
            Duration::ZERO
        } else {
            rng.between(hold)
        };
        out.push(Planned { at: t, kind, hold });
        t += hold + rng.between(gap);
    }
    out
}

/// The gateway's listeners, from its `--ports-file`.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub ws: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: SocketAddr,
}

/// The gateway loadgen runs: `IMGW serve ARGS --ports-file F`; a restart adds the
/// addresses it bound the first time (`imgw` takes a repeated flag's last value), so the
/// clients find it where it was.
struct Gateway {
    bin: PathBuf,
    args: Vec<String>,
    ports_file: PathBuf,
    log: Option<PathBuf>,
    child: Option<Child>,
    ports: Option<Ports>,
}

/// How long the first start may take to bind its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A drain (SIGTERM) that has not ended by then is cut short with SIGKILL.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// A gateway that exits by itself (a restart that could not bind) is started again at most
/// this many times in a row.
const MAX_RESPAWNS: u32 = 20;
const RESPAWN_DELAY: Duration = Duration::from_millis(300);
/// A backend's stop or start command is given this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Gateway {
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve").args(&self.args);
        if let Some(p) = self.ports {
            cmd.args(["--ws-listen", &p.ws.to_string()])
                .args(["--tcp-listen", &p.tcp.to_string()])
                .args(["--admin-listen", &p.admin.to_string()]);
        }
        cmd.arg("--ports-file").arg(&self.ports_file);
        cmd.stdin(Stdio::null());
        match &self.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("--gateway-log {}: {e}", path.display()))?;
                let f2 = f.try_clone().map_err(|e| e.to_string())?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The first start: waits for the ports file.
    fn start(&mut self) -> Result<Ports, String> {
        let _ = std::fs::remove_file(&self.ports_file);
        self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ports_file) {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("ports file: {e}"))?;
                let addr = |k: &str| -> Result<SocketAddr, String> {
                    v[k].as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("ports file: no {k} address in {text}"))
                };
                let p = Ports {
                    ws: addr("ws")?,
                    tcp: addr("tcp")?,
                    admin: addr("admin")?,
                };
                self.ports = Some(p);
                while !ready(p.admin) {
                    if !self.running() || Instant::now() > deadline {
                        return Err("the gateway bound its ports but never became ready".into());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(p);
            }
            if !self.running() {
                return Err(format!(
                    "the gateway exited at start (see {})",
                    self.log
                        .as_ref()
                        .map_or("--gateway-log".into(), |p| p.display().to_string())
                ));
            }
            if Instant::now() > deadline {
                return Err("the gateway did not bind its listeners within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            signal_pid(pid, sig);
        }
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGCONT (it may be paused), SIGTERM, then SIGKILL if it has not exited in time.
    fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            wait_bounded(&mut child, DRAIN_TIMEOUT);
        }
    }
}

/// `GET /readyz` on the admin listener answers 200.
fn ready(admin: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: imgw\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let n = s.read(&mut head).unwrap_or(0);
    head[..n].starts_with(b"HTTP/1.1 200")
}

fn sh(cmd: &str) -> Result<Child, String> {
    Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("sh -c {cmd:?}: {e}"))
}

fn read_pid(path: &PathBuf) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal_pid(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid (our gateway child's, or one a backend's pid file names); no
    // memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The fault under way.
enum Active {
    /// Killed; started again at `at`.
    Down { at: Instant },
    /// SIGTERM sent; started again once it exited (SIGKILL at `kill_at`).
    Draining { kill_at: Instant },
    /// A process stopped with SIGSTOP until `until`.
    Paused { pid: i32, until: Instant },
    /// A backend's stop command runs; then down for `hold`.
    Stopping {
        backend: usize,
        child: Child,
        hold: Duration,
        deadline: Instant,
    },
    /// A backend is down until `until`.
    BackendDown { backend: usize, until: Instant },
    /// A backend's start command runs.
    Starting { child: Child, deadline: Instant },
}

/// The campaign's state, driven by [`Chaos::step`] from the coordinator's loop.
pub struct Chaos {
    opts: ChaosOptions,
    gateway: Option<Gateway>,
    plan: Vec<Planned>,
    next: usize,
    active: Option<Active>,
    /// Faults started, by kind.
    pub counts: BTreeMap<String, u64>,
    /// What went wrong with the campaign itself (a restart that never came up, ...).
    pub problems: Vec<String>,
    go: Option<Instant>,
    duration: Duration,
    ended: bool,
    respawns: u32,
    respawn_at: Option<Instant>,
    /// Processes this campaign stopped and has not continued (continued on drop whatever
    /// happens).
    paused: Vec<i32>,
}

impl Chaos {
    /// Starts the gateway if the campaign runs it, and returns its listeners.
    pub fn new(opts: ChaosOptions, duration: Duration) -> Result<(Chaos, Option<Ports>), String> {
        let plan = schedule(opts.seed, &opts.kinds, duration, opts.gap, opts.hold);
        let mut chaos = Chaos {
            gateway: None,
            plan,
            next: 0,
            active: None,
            counts: BTreeMap::new(),
            problems: Vec::new(),
            go: None,
            duration,
            ended: false,
            respawns: 0,
            respawn_at: None,
            paused: Vec::new(),
            opts,
        };
        let mut ports = None;
        if let Some(args) = &chaos.opts.serve {
            let dir = std::env::temp_dir();
            let mut g = Gateway {
                bin: chaos.opts.imgw_bin.clone(),
                args: args.clone(),
                ports_file: dir.join(format!("loadgen-chaos-{}.ports.json", std::process::id())),
                log: chaos.opts.gateway_log.clone(),
                child: None,
                ports: None,
            };
            ports = Some(g.start()?);
            chaos.gateway = Some(g);
        }
        Ok((chaos, ports))
    }

    /// The schedule, one line.
    pub fn describe(&self) -> String {
        let items: Vec<String> = self
            .plan
            .iter()
            .map(|p| {
                if p.hold.is_zero() {
                    format!("{:.1}s {}", p.at.as_secs_f64(), p.kind.name())
                } else {
                    format!(
                        "{:.1}s {} {:.1}s",
                        p.at.as_secs_f64(),
                        p.kind.name(),
                        p.hold.as_secs_f64()
                    )
                }
            })
            .collect();
        format!(
            "chaos schedule (seed {}): {} fault(s): {}",
            self.opts.seed,
            self.plan.len(),
            items.join(", ")
        )
    }

    pub fn seed(&self) -> u64 {
        self.opts.seed
    }

    /// The measured run started.
    pub fn go(&mut self, now: Instant) {
        self.go = Some(now);
    }

    /// Carries the campaign forward: ends the fault under way when its time is up, starts the
    /// next one when due, and restarts a gateway that exited by itself. `storm` drops every
    /// loadgen connection (it writes `storm` to the workers). Returns a line to show, if any.
    pub fn step(&mut self, now: Instant, storm: &mut dyn FnMut()) -> Option<String> {
        let go = self.go?;
        let mut say = None;
        if !self.ended && now >= go + self.duration {
            self.ended = true;
            self.finish_active(now);
            let left = self.plan.len() - self.next;
            if left > 0 {
                say = Some(format!("chaos: {left} fault(s) not started before the end"));
            }
            self.next = self.plan.len();
        }
        self.progress_active(now);
        self.watch_gateway(now);
        if self.active.is_none() && !self.ended {
            if let Some(p) = self.plan.get(self.next).cloned() {
                if now >= go + p.at {
                    self.next += 1;
                    *self.counts.entry(p.kind.name()).or_default() += 1;
                    say = Some(format!(
                        "chaos: {} at {:.1}s",
                        p.kind.name(),
                        (now - go).as_secs_f64()
                    ));
                    self.begin(&p, now, storm);
                }
            }
        }
        say
    }

    fn begin(&mut self, p: &Planned, now: Instant, storm: &mut dyn FnMut()) {
        match &p.kind {
            FaultKind::Kill => {
                if let Some(g) = self.gateway.as_mut() {
                    g.kill_now();
                }
                self.active = Some(Active::Down { at: now + p.hold });
            }
            FaultKind::Term => {
                if let Some(g) = self.gateway.as_mut() {
                    g.signal(libc::SIGTERM);
                }
                self.active = Some(Active::Draining {
                    kill_at: now + DRAIN_TIMEOUT,
                });
            }
            FaultKind::Pause => {
                if let Some(pid) = self.gateway.as_ref().and_then(|g| g.pid()) {
                    self.pause(pid, now + p.hold);
                }
            }
            FaultKind::Storm => storm(),
            FaultKind::BackendPause(name) => {
                let pid = self
                    .backend(name)
                    .and_then(|b| self.opts.backends[b].pidfile.as_ref())
                    .and_then(read_pid);
                match pid {
                    Some(pid) => self.pause(pid, now + p.hold),
                    None => self
                        .problems
                        .push(format!("pause:{name}: no pid in its pid file")),
                }
            }
            FaultKind::BackendRestart(name) => {
                let Some(b) = self.backend(name) else { return };
                let Some(cmd) = self.opts.backends[b].stop.clone() else {
                    return;
                };
                match sh(&cmd) {
                    Ok(child) => {
                        self.active = Some(Active::Stopping {
                            backend: b,
                            child,
                            hold: p.hold,
                            deadline: now + COMMAND_TIMEOUT,
                        })
                    }
                    Err(e) => self.problems.push(format!("restart:{name}: {e}")),
                }
            }
        }
    }

    fn backend(&self, name: &str) -> Option<usize> {
        self.opts.backends.iter().position(|b| b.name == name)
    }

    fn pause(&mut self, pid: i32, until: Instant) {
        signal_pid(pid, libc::SIGSTOP);
        self.paused.push(pid);
        self.active = Some(Active::Paused { pid, until });
    }

    fn resume(&mut self, pid: i32) {
        signal_pid(pid, libc::SIGCONT);
        self.paused.retain(|p| *p != pid);
    }

    fn restart_gateway(&mut self) {
        if let Some(g) = self.gateway.as_mut() {
            if let Err(e) = g.spawn() {
                self.problems.push(format!("restarting the gateway: {e}"));
            }
        }
    }

    fn start_backend(&mut self, b: usize, now: Instant) {
        let Some(cmd) = self.opts.backends[b].start.clone() else {
            return;
        };
        match sh(&cmd) {
            Ok(child) => {
                self.active = Some(Active::Starting {
                    child,
                    deadline: now + COMMAND_TIMEOUT,
                })
            }
            Err(e) => self
                .problems
                .push(format!("restart:{}: {e}", self.opts.backends[b].name)),
        }
    }

    /// Moves the fault under way on when its time has come.
    fn progress_active(&mut self, now: Instant) {
        let Some(active) = self.active.take() else {
            return;
        };
        match active {
            Active::Down { at } if now >= at => self.restart_gateway(),
            Active::Draining { kill_at } => {
                let running = self.gateway.as_mut().is_some_and(|g| g.running());
                if !running {
                    self.restart_gateway();
                } else if now >= kill_at {
                    self.problems
                        .push("a drain outlasted its bound: the gateway was killed".into());
                    if let Some(g) = self.gateway.as_mut() {
                        g.kill_now();
                    }
                    self.restart_gateway();
                } else {
                    self.active = Some(Active::Draining { kill_at });
                }
            }
            Active::Paused { pid, until } if now >= until => self.resume(pid),
            Active::Stopping {
                backend,
                mut child,
                hold,
                deadline,
            } => match child.try_wait() {
                Ok(Some(_)) => {
                    self.active = Some(Active::BackendDown {
                        backend,
                        until: now + hold,
                    })
                }
                Ok(None) if now < deadline => {
                    self.active = Some(Active::Stopping {
                        backend,
                        child,
                        hold,
                        deadline,
                    })
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.problems.push(format!(
                        "restart:{}: the stop command did not finish",
                        self.opts.backends[backend].name
                    ));
                    self.start_backend(backend, now);
                }
            },
            Active::BackendDown { backend, until } if now >= until => {
                self.start_backend(backend, now)
            }
            Active::Starting {
                mut child,
                deadline,
            } => match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        self.problems
                            .push(format!("a backend's start command failed: {status}"));
                    }
                }
                Ok(None) if now < deadline => {
                    self.active = Some(Active::Starting { child, deadline })
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.problems
                        .push("a backend's start command did not finish".into());
                }
            },
            other => self.active = Some(other),
        }
    }

    /// Ends the fault under way at once (the run is over): continue, restart, start. At most
    /// two rounds: a backend's start (the step after its stop or its time down) is awaited,
    /// bounded, so the settle finds it up; every other step leaves nothing under way.
    fn finish_active(&mut self, now: Instant) {
        while let Some(active) = self.active.take() {
            match active {
                Active::Down { .. } => self.restart_gateway(),
                Active::Paused { pid, .. } => self.resume(pid),
                Active::BackendDown { backend, .. } => self.start_backend(backend, now),
                Active::Draining { kill_at } => {
                    let deadline = kill_at.min(now + DRAIN_TIMEOUT);
                    self.active = Some(Active::Draining { kill_at: deadline });
                    while self.active.is_some() && Instant::now() < deadline + RESPAWN_DELAY {
                        self.progress_active(Instant::now());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Active::Stopping {
                    backend, mut child, ..
                } => {
                    wait_bounded(&mut child, COMMAND_TIMEOUT);
                    self.start_backend(backend, now);
                }
                Active::Starting { mut child, .. } => {
                    wait_bounded(&mut child, COMMAND_TIMEOUT);
                }
            }
        }
    }

    /// A gateway that exited when no fault stopped it (a restart that could not bind its
    /// port yet) is started again, a bounded number of times.
    fn watch_gateway(&mut self, now: Instant) {
        if matches!(
            self.active,
            Some(Active::Down { .. } | Active::Draining { .. })
        ) {
            return;
        }
        let Some(g) = self.gateway.as_mut() else {
            return;
        };
        if g.running() {
            if self.respawn_at.is_none() {
                self.respawns = 0;
            }
            self.respawn_at = None;
            return;
        }
        match self.respawn_at {
            None => self.respawn_at = Some(now + RESPAWN_DELAY),
            Some(at) if now >= at => {
                self.respawns += 1;
                if self.respawns > MAX_RESPAWNS {
                    if self.respawns == MAX_RESPAWNS + 1 {
                        self.problems.push(format!(
                            "the gateway exited {MAX_RESPAWNS} times in a row after a restart"
                        ));
                    }
                    return;
                }
                self.respawn_at = None;
                if let Err(e) = g.spawn() {
                    self.problems.push(format!("restarting the gateway: {e}"));
                }
            }
            Some(_) => {}
        }
    }

    /// The verdict line.
    pub fn summary(&self, t: &crate::integrity::Tally) -> String {
        let faults: Vec<String> = self
            .counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "chaos (seed {}): faults {}; {} acked, {} lost, {} duplicates, {} out of order ({} unconfirmed, {} refused)",
            self.opts.seed,
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            },
            t.acked,
            t.lost,
            t.duplicates,
            t.out_of_order,
            t.unconfirmed,
            t.refused
        )
    }
}

/// Waits for `child` to exit, at most `limit`; then kills it.
fn wait_bounded(child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        // Nothing this campaign stopped stays stopped, whatever ended it.
        for pid in std::mem::take(&mut self.paused) {
            signal_pid(pid, libc::SIGCONT);
        }
        if let Some(g) = self.gateway.as_mut() {
            g.stop();
            let _ = std::fs::remove_file(&g.ports_file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> Vec<FaultKind> {
        vec![
            FaultKind::Kill,
            FaultKind::Storm,
            FaultKind::BackendPause("redis".into()),
        ]
    }

    #[test]
    fn the_same_seed_replays_the_same_schedule() {
        let d = Duration::from_secs(60);
        let gap = (Duration::from_secs(2), Duration::from_secs(5));
        let hold = (Duration::from_millis(500), Duration::from_secs(3));
        let a = schedule(7, &kinds(), d, gap, hold);
        let b = schedule(7, &kinds(), d, gap, hold);
        let c = schedule(8, &kinds(), d, gap, hold);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() >= 6, "{a:?}");
        // One at a time, a gap between, all before the last second, every kind drawn.
        for w in a.windows(2) {
            assert!(w[1].at >= w[0].at + w[0].hold + gap.0);
        }
        assert!(a.iter().all(|p| p.at < d - Duration::from_secs(1)));
        for k in kinds() {
            assert!(a.iter().any(|p| p.kind == k), "{k:?} never drawn");
        }
        assert!(a
            .iter()
            .all(|p| (p.kind == FaultKind::Storm) == p.hold.is_zero()));
    }

    #[test]
    fn kinds_parse_and_are_checked_against_what_was_given() {
        for s in [
            "kill",
            "term",
            "pause",
            "storm",
            "pause:redis",
            "restart:mysql",
        ] {
            assert_eq!(FaultKind::parse(s).unwrap().name(), s);
        }
        assert!(FaultKind::parse("explode").is_err());
        assert!(FaultKind::parse("pause:").is_err());
        let mut o = ChaosOptions {
            seed: 1,
            kinds: vec![FaultKind::Kill],
            serve: None,
            imgw_bin: "imgw".into(),
            backends: Vec::new(),
            gap: (Duration::from_secs(1), Duration::from_secs(2)),
            hold: (Duration::from_secs(1), Duration::from_secs(2)),
            gateway_log: None,
        };
        assert!(o.check().unwrap_err().contains("--serve"));
        o.kinds = vec![FaultKind::BackendPause("redis".into())];
        assert!(o.check().unwrap_err().contains("--backend redis=PIDFILE"));
        o.backends.push(Backend {
            name: "redis".into(),
            pidfile: Some("/tmp/x.pid".into()),
            ..Backend::default()
        });
        assert!(o.check().is_ok());
        o.kinds = vec![FaultKind::BackendRestart("redis".into())];
        assert!(o.check().unwrap_err().contains("--backend-stop"));
        assert_eq!(
            ChaosOptions::default_kinds(true, &o.backends)
                .iter()
                .map(FaultKind::name)
                .collect::<Vec<_>>(),
            ["kill", "term", "pause", "storm", "pause:redis"]
        );
        assert_eq!(
            parse_range("2s-5s").unwrap(),
            (Duration::from_secs(2), Duration::from_secs(5))
        );
    }
}
