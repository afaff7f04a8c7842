"""Open-loop async load generator against any OpenAI-compatible `/v1/completions` endpoint.

Every request is sent at its arrival offset whether or not earlier ones finished (open loop,
so a slow server builds a queue, as in production), streamed, and timed per chunk. Works
against our server, stock vLLM or any other server that streams completions. Requests that
fail or time out are recorded with their error, never dropped.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
from tqdm import tqdm

from vllm_ext.bench.conversation import converse
from vllm_ext.bench.metrics import RequestRecord
from vllm_ext.bench.workload import BenchRequest


def request_body(model: str, req: BenchRequest, send_true_len: bool, ignore_eos: bool) -> dict:
    sampling = req.meta.get("sampling") or {}  # e.g. n, temperature, seed (multi-branch runs)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            **sampling}
    if ignore_eos:
        body["ignore_eos"] = True
    xargs = dict(req.meta.get("xargs") or {})
    if send_true_len and req.true_output_len is not None:
        xargs["ext_true_output_len"] = req.true_output_len
    if req.meta.get("tools"):
        xargs["ext_tools"] = True  # tool calls run in the server (vllm_ext.tools.loop)
    if xargs:
        body["vllm_xargs"] = xargs
    return body


async def _one(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord,
               timeout_s: float) -> None:
    start = time.perf_counter()
    rec.send_s = start
    last = start
    try:
        async with client.stream("POST", url, json=body, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    rec.text += chunk["choices"][0]["text"]
                calls = (chunk.get("vllm_ext") or {}).get("tool_calls")
                if calls is not None:  # server-side tool calls (LAMPS): their time
                    rec.meta["tool_calls"] = len(calls)
                    rec.meta["tool_s"] = sum(c["seconds"] for c in calls)
                branches = (chunk.get("vllm_ext") or {}).get("branches")
                if branches:  # a multi-branch request (DUCHESS): its branch counts
                    rec.meta["branches_run"] = branches["branches_run"]
                    rec.meta["branches_terminated"] = branches["terminated"]
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
        rec.e2el_s = time.perf_counter() - start
        if rec.ttft_s is None:
            rec.ttft_s = rec.e2el_s
    except (httpx.HTTPError, json.JSONDecodeError, asyncio.TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"


async def run_load(base_url: str, model: str, requests: list[BenchRequest], *,
                   send_true_len: bool = True, ignore_eos: bool = False,
                   timeout_s: float = 600.0, duration_s: float | None = None,
                   progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Send `requests` at their arrival offsets; return records (in arrival order) and the
    wall time from the first send to the last completion."""
    url = base_url.rstrip("/") + "/v1/completions"
    records = [RequestRecord(index=i, arrival_s=r.arrival_s, meta=dict(r.meta))
               for i, r in enumerate(requests)]
    bar = tqdm(total=len(requests), desc="requests", disable=not progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        t0 = time.perf_counter()

        async def fire(req: BenchRequest, rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            body = request_body(model, req, send_true_len, ignore_eos)
            if req.meta.get("client_tools"):  # the client runs the tool calls, turn by turn
                await converse(lambda b, r: _one(client, url, b, r, timeout_s), body, rec,
                               req.meta["client_tools"])
            else:
                await _one(client, url, body, rec, timeout_s)
            bar.update(1)

        chosen = [(q, r) for q, r in zip(requests, records)
                  if duration_s is None or q.arrival_s <= duration_s]
        await asyncio.gather(*(fire(q, r) for q, r in chosen))
        wall = time.perf_counter() - t0
    bar.close()
    return [r for _, r in chosen], wall
