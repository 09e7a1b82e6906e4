#!/usr/bin/env bash
# Acked msgs/s and latency of 1:1 chat at durability `local` (embedded store) and `backend`
# (MariaDB) with 1 and 4 concurrent transactions (`mysql.writers`), RUNS runs each, alternating,
# medians (docs/STORE.md, "MySQL backend: measured").
#
#   tests/services.sh start
#   cargo build --release -p loadgen -p imgw --bins
#   bench/mysql_vs_local.sh [RATE] [RUNS] [DURATION]      # defaults 5000 3 15s
#   VARIANTS="backend:1 backend:8" bench/mysql_vs_local.sh 40000 3 10s
#   OLD_BIN=/tmp/oldtarget/release VARIANTS="old@backend backend" bench/mysql_vs_local.sh
#
# A variant is `local`, `backend` (the [mysql] defaults), or `backend:WRITERS[:WRITER_MIN_OPS]`;
# an `old@` prefix runs $OLD_BIN/imgw instead (an older build, side by side; loadgen is always
# this build's).
#
# Each run starts a fresh imgw (1 shard, dev auth, a fresh data directory or a fresh database
# `imgw_bench`), runs `loadgen chat` against it and keeps its JSON.
set -euo pipefail
RATE=${1:-5000}
RUNS=${2:-3}
DURATION=${3:-15s}
CONNS=${CONNS:-1000}
VARIANTS=${VARIANTS:-local backend:1 backend:4}
OLD_BIN=${OLD_BIN:-}
# Past the run, loadgen waits this long for what is in flight (it ends early once settled).
# Above saturation the latency reaches seconds: with loadgen's default of 3 s the run could end
# between a message's ack and its delivery, which then counted as lost.
GRACE=${GRACE:-15s}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
MYSQL=${IMGW_MYSQL_URL:-mysql://imgw:imgw@127.0.0.1:3306/imgw}
BASE=${MYSQL%/*}
OUT=${OUT:-/tmp/imgw-bench-mysql}
mkdir -p "$OUT"
port=${PORT:-28380}

ticks() { # utime + stime of a process, in clock ticks (0 when it is gone)
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
MARIADB_PID=$(pgrep -o -x mariadbd || true)

run_one() { # variant run
    local variant=$1 n=$2 extra=() imgw=$BIN/imgw
    local spec_all=$variant
    if [ "${variant#old@}" != "$variant" ]; then
        imgw=$OLD_BIN/imgw spec_all=${variant#old@}
    fi
    local dur=${spec_all%%:*}
    local data="$OUT/data-$dur-$n"
    rm -rf "$data"
    if [ "$dur" = backend ]; then
        mariadb -h127.0.0.1 -uimgw -pimgw -e "DROP DATABASE IF EXISTS imgw_bench; CREATE DATABASE imgw_bench"
        extra=(--mysql "$BASE/imgw_bench")
        if [ "$spec_all" != backend ]; then
            # backend:WRITERS[:WRITER_MIN_OPS]
            local spec=${spec_all#*:}
            local writers=${spec%%:*} min_ops=512
            [ "$spec" != "$writers" ] && min_ops=${spec#*:}
            printf '[mysql]\npool_min = %s\npool_max = %s\nwriters = %s\nwriter_min_ops = %s\n' \
                "$writers" "$writers" "$writers" "$min_ops" >"$OUT/writers.toml"
            extra+=(--config "$OUT/writers.toml")
        fi
    fi
    "$imgw" serve --insecure-dev-auth --shards 1 --durability "$dur" "${extra[@]}" \
        --data-dir "$data" --ws-listen 127.0.0.1:$port --tcp-listen 127.0.0.1:$((port + 1)) \
        --admin-listen 127.0.0.1:$((port + 2)) --log warn 2>"$OUT/imgw-$dur-$n.log" &
    local pid=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$((port + 2))/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    local i0 m0
    i0=$(ticks "$pid") m0=$(ticks "${MARIADB_PID:-0}")
    "$BIN/loadgen" chat --target "ws://127.0.0.1:$port/ws" --conns "$CONNS" --rate "$RATE" \
        --duration "$DURATION" --grace "$GRACE" --json "$OUT/$variant-$RATE-$n.json" >"$OUT/$variant-$RATE-$n.txt" 2>/dev/null || true
    echo "$(($(ticks "$pid") - i0)) $(($(ticks "${MARIADB_PID:-0}") - m0)) $(getconf CLK_TCK)" \
        >"$OUT/$variant-$RATE-$n.cpu"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$data"
}

for n in $(seq 1 "$RUNS"); do
    for variant in $VARIANTS; do
        run_one "$variant" "$n"
    done
done

python3 - "$OUT" "$RATE" "$RUNS" $VARIANTS <<'PY'
import json, statistics, sys
out, rate, runs, variants = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
print(f"rate {rate} msgs/s offered, medians of {runs} runs")
print("| durability:writers | acked msgs/s | ack p50 ms | ack p99 ms | ack p999 ms | delivery p99 ms "
      "| imgw CPU µs/msg | MariaDB CPU µs/msg | lost | dup |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for dur in variants:
    rows = []
    for n in range(1, runs + 1):
        try:
            j = json.load(open(f"{out}/{dur}-{rate}-{n}.json"))
            imgw_t, maria_t, hz = (int(x) for x in open(f"{out}/{dur}-{rate}-{n}.cpu").read().split())
        except (OSError, ValueError):
            continue
        m = j["messages"]
        acked = max(m["acked"], 1)
        a = j["ack_latency_us"]
        rows.append((m["acked"] / j["run_s"], a["p50"] / 1000, a["p99"] / 1000, a["p999"] / 1000,
                     j["latency_us"]["p99"] / 1000, imgw_t * 1e6 / hz / acked,
                     maria_t * 1e6 / hz / acked if "backend" in dur else 0.0,
                     m["lost"], m["duplicates"]))
    if not rows:
        print(f"| {dur} | no data | | | | | | | | |")
        continue
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"| {dur} | {med[0]:,.0f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | {med[4]:.2f} | "
          f"{med[5]:.1f} | {med[6]:.1f} | {max(r[7] for r in rows)} | {max(r[8] for r in rows)} |")
    print(f"  {dur} runs: " + "; ".join(f"{r[0]:,.0f}/s p99 {r[2]:.2f}" for r in rows), file=sys.stderr)
PY
