#!/usr/bin/env bash
# Installs what twinvm's tests need (Debian packages) and runs them:
# formatting, lints, unit tests and the integration tests that boot guests
# under KVM. Tests that need /dev/kvm fail loudly without it; set
# TWINVM_TESTS_SKIP_KVM=1 to skip them on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v objdump >/dev/null || need+=(binutils)
command -v unshare >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" ||
        { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi

echo "== format"
cargo fmt --all --check
(cd testguest && cargo fmt --check)

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd testguest && cargo clippy --release --locked -- -D warnings)

echo "== test guest unit tests"
(cd testguest && cargo test --locked)

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
