"""``vllm-ext telemetry merge URL|FILE [...]``: one view of several servers' telemetry.

Each argument is a server base URL (``http://host:8000``; ``/v1/ext/telemetry?fragments=1`` is
fetched, so the prefix counts are recomputed from the union of every server's fragments -
DiSketch's cross-replica merge, arXiv 2503.13515) or a saved JSON file. Prints the merged JSON
(`export.merge_payloads`), or with ``--top-k K`` its first K rows per table.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request

from vllm_ext.telemetry.export import merge_payloads


def load(source: str, range_s: float, timeout: float) -> dict:
    if source.startswith(("http://", "https://")):
        url = source.rstrip("/")
        if "/v1/ext/telemetry" not in url:
            url += f"/v1/ext/telemetry?fragments=1&top_k=100&range_s={range_s:g}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    with open(source) as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="vllm-ext telemetry")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge GET /v1/ext/telemetry of several servers")
    m.add_argument("sources", nargs="+", metavar="URL|FILE")
    m.add_argument("--range-s", type=float, default=60.0,
                   help="prefix counts over the last S seconds (URLs only)")
    m.add_argument("--top-k", type=int, default=0, help="print only the first K rows (0: all)")
    m.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    payloads = []
    for source in args.sources:
        try:
            payloads.append(load(source, args.range_s, args.timeout))
        except Exception as exc:
            p.error(f"{source}: {exc}")
    merged = merge_payloads(payloads)
    if args.top_k > 0:
        for table in ("prefixes", "tenants"):
            if merged.get(table):
                merged[table]["top"] = merged[table]["top"][:args.top_k]
                merged[table].pop("fragments", None)
    json.dump(merged, sys.stdout, indent=1)
    print()
