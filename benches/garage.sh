#!/usr/bin/env bash
# Runs a command (default: the read benchmark) against a throwaway single-node Garage server on
# loopback, the fast S3 server benchmarks are measured on. Needs `garage` on PATH:
#   cargo install garage --version 2.5.0 --locked
# Usage: benches/garage.sh [command ...]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v garage >/dev/null || { echo "garage not found: cargo install garage --version 2.5.0 --locked" >&2; exit 1; }

dir=$(mktemp -d /tmp/keepfs-garage.XXXXXX)
port_rpc=${GARAGE_RPC_PORT:-3911}
port_s3=${GARAGE_S3_PORT:-3910}
key_id=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$port_rpc"
rpc_public_addr = "127.0.0.1:$port_rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port_s3"
root_domain = ".s3.garage.localhost"
TOML
g() { garage -c "$dir/garage.toml" "$@"; }
# Started directly, not through g(): a backgrounded function is a subshell, and its pid is
# not garage's.
garage -c "$dir/garage.toml" server >"$dir/server.log" 2>&1 &
pid=$!
stop() {
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT INT TERM
for _ in $(seq 1 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
node=$(g node id -q 2>/dev/null | cut -d@ -f1)
g layout assign -z dc1 -c 100G "$node" >/dev/null
g layout apply --version 1 >/dev/null
g key import --yes "$key_id" "$secret" -n bench >/dev/null
g bucket create keepfs-bench >/dev/null
g bucket allow --read --write --owner keepfs-bench --key "$key_id" >/dev/null

export KEEPFS_BENCH_ENDPOINT="http://127.0.0.1:$port_s3"
export KEEPFS_BENCH_BUCKET=keepfs-bench
export KEEPFS_BENCH_SERVER_PID=$pid
export AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$secret" AWS_REGION=us-east-1
if [ $# -eq 0 ]; then
    set -- cargo bench --bench read
fi
"$@"
