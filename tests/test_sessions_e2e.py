"""`--ext-session-keep` e2e: a client-side tool round trip keeps its KV across the gap.

One server, a KV cache of 20 blocks of 32 tokens. A turn with a ``session_id`` finishes, then
four other requests need more blocks than exist (so vLLM's prefix cache loses the turn's
blocks), then the session's next turn arrives (the previous prompt + output + a tool result).
Switched live: under ``off`` (vLLM's way) the next turn's prefix cache hits are lost; under
``preserve`` the turn's full blocks are pinned, and the next turn finds them. Afterwards no
pin, request or per-request entry is left and every block is free again.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import admin_state, set_live, wait_drained

from vllm_ext.testbed.tasks import generate_tasks, prompt_text

pytestmark = [pytest.mark.e2e]
TOKEN = "sessions-token"
TURN, *FLOOD = [prompt_text(t) for t in generate_tasks(5, seed=12)]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    flags = ("--enforce-eager --max-model-len 512 --max-num-seqs 4 --block-size 32 "
             f"--kv-cache-memory-bytes 655360 --ext-admin-token {TOKEN}")
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server("ext", model_path, flags, log, timeout_s=600,
                        env={"VLLM_SERVER_DEV_MODE": "1"}) as running:
        yield running.url


def complete(server, prompt, max_tokens, **extra):
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    resp = httpx.post(server + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def counter(server, name) -> float:
    text = httpx.get(server + "/metrics").text
    return sum(float(v) for v in re.findall(re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+-]+)",
                                            text))


def round_trip(server, mode):
    set_live(server, TOKEN, session_keep=mode)
    httpx.post(server + "/reset_prefix_cache", timeout=30).raise_for_status()
    session = {"session_id": f"s-{mode}", "vllm_xargs": {"ext_followup_s": 60}}
    first = complete(server, TURN, 64, **session)
    with ThreadPoolExecutor(len(FLOOD)) as pool:  # more blocks than the cache holds
        list(pool.map(lambda p: complete(server, p, 200), FLOOD))
    hits = counter(server, "vllm:prefix_cache_hits_total")
    pinned = admin_state(server, TOKEN)["session_pinned_blocks"]
    complete(server, TURN + first + "<result>42</result>", 16, **session)
    return counter(server, "vllm:prefix_cache_hits_total") - hits, pinned


def test_a_pinned_turn_is_found_by_its_next_turn_after_kv_pressure(server):
    baseline = admin_state(server, TOKEN)["free_blocks"]
    kept_before = counter(server, "vllm_ext_session_turns_total")
    off_hits, off_pinned = round_trip(server, "off")
    kept_hits, kept_pinned = round_trip(server, "preserve")
    print({"off": off_hits, "preserve": kept_hits, "pinned": kept_pinned})  # shown with -s
    full_blocks = (len(TURN) + 64) // 32 - 1       # at least this many (char-level tokens)
    assert off_pinned == 0 and kept_pinned >= full_blocks > 0
    assert kept_hits >= 32 * kept_pinned > off_hits
    assert counter(server, "vllm_ext_session_reused_tokens_total") >= 32 * kept_pinned
    # preserve: the first turn pinned, the second (no follow-up yet) pinned too
    assert counter(server, "vllm_ext_session_turns_total") - kept_before == 2
    set_live(server, TOKEN, session_keep="off")    # releases the last turn's pin
    now = wait_drained(lambda: admin_state(server, TOKEN), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
    assert now["session_pinned_blocks"] == 0
    assert all(v == 0 for v in now["per_request"].values()), now["per_request"]
