#!/usr/bin/env bash
# What one connection's set-up costs the gateway in system calls and driver passes: per run a
# fresh `imgw serve --shards 1` (bench/peers/imgw-bench.toml, core 0) takes CONNS connections
# from 4 loadgen workers on core 1 as fast as they come (`loadgen idle --ramp 0`, as
# bench/ab_handshake.sh), while `perf stat` counts the gateway's system calls from before the
# first connect until `imgw_connections_authenticated` reaches CONNS (the teardown is not
# counted). Prints, per connection set up: each system call made at least 0.05 times, the
# empty `accept4` and `recvfrom` (EAGAIN), the driver's passes and context switches, and the
# CPU per connection loadgen read from /proc. Counts, unlike CPU time, hardly depend on how
# busy the machine is: compare two builds with them.
#
#   bench/handshake_syscalls.sh RELEASE_DIR [LISTENER] [CONNS] [RUNS]
#   (defaults: ws_early, 19000, 1; LISTENER tcp, ws or ws_early as in bench/ab_handshake.sh)
#
# Needs perf (linux-perf) and root or perf_event_paranoid <= 1.
set -u
BIN=$1 LISTENER=${2:-ws_early} CONNS=${3:-19000} RUNS=${4:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
OUT=$(mktemp -d /tmp/handshake-syscalls.XXXXXX)
src=$((20 + RANDOM % 200))
for run in $(seq "$RUNS"); do
  gw_start "$BIN/imgw" 0 --shards 1 --config "$ROOT/bench/peers/imgw-bench.toml" || exit 1
  gw_target "$LISTENER" || { gw_stop; exit 1; }
  passes_before=$(gw_metric imgw_driver_pass_seconds_count)
  perf stat -x, -e 'syscalls:sys_enter_*' -e context-switches \
    -e syscalls:sys_exit_accept4 --filter 'ret == -11' \
    -e syscalls:sys_exit_recvfrom --filter 'ret == -11' \
    -p "$GW_PID" -o "$OUT/perf-$run.csv" &
  perf_pid=$!
  sleep 0.5
  taskset -c 1 "$BIN/loadgen" idle --target "$GW_TARGET" "${GW_EARLY[@]}" --conns "$CONNS" --workers 4 \
    --ramp 0 --sources "127.0.0.$src-127.0.0.$((src + 3))" --duration 2s --setup-timeout 120s \
    --server-pid "$GW_PID" --quiet --json "$OUT/loadgen-$run.json" >/dev/null 2>&1 &
  lg_pid=$!
  src=$((src + 4))
  [ "$src" -gt 250 ] && src=20
  # Until all are up (at most 120 s), then stop counting before the teardown (loadgen holds
  # them 2 s first).
  for _ in $(seq 1200); do
    up=$(gw_metric imgw_connections_authenticated)
    [ "${up%.*}" -ge "$CONNS" ] && break
    kill -0 "$lg_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -INT "$perf_pid"
  wait "$perf_pid"
  passes=$(gw_metric imgw_driver_pass_seconds_count)
  # loadgen holds them 2 s, closes them and writes its report.
  wait "$lg_pid"
  gw_stop
  python3 - "$OUT" "$run" "$CONNS" "$((passes - passes_before))" "$up" <<'PY'
import json, sys
out, run, n, passes, up = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
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
print(f"  driver passes{'':30s} {passes / n:6.2f} per connection")
for name, v in sorted(counts.items()):
    label = name.replace("syscalls:sys_enter_", "").replace("syscalls:sys_exit_", "")
    if v / n >= 0.05 or "EAGAIN" in name:
        print(f"  {label:42s} {v / n:6.2f} per connection")
PY
done
rm -rf "$OUT"
