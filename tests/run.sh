#!/usr/bin/env bash
# The project's test command (README.md): installs what is missing, then runs every test of
# the workspace through real sockets where a feature has them, and the Autobahn conformance run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
# Redis and the Kafka-compatible broker for tests/services.rs (and MariaDB); prints the URLs.
eval "$(tests/services.sh start)"
export IMGW_REDIS_URL IMGW_KAFKA IMGW_MYSQL_URL
cargo nextest run --workspace --all-targets --no-fail-fast "$@"
tests/autobahn.sh
