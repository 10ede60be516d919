#!/usr/bin/env python3
"""Prints one row per k6 summary (`k6 run --summary-export DIR/k6-NAME.json`):
requests/s, p50 and p99 latency, and the ratio of requests/s to the first row.
Usage: k6_table.py DIR NAME... (names in row order)."""
import json
import sys

out, names = sys.argv[1], sys.argv[2:]
rows = []
for name in names:
    m = json.load(open(f"{out}/k6-{name}.json"))["metrics"]
    rows.append((name, m["iterations"]["rate"], m["http_req_duration"]["med"], m["http_req_duration"]["p(99)"]))
print(f"{'run':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs ' + rows[0][0]:>14}")
for name, rate, p50, p99 in rows:
    print(f"{name:<24} {rate:>8.1f} {p50:>8.1f} {p99:>8.1f} {rate / rows[0][1]:>14.2f}")
