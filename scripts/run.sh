#!/usr/bin/env bash
# Builds twinvm and boots the default test guest with its console on this
# terminal. Type "poweroff" (or "reboot") to end it. Extra arguments are
# passed to `twinvm run`, e.g. `scripts/run.sh --cmdline dirty_rate=1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin twinvm
exec target/release/twinvm run "$@"
