"""LAMPS swap e2e: `vllm-ext serve --ext-swap-dir` on the embedded model (one server).

Each tool call first drops the engine's local prefix cache (tests/swap_tools.py), so a paused
request resumes with nothing cached: under discard it recomputes its context, under swap the
tier loads its full blocks back. Checked, handling switched live on one server: the greedy text
is the same under preserve, discard and swap; swap loaded tokens from the tier and recomputed
fewer context tokens than discard; afterwards no request, paused session or KV block is left.
Then: records carrying another store's nonce (what a file left by an earlier store instance
holds) are refused at load, the blocks are recomputed and the text is still the same.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from conftest import admin_state, set_tool_handling, wait_drained

from vllm_ext.testbed.tasks import generate_tasks, prompt_text

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "swap-admin-token"
TASKS = [t for t in generate_tasks(12, seed=3, kinds=["calc", "lookup"])
         if len(t.tool_calls) >= 2][:3]


@pytest.fixture(scope="module")
def swap_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("swap")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory, swap_dir):
    from vllm_ext.bench.servers import running_server

    tests = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
           "VLLM_SERVER_DEV_MODE": "1"}
    flags = ("--enforce-eager --max-model-len 512 --max-num-seqs 4 --block-size 32 "
             f"--ext-swap-dir {swap_dir} --ext-swap-gib 0.01 --ext-swap-depth 4 "
             "--ext-tools swap_tools:TOOLS --ext-tool-latency calc=0.05,lookup=0.2 "
             f"--ext-tool-timeout 30 --ext-admin-token {TOKEN}")
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server("ext", model_path, flags, log, timeout_s=600, env=env) as running:
        yield running.url


def complete(server, prompt):
    body = {"model": "bench", "prompt": prompt, "max_tokens": 160, "temperature": 0,
            "vllm_xargs": {"ext_tools": True}}
    resp = httpx.post(server + "/v1/completions", json=body, timeout=180)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def state(server):
    return admin_state(server, TOKEN)


def set_handling(server, handling):
    set_tool_handling(server, TOKEN, handling)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server + "/metrics").text
    out = {}
    for name in ("vllm_ext_swap_tokens_loaded_total", "vllm_ext_swap_blocks_saved_total",
                 "vllm_ext_swap_load_failures_total", "vllm_ext_swap_fallbacks_total",
                 "vllm_ext_tool_recompute_tokens_total", "vllm_ext_tool_reused_tokens_total",
                 'vllm_ext_tool_pauses_total{handling="swap"}'):
        m = re.search(re.escape(name) + r" ([0-9.e+-]+)", text)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def run_block(server, handling):
    set_handling(server, handling)
    before = metrics(server)
    texts = [complete(server, prompt_text(t)) for t in TASKS]
    after = metrics(server)
    return texts, {k: after[k] - before[k] for k in after}


def test_swap_same_text_loads_from_the_tier_and_recomputes_less(server):
    baseline = state(server)["free_blocks"]
    runs = {h: run_block(server, h) for h in ("preserve", "discard", "swap")}
    assert runs["swap"][0] == runs["preserve"][0]
    assert runs["discard"][0] == runs["preserve"][0]
    swap, discard = runs["swap"][1], runs["discard"][1]
    print({h: r[1] for h, r in runs.items()})  # shown with -s
    assert swap['vllm_ext_tool_pauses_total{handling="swap"}'] >= len(TASKS)
    assert swap["vllm_ext_swap_blocks_saved_total"] > 0
    assert swap["vllm_ext_swap_tokens_loaded_total"] > 0
    assert swap["vllm_ext_swap_load_failures_total"] == 0
    assert discard["vllm_ext_tool_recompute_tokens_total"] > 0
    assert (swap["vllm_ext_tool_recompute_tokens_total"]
            < discard["vllm_ext_tool_recompute_tokens_total"])
    assert swap["vllm_ext_tool_reused_tokens_total"] >= swap["vllm_ext_swap_tokens_loaded_total"]
    set_handling(server, "preserve")
    now = wait_drained(lambda: state(server), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
    assert now["paused_sessions"] == 0 and not now["swap_pending"]
    assert all(v == 0 for k, v in now["per_request"].items()), now["per_request"]


def test_records_of_another_store_are_refused_and_recomputed(server, swap_dir):
    baseline = state(server)["free_blocks"]
    reference, _ = run_block(server, "preserve")
    (swap_dir / "STALE").touch()
    try:
        texts, delta = run_block(server, "swap")
    finally:
        (swap_dir / "STALE").unlink()
        set_handling(server, "preserve")
    print(delta)  # shown with -s
    assert delta["vllm_ext_swap_load_failures_total"] > 0
    # what failed to load was recomputed, and is counted so
    assert delta["vllm_ext_tool_recompute_tokens_total"] >= \
        32 * delta["vllm_ext_swap_load_failures_total"]
    assert texts == reference
    now = wait_drained(lambda: state(server), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
