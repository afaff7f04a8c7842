"""Server e2e: `vllm-ext serve` on loopback with the embedded model, driven by the openai client.

One server for the module (startup ~30 s on CPU): oracle policy and a dummy probe loaded, so
`/v1/ext/config` and predictions in responses have something to show, and an admin token, so
the live config switch and `/metrics` are exercised on the same engine.
"""
import json

import httpx
import openai
import pytest

from conftest import make_linear_probe

pytestmark = pytest.mark.e2e
MODEL = "bench"  # served name set by running_server
TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    probe_path = tmp_path_factory.mktemp("probe") / "probe.pt"
    make_linear_probe(model_path, 1, probe_path)
    flags = (f"--enforce-eager --max-model-len 512 --ext-policy oracle "
             f"--ext-probe {probe_path} --ext-probe-every 2 --ext-admin-token {TOKEN}")
    with running_server("ext", model_path, flags,
                        tmp_path_factory.mktemp("log") / "server.log", timeout_s=300) as running:
        yield running.url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def test_ext_config_reports_policy(server):
    data = httpx.get(server + "/v1/ext/config").json()
    assert data["config"]["policy"] == "oracle"
    assert data["scheduler_cls"].endswith("PredictiveScheduler")
    assert data["worker_cls"].endswith("ProbeWorker")


def test_completion_chat_stream_and_n2(client):
    out = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "7*6?"}], max_tokens=8)
    assert chat.choices[0].message.role == "assistant"
    pieces = list(client.completions.create(model=MODEL, prompt="99-17=", max_tokens=8,
                                            stream=True, temperature=0))
    streamed = "".join(p.choices[0].text for p in pieces if p.choices)
    again = client.completions.create(model=MODEL, prompt="99-17=", max_tokens=8, temperature=0)
    assert streamed == again.choices[0].text
    chat_stream = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chat_stream)
    two = client.completions.create(model=MODEL, prompt="sort 3 1 2", max_tokens=6, n=2,
                                    temperature=1.0, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_predictions_in_responses(client):
    xargs = {"vllm_xargs": {"ext_return_predictions": True}}
    out = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=5, extra_body=xargs)
    preds = out.model_extra["vllm_ext"]["predictions"]
    (entry,) = preds.values()
    assert set(entry["values"]) == {"p0", "p1"} and entry["probe_runs"] >= 2
    two = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, n=2,
                                    extra_body=xargs)
    assert len(two.model_extra["vllm_ext"]["predictions"]) == 2
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, extra_body=xargs)
    assert chat.model_extra["vllm_ext"]["predictions"]
    chunks = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=5, stream=True,
                                            extra_body=xargs))
    tagged = [c for c in chunks if (c.model_extra or {}).get("vllm_ext")]
    assert len(tagged) == 1 and tagged[0] is chunks[-1]
    plain = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=3)
    assert "vllm_ext" not in (plain.model_extra or {})


@pytest.mark.parametrize("xargs, needle", [
    ("not-an-object", "vllm_xargs must be a JSON object"),
    ({"ext_true_output_len": -3}, "ext_true_output_len"),
    ({"ext_bogus": 1}, "ext_bogus"),
])
def test_malformed_xargs_is_400_and_server_keeps_serving(client, server, xargs, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="1+1=", max_tokens=3,
                                  extra_body={"vllm_xargs": xargs})
    assert needle in str(err.value)
    raw = httpx.post(server + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "a"}], "vllm_xargs": xargs})
    assert raw.status_code == 400 and needle in json.dumps(raw.json())
    ok = client.completions.create(model=MODEL, prompt="1+1=", max_tokens=3,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 3


def test_oracle_true_length_accepted(client):
    out = client.completions.create(model=MODEL, prompt="5+5=", max_tokens=4,
                                    extra_body={"vllm_xargs": {"ext_true_output_len": 4}})
    assert out.usage.completion_tokens >= 1


def test_openapi_lists_ext_routes_with_their_models(server):
    """The /v1/ext/* routes are in the server's schema (attached by ExtMiddleware here: no
    VLLM_PLUGINS), with the admin body's model, and the payloads fit their response models."""
    from vllm_ext.server.routes import AdminStateResponse, ExtConfigResponse

    spec = httpx.get(server + "/openapi.json", timeout=30).json()
    paths = spec["paths"]
    assert set(paths["/v1/ext/config"]) == {"get"}
    assert set(paths["/v1/ext/admin/config"]) == {"post"}
    assert set(paths["/v1/ext/admin/state"]) == {"get"}
    post = paths["/v1/ext/admin/config"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert post["requestBody"]["required"] and body["required"] == ["config"]
    assert set(body["properties"]) == {"config", "drain", "drain_timeout_s", "reset_prefix_cache"}
    assert body["properties"]["config"]["properties"]["policy"]["enum"][:2] == ["fcfs", "oracle"]
    assert {"200", "400", "401", "403"} <= set(post["responses"])
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.rsplit("/", 1)[1] in spec["components"]["schemas"]
    # the models describe what the routes answer (every listed field there, typed right)
    ExtConfigResponse.model_validate(httpx.get(server + "/v1/ext/config").json())
    state = httpx.get(server + "/v1/ext/admin/state", timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}).json()
    AdminStateResponse.model_validate(state)
