#!/usr/bin/env python3
"""Bookkeeping for benches/compare.sh: request counters and the side-by-side table.

    compare.py scrape URL [TOKEN]      requests by S3 API call from a Prometheus endpoint, as JSON
    compare.py record FILE k=v ...     appends one measurement (a JSON line) to FILE
    compare.py table FILE [RUNS]       prints the markdown table of FILE's measurements

`scrape` reads Garage's `api_s3_request_counter{api_endpoint=...}` (the server's count) and
keepfs's `keepfs_s3_requests_total{operation=...}` (its own), summed over the other labels.
"""

import json
import os
import re
import statistics
import sys
import urllib.request

SERIES = re.compile(
    r'^(api_s3_request_counter|keepfs_s3_requests_total)\{([^}]*)\}\s+([0-9.e+]+)', re.M)
LABEL = re.compile(r'(api_endpoint|operation)="([^"]*)"')


def scrape(url, token=None):
    """{operation: requests} from the Prometheus text at `url` ({} if it can't be read)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        text = urllib.request.urlopen(req, timeout=5).read().decode()
    except OSError:
        return {}
    counts = {}
    for _, labels, value in SERIES.findall(text):
        op = LABEL.search(labels)
        if op:
            counts[op.group(2)] = counts.get(op.group(2), 0) + int(float(value))
    return counts


def diff(before, after):
    """Requests made between two scrapes, by operation (zeros left out)."""
    out = {op: after.get(op, 0) - before.get(op, 0) for op in after}
    return {op: n for op, n in sorted(out.items()) if n > 0}


def record(path, pairs):
    row = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        if k.endswith("_json"):
            row[k[:-5]] = json.loads(v) if v else {}
        else:
            try:
                row[k] = float(v) if "." in v else int(v)
            except ValueError:
                row[k] = v
    for side in ("server", "client"):
        b, a = row.pop(f"{side}_before", None), row.pop(f"{side}_after", None)
        if b is not None and a is not None:
            row[f"{side}_requests"] = diff(b, a)
    # The benchmark's own polling for "until in S3" is not the peer's.
    lists = row.pop("waiter_lists", 0)
    server = row.get("server_requests", {})
    if lists and "ListObjectsV2" in server:
        server["ListObjectsV2"] = max(0, server["ListObjectsV2"] - lists)
        if not server["ListObjectsV2"]:
            del server["ListObjectsV2"]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# Workloads in table order: (id, title, what MB/s or rate counts).
WORKLOADS = [
    ("read1", "cold sequential read, 1 reader", "MB/s"),
    ("read4", "cold sequential read, 4 readers × 1 object", "MB/s"),
    ("reread", "warm re-read after remount", "MB/s"),
    ("rand4k", "4 KiB random reads", "IOPS"),
    ("write_close", "sequential write until close", "MB/s"),
    ("write_s3", "sequential write until in S3", "MB/s"),
    ("small_close", "4 KiB files create+close", "files/s"),
    ("small_s3", "4 KiB files until in S3", "files/s"),
    ("untar_s3", "untar until in S3", "files/s"),
    ("ls_cold", "`ls -lR` cold", "entries/s"),
    ("ls_warm", "`ls -lR` warm", "entries/s"),
    ("ls_restart", "`ls -lR` after a restart on the same cache directory", "entries/s"),
    ("find_cold", "`find` cold", "entries/s"),
    ("find_warm", "`find` warm", "entries/s"),
    ("rename_dir", "rename a directory of files", "files/s"),
    ("scale_list", "`ls -f` of one large directory, cold", "entries/s"),
    ("scale_relist", "the same after the kernel forgot its inodes", "entries/s"),
]
PEERS = ["reference", "keepfs", "keepfs-nodisk", "rclone", "s3fs"]
PEER_TITLES = {
    "reference": "reference",
    "keepfs": "keepfs",
    "keepfs-nodisk": "keepfs `--no-disk-cache`",
    "rclone": "rclone mount (full cache)",
    "s3fs": "s3fs (use_cache)",
}


def median(xs):
    return statistics.median(xs) if xs else None


def rate(row, unit):
    units = row["bytes"] / 1e6 if unit == "MB/s" else row["objects"]
    return units / row["seconds"] if row["seconds"] > 0 else float("inf")


def table(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["peer"]), []).append(r)
    peers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
    lines = [
        "| workload | unit | " + " | ".join(PEER_TITLES[p] for p in peers) + " | keepfs ÷ ref | keepfs ÷ best peer |",
        "|---" * (len(peers) + 4) + "|",
    ]
    requests = []
    for wl, title, unit in WORKLOADS:
        cells, rates = [], {}
        for p in peers:
            runs = by.get((wl, p), [])
            if not runs:
                cells.append("–")
                continue
            r = median([rate(x, unit) for x in runs])
            s = median([x["seconds"] for x in runs])
            rates[p] = r
            note = runs[0].get("what", "")
            rss = max((x.get("rss_kib", 0) for x in runs), default=0)
            cell = f"**{r:,.0f}** ({s:.2f} s"
            if rss:
                cell += f", {rss / 1024:,.0f} MiB"
            cell += ")"
            if note:
                cell += f" {note}"
            cells.append(cell)
            reqs = runs[-1].get("server_requests") or {}
            own = runs[-1].get("client_requests")
            if p != "reference" or reqs:
                requests.append((title, p, reqs, own))
        k = rates.get("keepfs")
        ref = rates.get("reference")
        best = max((v for q, v in rates.items() if q not in ("reference", "keepfs", "keepfs-nodisk")), default=None)
        lines.append(
            f"| {title} | {unit} | " + " | ".join(cells)
            + f" | {k / ref:.2f}× |" if k and ref else f"| {title} | {unit} | " + " | ".join(cells) + " | – |"
        )
        lines[-1] += f" {k / best:.2f}× |" if k and best else " – |"
    print("\n".join(lines))
    print()
    print("S3 requests per run (the server's count; keepfs's own count where it differs):")
    print()
    print("| workload | peer | requests |")
    print("|---|---|---|")
    for title, p, reqs, own in requests:
        text = ", ".join(f"{op} {n}" for op, n in reqs.items()) or "none"
        total = sum(reqs.values())
        if own is not None and own != reqs:
            text += f" (keepfs counted: {', '.join(f'{op} {n}' for op, n in own.items()) or 'none'})"
        lines_ = f"| {title} | {PEER_TITLES[p]} | {total}: {text} |"
        print(lines_)
    cpu_table(by, peers)


def cpu_table(by, peers):
    """CPU seconds of the mount process and of the server per workload (medians), and how busy
    the machine's cores were: (mount + server) ÷ (wall time × cores). Near 100 % the workload is
    bound by CPU on this machine, not by keepfs waiting."""
    cores = os.cpu_count() or 1
    print()
    print(f"CPU seconds per run, mount process + server (median), and the share of the {cores} cores they kept busy:")
    print()
    print("| workload | " + " | ".join(PEER_TITLES[p] for p in peers) + " |")
    print("|---" * (len(peers) + 1) + "|")
    for wl, title, _ in WORKLOADS:
        cells = []
        for p in peers:
            runs = [x for x in by.get((wl, p), []) if "server_cpu_s" in x]
            if not runs:
                cells.append("–")
                continue
            mount = median([x.get("mount_cpu_s", 0) for x in runs])
            server = median([x["server_cpu_s"] for x in runs])
            secs = median([x["seconds"] for x in runs])
            busy = (mount + server) / (secs * cores) if secs > 0 else 0
            if p == "reference":  # the raw client's own CPU is not measured
                cells.append(f"server {server:.1f} s")
            else:
                cells.append(f"{mount:.1f} + {server:.1f} s ({busy:.0%})")
        if any(c != "–" for c in cells):
            print(f"| {title} | " + " | ".join(cells) + " |")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "scrape":
        print(json.dumps(scrape(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
    elif cmd == "record":
        record(sys.argv[2], sys.argv[3:])
    elif cmd == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
