# Sourced by benches/garage.sh and benches/compare.sh: starts a throwaway single-node Garage
# 2.5.0 on loopback and exports what the benchmarks need. Needs `garage` on PATH:
#   cargo install garage --version 2.5.0 --locked
#
# After `garage_start`: KEEPFS_BENCH_ENDPOINT, KEEPFS_BENCH_BUCKET, KEEPFS_BENCH_SERVER_PID,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and GARAGE_METRICS_URL +
# GARAGE_METRICS_TOKEN (the admin API's Prometheus endpoint: requests by S3 API call, the
# server's own count). `garage_stop` stops it and removes its data.

garage_start() {
    command -v garage >/dev/null || {
        echo "garage not found: cargo install garage --version 2.5.0 --locked" >&2
        return 1
    }
    GARAGE_DIR=$(mktemp -d /tmp/keepfs-garage.XXXXXX)
    local port_rpc=${GARAGE_RPC_PORT:-3911} port_s3=${GARAGE_S3_PORT:-3910}
    local port_admin=${GARAGE_ADMIN_PORT:-3913}
    local key_id secret
    key_id=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    GARAGE_METRICS_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    cat >"$GARAGE_DIR/garage.toml" <<TOML
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$port_rpc"
rpc_public_addr = "127.0.0.1:$port_rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port_s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$port_admin"
metrics_token = "$GARAGE_METRICS_TOKEN"
TOML
    # Started directly, not through a function: a backgrounded function is a subshell, and its
    # pid is not garage's.
    garage -c "$GARAGE_DIR/garage.toml" server >"$GARAGE_DIR/server.log" 2>&1 &
    KEEPFS_BENCH_SERVER_PID=$!
    local g=(garage -c "$GARAGE_DIR/garage.toml")
    for _ in $(seq 1 100); do "${g[@]}" status >/dev/null 2>&1 && break; sleep 0.2; done
    local node
    node=$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1)
    "${g[@]}" layout assign -z dc1 -c 100G "$node" >/dev/null
    "${g[@]}" layout apply --version 1 >/dev/null
    "${g[@]}" key import --yes "$key_id" "$secret" -n bench >/dev/null
    "${g[@]}" bucket create keepfs-bench >/dev/null
    "${g[@]}" bucket allow --read --write --owner keepfs-bench --key "$key_id" >/dev/null
    export KEEPFS_BENCH_ENDPOINT="http://127.0.0.1:$port_s3"
    export KEEPFS_BENCH_BUCKET=keepfs-bench
    export KEEPFS_BENCH_SERVER_PID
    export AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$secret" AWS_REGION=us-east-1
    export GARAGE_METRICS_URL="http://127.0.0.1:$port_admin/metrics" GARAGE_METRICS_TOKEN
}

garage_stop() {
    [ -n "${KEEPFS_BENCH_SERVER_PID:-}" ] || return 0
    kill "$KEEPFS_BENCH_SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$KEEPFS_BENCH_SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$KEEPFS_BENCH_SERVER_PID" 2>/dev/null || true
    rm -rf "$GARAGE_DIR"
    KEEPFS_BENCH_SERVER_PID=
}
