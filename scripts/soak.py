"""Lifetime soak: many streaming requests, a fifth of the clients disconnecting mid-stream.

Starts `vllm-ext serve` (default `--ext-policy trail`, admin token for the state route), reads
the engine's per-request state (`GET /v1/ext/admin/state`: free KV blocks, the scheduler's and
the policy's per-request dicts, the workers' prediction entries and pending sets) and the server
processes' RSS, sends N streamed completions open-loop at --rate (each client with probability
--disconnect closes its stream after a few chunks), waits until the engine is idle, and reads
them again. Pass: no errors on completed clients, the free block count and every per-request
dict back to where they started. Writes a JSON report:
    .venv/bin/python scripts/soak.py --num-requests 1000 --rate 8 --out docs/reliability/soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import time
from pathlib import Path

import httpx
import psutil

from vllm_ext.bench.servers import running_server
from vllm_ext.testbed.model import default_model_path


def state(url: str, token: str) -> dict:
    resp = httpx.get(url + "/v1/ext/admin/state", timeout=60,
                     headers={"Authorization": f"Bearer {token}"})
    resp.raise_for_status()
    return resp.json()


def rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


async def one(client, url, prompt, disconnect_after: int | None) -> str:
    body = {"model": "bench", "prompt": prompt, "max_tokens": 96, "temperature": 0.0,
            "stream": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return f"HTTP {resp.status_code}"
            chunks = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        return "disconnected"  # leaving the block closes the connection
        return "ok"
    except httpx.HTTPError as exc:
        return f"error {type(exc).__name__}: {exc}"


async def load(url: str, n: int, rate: float, p_disconnect: float, seed: int) -> dict:
    from vllm_ext.testbed.tasks import generate_tasks, prompt_text

    rng = random.Random(seed)
    prompts = [prompt_text(t) for t in generate_tasks(n, seed)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        at, jobs = time.perf_counter(), []
        for prompt in prompts:  # Poisson arrivals
            at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            cut = rng.randint(1, 8) if rng.random() < p_disconnect else None
            jobs.append(asyncio.create_task(one(client, url, prompt, cut)))
        results = await asyncio.gather(*jobs)
    out: dict = {}
    for r in results:
        key = r if r in ("ok", "disconnected") else "errors"
        out[key] = out.get(key, 0) + 1
    out["error_samples"] = [r for r in results if r not in ("ok", "disconnected")][:5]
    return out


async def wait_idle(url: str, token: str, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while True:
        now = state(url, token)
        if now["scheduler"]["requests"] == 0 or time.time() > deadline:
            return now
        await asyncio.sleep(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--disconnect", type=float, default=0.2)
    p.add_argument("--server-args", default="--ext-policy trail --max-num-seqs 8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/soak.json")
    args = p.parse_args()
    token = secrets.token_hex(8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with running_server("ext", default_model_path(), f"{args.server_args} --ext-admin-token "
                        f"{token}", out.with_suffix(".server.log")) as server:
        warm = asyncio.run(load(server.url, 20, args.rate, 0.0, args.seed + 1))  # warm-up
        before, rss_before = asyncio.run(wait_idle(server.url, token)), rss_mb(server.pid)
        clients = asyncio.run(load(server.url, args.num_requests, args.rate, args.disconnect,
                                   args.seed))
        after, rss_after = asyncio.run(wait_idle(server.url, token)), rss_mb(server.pid)
    report = {"argv": sys.argv, "warmup": warm, "clients": clients, "state_before": before,
              "state_after": after, "rss_mb_before": rss_before, "rss_mb_after": rss_after,
              "rss_growth": rss_after / rss_before - 1}
    report["pass"] = (clients.get("errors", 0) == 0
                      and before["scheduler"] == after["scheduler"]
                      and all(not any(w["per_request"].values()) for w in after["workers"])
                      and all(w["prediction_entries"] <= w["prediction_capacity"]
                              for w in after["workers"]))
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("clients", "rss_growth", "pass")}, indent=2))
    print(f"state before: {before}\nstate after:  {after}\nwrote {out}")
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
