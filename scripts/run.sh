#!/usr/bin/env bash
# Builds twinvm and starts a protected pair of the default test guest on
# this machine (`twinvm pair`): the primary's console is this terminal, the
# secondary is kept in step with it by checkpoints. Type "poweroff" (or
# "reboot") to end both. Extra arguments are passed to `twinvm pair`,
# e.g. `scripts/run.sh --cmdline dirty_rate=1000 --checkpoint-interval-ms 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin twinvm
exec target/release/twinvm pair "$@"
