#!/usr/bin/env bash
# The project's test command (README.md): installs what is missing, then runs every test of
# the workspace through real sockets where a feature has them, and the Autobahn conformance run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
cargo nextest run --workspace --all-targets --no-fail-fast "$@"
tests/autobahn.sh
