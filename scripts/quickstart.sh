#!/usr/bin/env bash
# The first command on a fresh machine: installs what the build needs (protoc), then builds nagare and runs the
# quickstart pipeline on the sample shipped in the repo (output: target/quickstart/). Extra arguments go to
# `nagare run` (e.g. --checkpoint-dir /tmp/ckpt).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh
exec cargo run -p nagare-cli -- run sql/examples/quickstart.sql "$@"
