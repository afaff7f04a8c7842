"""Tools for tests/test_swap_e2e.py (``--ext-tools swap_tools:TOOLS``, tests/ on PYTHONPATH).

The testbed's ``calc`` and ``lookup`` with the same answers, but each call first drops the
engine's local prefix cache (vLLM's dev route ``POST /reset_prefix_cache``, which leaves a KV
connector's cache alone), so a paused request's blocks are gone from the prefix cache when it
resumes: under discard it recomputes them, under swap it loads them from the tier. With a file
``STALE`` in the swap directory a call also rewrites the nonce of every record in the swap
store's file in place (what a file left by an earlier store instance holds), after waiting for
the pause's saves to land, so the resume's loads are refused.
"""
from __future__ import annotations

import glob
import os
import sys
import time

import httpx

from vllm_ext.testbed import tasks

MAGIC = b"VXSWAP01"


def _arg(flag: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1]


def _flush() -> None:
    httpx.post(f"http://127.0.0.1:{_arg('--port')}/reset_prefix_cache", timeout=30)


def _stale_records(swap_dir: str, timeout_s: float = 10.0) -> int:
    """Overwrite the nonce of every record in the store file(s); returns how many."""
    deadline, done = time.time() + timeout_s, 0
    while time.time() < deadline and not done:
        time.sleep(0.2)
        for path in glob.glob(os.path.join(swap_dir, "*.slots")):
            with open(path, "r+b") as f:
                head = f.read(72)
                if head[:8] != MAGIC:
                    continue
                length = int.from_bytes(head[48:56], "little")
                stride = -(-(72 + length) // 4096) * 4096
                size = os.fstat(f.fileno()).st_size
                for offset in range(0, size, stride):
                    f.seek(offset)
                    if f.read(8) == MAGIC:
                        f.seek(offset + 8)
                        f.write(os.urandom(16))
                        done += 1
    return done


def _tool(name: str):
    def fn(arg: str) -> str:
        _flush()
        swap_dir = _arg("--ext-swap-dir") if "--ext-swap-dir" in sys.argv else ""
        if swap_dir and os.path.exists(os.path.join(swap_dir, "STALE")):
            _stale_records(swap_dir)
        return tasks.run_tool(f"{name} {arg}")
    return fn


TOOLS = {"calc": _tool("calc"), "lookup": _tool("lookup")}
