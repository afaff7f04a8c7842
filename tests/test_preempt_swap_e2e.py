"""`--ext-preempt-mode swap` e2e: preempted requests' KV through the swap tier (one server).

A KV cache of 20 blocks of 32 tokens for 4 concurrent requests of ~100 prompt + 200 output
tokens: vLLM preempts under KV pressure, and the freed blocks are soon reused by the others,
so a victim's return finds little in the prefix cache. Switched live on one server: under
``recompute`` it re-prefills that context; under ``swap`` the tier loads its full blocks back,
so it re-prefills less; the greedy text is the same; afterwards no request or KV block is left.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import admin_state, set_live, wait_drained

from vllm_ext.testbed.tasks import generate_tasks, prompt_text

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "preempt-swap-token"
PROMPTS = [prompt_text(t) for t in generate_tasks(4, seed=11)]
NAMES = ("vllm_ext_preemptions_total", "vllm_ext_preempt_swapped_total",
         "vllm_ext_preempt_recompute_tokens_total", "vllm_ext_preempt_reused_tokens_total",
         "vllm_ext_swap_tokens_loaded_total", "vllm_ext_swap_load_failures_total")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    swap_dir = tmp_path_factory.mktemp("swap")
    # float32: a recompute re-prefills the victim's context in a batch of another shape, whose
    # bf16 K/V differ in the last bits from the decode-time ones the tier restores; on the
    # degenerate ignore_eos tails that flipped a greedy token now and then (CI, 1 run in ~4).
    # 1310720 bytes = the same 20 blocks of 32 tokens as 655360 in bf16.
    flags = ("--enforce-eager --max-model-len 512 --max-num-seqs 4 --block-size 32 "
             "--dtype float32 --kv-cache-memory-bytes 1310720 --max-num-batched-tokens 512 "
             f"--ext-swap-dir {swap_dir} --ext-swap-gib 0.01 --ext-swap-depth 4 "
             f"--ext-admin-token {TOKEN}")
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server("ext", model_path, flags, log, timeout_s=600,
                        env={"VLLM_SERVER_DEV_MODE": "1"}) as running:
        yield running.url


def complete(server, prompt):
    body = {"model": "bench", "prompt": prompt, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    resp = httpx.post(server + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def metrics(server) -> dict[str, float]:
    text = httpx.get(server + "/metrics").text
    out = {}
    for name in NAMES:  # summed over labels
        out[name] = sum(float(v) for v in re.findall(
            re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+-]+)", text))
    return out


def run_block(server, mode):
    set_live(server, TOKEN, preempt_mode=mode)
    httpx.post(server + "/reset_prefix_cache", timeout=30).raise_for_status()
    before = metrics(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(lambda p: complete(server, p), PROMPTS))
    after = metrics(server)
    return texts, {k: after[k] - before[k] for k in after}


def test_preempted_requests_reload_from_the_tier_with_the_same_text(server):
    baseline = admin_state(server, TOKEN)["free_blocks"]
    runs = {m: run_block(server, m) for m in ("recompute", "swap")}
    print({m: r[1] for m, r in runs.items()})  # shown with -s
    recompute, swap = runs["recompute"][1], runs["swap"][1]
    assert recompute["vllm_ext_preemptions_total"] > 0 and swap["vllm_ext_preemptions_total"] > 0
    assert recompute["vllm_ext_preempt_swapped_total"] == 0
    assert recompute["vllm_ext_preempt_recompute_tokens_total"] > 0
    assert swap["vllm_ext_preempt_swapped_total"] > 0
    assert swap["vllm_ext_swap_tokens_loaded_total"] > 0
    assert swap["vllm_ext_swap_load_failures_total"] == 0
    # per preemption, swap re-prefills less of the victim's context than recompute
    per = {m: r["vllm_ext_preempt_recompute_tokens_total"] / r["vllm_ext_preemptions_total"]
           for m, r in ((m, runs[m][1]) for m in runs)}
    assert per["swap"] < per["recompute"], per
    assert runs["swap"][0] == runs["recompute"][0]
    set_live(server, TOKEN, preempt_mode="recompute")
    now = wait_drained(lambda: admin_state(server, TOKEN), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline and not now["swap_pending"]
    assert all(v == 0 for v in now["per_request"].values()), now["per_request"]
