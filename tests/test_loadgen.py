"""`bench/loadgen.py` against a fake streaming completions server on loopback (aiohttp, no
vLLM): requests leave at their seeded arrival offsets whether or not earlier ones finished
(open loop), each record is parsed from the stream, and failures are recorded, never dropped."""
import asyncio
import json
import time

import numpy as np
import pytest
from aiohttp import web

from vllm_ext.bench.loadgen import run_load
from vllm_ext.bench import workload
from vllm_ext.bench.workload import BenchRequest

FIRST_S, GAP_S = 0.08, 0.04  # fake server: first text chunk after FIRST_S, then every GAP_S


class FakeServer:
    """``POST /v1/completions`` streaming like vLLM. The prompt picks the behaviour:
    ``ok <n>`` n text chunks then a usage chunk; ``http500``; ``badjson`` (a broken data
    line); ``hang`` (nothing for 5 s: the client's timeout fires); ``notext`` (usage only)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []
        self.in_flight = self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = time.perf_counter()
        body = await request.json()
        self.received.append((now, body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request, body):
        prompt = body["prompt"]
        if prompt == "http500":
            return web.Response(status=500, text="engine dead")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())
        if prompt == "hang":
            await asyncio.sleep(5)
        elif prompt == "badjson":
            await event('{"choices": [')
        else:
            n = int(prompt.split()[1]) if prompt.startswith("ok ") else 0
            for i in range(n):
                await asyncio.sleep(FIRST_S if i == 0 else GAP_S)
                await event({"choices": [{"index": 0, "text": f"t{i} "}]})
            await event({"choices": [], "usage": {"prompt_tokens": len(prompt),
                                                  "completion_tokens": n + 1}})
            await event("[DONE]")
        await resp.write_eof()
        return resp


async def _serve_and_load(server: FakeServer, requests, **kwargs):
    app = web.Application()
    app.router.add_post("/v1/completions", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await run_load(f"http://127.0.0.1:{port}/", "fake", requests,
                              progress=False, **kwargs)
    finally:
        await runner.cleanup()


def load(requests, **kwargs):
    server = FakeServer()
    records, wall = asyncio.run(_serve_and_load(server, requests, **kwargs))
    return server, records, wall


def test_seeded_schedule_is_reproducible_and_has_its_rate():
    a, b = (workload.testbed_requests(2000, rate=5.0, seed=s) for s in (3, 3))
    assert [(r.arrival_s, r.prompt) for r in a] == [(r.arrival_s, r.prompt) for r in b]
    other = workload.testbed_requests(2000, rate=5.0, seed=4)
    assert [r.arrival_s for r in other] != [r.arrival_s for r in a]
    gaps = np.diff([r.arrival_s for r in a])
    assert a[0].arrival_s == 0.0 and np.all(gaps >= 0)
    assert abs(1.0 / gaps.mean() - 5.0) < 5.0 * 0.05       # 1,999 gaps: sd of the mean ~2.2%
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08       # exponential gaps: cv 1


def test_open_loop_sends_each_request_at_its_offset():
    """60 requests at 40/s, each answered over ~0.5 s: a closed loop would take ~30 s and
    send one at a time; the open loop sends on the schedule and overlaps them."""
    schedule = workload.testbed_requests(60, rate=40.0, seed=1)
    requests = [BenchRequest(r.arrival_s, "ok 12", 16) for r in schedule]
    server, records, wall = load(requests, send_true_len=False)
    assert len(server.received) == 60 and all(r.ok for r in records)
    # send offsets (from the first send) against the schedule: never early, about on time
    # (loose: the suite may share 2 cores with an engine), never waiting for earlier answers
    # (a closed loop would lag by up to 60 x 0.5 s)
    want = np.array([r.arrival_s for r in requests])
    sent = np.array([r.send_s for r in records])
    lag = (sent - sent[0]) - want
    assert lag.min() > -0.005 and np.median(lag) < 0.1 and lag.max() < 1.0, lag
    got = np.array(sorted(t for t, _ in server.received))
    assert want[-1] - 0.05 < got[-1] - got[0] < want[-1] + 1.0
    assert server.max_in_flight >= 10               # overlapped, not one at a time
    assert wall < want[-1] + 3.0                    # ~1.5 s of arrivals + one ~0.5 s answer


def test_records_are_parsed_from_the_stream_and_bodies_built():
    requests = [BenchRequest(0.0, "ok 5", 32, true_output_len=5, meta={"kind": "add"}),
                BenchRequest(0.05, "ok 1", 8),
                BenchRequest(0.1, "notext", 4, true_output_len=3)]
    server, records, _ = load(requests, send_true_len=True, ignore_eos=True)
    five, one, notext = records
    assert [r.index for r in records] == [0, 1, 2] and five.meta == {"kind": "add"}
    assert five.ok and five.text == "t0 t1 t2 t3 t4 "
    assert (five.output_tokens, five.prompt_tokens) == (6, len("ok 5"))
    assert len(five.itl_s) == 4 and min(five.itl_s) >= GAP_S * 0.8
    assert sum(five.itl_s) <= five.e2el_s - five.ttft_s  # gaps between text chunks
    assert FIRST_S * 0.8 <= five.ttft_s < five.e2el_s
    assert five.tpot_s == pytest.approx((five.e2el_s - five.ttft_s) / 5)
    assert one.ok and one.itl_s == [] and one.text == "t0 "
    assert notext.ok and notext.ttft_s == notext.e2el_s and notext.text == ""
    bodies = {b["prompt"]: b for _, b in server.received}
    assert bodies["ok 5"] == {"model": "fake", "prompt": "ok 5", "max_tokens": 32,
                              "temperature": 0.0, "stream": True, "ignore_eos": True,
                              "stream_options": {"include_usage": True},
                              "vllm_xargs": {"ext_true_output_len": 5}}
    assert "vllm_xargs" not in bodies["ok 1"]  # no true length known
    again, _, _ = load(requests[:1], send_true_len=False)
    (_, body), = again.received
    assert "vllm_xargs" not in body and "ignore_eos" not in body


def test_failures_are_recorded_not_dropped_and_duration_cuts_arrivals():
    requests = [BenchRequest(0.0, "http500", 4), BenchRequest(0.01, "badjson", 4),
                BenchRequest(0.02, "hang", 4), BenchRequest(0.03, "ok 2", 4),
                BenchRequest(30.0, "ok 2", 4)]  # past duration_s: never sent
    server, records, wall = load(requests, timeout_s=0.6, duration_s=1.0)
    assert len(records) == 4 and len(server.received) == 4 and wall < 5
    err500, bad, hang, ok = records
    assert err500.error.startswith("HTTP 500") and "engine dead" in err500.error
    assert bad.error.startswith("JSONDecodeError")
    assert "Timeout" in hang.error and not hang.ok
    assert ok.ok and ok.error is None and ok.output_tokens == 3
