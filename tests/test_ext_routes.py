"""The /v1/ext/* routes on vLLM's own app (`build_app`), without an engine: vLLM's
endpoint-plugin hook attaches them only when VLLM_PLUGINS names ``vllm_ext``, ExtMiddleware
attaches them otherwise; either way they are in /openapi.json, and the middleware and the
routes give the same answers (the middleware calls the routes' endpoints)."""
import json
import sys
from types import SimpleNamespace

import pytest

from vllm_ext.config import ExtConfig

MIDDLEWARE = "vllm_ext.server.middleware.ExtMiddleware"
TOKEN = "routes-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXT_PATHS = {"/v1/ext/config": {"get"}, "/v1/ext/admin/config": {"post"},
             "/v1/ext/admin/state": {"get"}, "/v1/ext/telemetry": {"get"}}


class _EngineCore:
    def __init__(self) -> None:
        self.config = ExtConfig(policy="oracle")

    async def call_utility_async(self, _utility, method, args):
        if method == "ext_get_config":
            return {**self.config.to_dict(), "active_policy": self.config.policy,
                    "fallback": None}
        if method == "ext_apply_config":
            self.config = self.config.with_live_changes(args[0])
            return await self.call_utility_async(_utility, "ext_get_config", [])
        if method == "ext_get_state":
            return {"requests": 0, "free_blocks": 7, "per_request": {"predictions": 0}}
        raise AssertionError(method)


class _Engine:
    """What the routes use of vLLM's AsyncLLM."""

    def __init__(self) -> None:
        self.engine_core = _EngineCore()
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(model="tiny"),
            scheduler_config=SimpleNamespace(scheduler_cls="PredictiveScheduler"),
            parallel_config=SimpleNamespace(worker_cls="ProbeWorker"),
            additional_config={"vllm_ext": {"policy": "oracle"}})

    async def collective_rpc(self, method, args=()):
        if method == "ext_apply_config":
            return [{"probe_every": self.engine_core.config.probe_every, "probes_running": False}]
        if method == "ext_get_state":
            return [{"per_request": {"awaiting_first_probe": 0}, "prediction_entries": 0,
                     "prediction_capacity": 4096}]
        raise AssertionError(method)


def _build(monkeypatch, plugin: bool, middleware: bool, extra=()):
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if plugin:
        monkeypatch.setenv("VLLM_PLUGINS", "vllm_ext")
    else:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    argv = ["--model", "tiny", *(["--middleware", MIDDLEWARE] if middleware else []), *extra]
    app = build_app(make_arg_parser(FlexibleArgumentParser()).parse_args(argv),
                    supported_tasks=("generate",))
    app.state.log_stats = False  # what init_app_state would set; lifespan reads it
    app.state.engine_client = _Engine()
    return app


def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)  # used as a context manager: runs the lifespan, as uvicorn does


def test_endpoint_plugin_loads_only_when_vllm_plugins_names_it(monkeypatch):
    from vllm.plugins import load_endpoint_plugins

    from vllm_ext.server.routes import ExtEndpointPlugin

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert load_endpoint_plugins(("generate",)) == []
    monkeypatch.setenv("VLLM_PLUGINS", "vllm_ext")
    (plugin,) = load_endpoint_plugins(("generate",))
    assert isinstance(plugin, ExtEndpointPlugin)
    assert load_endpoint_plugins(("render",)) == []  # needs an engine


@pytest.mark.parametrize("plugin, middleware", [(True, True), (False, True), (True, False)])
def test_openapi_lists_the_routes_in_every_wiring(monkeypatch, plugin, middleware):
    app = _build(monkeypatch, plugin, middleware)
    with _client(app) as client:
        spec = client.get("/openapi.json").json()
    assert {p: set(ops) for p, ops in spec["paths"].items() if p.startswith("/v1/ext/")} \
        == EXT_PATHS
    schema = spec["paths"]["/v1/ext/admin/config"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert "$ref" not in json.dumps(schema)  # inlined: resolvable anywhere
    assert "ExtConfigResponse" in spec["components"]["schemas"]
    routes = [r for r in app.routes if getattr(r, "path", "") == "/v1/ext/config"]
    assert len(routes) == 1  # plugin and middleware together attach once


def test_without_plugin_or_middleware_there_are_no_routes(monkeypatch):
    with _client(_build(monkeypatch, False, False)) as client:
        assert not [p for p in client.get("/openapi.json").json()["paths"] if "/ext/" in p]
        assert client.get("/v1/ext/config").status_code == 404


def _exchange(client) -> list[tuple[int, bytes]]:
    admin, state = "/v1/ext/admin/config", "/v1/ext/admin/state"
    calls = [("GET", "/v1/ext/config", None, {}),
             ("POST", admin, {"config": {"policy": "fcfs"}}, {}),
             ("POST", admin, {"config": {"policy": "fcfs"}}, {"Authorization": "Bearer no"}),
             ("GET", state, None, {}),
             ("GET", admin, None, {}),
             ("POST", admin, {"policy": "fcfs"}, AUTH),
             ("POST", admin, {"config": {"kv_bits": 4}}, AUTH),
             ("POST", admin, {"config": {"policy": "srtf"}}, AUTH),
             ("POST", admin, {"config": {"policy": "fcfs"}, "drain": "yes"}, AUTH),
             ("GET", admin, None, AUTH),
             ("POST", state, None, AUTH),
             ("GET", state, None, AUTH),
             ("POST", admin, {"config": {"policy": "fcfs", "preemption_margin": 2}}, AUTH),
             ("GET", "/v1/ext/config", None, {})]
    out = []
    for method, path, body, headers in calls:
        resp = client.request(method, path, json=body, headers=headers)
        out.append((resp.status_code, resp.content))
    return out


def _run(monkeypatch, plugin, middleware, token):
    if token:
        monkeypatch.setenv("VLLM_EXT_ADMIN_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("VLLM_EXT_ADMIN_TOKEN", raising=False)
    with _client(_build(monkeypatch, plugin, middleware)) as client:
        return _exchange(client)


def test_middleware_and_routes_answer_alike_with_the_admin_codes(monkeypatch):
    from vllm_ext.server.routes import (AdminConfigResponse, AdminStateResponse,
                                        ErrorResponse, ExtConfigResponse)

    through_middleware = _run(monkeypatch, False, True, token=True)
    assert _run(monkeypatch, True, False, token=True) == through_middleware
    codes = [status for status, _ in through_middleware]
    assert codes == [200, 401, 401, 401, 401, 400, 400, 400, 400, 405, 405, 200, 200, 200]
    bodies = [json.loads(body) for _, body in through_middleware]
    for (status, _), body in zip(through_middleware, bodies):
        if status != 200:
            ErrorResponse.model_validate(body)
    assert "cannot change on a live server" in bodies[6]["error"]["message"]
    assert "--ext-policy" in bodies[7]["error"]["message"]
    ExtConfigResponse.model_validate(bodies[0])
    AdminStateResponse.model_validate(bodies[11])
    switched = AdminConfigResponse.model_validate(bodies[12])
    assert switched.config.policy == "fcfs" and switched.previous["policy"] == "oracle"
    assert bodies[13]["config"]["preemption_margin"] == 2 and bodies[13]["admin"] is True
    off = _run(monkeypatch, False, True, token=False)
    assert [s for s, _ in off][1:5] == [403, 403, 403, 403]
    assert _run(monkeypatch, True, False, token=False) == off


def test_middleware_answers_ahead_of_vllms_api_key(monkeypatch):
    """As before the routes existed: the admin token, not --api-key, guards the admin routes
    when the middleware is installed (both read the Authorization header)."""
    monkeypatch.setenv("VLLM_EXT_ADMIN_TOKEN", TOKEN)
    app = _build(monkeypatch, False, True, extra=["--api-key", "api-key"])
    with _client(app) as client:
        assert client.get("/v1/ext/admin/state", headers=AUTH).status_code == 200
        assert client.get("/v1/models").status_code == 401  # vLLM's check still on


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
