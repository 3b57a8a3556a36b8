#!/usr/bin/env bash
# Installs what the test suite and perf scripts need on a fresh Debian machine,
# only when missing: protoc (the etcd-client crate compiles its protos at build
# time, with the well-known types), etcdctl and etcd 3.4 (a real client and a real server to compare with).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd-client's
# protos import; --no-install-recommends leaves them out.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# Certificates for the TLS tests, and an HTTP/2 client for TLS ports.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
# make runs the etcd-rs crate's test harness (tests/rust_client_suite.rs).
command -v make >/dev/null 2>&1 || need+=(make)
# Go and etcd 3.4's Go source (clientv3 and its examples), for the Go
# client's examples run against three members (tests/go_client.rs).
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -f /usr/share/gocode/src/go.etcd.io/etcd/clientv3/example_kv_test.go ] || need+=(golang-etcd-server-dev)
# A venv for the Python clients the tests run (tests/python_clients.rs).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Keep package scripts from starting an etcd service on 2379.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
  # If a service started anyway, stop it: tests want their own servers.
  if command -v systemctl >/dev/null 2>&1; then systemctl stop etcd >/dev/null 2>&1 || true; fi
  pkill -x etcd >/dev/null 2>&1 || true
fi
# Python clients (from PyPI, pinned), in target/pyclients.
venv="$(cd "$(dirname "$0")/.." && pwd)/target/pyclients"
# etcd3 0.12's generated protobuf code needs the protobuf 3 runtime, and
# its Lock the tenacity it was released with (6.1; later ones changed the
# wait callback's signature). pytest, hypothesis, mock and pifpaf run
# python-etcd3's own test suite, and oslotest etcd3gw's (its tests ship in
# its wheel) (tests/python_clients.rs).
if ! "$venv/bin/python" -c 'import etcd3gw, etcd3, pytest, hypothesis, mock, pifpaf, tenacity, oslotest' >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    etcd3gw==2.7.0 etcd3==0.12.0 'protobuf>=3.20,<4' tenacity==6.1.0 \
    pytest==9.2.0 hypothesis==4.56.3 mock==5.2.0 pifpaf==3.4.0 oslotest==6.1.1
fi
# python-etcd3's own test suite, from its source release on PyPI.
if [ ! -f "$venv/etcd3-0.12.0/tests/test_etcd3.py" ]; then
  rm -rf "$venv/sdist"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps \
    --no-binary :all: -d "$venv/sdist" etcd3==0.12.0
  echo "89a704cb389bf0a010a1fa050ce19342d23bf6371ebda1c21cfe8ff3ed488726  $venv/sdist/etcd3-0.12.0.tar.gz" | sha256sum -c --quiet
  tar xzf "$venv/sdist/etcd3-0.12.0.tar.gz" -C "$venv" etcd3-0.12.0/tests
fi
# aetcd (an asyncio client on grpcio) and its own test suite, from its
# source release, in a venv of its own: it needs protobuf 4 or later,
# python-etcd3 protobuf 3.
avenv="$(cd "$(dirname "$0")/.." && pwd)/target/pyclients-aetcd"
if ! "$avenv/bin/python" -c 'import grpc, google.protobuf, pytest, pytest_asyncio, pytest_mock' >/dev/null 2>&1; then
  rm -rf "$avenv"
  python3 -m venv "$avenv"
  "$avenv/bin/pip" install -q --disable-pip-version-check \
    grpcio==1.85.3 protobuf==7.36.2 pytest==9.0.3 pytest-asyncio==1.3.0 pytest-mock==3.15.1
fi
if [ ! -f "$avenv/aetcd-1.0.0/tests/integration/conftest.py" ]; then
  rm -rf "$avenv/sdist"
  "$avenv/bin/pip" download -q --disable-pip-version-check --no-deps \
    --no-binary :all: -d "$avenv/sdist" aetcd==1.0.0
  echo "9d7173c9909ea3fc8a54dc7c82227c0ddf439d1b42c1bd2496956297d76c1107  $avenv/sdist/aetcd-1.0.0.tar.gz" | sha256sum -c --quiet
  tar xzf "$avenv/sdist/aetcd-1.0.0.tar.gz" -C "$avenv"
fi
# The etcd-rs crate's source release (with its own tests), from crates.io,
# in target/etcd-rs-suite (tests/rust_client_suite.rs).
rs="$(cd "$(dirname "$0")/.." && pwd)/target/etcd-rs-suite"
if [ ! -f "$rs/etcd-rs-1.0.1/tests/failover.rs" ]; then
  rm -rf "$rs/etcd-rs-1.0.1"
  mkdir -p "$rs"
  curl -sSfL -o "$rs/etcd-rs-1.0.1.crate" https://static.crates.io/crates/etcd-rs/etcd-rs-1.0.1.crate
  echo "ac209f35d6d386385644695eb4edfb1af99637977193e9239ef2d8721c930d25  $rs/etcd-rs-1.0.1.crate" | sha256sum -c --quiet
  tar xzf "$rs/etcd-rs-1.0.1.crate" -C "$rs"
fi
