#!/usr/bin/env bash
# Short smoke run of every fuzz target (SPEC 3.2). Installs cargo-fuzz when missing.
# Usage: fuzz/smoke.sh [SECONDS_PER_TARGET]   (default 20)
# Longer runs: cd fuzz && cargo fuzz run --sanitizer none TARGET -- -max_total_time=3600
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# --sanitizer none builds on the stable toolchain (AddressSanitizer would need nightly flags).
targets=(frame json protobuf msgpack flatbuffers hessian ws_frame ws_handshake jwt admin_http session)
cargo fuzz build --sanitizer none
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz: $t for ${secs}s"
  log=$(mktemp)
  rc=0
  cargo fuzz run --sanitizer none "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=1024 >"$log" 2>&1 || rc=$?
  grep -E "^(#[0-9]+ +DONE|Done|==|SUMMARY|thread)" "$log" || true
  if [ -d "artifacts/$t" ] && [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz: $t found a crash: fuzz/artifacts/$t"; exit 1
  fi
  if [ "$rc" -ne 0 ]; then
    # The fuzzer failed without an artifact (it did not build or start, ran out of memory, ...).
    tail -20 "$log"; echo "fuzz: $t failed (exit $rc)"; exit 1
  fi
  rm -f "$log"
done
echo "fuzz: all targets ran ${secs}s without a crash"
