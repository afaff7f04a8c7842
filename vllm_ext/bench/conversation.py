"""Client-side tool round trips for `bench`: one testbed tool task as a multi-turn session.

LAMPS (arXiv 2410.18248) applied to clients that run their own tools (`--ext-session-keep`,
`vllm_ext.sched.sessions`): each turn is its own request with the session's ``session_id``
(vLLM's OpenAI field), stopping at the testbed's ``</call>``; the client runs the tool
(`testbed.tasks.run_tool`), sleeps its latency, appends ``<result>..</result>`` and sends the
next turn, whose prompt starts with this turn's prompt and output, so the server's prefix
cache (or a kept turn) can skip recomputing it. The latency per call is drawn from the
request's own seeded `Registry` (`--client-tool-latency`, the `--ext-tool-latency` syntax), so
every config of a paired run sees the same tool times. One `RequestRecord` per conversation:
send to last token (tool time included, like a server-side pause), TTFT of the first turn,
inter-token gaps within turns, tokens of all turns.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from vllm_ext.bench.metrics import RequestRecord

MAX_CALLS = 4   # as the testbed harness


def client_tools_meta(spec: str, seed: int) -> dict:
    return {"latency": spec, "seed": int(seed)}


async def converse(send, body: dict, rec: RequestRecord, tools: dict) -> None:
    """Run the conversation of `body` (a completion request) into `rec`; `send(body, record)`
    sends one turn (the load generator's streaming request)."""
    from vllm_ext.testbed.tasks import RESULT_CLOSE, RESULT_OPEN, parse_call, pending_call, \
        run_tool
    from vllm_ext.tools.registry import Registry

    registry = Registry.build(latency=tools.get("latency", ""), seed=tools.get("seed", 0))
    session = f"bench-{uuid.uuid4().hex[:12]}"
    start = time.perf_counter()
    rec.send_s = start
    completion, tokens, calls, tool_s = "", 0, 0, 0.0
    while True:
        turn = RequestRecord(index=rec.index, arrival_s=rec.arrival_s)
        await send({**body, "prompt": body["prompt"] + completion, "session_id": session,
                    "max_tokens": max(1, body["max_tokens"] - tokens), "stop": ["</call>"],
                    "include_stop_str_in_output": True}, turn)
        if turn.error is not None:
            rec.error = f"turn {calls}: {turn.error}"
            return
        if rec.ttft_s is None:
            rec.ttft_s = turn.send_s + turn.ttft_s - start
            rec.prompt_tokens = turn.prompt_tokens
        rec.itl_s += turn.itl_s
        completion += turn.text
        tokens += turn.output_tokens
        call = pending_call(completion)
        if call is None or calls >= MAX_CALLS or tokens >= body["max_tokens"]:
            break
        calls += 1
        seconds = registry.latency(parse_call(call)[0])
        await asyncio.sleep(seconds)
        tool_s += seconds
        completion += f"{RESULT_OPEN}{run_tool(call)}{RESULT_CLOSE}"
    rec.text, rec.output_tokens = completion, tokens
    rec.e2el_s = time.perf_counter() - start
    rec.meta.update({"tool_calls": calls, "tool_s": tool_s, "turns": calls + 1})
