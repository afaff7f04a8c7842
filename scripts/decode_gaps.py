"""Decode step cost and preemption stalls of benchmark runs, from their per-request JSONL.

A gap between two streamed tokens of a request is a decode step when it is at most
`STALL_FACTOR` (10) x the run's median gap, the simulator's calibration rule; a longer one is a stall (the request was preempted and recomputed, or waited
behind a long prefill). Per run: median gap, mean of the decode gaps, number of stalls:

    .venv/bin/python scripts/decode_gaps.py results/trail12/*@2.5.r*.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from vllm_ext.sim.profile import STALL_FACTOR  # the simulator's calibration uses the same rule


def gaps_of(path: Path) -> dict:
    gaps = [g for line in path.read_text().splitlines() if line.strip()
            for g in json.loads(line).get("itl_s") or []]
    if not gaps:
        return {"median_ms": float("nan"), "decode_ms": float("nan"), "stalls": 0}
    median = statistics.median(gaps)
    decode = [g for g in gaps if g <= STALL_FACTOR * median]
    return {"median_ms": 1000 * median, "decode_ms": 1000 * statistics.fmean(decode),
            "stalls": len(gaps) - len(decode)}


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    print(f"{'run':<28}{'median gap ms':>14}{'decode gap ms':>14}{'stalls':>8}")
    for path in paths:
        g = gaps_of(Path(path))
        print(f"{Path(path).stem:<28}{g['median_ms']:>14.3f}{g['decode_ms']:>14.3f}"
              f"{g['stalls']:>8}")


if __name__ == "__main__":
    main(sys.argv[1:])
