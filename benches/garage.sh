#!/usr/bin/env bash
# Runs a command (default: the read benchmark) against a throwaway single-node Garage server on
# loopback, the fast S3 server benchmarks are measured on. Needs `garage` on PATH:
#   cargo install garage --version 2.5.0 --locked
# Usage: benches/garage.sh [command ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/garage-env.sh
. benches/garage-env.sh
trap garage_stop EXIT INT TERM
garage_start
if [ $# -eq 0 ]; then
    set -- cargo bench --bench read
fi
"$@"
