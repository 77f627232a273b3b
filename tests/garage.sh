#!/usr/bin/env bash
# Runs the integration tests against a throwaway single-node Garage 2.5.0 on loopback (not part
# of CI: Garage takes ~25 minutes to build on 2 cores). Garage ignores conditional PUTs, keeps
# no versions and stores keys only up to about 500 bytes; tests that need those skip
# themselves with a SKIPPED line.
#
#   cargo install garage --version 2.5.0 --locked   # once
#   tests/garage.sh                                 # every integration test
#   tests/garage.sh --test write names_whose        # any `cargo test` arguments
set -euo pipefail
cd "$(dirname "$0")/.."
# Ports of their own, so that a benchmark's Garage can run beside it.
export GARAGE_S3_PORT=${GARAGE_S3_PORT:-3940} GARAGE_RPC_PORT=${GARAGE_RPC_PORT:-3941}
export GARAGE_ADMIN_PORT=${GARAGE_ADMIN_PORT:-3943}
source benches/garage-env.sh
garage_start
trap garage_stop EXIT
garage -c "$GARAGE_DIR/garage.toml" key allow --create-bucket "$AWS_ACCESS_KEY_ID" >/dev/null
if [ $# -eq 0 ]; then
    # What runs against moto in CI, less the load and torture runs (minutes each, and about
    # the journal, not the server).
    for file in tests/*.rs; do
        name=$(basename "$file" .rs)
        case "$name" in
        manifests | containers | fstab | handover | load | torture) ;;
        *) set -- "$@" --test "$name" ;;
        esac
    done
    set -- --no-fail-fast "$@"
fi
KEEPFS_TEST_S3_ENDPOINT="$KEEPFS_BENCH_ENDPOINT" KEEPFS_TEST_S3_KIND=garage \
    KEEPFS_TEST_S3_ACCESS_KEY="$AWS_ACCESS_KEY_ID" KEEPFS_TEST_S3_SECRET_KEY="$AWS_SECRET_ACCESS_KEY" \
    cargo test "$@"
