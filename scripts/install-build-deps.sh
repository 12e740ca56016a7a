#!/usr/bin/env bash
# Installs what building nagare needs besides the Rust toolchain: `protoc`, which etcd-client's build script runs
# (crates.io's etcd-client compiles etcd's protos at build time). Does nothing when protoc is already on PATH.
set -euo pipefail

if command -v protoc >/dev/null 2>&1; then
  exit 0
fi
echo "protoc not found: installing it (needed by etcd-client's build)" >&2
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}
if command -v apt-get >/dev/null 2>&1; then
  as_root apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq protobuf-compiler >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  as_root dnf install -y protobuf-compiler >/dev/null
elif command -v brew >/dev/null 2>&1; then
  brew install protobuf >/dev/null
fi
if ! command -v protoc >/dev/null 2>&1; then
  echo "could not install protoc: install the Protocol Buffers compiler (Debian/Ubuntu: apt-get install" \
    "protobuf-compiler; macOS: brew install protobuf) or set PROTOC to its path, then run this again" >&2
  exit 1
fi
