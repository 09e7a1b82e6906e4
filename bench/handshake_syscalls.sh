#!/usr/bin/env bash
# What one connection's set-up costs the gateway in system calls and driver passes: per run a
# fresh `imgw serve --shards 1` (bench/peers/imgw-bench.toml, core 0) takes CONNS connections
# from 4 loadgen workers on core 1 as fast as they come (`loadgen idle --ramp 0`, as
# bench/ab_handshake.sh), while `perf stat` counts the gateway's system calls from before the
# first connect until `imgw_connections_authenticated` reaches CONNS (the teardown is not
# counted). Prints, per connection set up: each system call made at least 0.05 times, the
# empty `accept4` and `recvfrom` (EAGAIN), the driver's passes and context switches, the CPU
# per connection loadgen read from /proc, and the same CPU split into user and kernel time
# (/proc/PID/stat over the counted span). Counts, unlike CPU time, hardly depend on how busy
# the machine is: compare two builds with them. With ALLOCS=1 it also counts the calls to
# libc's malloc, free and realloc (uprobes made with `perf probe` and removed after; they slow
# every call down, so the CPU figures of such a run are not the build's).
#
# LISTENER uws measures bench/peers/uws (uWebSockets.js, `node`, its npm install as
# bench/side_by_side.sh makes it) the same way, its connections a bare upgrade (loadgen
# --protocol plainws), counted up when `ss` lists CONNS established on its port: the kernel
# and user time a connection costs it, beside imgw's.
#
#   [ALLOCS=1] bench/handshake_syscalls.sh RELEASE_DIR [LISTENER] [CONNS] [RUNS]
#   (defaults: ws_early, 19000, 1; LISTENER tcp, ws or ws_early as in bench/ab_handshake.sh,
#   or uws)
#
# Needs perf (linux-perf) and root or perf_event_paranoid <= 1.
set -u
BIN=$1 LISTENER=${2:-ws_early} CONNS=${3:-19000} RUNS=${4:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
OUT=$(mktemp -d /tmp/handshake-syscalls.XXXXXX)
ALLOC_EVENTS=()
if [ "${ALLOCS:-0}" = 1 ]; then
  libc=$(ldd "$BIN/imgw" | awk '/libc\.so/ {print $3}')
  for f in malloc free realloc; do
    perf probe -q -x "$libc" -a "$f" 2>/dev/null || true
    ALLOC_EVENTS+=(-e "probe_libc:$f")
  done
  trap 'perf probe -q -d "probe_libc:*" 2>/dev/null' EXIT
fi
src=$((20 + RANDOM % 200))
# utime and stime of process $1, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# Connections up: the gateway's authenticated count, or the peer's established sockets.
conns_up() {
  if [ "$LISTENER" = uws ]; then
    ss -Htn state established "( sport = :$UWS_PORT )" | wc -l
  else
    gw_metric imgw_connections_authenticated
  fi
}
for run in $(seq "$RUNS"); do
  if [ "$LISTENER" = uws ]; then
    UWS_PORT=$((18100 + run))
    uws_start "$UWS_PORT" || exit 1
    GW_PID=$UWS_PID
    # GW_EARLY: the loadgen flags of the listener, here the peer protocol.
    GW_TARGET="ws://127.0.0.1:$UWS_PORT/" GW_EARLY=(--protocol plainws)
    passes_before=0
  else
    gw_start "$BIN/imgw" 0 --shards 1 --config "$ROOT/bench/peers/imgw-bench.toml" || exit 1
    gw_target "$LISTENER" || { gw_stop; exit 1; }
    passes_before=$(gw_metric imgw_driver_pass_seconds_count)
  fi
  perf stat -x, -e 'syscalls:sys_enter_*' -e context-switches \
    -e syscalls:sys_exit_accept4 --filter 'ret == -11' \
    -e syscalls:sys_exit_recvfrom --filter 'ret == -11' "${ALLOC_EVENTS[@]}" \
    -p "$GW_PID" -o "$OUT/perf-$run.csv" &
  perf_pid=$!
  sleep 0.5
  read -r user0 sys0 < <(cpu_ticks "$GW_PID")
  taskset -c 1 "$BIN/loadgen" idle --target "$GW_TARGET" "${GW_EARLY[@]}" --conns "$CONNS" --workers 4 \
    --ramp 0 --sources "127.0.0.$src-127.0.0.$((src + 3))" --duration 2s --setup-timeout 120s \
    --server-pid "$GW_PID" --quiet --json "$OUT/loadgen-$run.json" >/dev/null 2>&1 &
  lg_pid=$!
  src=$((src + 4))
  [ "$src" -gt 250 ] && src=20
  # Until all are up (at most 120 s), then stop counting before the teardown (loadgen holds
  # them 2 s first).
  for _ in $(seq 1200); do
    up=$(conns_up)
    [ "${up%.*}" -ge "$CONNS" ] && break
    kill -0 "$lg_pid" 2>/dev/null || break
    sleep 0.1
  done
  read -r user1 sys1 < <(cpu_ticks "$GW_PID")
  kill -INT "$perf_pid"
  wait "$perf_pid"
  if [ "$LISTENER" = uws ]; then
    passes=0
    wait "$lg_pid"
    kill "$GW_PID"
    wait "$GW_PID" 2>/dev/null
  else
    passes=$(gw_metric imgw_driver_pass_seconds_count)
    # loadgen holds them 2 s, closes them and writes its report.
    wait "$lg_pid"
    gw_stop
  fi
  TICKS="$((user1 - user0)) $((sys1 - sys0)) $(getconf CLK_TCK)" \
  python3 - "$OUT" "$run" "$CONNS" "$((passes - passes_before))" "$up" <<'PY'
import json, os, sys
out, run, n, passes, up = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
user, kernel, hz = (int(x) for x in os.environ["TICKS"].split())
counts = {}
for line in open(f"{out}/perf-{run}.csv"):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0].replace(".", "").isdigit():
        continue
    # The only exits counted are the filtered ones: the calls that found nothing.
    name = f[2] + (" (EAGAIN)" if f[2].startswith("syscalls:sys_exit_") else "")
    counts[name] = counts.get(name, 0) + float(f[0])
try:
    s = json.load(open(f"{out}/loadgen-{run}.json")).get("server_proc") or {}
    cpu = f", CPU {s.get('cpu_per_connect_us', 0):.1f} us per connection (loadgen's reading)"
except (OSError, ValueError):
    cpu = ""
print(f"run {run}: {up} connections up{cpu}")
print(f"  user / kernel CPU{'':26s} {user / hz * 1e6 / n:6.1f} / {kernel / hz * 1e6 / n:.1f} us per connection")
if passes:
    print(f"  driver passes{'':30s} {passes / n:6.2f} per connection")
for name, v in sorted(counts.items()):
    label = name.replace("syscalls:sys_enter_", "").replace("syscalls:sys_exit_", "")
    label = label.replace("probe_libc:", "libc ")
    if v / n >= 0.05 or "EAGAIN" in name:
        print(f"  {label:42s} {v / n:6.2f} per connection")
PY
done
rm -rf "$OUT"
