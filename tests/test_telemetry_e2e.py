"""Telemetry e2e: `vllm-ext serve --ext-telemetry` with the embedded model (one server, ~30 s
start on CPU): the scheduler feeds the prefix sketch from vLLM's own block hashes, the tenant
middleware sees the header and the `user` field, the worker's MoE counters feed the expert
load, and all of it comes back on GET /v1/ext/telemetry, /metrics and `telemetry merge`."""
import json
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.e2e
MODEL = "bench"  # served name set by running_server


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    flags = ("--enforce-eager --max-model-len 512 --ext-telemetry --ext-moe-track-load "
             "--ext-telemetry-window 64 --ext-telemetry-prefix-blocks 1")
    with running_server("ext", model_path, flags,
                        tmp_path_factory.mktemp("log") / "server.log", timeout_s=300) as running:
        yield running.url


def _chat(server, text, **extra):
    headers = extra.pop("headers", {})
    r = httpx.post(server + "/v1/chat/completions", timeout=120, headers=headers, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": text}],
        **extra})
    assert r.status_code == 200, r.text


def test_telemetry_route_metrics_and_merge(server):
    shared = "use calc: " + "(1+2)*3-4 " * 30  # > one KV block (CPU: 128 tokens), shared
    for i in range(6):
        _chat(server, shared + str(i), user="alice" if i % 2 else "bob")
    _chat(server, shared, headers={"x-tenant": "carol"})
    body = httpx.get(server + "/v1/ext/telemetry?top_k=3&range_s=600&windows=600",
                     timeout=60).json()
    prefixes = body["prefixes"]
    assert prefixes["requests"] >= 7 and prefixes["sketch"]["items"] > 0
    top = prefixes["top"][0]
    assert top["window_count"] >= 7 - 2  # LWCSS: at most two undercounts per window
    assert top["range_count"] >= 7       # Count-Min never undercounts
    tenants = {t["tenant"] for t in body["tenants"]["top"]}
    assert body["tenants"]["requests"] >= 7 and tenants & {"alice", "bob", "carol"}
    layers = body["experts"]["windows"]["600"]["layers"]
    assert layers and sum(sum(v) for v in layers.values()) > 0
    assert prefixes["engine_cost"]["calls"] >= 7 and prefixes["engine_cost"]["seconds"] > 0
    assert httpx.get(server + "/v1/ext/telemetry?top_k=0", timeout=30).status_code == 400
    metrics = httpx.get(server + "/metrics", timeout=60).text
    for name in ("vllm_ext_telemetry_memory_bytes", "vllm_ext_telemetry_items_total",
                 "vllm_ext_telemetry_top_prefix_requests", "vllm_ext_telemetry_expert_tokens",
                 "vllm_ext_telemetry_engine_seconds_total"):
        assert name in metrics, name
    merged = subprocess.run([sys.executable, "-m", "vllm_ext.cli", "telemetry", "merge",
                             server, server, "--range-s", "600"], capture_output=True,
                            text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    out = json.loads(merged.stdout)
    # the same server twice: fragments are deduplicated by (node, seq), rows are summed
    assert out["servers"] == 2
    assert out["prefixes"]["top"][0]["range_count"] == pytest.approx(top["range_count"], abs=1)
