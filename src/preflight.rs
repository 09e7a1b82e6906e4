//! Host checks for `imgw preflight` and for the start of `imgw serve` (SPEC 7).
//!
//! This module owns what is checked (io_uring, RLIMIT_MEMLOCK, RLIMIT_NOFILE, listen backlogs,
//! the local port range, TCP memory, system-wide file limits, the store's data directory),
//! the thresholds, the fix printed for each, and the connection ceiling the limits imply.
//! Every check is a pure function over [`HostFacts`] or [`DataDir`]; only their `read`s touch
//! /proc, getrlimit and access(2), so tests feed synthetic hosts. Nothing here changes the host.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{Config, Durability};

/// glommio 0.9 refuses to start an executor below this RLIMIT_MEMLOCK (sys/uring.rs).
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;
/// glommio registers each shard's io_memory in its three rings (main, latency, poll); the
/// kernel charges every registration separately.
pub const RINGS_PER_SHARD: u64 = 3;
/// Allowance per shard for the ring memory that kernels before 5.12 charge to memlock
/// (three rings of 128 entries each take about 60 KiB).
pub const MEMLOCK_MARGIN_PER_SHARD: u64 = 128 * 1024;
/// File descriptors kept aside for listeners, the admin port, the store, eventfds and rings.
pub const FD_RESERVE_BASE: u64 = 64;
pub const FD_RESERVE_PER_SHARD: u64 = 16;
/// tcp_mem is charged in whole pages: a connection holding any queued data costs at least one.
pub const TCP_MEM_PAGES_PER_CONN: u64 = 1;
/// glommio 0.9 needs Linux 5.8 or newer.
pub const MIN_KERNEL: (u32, u32) = (5, 8);
/// Below this many local ports a load generator on this host runs out of source ports early.
pub const MIN_PORT_RANGE: u64 = 50_000;
/// `rlimit` reports RLIM_INFINITY as this.
pub const UNLIMITED: u64 = u64::MAX;

/// A soft/hard resource limit pair; [`UNLIMITED`] stands for RLIM_INFINITY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

/// What the checks look at. `None` means the value could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// /proc/sys/kernel/osrelease, e.g. "6.1.0-18-amd64".
    pub kernel_release: Option<String>,
    /// /proc/sys/kernel/io_uring_disabled; absent on kernels before 6.6 (= enabled).
    pub io_uring_disabled: Option<u64>,
    pub memlock: Option<Rlimit>,
    pub nofile: Option<Rlimit>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub port_range: Option<(u64, u64)>,
    /// Pages: low, pressure, max.
    pub tcp_mem: Option<[u64; 3]>,
    /// Bytes per socket: min, default, max.
    pub tcp_rmem: Option<[u64; 3]>,
    pub tcp_wmem: Option<[u64; 3]>,
    pub file_max: Option<u64>,
    pub nr_open: Option<u64>,
    /// net.netfilter.nf_conntrack_max; absent when conntrack is not loaded.
    pub conntrack_max: Option<u64>,
    /// Kernel page size in bytes (tcp_mem's unit).
    pub page_size: u64,
}

impl Default for HostFacts {
    fn default() -> Self {
        HostFacts {
            kernel_release: None,
            io_uring_disabled: None,
            memlock: None,
            nofile: None,
            somaxconn: None,
            tcp_max_syn_backlog: None,
            port_range: None,
            tcp_mem: None,
            tcp_rmem: None,
            tcp_wmem: None,
            file_max: None,
            nr_open: None,
            conntrack_max: None,
            page_size: 4096,
        }
    }
}

/// What the host is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Connections this host should hold.
    pub conns: u64,
    pub shards: u64,
    /// Registered-buffer memory per shard as glommio sizes it (see [`glommio_io_memory`]).
    pub io_memory_bytes: u64,
    /// Listen backlog requested by the listeners.
    pub backlog: u64,
}

impl Target {
    /// The target a configuration implies; `conns` defaults to `limits.max_conns`.
    pub fn from_config(config: &Config, conns: Option<u64>) -> Target {
        Target {
            conns: conns.unwrap_or(u64::from(config.limits.max_conns)),
            shards: config.shard_count() as u64,
            io_memory_bytes: glommio_io_memory(config.runtime.io_memory_kib as u64 * 1024),
            backlog: u64::from(config.server.backlog),
        }
    }

    /// File descriptors needed: one per connection plus the reserve.
    pub fn fds_needed(&self) -> u64 {
        self.conns.saturating_add(fd_reserve(self.shards))
    }
}

/// glommio rounds io_memory up to a page and to at least 64 KiB.
pub fn glommio_io_memory(bytes: u64) -> u64 {
    bytes.div_ceil(4096).saturating_mul(4096).max(65_536)
}

pub fn fd_reserve(shards: u64) -> u64 {
    FD_RESERVE_BASE + FD_RESERVE_PER_SHARD * shards
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One check's verdict, printed as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub value: String,
    /// The exact sysctl, limits.conf or systemd line that fixes it (`None` when OK).
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, level: Level, value: String, fix: Option<String>) -> Check {
        let fix = if level == Level::Ok { None } else { fix };
        Check {
            name,
            level,
            value,
            fix,
        }
    }

    fn unreadable(name: &'static str, what: &str) -> Check {
        Check::new(
            name,
            Level::Warn,
            format!("could not read {what}"),
            Some(format!("check {what} by hand")),
        )
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4} {:<22} {}", self.level, self.name, self.value)?;
        if let Some(fix) = &self.fix {
            write!(f, " | fix: {fix}")?;
        }
        Ok(())
    }
}

/// Major and minor of a kernel release string ("6.1.0-18-amd64" -> (6, 1)).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn fmt_limit(v: u64) -> String {
    if v == UNLIMITED {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// io_uring usable by glommio: kernel >= 5.8 and not disabled by sysctl.
pub fn check_io_uring(h: &HostFacts) -> Check {
    const NAME: &str = "io_uring";
    let fix_sysctl = "sysctl -w kernel.io_uring_disabled=0 (and in containers allow \
                      io_uring_setup/io_uring_enter/io_uring_register in the seccomp profile)";
    let kernel = h.kernel_release.as_deref().map(str::trim);
    let disabled = h.io_uring_disabled.unwrap_or(0);
    let value = format!(
        "kernel {}, kernel.io_uring_disabled={}",
        kernel.unwrap_or("unknown"),
        h.io_uring_disabled
            .map_or_else(|| "absent (enabled)".to_string(), |d| d.to_string())
    );
    if disabled >= 2 {
        return Check::new(NAME, Level::Fail, value, Some(fix_sysctl.into()));
    }
    let version = kernel.and_then(parse_kernel_version);
    match version {
        Some(v) if v < MIN_KERNEL => {
            return Check::new(
                NAME,
                Level::Fail,
                format!("{value}; glommio needs Linux 5.8+"),
                Some("upgrade the kernel to 5.8 or newer (5.15+ recommended)".into()),
            )
        }
        None => {
            return Check::new(
                NAME,
                Level::Warn,
                format!("{value}; kernel version unknown"),
                Some("run on Linux 5.8 or newer".into()),
            )
        }
        Some(_) => {}
    }
    if disabled == 1 {
        return Check::new(
            NAME,
            Level::Warn,
            format!("{value}; only CAP_SYS_ADMIN or kernel.io_uring_group members may use it"),
            Some(format!(
                "{fix_sysctl}, or add the service user to the group in kernel.io_uring_group"
            )),
        );
    }
    Check::new(NAME, Level::Ok, value, None)
}

/// RLIMIT_MEMLOCK against glommio's floor and the shards' registered buffers.
///
/// FAIL below glommio's 512 KiB floor (executors refuse to start) or below one registration of
/// every shard's io_memory; WARN below the full three-ring registration (glommio then skips
/// registering buffers in some rings and logs it; sockets do not use them).
pub fn check_memlock(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "memlock";
    let Some(l) = h.memlock else {
        return Check::unreadable(NAME, "RLIMIT_MEMLOCK");
    };
    let margin = t.shards * MEMLOCK_MARGIN_PER_SHARD;
    let need_start = GLOMMIO_MIN_MEMLOCK.max(t.shards * t.io_memory_bytes + margin);
    let need_full =
        GLOMMIO_MIN_MEMLOCK.max(t.shards * RINGS_PER_SHARD * t.io_memory_bytes + margin);
    let value = format!(
        "soft {} hard {} bytes; {} shard(s) x {} KiB io_memory need {} (all rings {})",
        fmt_limit(l.soft),
        fmt_limit(l.hard),
        t.shards,
        t.io_memory_bytes / 1024,
        need_start,
        need_full
    );
    let fix = format!(
        "systemd: LimitMEMLOCK={m}M; limits.conf: imgw - memlock {k}; or lower runtime.io_memory_kib",
        m = mib_ceil(need_full),
        k = mib_ceil(need_full) * 1024
    );
    let level = if l.soft == UNLIMITED || l.soft >= need_full {
        Level::Ok
    } else if l.soft >= need_start {
        Level::Warn
    } else {
        Level::Fail
    };
    Check::new(NAME, level, value, Some(fix))
}

fn suggest_fds(need: u64) -> u64 {
    need.max(1 << 20).next_power_of_two()
}

/// RLIMIT_NOFILE against the target. `serve` raises the soft limit to the hard one at start.
pub fn check_nofile(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "nofile";
    let Some(l) = h.nofile else {
        return Check::unreadable(NAME, "RLIMIT_NOFILE");
    };
    let need = t.fds_needed();
    let value = format!(
        "soft {} hard {}; {} connections need {need}",
        fmt_limit(l.soft),
        fmt_limit(l.hard),
        t.conns
    );
    let s = suggest_fds(need);
    let fix = format!(
        "systemd: LimitNOFILE={s}; limits.conf: imgw - nofile {s}; shell: ulimit -n {s} \
         (fs.nr_open must be at least as high)"
    );
    if l.hard < need {
        Check::new(NAME, Level::Fail, value, Some(fix))
    } else if l.soft < need {
        Check::new(
            NAME,
            Level::Warn,
            format!("{value}; serve raises the soft limit to the hard one at start"),
            Some(fix),
        )
    } else {
        Check::new(NAME, Level::Ok, value, None)
    }
}

/// fs.file-max: open files on the whole system.
pub fn check_file_max(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "fs.file-max";
    let Some(v) = h.file_max else {
        return Check::unreadable(NAME, "/proc/sys/fs/file-max");
    };
    let need = t.fds_needed();
    let value = format!("{v}; need {need} for imgw alone");
    let s = suggest_fds(need.saturating_mul(2));
    let level = if v < need { Level::Fail } else { Level::Ok };
    Check::new(
        NAME,
        level,
        value,
        Some(format!("sysctl -w fs.file-max={s}")),
    )
}

/// fs.nr_open: the ceiling of any process's hard RLIMIT_NOFILE.
pub fn check_nr_open(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "fs.nr_open";
    let Some(v) = h.nr_open else {
        return Check::unreadable(NAME, "/proc/sys/fs/nr_open");
    };
    let need = t.fds_needed();
    let value = format!("{v}; need {need}");
    let level = if v < need { Level::Fail } else { Level::Ok };
    Check::new(
        NAME,
        level,
        value,
        Some(format!("sysctl -w fs.nr_open={}", suggest_fds(need))),
    )
}

/// net.core.somaxconn silently caps every listen backlog.
pub fn check_somaxconn(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "net.core.somaxconn";
    let Some(v) = h.somaxconn else {
        return Check::unreadable(NAME, "/proc/sys/net/core/somaxconn");
    };
    let value = format!("{v}; listeners ask for {}", t.backlog);
    let level = if v < t.backlog {
        Level::Warn
    } else {
        Level::Ok
    };
    Check::new(
        NAME,
        level,
        value,
        Some(format!(
            "sysctl -w net.core.somaxconn={}",
            t.backlog.max(65_535)
        )),
    )
}

/// net.ipv4.tcp_max_syn_backlog: half-open connections queued during a reconnect storm.
pub fn check_syn_backlog(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "tcp_max_syn_backlog";
    let Some(v) = h.tcp_max_syn_backlog else {
        return Check::unreadable(NAME, "/proc/sys/net/ipv4/tcp_max_syn_backlog");
    };
    let level = if v < t.backlog {
        Level::Warn
    } else {
        Level::Ok
    };
    Check::new(
        NAME,
        level,
        format!("{v}; listeners ask for {}", t.backlog),
        Some(format!(
            "sysctl -w net.ipv4.tcp_max_syn_backlog={}",
            t.backlog.max(65_535)
        )),
    )
}

/// net.ipv4.ip_local_port_range bounds outbound connections per (source, destination) pair:
/// it matters to a load generator on this host, not to inbound connections.
pub fn check_port_range(h: &HostFacts) -> Check {
    const NAME: &str = "ip_local_port_range";
    let Some((lo, hi)) = h.port_range else {
        return Check::unreadable(NAME, "/proc/sys/net/ipv4/ip_local_port_range");
    };
    let width = (hi + 1).saturating_sub(lo);
    let value = format!(
        "{lo} {hi} ({width} ports per source address and destination; bounds outbound \
         connections such as a local loadgen, not inbound ones)"
    );
    let level = if width < MIN_PORT_RANGE {
        Level::Warn
    } else {
        Level::Ok
    };
    Check::new(
        NAME,
        level,
        value,
        Some(
            "sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"; and give loadgen several \
             127.0.0.x source addresses"
                .into(),
        ),
    )
}

/// net.ipv4.tcp_mem: pages all TCP sockets together may hold in queued data.
pub fn check_tcp_mem(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "net.ipv4.tcp_mem";
    let Some([low, pressure, max]) = h.tcp_mem else {
        return Check::unreadable(NAME, "/proc/sys/net/ipv4/tcp_mem");
    };
    let holds = max / TCP_MEM_PAGES_PER_CONN;
    let value = format!(
        "{low} {pressure} {max} pages (max {} MiB: queued data on {holds} connections at one \
         page each; idle sockets hold none)",
        mib_ceil(max.saturating_mul(h.page_size))
    );
    let m = t.conns.saturating_mul(2 * TCP_MEM_PAGES_PER_CONN).max(max);
    let fix = format!(
        "sysctl -w net.ipv4.tcp_mem=\"{} {} {m}\" (pages; two per connection; keep the max \
         under about half of RAM)",
        m / 2,
        m / 4 * 3
    );
    let level = if holds < t.conns {
        Level::Warn
    } else {
        Level::Ok
    };
    Check::new(NAME, level, value, Some(fix))
}

/// net.ipv4.tcp_rmem / tcp_wmem: per-socket buffer bounds. Under memory pressure each socket
/// with queued data keeps up to `min`, so `min` should stay at one page.
pub fn check_tcp_buf(name: &'static str, v: Option<[u64; 3]>, h: &HostFacts) -> Check {
    let Some([min, default, max]) = v else {
        return Check::unreadable(name, name);
    };
    let value = format!(
        "{min} {default} {max} bytes (min kept under pressure; default is the initial \
         allowance, charged only while data is queued)"
    );
    let level = if min > h.page_size {
        Level::Warn
    } else {
        Level::Ok
    };
    Check::new(
        name,
        level,
        value,
        Some(format!(
            "sysctl -w {name}=\"{} {default} {max}\"",
            h.page_size
        )),
    )
}

/// net.netfilter.nf_conntrack_max: when firewall rules track connections, new ones beyond it
/// are dropped. Absent (conntrack not loaded) is fine.
pub fn check_conntrack(h: &HostFacts, t: &Target) -> Check {
    const NAME: &str = "nf_conntrack_max";
    let Some(v) = h.conntrack_max else {
        return Check::new(NAME, Level::Ok, "conntrack not loaded".into(), None);
    };
    let level = if v < t.conns { Level::Warn } else { Level::Ok };
    Check::new(
        NAME,
        level,
        format!(
            "{v} (binds only if firewall rules track imgw's connections: beyond it new \
             connections are dropped)"
        ),
        Some(format!(
            "sysctl -w net.netfilter.nf_conntrack_max={}, or exempt imgw's ports with notrack \
             rules (tuning/TUNING.md)",
            suggest_fds(t.conns.saturating_mul(2))
        )),
    )
}

/// The connection ceiling the limits imply, and the limit that sets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ceiling {
    pub connections: u64,
    pub bound_by: &'static str,
    /// Every bound considered, for the printout.
    pub terms: Vec<(&'static str, u64)>,
}

impl fmt::Display for Ceiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection ceiling implied: {} (bound by {}; ",
            self.connections, self.bound_by
        )?;
        for (i, (name, v)) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} {v}")?;
        }
        f.write_str(")")
    }
}

/// Minimum over the limits that bound connections: the nofile hard limit (serve raises the
/// soft limit to it) and fs.file-max, each less the fd reserve, and tcp_mem's max at one page
/// per connection with queued data. `None` when none of them could be read.
pub fn ceiling(h: &HostFacts, t: &Target) -> Option<Ceiling> {
    let reserve = fd_reserve(t.shards);
    let mut terms = Vec::new();
    if let Some(l) = h.nofile {
        terms.push(("nofile", l.hard.saturating_sub(reserve)));
    }
    if let Some(v) = h.file_max {
        terms.push(("fs.file-max", v.saturating_sub(reserve)));
    }
    if let Some([_, _, max]) = h.tcp_mem {
        terms.push(("tcp_mem", max / TCP_MEM_PAGES_PER_CONN));
    }
    let (bound_by, connections) = terms.iter().copied().min_by_key(|&(_, v)| v)?;
    Some(Ceiling {
        connections,
        bound_by,
        terms,
    })
}

/// Every check, in print order.
pub fn run_all(h: &HostFacts, t: &Target) -> Vec<Check> {
    vec![
        check_io_uring(h),
        check_memlock(h, t),
        check_nofile(h, t),
        check_nr_open(h, t),
        check_file_max(h, t),
        check_somaxconn(h, t),
        check_syn_backlog(h, t),
        check_port_range(h),
        check_tcp_mem(h, t),
        check_tcp_buf("net.ipv4.tcp_rmem", h.tcp_rmem, h),
        check_tcp_buf("net.ipv4.tcp_wmem", h.tcp_wmem, h),
        check_conntrack(h, t),
    ]
}

/// The checks `imgw serve` runs before starting: the ones without which shards cannot start.
pub fn start_checks(h: &HostFacts, t: &Target) -> Vec<Check> {
    vec![check_io_uring(h), check_memlock(h, t)]
}

/// File systems whose contents do not survive a reboot.
pub const VOLATILE_FS: [&str; 2] = ["tmpfs", "ramfs"];

/// The embedded store's data directory as `imgw serve` would use it (durability `local`, and
/// `backend` with Kafka alone, where the log store under it is the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    /// As configured (`server.data_dir`, `--data-dir`).
    pub path: PathBuf,
    /// The directory exists already.
    pub exists: bool,
    /// The directory itself, or its nearest ancestor that exists (where it would be made),
    /// with symbolic links resolved; `None`: none could be resolved.
    pub existing: Option<PathBuf>,
    /// Whether this process may write in `existing` (access(2) `W_OK`); `None`: unknown.
    pub writable: Option<bool>,
    /// The type of the file system `existing` is on (/proc/self/mountinfo); `None`: unknown.
    pub fs_type: Option<String>,
}

impl DataDir {
    /// The data directory `config` stores in, read from this host; `None` when the store is
    /// not on this host's disk (durability `memory`, or `backend` with MySQL).
    pub fn read(config: &Config) -> Option<DataDir> {
        let local = match config.server.durability {
            Durability::Memory => false,
            Durability::Local => true,
            Durability::Backend => config.mysql.url.is_none(),
        };
        if !local {
            return None;
        }
        let path = config.server.data_dir.clone();
        let existing = path
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .chain(std::iter::once(Path::new(".")))
            .find_map(|a| std::fs::canonicalize(a).ok());
        let writable = existing
            .as_deref()
            .map(|e| nix::unistd::access(e, nix::unistd::AccessFlags::W_OK).is_ok());
        let fs_type = existing
            .as_deref()
            .and_then(|e| fs_type_of(&read_proc("/proc/self/mountinfo")?, e));
        Some(DataDir {
            exists: path.is_dir(),
            path,
            existing,
            writable,
            fs_type,
        })
    }
}

/// The file system type of the mount that holds `path` (absolute, links resolved), from the
/// text of /proc/self/mountinfo: the longest mount point that is a prefix of `path`, the later
/// line winning on the same mount point (it is mounted over the earlier one).
pub fn fs_type_of(mountinfo: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let (Some(point), Some(fs)) = (left.split(' ').nth(4), right.split(' ').next()) else {
            continue;
        };
        let point = unescape_mount(point);
        if !path.starts_with(&point) {
            continue;
        }
        let depth = Path::new(&point).components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, fs));
        }
    }
    best.map(|(_, fs)| fs.to_string())
}

/// mountinfo writes space, tab, newline and backslash in a path as `\ooo` octal escapes.
fn unescape_mount(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where acknowledged messages are kept: durability `memory` keeps none (a warning: it is for
/// load tests), and the embedded store's directory must be writable and on a disk.
pub fn check_store(durability: Durability, dir: Option<&DataDir>) -> Check {
    const NAME: &str = "data directory";
    let Some(d) = dir else {
        return match durability {
            Durability::Memory => Check::new(
                NAME,
                Level::Warn,
                "durability memory: nothing is stored, a crash loses acked messages".into(),
                Some("[server] durability = \"local\" (memory is for load tests)".into()),
            ),
            _ => Check::new(NAME, Level::Ok, "durability backend: MySQL".into(), None),
        };
    };
    let shown = d.path.display();
    let fix_dir = || {
        Some(format!(
            "install -d -o USER {shown} for the user imgw runs as, or --data-dir a writable directory"
        ))
    };
    let Some(existing) = &d.existing else {
        return Check::new(
            NAME,
            Level::Fail,
            format!("{shown}: no parent exists"),
            fix_dir(),
        );
    };
    match d.writable {
        Some(false) => {
            let what = if d.exists {
                format!("{shown}: not writable by this user")
            } else {
                format!(
                    "{shown}: missing, and {} is not writable",
                    existing.display()
                )
            };
            return Check::new(NAME, Level::Fail, what, fix_dir());
        }
        None => return Check::unreadable(NAME, &format!("access to {}", existing.display())),
        Some(true) => {}
    }
    match d.fs_type.as_deref() {
        Some(fs) if VOLATILE_FS.contains(&fs) => Check::new(
            NAME,
            Level::Warn,
            format!("{shown} is on {fs}: acked messages do not survive a reboot"),
            Some("--data-dir a directory on a disk".into()),
        ),
        Some(fs) => Check::new(NAME, Level::Ok, format!("{shown} on {fs}, writable"), None),
        None => Check::unreadable(NAME, &format!("the file system of {}", existing.display())),
    }
}

/// The worst level among checks.
pub fn worst(checks: &[Check]) -> Level {
    checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok)
}

// ---- reading the host ------------------------------------------------------------------

/// One number from a /proc file.
pub fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Whitespace-separated numbers, exactly N of them.
pub fn parse_numbers<const N: usize>(text: &str) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut it = text.split_whitespace();
    for slot in &mut out {
        *slot = it.next()?.parse().ok()?;
    }
    it.next().is_none().then_some(out)
}

/// The first `KernelPageSize:` of /proc/self/smaps, in bytes.
pub fn parse_page_size(smaps: &str) -> Option<u64> {
    let line = smaps.lines().find(|l| l.starts_with("KernelPageSize:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn getrlimit(resource: rlimit::Resource) -> Option<Rlimit> {
    rlimit::getrlimit(resource)
        .ok()
        .map(|(soft, hard)| Rlimit { soft, hard })
}

impl HostFacts {
    /// Reads this host: /proc/sys and getrlimit. Missing values stay `None`.
    pub fn read() -> HostFacts {
        let num = |p: &str| read_proc(p).as_deref().and_then(parse_u64);
        let three = |p: &str| read_proc(p).as_deref().and_then(parse_numbers::<3>);
        HostFacts {
            kernel_release: read_proc("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()),
            io_uring_disabled: num("/proc/sys/kernel/io_uring_disabled"),
            memlock: getrlimit(rlimit::Resource::MEMLOCK),
            nofile: getrlimit(rlimit::Resource::NOFILE),
            somaxconn: num("/proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: num("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            port_range: read_proc("/proc/sys/net/ipv4/ip_local_port_range")
                .as_deref()
                .and_then(parse_numbers::<2>)
                .map(|[lo, hi]| (lo, hi)),
            tcp_mem: three("/proc/sys/net/ipv4/tcp_mem"),
            tcp_rmem: three("/proc/sys/net/ipv4/tcp_rmem"),
            tcp_wmem: three("/proc/sys/net/ipv4/tcp_wmem"),
            file_max: num("/proc/sys/fs/file-max"),
            nr_open: num("/proc/sys/fs/nr_open"),
            conntrack_max: num("/proc/sys/net/netfilter/nf_conntrack_max"),
            page_size: read_proc("/proc/self/smaps")
                .as_deref()
                .and_then(parse_page_size)
                .unwrap_or(4096),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> std::io::Result<u64> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if soft < hard {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host tuned for a million connections.
    fn good() -> HostFacts {
        HostFacts {
            kernel_release: Some("6.1.0-18-amd64".into()),
            io_uring_disabled: Some(0),
            memlock: Some(Rlimit {
                soft: UNLIMITED,
                hard: UNLIMITED,
            }),
            nofile: Some(Rlimit {
                soft: 2_097_152,
                hard: 2_097_152,
            }),
            somaxconn: Some(65_535),
            tcp_max_syn_backlog: Some(65_535),
            port_range: Some((1024, 65_535)),
            tcp_mem: Some([1_000_000, 1_500_000, 2_000_000]),
            tcp_rmem: Some([4096, 16_384, 4_194_304]),
            tcp_wmem: Some([4096, 16_384, 4_194_304]),
            file_max: Some(4_194_304),
            nr_open: Some(2_097_152),
            conntrack_max: None,
            page_size: 4096,
        }
    }

    fn target(conns: u64) -> Target {
        Target {
            conns,
            shards: 4,
            io_memory_bytes: 512 * 1024,
            backlog: 4096,
        }
    }

    #[test]
    fn tuned_host_passes_everything() {
        let checks = run_all(&good(), &target(1_000_000));
        for c in &checks {
            assert_eq!(c.level, Level::Ok, "{c}");
            assert!(c.fix.is_none());
        }
        assert_eq!(worst(&checks), Level::Ok);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(parse_kernel_version("4.19\n"), Some((4, 19)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn io_uring_levels() {
        let mut h = good();
        assert_eq!(check_io_uring(&h).level, Level::Ok);
        h.io_uring_disabled = None; // older kernels: no sysctl, enabled
        assert_eq!(check_io_uring(&h).level, Level::Ok);
        h.io_uring_disabled = Some(1);
        assert_eq!(check_io_uring(&h).level, Level::Warn);
        h.io_uring_disabled = Some(2);
        let c = check_io_uring(&h);
        assert_eq!(c.level, Level::Fail);
        assert!(c.fix.unwrap().contains("kernel.io_uring_disabled=0"));
        h.io_uring_disabled = Some(0);
        h.kernel_release = Some("5.4.0-150-generic".into());
        assert_eq!(check_io_uring(&h).level, Level::Fail);
        h.kernel_release = Some("5.8.0".into());
        assert_eq!(check_io_uring(&h).level, Level::Ok);
        h.kernel_release = None;
        assert_eq!(check_io_uring(&h).level, Level::Warn);
    }

    #[test]
    fn memlock_levels() {
        let mut h = good();
        let t = target(10); // 4 shards x 512 KiB
        let margin = 4 * MEMLOCK_MARGIN_PER_SHARD;
        let one = 4 * 512 * 1024 + margin;
        let all = 4 * 3 * 512 * 1024 + margin;
        for (soft, want) in [
            (UNLIMITED, Level::Ok),
            (all, Level::Ok),
            (all - 1, Level::Warn),
            (one, Level::Warn),
            (one - 1, Level::Fail),
            (256 * 1024, Level::Fail),
        ] {
            h.memlock = Some(Rlimit {
                soft,
                hard: UNLIMITED,
            });
            let c = check_memlock(&h, &t);
            assert_eq!(c.level, want, "soft {soft}: {c}");
        }
        let c = check_memlock(&h, &t);
        assert!(c.fix.unwrap().contains("LimitMEMLOCK=7M"));
        // glommio's 512 KiB floor holds even for a tiny io_memory
        let tiny = Target {
            shards: 1,
            io_memory_bytes: 65_536,
            ..t
        };
        h.memlock = Some(Rlimit {
            soft: 400 * 1024,
            hard: 400 * 1024,
        });
        assert_eq!(check_memlock(&h, &tiny).level, Level::Fail);
        h.memlock = None;
        assert_eq!(check_memlock(&h, &tiny).level, Level::Warn);
    }

    #[test]
    fn nofile_levels() {
        let mut h = good();
        let t = target(1_000_000);
        let need = 1_000_000 + fd_reserve(4);
        h.nofile = Some(Rlimit {
            soft: 1024,
            hard: need,
        });
        assert_eq!(check_nofile(&h, &t).level, Level::Warn);
        h.nofile = Some(Rlimit {
            soft: 1024,
            hard: need - 1,
        });
        let c = check_nofile(&h, &t);
        assert_eq!(c.level, Level::Fail);
        let fix = c.fix.unwrap();
        assert!(fix.contains("LimitNOFILE=1048576"), "{fix}");
        assert!(fix.contains("imgw - nofile 1048576"), "{fix}");
        h.nofile = Some(Rlimit {
            soft: need,
            hard: need,
        });
        assert_eq!(check_nofile(&h, &t).level, Level::Ok);
    }

    #[test]
    fn system_file_limits() {
        let mut h = good();
        let t = target(1_000_000);
        h.file_max = Some(1_000_000);
        let c = check_file_max(&h, &t);
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.fix.as_deref(), Some("sysctl -w fs.file-max=2097152"));
        h.nr_open = Some(1_048_576);
        assert_eq!(check_nr_open(&h, &t).level, Level::Ok);
        let big = target(1_048_576);
        let c = check_nr_open(&h, &big);
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.fix.as_deref(), Some("sysctl -w fs.nr_open=2097152"));
    }

    #[test]
    fn backlogs_and_ports() {
        let mut h = good();
        let t = target(10);
        h.somaxconn = Some(128);
        h.tcp_max_syn_backlog = Some(128);
        let c = check_somaxconn(&h, &t);
        assert_eq!(c.level, Level::Warn);
        assert_eq!(c.fix.as_deref(), Some("sysctl -w net.core.somaxconn=65535"));
        assert_eq!(check_syn_backlog(&h, &t).level, Level::Warn);
        h.port_range = Some((32_768, 60_999)); // kernel default: 28232 ports
        let c = check_port_range(&h);
        assert_eq!(c.level, Level::Warn);
        assert!(c.value.contains("28232 ports"));
        assert!(c.fix.unwrap().contains("\"1024 65535\""));
    }

    #[test]
    fn tcp_memory() {
        let mut h = good();
        let t = target(1_000_000);
        h.tcp_mem = Some([287_901, 383_869, 575_802]); // a 24 GiB host's default
        let c = check_tcp_mem(&h, &t);
        assert_eq!(c.level, Level::Warn);
        assert_eq!(
            c.fix.as_deref(),
            Some(
                "sysctl -w net.ipv4.tcp_mem=\"1000000 1500000 2000000\" (pages; two per \
                 connection; keep the max under about half of RAM)"
            )
        );
        h.tcp_rmem = Some([8192, 131_072, 6_291_456]);
        let c = check_tcp_buf("net.ipv4.tcp_rmem", h.tcp_rmem, &h);
        assert_eq!(c.level, Level::Warn);
        assert_eq!(
            c.fix.as_deref(),
            Some("sysctl -w net.ipv4.tcp_rmem=\"4096 131072 6291456\"")
        );
        h.tcp_wmem = None;
        assert_eq!(
            check_tcp_buf("net.ipv4.tcp_wmem", h.tcp_wmem, &h).level,
            Level::Warn
        );
    }

    #[test]
    fn conntrack() {
        let mut h = good();
        let t = target(1_000_000);
        assert_eq!(check_conntrack(&h, &t).level, Level::Ok);
        h.conntrack_max = Some(262_144);
        let c = check_conntrack(&h, &t);
        assert_eq!(c.level, Level::Warn);
        assert!(c
            .fix
            .unwrap()
            .starts_with("sysctl -w net.netfilter.nf_conntrack_max=2097152"));
        h.conntrack_max = Some(2_097_152);
        assert_eq!(check_conntrack(&h, &t).level, Level::Ok);
    }

    #[test]
    fn ceiling_is_the_smallest_bound() {
        let mut h = good();
        let t = target(1);
        let reserve = fd_reserve(4);
        let c = ceiling(&h, &t).unwrap();
        assert_eq!(c.bound_by, "tcp_mem");
        assert_eq!(c.connections, 2_000_000);
        h.nofile = Some(Rlimit {
            soft: 1024,
            hard: 20_000,
        });
        let c = ceiling(&h, &t).unwrap();
        assert_eq!(c.bound_by, "nofile");
        assert_eq!(c.connections, 20_000 - reserve);
        assert!(c.to_string().starts_with(&format!(
            "connection ceiling implied: {} (bound by nofile;",
            20_000 - reserve
        )));
        h.file_max = Some(10);
        let c = ceiling(&h, &t).unwrap();
        assert_eq!((c.bound_by, c.connections), ("fs.file-max", 0));
        assert_eq!(ceiling(&HostFacts::default(), &t), None);
    }

    #[test]
    fn start_checks_are_the_fail_level_ones() {
        let names: Vec<_> = start_checks(&good(), &target(1))
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["io_uring", "memlock"]);
    }

    #[test]
    fn check_line_format() {
        let c = Check::new(
            "memlock",
            Level::Fail,
            "soft 1".into(),
            Some("fix it".into()),
        );
        assert_eq!(
            c.to_string(),
            format!("FAIL {:<22} soft 1 | fix: fix it", "memlock")
        );
        let ok = Check::new("x", Level::Ok, "v".into(), Some("ignored".into()));
        assert!(!ok.to_string().contains("fix"));
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_u64("4096\n"), Some(4096));
        assert_eq!(parse_numbers::<2>("32768\t60999\n"), Some([32_768, 60_999]));
        assert_eq!(
            parse_numbers::<3>("4096 131072 6291456\n"),
            Some([4096, 131_072, 6_291_456])
        );
        assert_eq!(parse_numbers::<3>("1 2"), None);
        assert_eq!(parse_numbers::<2>("1 2 3"), None);
        let smaps = "5555-6666 r--p 0 08:01 1 /bin/x\nSize: 4 kB\nKernelPageSize:       64 kB\n";
        assert_eq!(parse_page_size(smaps), Some(65_536));
        assert_eq!(glommio_io_memory(512 * 1024), 512 * 1024);
        assert_eq!(glommio_io_memory(1), 65_536);
        assert_eq!(glommio_io_memory(70_000), 73_728);
    }

    #[test]
    fn target_from_default_config() {
        let c = Config::default();
        let t = Target::from_config(&c, None);
        assert_eq!(t.conns, 1_000_000);
        assert_eq!(t.io_memory_bytes, 512 * 1024);
        assert_eq!(t.backlog, 4096);
        assert!(t.shards >= 1);
        assert_eq!(Target::from_config(&c, Some(7)).conns, 7);
    }

    /// tuning/sysctl.conf and the unit's limits pass every check for the worked example.
    #[test]
    fn shipped_tuning_passes_for_the_worked_example() {
        let mut h = good();
        h.tcp_mem = None;
        h.tcp_rmem = None;
        h.tcp_wmem = None;
        for line in include_str!("../tuning/sysctl.conf").lines() {
            let line = line.trim().trim_start_matches('-');
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap();
            let v = v.trim();
            match k.trim() {
                "fs.file-max" => h.file_max = parse_u64(v),
                "fs.nr_open" => h.nr_open = parse_u64(v),
                "net.core.somaxconn" => h.somaxconn = parse_u64(v),
                "net.ipv4.tcp_max_syn_backlog" => h.tcp_max_syn_backlog = parse_u64(v),
                "net.ipv4.ip_local_port_range" => {
                    h.port_range = parse_numbers::<2>(v).map(|[a, b]| (a, b))
                }
                "net.ipv4.tcp_mem" => h.tcp_mem = parse_numbers(v),
                "net.ipv4.tcp_rmem" => h.tcp_rmem = parse_numbers(v),
                "net.ipv4.tcp_wmem" => h.tcp_wmem = parse_numbers(v),
                "net.netfilter.nf_conntrack_max" => h.conntrack_max = parse_u64(v),
                _ => {}
            }
        }
        let unit = include_str!("../tuning/imgw.service");
        let limit = |key: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_string()
        };
        let nofile: u64 = limit("LimitNOFILE=").parse().unwrap();
        let memlock: u64 = limit("LimitMEMLOCK=")
            .trim_end_matches('M')
            .parse::<u64>()
            .unwrap()
            << 20;
        h.nofile = Some(Rlimit {
            soft: nofile,
            hard: nofile,
        });
        h.memlock = Some(Rlimit {
            soft: memlock,
            hard: memlock,
        });
        let t = Target {
            conns: 1_000_000,
            shards: 14,
            io_memory_bytes: 512 * 1024,
            backlog: 16_384,
        };
        for c in run_all(&h, &t) {
            assert_eq!(c.level, Level::Ok, "{c}");
        }
        let c = ceiling(&h, &t).unwrap();
        assert_eq!((c.bound_by, c.connections), ("nofile", 2_097_152 - 288));
    }

    #[test]
    fn reading_this_host_does_not_panic() {
        let h = HostFacts::read();
        assert!(h.page_size >= 4096);
        let _ = run_all(&h, &target(1));
    }

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
30 22 0:25 / /dev/shm rw,nosuid,nodev shared:3 - tmpfs tmpfs rw
40 22 8:17 / /var/lib/im\\040gw rw,noatime shared:20 - xfs /dev/sdb1 rw
41 40 0:30 / /var/lib/im\\040gw/ram rw shared:21 - ramfs ramfs rw
42 22 8:33 / /var/lib/im rw shared:22 - btrfs /dev/sdc1 rw
43 22 8:49 / /var/lib/im rw shared:23 - ext3 /dev/sdd1 rw
";

    #[test]
    fn a_path_is_on_its_longest_mount_point_the_later_one_on_the_same_point() {
        let on = |p: &str| fs_type_of(MOUNTINFO, Path::new(p));
        assert_eq!(on("/home/x").as_deref(), Some("ext4"));
        assert_eq!(on("/dev/shm/imgw").as_deref(), Some("tmpfs"));
        // `\040` is a space; a component boundary, not a string prefix, decides.
        assert_eq!(on("/var/lib/im gw/data").as_deref(), Some("xfs"));
        assert_eq!(on("/var/lib/im gw/ram/data").as_deref(), Some("ramfs"));
        assert_eq!(on("/var/lib/imx").as_deref(), Some("ext4"));
        // Mounted over: the later line wins.
        assert_eq!(on("/var/lib/im/data").as_deref(), Some("ext3"));
        assert_eq!(fs_type_of("garbage\n", Path::new("/x")), None);
        assert_eq!(unescape_mount("a\\134b\\011c\\9"), "a\\b\tc\\9");
    }

    fn dir(
        path: &str,
        existing: Option<&str>,
        writable: Option<bool>,
        fs: Option<&str>,
    ) -> DataDir {
        DataDir {
            path: path.into(),
            exists: existing == Some(path),
            existing: existing.map(PathBuf::from),
            writable,
            fs_type: fs.map(str::to_string),
        }
    }

    #[test]
    fn the_data_directory_must_be_writable_and_on_a_disk() {
        let ok = check_store(
            Durability::Local,
            Some(&dir(
                "/var/lib/imgw",
                Some("/var/lib/imgw"),
                Some(true),
                Some("ext4"),
            )),
        );
        assert_eq!(ok.level, Level::Ok, "{ok}");
        assert!(ok.fix.is_none());
        let missing = check_store(
            Durability::Local,
            Some(&dir(
                "/srv/imgw/data",
                Some("/srv"),
                Some(false),
                Some("ext4"),
            )),
        );
        assert_eq!(missing.level, Level::Fail, "{missing}");
        assert!(
            missing.value.contains("missing, and /srv is not writable"),
            "{missing}"
        );
        assert!(missing.fix.as_deref().unwrap_or("").contains("install -d"));
        let read_only = check_store(
            Durability::Local,
            Some(&dir("/srv", Some("/srv"), Some(false), Some("ext4"))),
        );
        assert_eq!(read_only.level, Level::Fail);
        assert!(
            read_only.value.contains("not writable by this user"),
            "{read_only}"
        );
        for fs in VOLATILE_FS {
            let c = check_store(
                Durability::Backend,
                Some(&dir("/run/imgw", Some("/run/imgw"), Some(true), Some(fs))),
            );
            assert_eq!(c.level, Level::Warn, "{c}");
            assert!(c.value.contains("do not survive a reboot"), "{c}");
        }
        assert_eq!(
            check_store(Durability::Local, Some(&dir("x", None, None, None))).level,
            Level::Fail
        );
        let unknown = check_store(
            Durability::Local,
            Some(&dir("/x", Some("/x"), None, Some("ext4"))),
        );
        assert_eq!(unknown.level, Level::Warn);
        let memory = check_store(Durability::Memory, None);
        assert_eq!(memory.level, Level::Warn);
        assert!(memory
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("durability = \"local\""));
        assert_eq!(check_store(Durability::Backend, None).level, Level::Ok);
    }

    #[test]
    fn the_data_directory_is_read_where_the_store_is_local() {
        let mut c = Config::default();
        c.server.data_dir = std::env::temp_dir().join("imgw-preflight-none/data");
        let d = DataDir::read(&c).expect("durability local stores on this host");
        assert!(!d.exists);
        assert_eq!(d.existing, std::fs::canonicalize(std::env::temp_dir()).ok());
        assert!(d.fs_type.is_some());
        c.server.data_dir = std::env::temp_dir();
        let d = DataDir::read(&c).unwrap();
        assert!(d.exists && d.existing == std::fs::canonicalize(std::env::temp_dir()).ok());
        c.server.durability = Durability::Memory;
        assert!(DataDir::read(&c).is_none());
        c.server.durability = Durability::Backend;
        assert!(
            DataDir::read(&c).is_some(),
            "Kafka alone: the log store is the store"
        );
        c.mysql.url = Some("mysql://u@127.0.0.1/imgw".into());
        assert!(DataDir::read(&c).is_none());
    }
}
