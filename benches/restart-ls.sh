#!/bin/bash
# `ls -lR` of files written through keepfs, from a fresh mount on an empty cache directory and
# after a restart on the same one (a pod's): time and HEAD requests (keepfs's own metrics).
# Needs moto_server (pip install 'moto[server]'), boto3, curl, bc; runs as root (drop_caches).
#   benches/restart-ls.sh target/release/keepfs            # 20 directories × 100 files, 3 runs
#   DIRS=10 PER_DIR=1000 RUNS=5 benches/restart-ls.sh target/release/keepfs
set -euo pipefail
bin=$(realpath "${1:?usage: benches/restart-ls.sh PATH/TO/keepfs}")
port=${PORT:-5079} metrics=${METRICS_PORT:-9599}
n_dirs=${DIRS:-20} per_dir=${PER_DIR:-100} runs=${RUNS:-3}
export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1
unset AWS_CA_BUNDLE
work=$(mktemp -d)
mnt=$work/mnt
mkdir "$mnt"
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'umount "$mnt" 2>/dev/null || true; kill $moto 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 3
python3 -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$port').create_bucket(Bucket='lsr')"
mount_on() {
    "$bin" mount s3://lsr "$mnt" --endpoint-url "http://127.0.0.1:$port" --force-path-style \
        --cache-dir "$1" --metrics-addr "127.0.0.1:$metrics" --metadata-ttl 60 >"$work/$2.log" 2>&1 &
    for _ in $(seq 1 50); do mountpoint -q "$mnt" && return; sleep 0.1; done
    echo "mount failed: $(cat "$work/$2.log")" >&2
    exit 1
}
heads() {
    curl -s "http://127.0.0.1:$metrics/metrics" |
        awk '/^keepfs_s3_requests_total\{.*operation="HeadObject"/ {s += $2} END {print s + 0}'
}
mount_on "$work/writer" writer
for d in $(seq 1 "$n_dirs"); do
    mkdir "$mnt/d$d"
    for f in $(seq 1 "$per_dir"); do head -c $((100 + f * 50)) /dev/urandom >"$mnt/d$d/f$f"; done
done
"$bin" flush "$mnt" >/dev/null
umount "$mnt"
sleep 3 # HEAD answers are kept once their object is 2 s old
echo "files: $((n_dirs * per_dir))"
for run in $(seq 1 "$runs"); do
    rm -rf "$work/cache"
    for phase in fresh restart; do
        mount_on "$work/cache" "$phase"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t0=$(date +%s.%N)
        ls -lR "$mnt" >/dev/null
        t1=$(date +%s.%N)
        echo "run $run $phase: $(echo "$t1 - $t0" | bc) s, HEADs $(heads)"
        umount "$mnt"
        sleep 1
    done
done
