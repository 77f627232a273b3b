#!/usr/bin/env bash
# keepfs side by side with what users would pick instead, on one Garage server, in one run:
# the raw SDK / local disk as reference, keepfs (default and --no-disk-cache), rclone mount
# (--vfs-cache-mode full) and s3fs (use_cache). Every workload runs for every peer in turn
# (interleaved, the order rotated each run), KEEPFS_BENCH_RUNS times; the table gives medians,
# peak RSS of the mount process and S3 requests by API call (Garage's count, and keepfs's own).
#
#   benches/compare.sh                       # everything, 3 runs (~1 hour on 2 cores)
#   KEEPFS_BENCH_QUICK=1 benches/compare.sh  # small sizes, 1 run: checks the script (~5 min)
#
# Knobs (environment): KEEPFS_BENCH_RUNS (3), KEEPFS_BENCH_SIZE_MIB (1024),
# KEEPFS_BENCH_SMALL_FILES (10000), KEEPFS_BENCH_TAR_FILES (4000), KEEPFS_BENCH_LIST_DIRS (100)
# × KEEPFS_BENCH_LIST_FILES (100), KEEPFS_BENCH_RENAME_FILES (1000), KEEPFS_BENCH_RAND_IOS
# (1000), KEEPFS_BENCH_SCALE_FILES (100000, one directory), KEEPFS_BENCH_PEERS ("keepfs
# keepfs-nodisk rclone s3fs"), KEEPFS_BENCH_WORKLOADS ("reads writes listing scale": a subset
# measures one lever quickly), KEEPFS_BENCH_OUT (results
# directory; default a new one under /tmp). Needs root (mounts, drop_caches), garage on PATH,
# fio; rclone and s3fs rows are run when they are installed (apt-get install rclone s3fs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=${KEEPFS_BENCH_QUICK:-}
runs=${KEEPFS_BENCH_RUNS:-$([ -n "$quick" ] && echo 1 || echo 3)}
size_mib=${KEEPFS_BENCH_SIZE_MIB:-$([ -n "$quick" ] && echo 64 || echo 1024)}
small_files=${KEEPFS_BENCH_SMALL_FILES:-$([ -n "$quick" ] && echo 300 || echo 10000)}
tar_files=${KEEPFS_BENCH_TAR_FILES:-$([ -n "$quick" ] && echo 200 || echo 4000)}
list_dirs=${KEEPFS_BENCH_LIST_DIRS:-$([ -n "$quick" ] && echo 5 || echo 100)}
list_files=${KEEPFS_BENCH_LIST_FILES:-$([ -n "$quick" ] && echo 20 || echo 100)}
rename_files=${KEEPFS_BENCH_RENAME_FILES:-$([ -n "$quick" ] && echo 50 || echo 1000)}
rand_ios=${KEEPFS_BENCH_RAND_IOS:-$([ -n "$quick" ] && echo 100 || echo 1000)}
scale_files=${KEEPFS_BENCH_SCALE_FILES:-$([ -n "$quick" ] && echo 2000 || echo 100000)}
peers=${KEEPFS_BENCH_PEERS:-keepfs keepfs-nodisk rclone s3fs}
workloads=${KEEPFS_BENCH_WORKLOADS:-reads writes listing scale}
for wl in $workloads; do
    case $wl in
    reads | writes | listing | scale) ;;
    *) echo "unknown workload $wl (reads, writes, listing, scale)" >&2; exit 1 ;;
    esac
done
out=${KEEPFS_BENCH_OUT:-$(mktemp -d /tmp/keepfs-compare.XXXXXX)}
mkdir -p "$out"
results=$out/results.jsonl
work=$(mktemp -d /var/tmp/keepfs-compare-work.XXXXXX)
size=$((size_mib << 20))

[ "$(id -u)" = 0 ] || { echo "compare.sh needs root (mounts, drop_caches)" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio not found: apt-get install fio" >&2; exit 1; }
ran=()
for p in $peers; do
    case $p in
    rclone | s3fs) command -v "$p" >/dev/null || { echo "SKIPPED: $p is not installed (apt-get install $p)"; continue; } ;;
    esac
    ran+=("$p")
done

# keepfs's disk cache leaves --cache-min-free (5 % of the disk) free: on a fuller disk its
# warm re-reads come from S3, and the table would say nothing about the disk cache.
read -r total avail < <(df -B1 --output=size,avail "$work" | tail -1)
if [ $((avail - 2 * size)) -lt $((total / 20)) ]; then
    echo "NOTE: $work's disk has $((avail >> 20)) MiB free, under 5 % of it plus the test data:" \
        "keepfs keeps no blocks on disk there (--cache-min-free); warm re-reads come from S3"
fi

echo "building keepfs and the raw client (release)"
cargo build --release --quiet --bin keepfs
s3raw=$(cargo bench --no-run --bench s3raw 2>&1 | sed -n 's/.*Executable .*(\(.*s3raw-[0-9a-f]*\)).*/\1/p' | tail -1)
keepfs=${CARGO_TARGET_DIR:-$root/target}/release/keepfs
[ -x "$s3raw" ] || { echo "could not build benches/s3raw.rs" >&2; exit 1; }

# shellcheck source=benches/garage-env.sh
. benches/garage-env.sh
mounted=()
cleanup() {
    set +e
    for m in "${mounted[@]}"; do umount_peer "$m"; done
    garage_stop
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
garage_start
bucket=$KEEPFS_BENCH_BUCKET

py() { python3 "$root/benches/compare.py" "$@"; }
raw() { "$s3raw" "$@" | sed -n 's/^seconds=//p' | cut -d' ' -f1; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
keepfs_metrics_port=9464

# --- mounts ------------------------------------------------------------------------------
# mount_peer PEER MOUNTPOINT CACHE_DIR: mounts the whole bucket; sets PEER_PID.
mount_peer() {
    local peer=$1 mnt=$2 cache=$3
    mkdir -p "$mnt" "$cache"
    case $peer in
    keepfs | keepfs-nodisk)
        local extra=()
        [ "$peer" = keepfs-nodisk ] && extra=(--no-disk-cache)
        "$keepfs" mount "s3://$bucket" "$mnt" --endpoint-url "$KEEPFS_BENCH_ENDPOINT" \
            --force-path-style --region us-east-1 --cache-dir "$cache" \
            --metrics-addr "127.0.0.1:$keepfs_metrics_port" "${extra[@]}" \
            >"$out/$peer.log" 2>&1 &
        ;;
    rclone)
        env -u AWS_CA_BUNDLE rclone mount ":s3:$bucket" "$mnt" --s3-provider Other \
            --s3-endpoint "$KEEPFS_BENCH_ENDPOINT" --s3-access-key-id "$AWS_ACCESS_KEY_ID" \
            --s3-secret-access-key "$AWS_SECRET_ACCESS_KEY" --s3-region us-east-1 \
            --s3-force-path-style --vfs-cache-mode full --cache-dir "$cache" \
            --dir-cache-time 1h >"$out/$peer.log" 2>&1 &
        ;;
    s3fs)
        printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$work/s3fs.passwd"
        chmod 600 "$work/s3fs.passwd"
        s3fs "$bucket" "$mnt" -f -o url="$KEEPFS_BENCH_ENDPOINT" -o use_path_request_style \
            -o passwd_file="$work/s3fs.passwd" -o use_cache="$cache" -o endpoint=us-east-1 \
            >"$out/$peer.log" 2>&1 &
        ;;
    esac
    PEER_PID=$!
    for _ in $(seq 1 200); do
        mountpoint -q "$mnt" && { mounted+=("$mnt"); return 0; }
        kill -0 "$PEER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "$peer did not mount; its log:" >&2
    cat "$out/$peer.log" >&2
    return 1
}

umount_peer() {
    local mnt=$1
    mountpoint -q "$mnt" || return 0
    umount "$mnt" 2>/dev/null || umount -l "$mnt"
    for _ in $(seq 1 100); do kill -0 "${PEER_PID:-0}" 2>/dev/null || break; sleep 0.1; done
    local keep=()
    for m in "${mounted[@]}"; do [ "$m" = "$mnt" ] || keep+=("$m"); done
    mounted=("${keep[@]}")
}

# --- measuring ---------------------------------------------------------------------------
# cpu_seconds PID: user + system CPU time of a running process so far (0 if none).
clk_tck=$(getconf CLK_TCK)
cpu_seconds() {
    [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
    # Fields after the command name (which may hold spaces): utime and stime are 12th and 13th.
    sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$clk_tck" '{print ($12 + $13) / hz}'
}

# cpu_since PID SECONDS: CPU time of PID since it read SECONDS, clamped at 0 (a process gone
# since then reads as 0).
cpu_since() {
    awk "BEGIN {d = $(cpu_seconds "$1") - $2; print (d > 0 ? d : 0)}"
}

# begin: resets the mount process's peak RSS and takes the request counters and CPU times.
begin() {
    [ -n "${PEER_PID:-}" ] && echo 5 >"/proc/$PEER_PID/clear_refs" 2>/dev/null || true
    server_before=$(py scrape "$GARAGE_METRICS_URL" "$GARAGE_METRICS_TOKEN")
    client_before=$(py scrape "http://127.0.0.1:$keepfs_metrics_port/metrics")
    # After the scrapes: serving them is not the workload's CPU.
    cpu_mount0=$(cpu_seconds "${PEER_PID:-}")
    cpu_server0=$(cpu_seconds "$KEEPFS_BENCH_SERVER_PID")
    t0=$(now)
}

# end WORKLOAD PEER BYTES OBJECTS [SECONDS] [NOTE]: records a measurement since `begin`.
end() {
    local t1 secs rss=0
    t1=$(now)
    secs=${5:-$(awk "BEGIN {print $t1 - $t0}")}
    if [ -n "${PEER_PID:-}" ] && [ -r "/proc/$PEER_PID/status" ]; then
        rss=$(awk '/^VmHWM/ {print $2}' "/proc/$PEER_PID/status")
    fi
    local cpu_mount cpu_server
    cpu_mount=$(cpu_since "${PEER_PID:-}" "$cpu_mount0")
    cpu_server=$(cpu_since "$KEEPFS_BENCH_SERVER_PID" "$cpu_server0")
    local client_after=
    case $2 in keepfs*) client_after=$(py scrape "http://127.0.0.1:$keepfs_metrics_port/metrics") ;; *) client_before= ;; esac
    py record "$results" workload="$1" peer="$2" run="$run" bytes="$3" objects="$4" \
        seconds="$(printf '%.3f' "$secs")" rss_kib="$rss" what="${6:-}" \
        mount_cpu_s="$(printf '%.3f' "$cpu_mount")" server_cpu_s="$(printf '%.3f' "$cpu_server")" waiter_lists="${waiter_lists:-0}" \
        server_before_json="$server_before" server_after_json="$(py scrape "$GARAGE_METRICS_URL" "$GARAGE_METRICS_TOKEN")" \
        ${client_before:+client_before_json="$client_before"} ${client_after:+client_after_json="$client_after"}
    printf '  %-12s %-14s %8.2f s\n' "$1" "$2" "$secs"
}

# reference WORKLOAD BYTES OBJECTS NOTE COMMAND...: a raw-client command that prints seconds.
reference() {
    local wl=$1 bytes=$2 objects=$3 note=$4
    shift 4
    PEER_PID=
    begin
    local secs
    secs=$("$@")
    end "$wl" reference "$bytes" "$objects" "$secs" "$note"
}

read_files() { # read files in parallel, 1 MiB reads (waits for these readers only)
    local pids=()
    for f in "$@"; do dd if="$f" of=/dev/null bs=1M status=none & pids+=($!); done
    wait "${pids[@]}"
}

# --- data --------------------------------------------------------------------------------
echo "seeding: 4 objects of $size_mib MiB, a tree of $list_dirs × $list_files files"
wants() { [[ " $workloads " == *" $1 "* ]]; }
if wants reads; then "$s3raw" seed-objects data/obj 4 "$size_mib" >/dev/null; fi
if wants listing; then "$s3raw" seed-tree tree/ "$list_dirs" "$list_files" 4096 >/dev/null; fi
# 5 000-byte objects: too large to be symlinks, so no peer needs a HEAD to type them.
if wants scale; then "$s3raw" seed-tree big/ 1 "$scale_files" 5000 >/dev/null; fi
tar_bytes=0
if wants writes; then
    head -c "$size" /dev/urandom >"$work/source.bin"
python3 - "$work/tree.tar" "$tar_files" <<'PY'
# A source-tree-like archive: 40 files per directory, sizes 1-64 KiB (deterministic).
import io, random, sys, tarfile
rng = random.Random(1)
with tarfile.open(sys.argv[1], "w") as tar:
    for n in range(int(sys.argv[2])):
        data = rng.randbytes(rng.choice([1, 2, 4, 4, 8, 8, 16, 32, 64]) * 1024)
        info = tarfile.TarInfo(f"src/d{n // 40:03}/f{n:05}.c")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
PY
    tar_bytes=$(tar tvf "$work/tree.tar" | awk '{s += $3} END {print s}')
fi
list_entries=$((list_dirs * list_files + list_dirs))

# --- workloads ---------------------------------------------------------------------------
# Each takes PEER and mounts what it needs on $work/PEER (cache $work/PEER.cache).

wl_reads() {
    local p=$1 mnt=$work/$1 cache=$work/$1.cache
    rm -rf "$cache"
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin; read_files "$mnt/data/obj0"; end read1 "$p" "$size" 1
    drop_caches; begin; read_files "$mnt"/data/obj{0,1,2,3}; end read4 "$p" $((4 * size)) 4
    umount_peer "$mnt"
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin; read_files "$mnt/data/obj0"; end reread "$p" "$size" 1
    umount_peer "$mnt"
    rm -rf "$cache"
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin
    fio --name=rand --filename="$mnt/data/obj1" --readonly --rw=randread --bs=4k \
        --number_ios="$rand_ios" --size="$size" --ioengine=psync --randrepeat=1 \
        --output-format=json >"$out/fio.$p.json"
    end rand4k "$p" $((rand_ios * 4096)) "$rand_ios"
    umount_peer "$mnt"
    rm -rf "$cache"
}

ref_reads() {
    reference read1 "$size" 1 "(raw SDK, 16 × 8 MiB GETs)" raw get data/obj0
    reference read4 $((4 * size)) 4 "(raw SDK)" raw get data/obj0 data/obj1 data/obj2 data/obj3
    cp "$work/source.bin" "$work/local.bin"
    drop_caches
    PEER_PID=; begin; read_files "$work/local.bin"; end reread reference "$size" 1 "" "(local disk, cold)"
    rm -f "$work/local.bin"
    reference rand4k $((rand_ios * 4096)) "$rand_ios" "(raw SDK ranged GETs)" raw randget data/obj1 "$rand_ios" 4096
}

# write_until_s3 WL_CLOSE WL_S3 PEER PREFIX BYTES OBJECTS COMMAND...: times COMMAND (until the
# last close), then until S3 lists everything it wrote. The second row counts the requests of
# both phases, less the waiter's own listings.
write_until_s3() {
    local wl_close=$1 wl_s3=$2 p=$3 prefix=$4 bytes=$5 objects=$6
    shift 6
    begin
    local start=$t0
    "$@"
    end "$wl_close" "$p" "$bytes" "$objects"
    local lists
    lists=$("$s3raw" wait "$prefix" "$objects" "$bytes" | sed -n 's/.*lists=//p')
    t0=$start
    waiter_lists=$lists end "$wl_s3" "$p" "$bytes" "$objects"
}

small_files() { # DIR COUNT: COUNT files of 4 KiB, each written and closed
    python3 - "$1" "$2" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
block = os.urandom(4096)
for i in range(n):
    with open(f"{d}/f{i:05}", "wb") as f:
        f.write(block)
PY
}

# Every run writes under keys of its own: a server may keep deleted keys as tombstones that
# its listings of the same prefix then step over (Garage does), which would slow the peers
# that list per file a little more each run.
wl_writes() {
    local p=$1 mnt=$work/$1 cache=$work/$1.cache
    rm -rf "$cache"
    mount_peer "$p" "$mnt" "$cache"
    mkdir -p "$mnt/w/$run/$p"
    write_until_s3 write_close write_s3 "$p" "w/$run/$p/big" "$size" 1 \
        dd if="$work/source.bin" of="$mnt/w/$run/$p/big" bs=1M status=none
    write_until_s3 small_close small_s3 "$p" "w/$run/$p/small/" $((small_files * 4096)) "$small_files" \
        small_files "$mnt/w/$run/$p/small" "$small_files"
    write_until_s3 untar_close untar_s3 "$p" "w/$run/$p/untar/" "$tar_bytes" "$tar_files" \
        tar xf "$work/tree.tar" -C "$mnt/w/$run/$p" --transform "s,^src,untar,"
    umount_peer "$mnt"
    rm -rf "$cache"
    "$s3raw" delete "w/$run/$p/" >/dev/null
}

ref_writes() {
    local ref_local=$work/local-write.bin
    PEER_PID=; begin
    dd if="$work/source.bin" of="$ref_local" bs=1M conv=fsync status=none
    end write_close reference "$size" 1 "" "(local disk, dd conv=fsync)"
    rm -f "$ref_local"
    reference write_s3 "$size" 1 "(raw SDK multipart from memory)" raw put w/$run/ref/big "$size_mib"
    reference small_s3 $((small_files * 4096)) "$small_files" "(raw SDK, 16 PUTs in flight)" \
        raw put-many w/$run/ref/small/ "$small_files" 4096
    "$s3raw" delete w/$run/ref/ >/dev/null
}

wl_listing() {
    local p=$1 mnt=$work/$1 cache=$work/$1.cache
    rm -rf "$cache"
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin; ls -lR "$mnt/tree" >/dev/null; end ls_cold "$p" 0 "$list_entries"
    begin; ls -lR "$mnt/tree" >/dev/null; end ls_warm "$p" 0 "$list_entries"
    umount_peer "$mnt"
    # A restart on the same cache directory (a pod's): what each peer kept of the metadata.
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin; ls -lR "$mnt/tree" >/dev/null; end ls_restart "$p" 0 "$list_entries"
    umount_peer "$mnt"
    rm -rf "$cache"
    # Rename: a directory of clean objects, there before the mount (rclone caches listings).
    "$s3raw" put-many "ren/$run/$p/a/" "$rename_files" 4096 >/dev/null
    mount_peer "$p" "$mnt" "$cache"
    drop_caches; begin; find "$mnt/tree" >/dev/null; end find_cold "$p" 0 "$list_entries"
    begin; find "$mnt/tree" >/dev/null; end find_warm "$p" 0 "$list_entries"
    ls "$mnt/ren/$run/$p/a" >/dev/null
    begin; mv "$mnt/ren/$run/$p/a" "$mnt/ren/$run/$p/b"; end rename_dir "$p" 0 "$rename_files"
    umount_peer "$mnt"
    rm -rf "$cache"
    local moved
    moved=$("$s3raw" list "ren/$run/$p/b/" | sed 's/.*objects=//')
    [ "$moved" = "$rename_files" ] || echo "WARNING: $p: S3 holds $moved of $rename_files renamed files" >&2
    "$s3raw" delete "ren/$run/$p/" >/dev/null
}

ref_listing() {
    reference ls_cold 0 "$list_entries" "(raw paginated ListObjectsV2)" raw list tree/
    reference find_cold 0 "$list_entries" "(raw paginated ListObjectsV2)" raw list tree/
    "$s3raw" put-many ren/$run/ref/a/ "$rename_files" 4096 >/dev/null
    reference rename_dir 0 "$rename_files" "(raw SDK CopyObject+DeleteObject, 16 in flight)" raw rename ren/$run/ref/a/ ren/$run/ref/b/
    "$s3raw" delete ren/$run/ref/ >/dev/null
}

# One directory of $scale_files entries listed without stat (`ls -f`: readdir only), cold; then
# the kernel is made to forget every inode (drop_caches 2: FUSE FORGET for each) and the
# directory is listed again. Peak RSS shows what the entries cost; the log line below shows
# whether the memory held for them came back.
rss_now() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$PEER_PID/status"; }
wl_scale() {
    local p=$1 mnt=$work/$1 cache=$work/$1.cache n
    rm -rf "$cache"
    mount_peer "$p" "$mnt" "$cache"
    local idle
    idle=$(rss_now)
    drop_caches; begin; n=$(ls -f "$mnt/big" | wc -l); end scale_list "$p" 0 "$scale_files"
    [ "$n" -ge "$scale_files" ] || echo "WARNING: $p listed $n of $scale_files entries" >&2
    local listed forgotten
    listed=$(rss_now)
    echo 2 >/proc/sys/vm/drop_caches
    sleep 2
    forgotten=$(rss_now)
    begin; ls -f "$mnt/big" >/dev/null; end scale_relist "$p" 0 "$scale_files"
    echo "  $p RSS: idle $idle MiB, after listing $listed MiB, after the kernel forgot $forgotten MiB, after listing again $(rss_now) MiB" | tee -a "$out/scale-rss.txt"
    umount_peer "$mnt"
    rm -rf "$cache"
}

ref_scale() {
    reference scale_list 0 "$scale_files" "(raw paginated ListObjectsV2, delimiter /)" raw list-dir big/
}

echo "peers: reference ${ran[*]}; $runs run(s); results in $out"
for run in $(seq 1 "$runs"); do
    # Rotate the order each run: no peer always goes first (or last) on a warming machine.
    order=("${ran[@]:$(((run - 1) % ${#ran[@]}))}" "${ran[@]:0:$(((run - 1) % ${#ran[@]}))}")
    echo "run $run: ${order[*]}"
    for wl in $workloads; do
        "ref_$wl"
        for p in "${order[@]}"; do "wl_$wl" "$p"; done
    done
done

{
    echo "# keepfs side by side ($(date -u +%Y-%m-%d), $runs run(s), medians)"
    echo
    echo "Garage 2.5.0 on loopback; $size_mib MiB objects; $small_files small files; untar of $tar_files files ($((tar_bytes >> 20)) MiB);"
    echo "$list_dirs × $list_files entries listed; $rename_files files renamed; $rand_ios random 4 KiB reads; $scale_files entries in one directory."
    echo "Cells: rate (median seconds, peak RSS of the mount process). Higher rate is better."
    echo
    py table "$results"
} | tee "$out/table.md"
echo "table: $out/table.md; every measurement: $results"
