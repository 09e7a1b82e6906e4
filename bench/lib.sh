# Sourced by the bench scripts: one way to build the release binaries, and to start and stop
# a gateway for a benchmark.
#
#   build_release                  builds imgw and loadgen (release) from the repository's root
#                                  and sets BIN to where cargo put them (under
#                                  CARGO_TARGET_DIR when it is set), IMGW and LOADGEN to the
#                                  two binaries. Fails if either is missing.
#   gw_start BIN CORES [ARGS...]   starts `BIN serve --insecure-dev-auth --log error` pinned to
#                                  CORES (taskset list, "" for none), every listener on port 0,
#                                  its data in a fresh directory (under $GW_TMP, default
#                                  /tmp), then waits (at most 60 s) for
#                                  GET /readyz. Sets GW_PID, GW_DIR, GW_WS (host:port),
#                                  GW_TCP, GW_ADMIN. ARGS go last (--shards, --config, ...).
#   gw_stop                        SIGTERM, waits for the exit, removes GW_DIR.
#   ab_gateways OLD NEW RUNS FN    RUNS rounds alternating two builds (release directories):
#                                  each calls `FN old|new ROUND` with a fresh gateway of that
#                                  build (`--shards 1`, bench/peers/imgw-bench.toml, core 0)
#                                  started (GW_ARGS adds flags, for example
#                                  "--durability local"; GW_OLD_ARGS and GW_NEW_ARGS add
#                                  flags to one side only, so one build may be run against
#                                  itself with a setting changed), and stops it after.
#   gw_metric NAME                 prints the sum of metric NAME's samples (every label set)
#                                  from the started gateway's /metrics (0 if none).
#   gw_target LISTENER             sets GW_TARGET (loadgen's --target for the started
#                                  gateway) and GW_EARLY (loadgen flags) for LISTENER: tcp,
#                                  ws, ws_early (ws with `hello` in the upgrade request's
#                                  write, --early-hello) or ws_url (`hello` in the request
#                                  target, --url-hello). Fails on anything else.
#   wait_port PORT                 waits (at most 10 s) until 127.0.0.1:PORT takes a
#                                  connection; fails with a message if it never does.
#   uws_start PORT                 starts the uWebSockets.js peer (bench/peers/uws, `node`)
#                                  on 127.0.0.1:PORT pinned to core 0 and waits for it. Sets
#                                  UWS_PID.
#
# Ports come from --ports-file, so several gateways (or a left-over one) never collide.

build_release() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  (cd "$root" && cargo build --release --quiet -p imgw --bin imgw -p loadgen --bin loadgen) ||
    return 1
  BIN=${CARGO_TARGET_DIR:-$root/target}/release
  IMGW=$BIN/imgw
  LOADGEN=$BIN/loadgen
  [ -x "$IMGW" ] && [ -x "$LOADGEN" ] || { echo "no $IMGW or $LOADGEN" >&2; return 1; }
}

gw_start() {
  local bin=$1 cores=$2
  shift 2
  mkdir -p "${GW_TMP:-/tmp}"
  GW_DIR=$(mktemp -d "${GW_TMP:-/tmp}/imgw-bench.XXXXXX")
  local pin=()
  [ -n "$cores" ] && pin=(taskset -c "$cores")
  "${pin[@]}" "$bin" serve --insecure-dev-auth --log error --data-dir "$GW_DIR/data" \
    --ws-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --ports-file "$GW_DIR/ports.json" "$@" 2>"$GW_DIR/stderr" &
  GW_PID=$!
  local i
  GW_WS= GW_TCP= GW_ADMIN=
  for i in $(seq 600); do
    # The ports file is written once, whole (renamed into place): read it once.
    if [ -z "$GW_ADMIN" ] && [ -s "$GW_DIR/ports.json" ]; then
      read -r GW_WS GW_TCP GW_ADMIN < <(python3 -c \
        'import json,sys; p=json.load(open(sys.argv[1])); print(p["ws"], p["tcp"], p["admin"])' \
        "$GW_DIR/ports.json" 2>/dev/null)
    fi
    if [ -n "$GW_ADMIN" ] && curl -sf "$GW_ADMIN/readyz" >/dev/null; then
      return 0
    fi
    if ! kill -0 "$GW_PID" 2>/dev/null; then
      echo "gateway exited at start:" >&2
      cat "$GW_DIR/stderr" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "gateway not ready within 60 s" >&2
  gw_stop
  return 1
}

gw_stop() {
  kill "$GW_PID" 2>/dev/null
  wait "$GW_PID" 2>/dev/null
  rm -rf "$GW_DIR"
}

gw_metric() {
  curl -s "$GW_ADMIN/metrics" |
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $NF} END {print s + 0}'
}

gw_target() {
  GW_EARLY=()
  case $1 in
    tcp) GW_TARGET="tcp://$GW_TCP" ;;
    ws) GW_TARGET="ws://$GW_WS/ws" ;;
    ws_early) GW_TARGET="ws://$GW_WS/ws" GW_EARLY=(--early-hello) ;;
    ws_url) GW_TARGET="ws://$GW_WS/ws" GW_EARLY=(--url-hello) ;;
    *) echo "unknown listener $1" >&2; return 1 ;;
  esac
}

wait_port() {
  local i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on 127.0.0.1:$1" >&2
  return 1
}

uws_start() {
  taskset -c 0 node "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/peers/uws/server.js" "$1" \
    127.0.0.1 >/dev/null 2>&1 &
  UWS_PID=$!
  wait_port "$1"
}

ab_gateways() {
  local old=$1 new=$2 runs=$3 fn=$4 k v b side
  local config
  config="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/peers/imgw-bench.toml"
  for k in $(seq 1 "$runs"); do
    for v in old new; do
      if [ "$v" = old ]; then b=$old side=${GW_OLD_ARGS:-}; else b=$new side=${GW_NEW_ARGS:-}; fi
      # shellcheck disable=SC2086 # GW_ARGS and the side's are lists of flags
      gw_start "$b/imgw" 0 --shards 1 --config "$config" ${GW_ARGS:-} $side || return 1
      "$fn" "$v" "$k"
      gw_stop
    done
  done
}
