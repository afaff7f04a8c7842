"""Live config switch and /metrics on a real server (the `server` fixture of test_server_e2e):
the admin route refuses without its token and on bad values and then changes nothing; a switch
in the middle of a load loses no request and leaves greedy outputs unchanged; vllm-ext's
metrics are on vLLM's /metrics with the right types and move with the load."""
import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server_e2e import MODEL, TOKEN, server  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.e2e
ADMIN = "/v1/ext/admin/config"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [f"{a}+{b}=" for a, b in ((12, 34), (7, 8), (91, 9), (45, 55), (3, 61), (20, 22))]


def active(server):
    return httpx.get(server + "/v1/ext/config").json()


def test_admin_refuses_without_token_and_on_bad_values(server):
    before = active(server)["config"]
    assert httpx.post(server + ADMIN, json={"config": {"policy": "fcfs"}}).status_code == 401
    wrong = httpx.post(server + ADMIN, json={"config": {"policy": "fcfs"}},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    for body, needle in (({"config": {"policy": "srtf"}}, "--ext-policy"),
                         ({"config": {"kv_bits": 4}}, "cannot change on a live server"),
                         ({"config": {"probe_every": -1}}, "--ext-probe-every"),
                         ({"policy": "fcfs"}, "expected")):
        resp = httpx.post(server + ADMIN, json=body, headers=AUTH)
        assert resp.status_code == 400 and needle in resp.json()["error"]["message"]
    assert active(server)["config"] == before


async def _complete(client, server, prompt, max_tokens=24):
    resp = await client.post(server + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    resp.raise_for_status()
    return resp.json()["choices"][0]["text"]


async def _load_with_switches(server):
    async with httpx.AsyncClient() as client:
        reference = [await _complete(client, server, p) for p in PROMPTS]
        jobs = [asyncio.create_task(_complete(client, server, p)) for p in PROMPTS * 2]
        switches = []
        for config, drain in (({"policy": "fcfs"}, False), ({"policy": "oracle",
                              "preemption_margin": 5}, True), ({"policy": "fcfs"}, False)):
            await asyncio.sleep(0.2)
            resp = await client.post(server + ADMIN, headers=AUTH, timeout=120,
                                     json={"config": config, "drain": drain})
            switches.append(resp)
        outputs = await asyncio.gather(*jobs)
        restore = await client.post(server + ADMIN, headers=AUTH, timeout=120, json={
            "config": {"policy": "oracle", "preemption_margin": 0}, "drain": True})
    return reference, outputs, switches, restore


def test_switch_mid_load_loses_no_request_and_keeps_greedy_outputs(server):
    reference, outputs, switches, restore = asyncio.run(_load_with_switches(server))
    assert [r.status_code for r in switches] == [200, 200, 200]
    assert switches[1].json()["drained"] and switches[1].json()["config"]["preemption_margin"] == 5
    assert switches[2].json()["config"]["active_policy"] == "fcfs"
    assert outputs == reference * 2
    assert restore.status_code == 200 and active(server)["active_policy"] == "oracle"


def test_metrics_on_vllms_endpoint_with_types(server):
    httpx.post(server + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "5+5=", "max_tokens": 6,
        "vllm_xargs": {"ext_true_output_len": 6}})
    text = httpx.get(server + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = families["vllm_ext_policy_info"]  # an info metric is a gauge in the text format
    assert info.type == "gauge" and info.samples[0].labels == {"policy": "oracle"}
    assert families["vllm_ext_preemptions"].type == "counter"
    causes = {s.labels["cause"] for s in families["vllm_ext_preemptions"].samples
              if s.name.endswith("_total")}
    assert causes == {"policy", "kv_pressure"}
    hist = families["vllm_ext_prediction_abs_error_tokens"]
    assert hist.type == "histogram"
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count >= 1  # the oracle predicted the request's length and it finished
    runs = families["vllm_ext_probe_runs"]
    assert runs.type == "counter" and runs.samples[0].value > 0
    assert families["vllm_ext_kv_cache_bits"].samples[0].value == 16
    assert "vllm:num_preemptions" in families  # vLLM's own metrics still there


def test_state_route_reports_sizes_behind_the_token(server):
    assert httpx.get(server + "/v1/ext/admin/state").status_code == 401
    # one finished request of its own, so the test holds when run alone too
    done = httpx.post(server + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert done.status_code == 200
    state = httpx.get(server + "/v1/ext/admin/state", headers=AUTH, timeout=60).json()
    sched = state["scheduler"]
    assert sched["requests"] == 0 and sched["free_blocks"] > 0  # idle between tests
    assert not any(sched["per_request"].values()), sched
    (worker,) = state["workers"]
    assert not any(worker["per_request"].values())
    assert 0 < worker["prediction_entries"] <= worker["prediction_capacity"]
