"""vllm-ext's HTTP routes as FastAPI routes, so they are in the server's ``/openapi.json``.

``GET /v1/ext/config``, ``POST /v1/ext/admin/config`` and ``GET /v1/ext/admin/state`` (the
logic is `admin`'s) with pydantic models of their payloads. They get onto vLLM's app in one
of two ways, whichever comes first; both attach this same `router`:
  * vLLM's endpoint-plugin hook: the ``vllm.endpoint_plugins`` entry point ``vllm_ext``
    (`ExtEndpointPlugin`), which vLLM's ``build_app`` attaches
    (``vllm/plugins/endpoint_plugins/interface.py:attach_endpoint_plugins``) only when
    ``VLLM_PLUGINS`` names it, e.g. ``VLLM_PLUGINS=vllm_ext`` (that one name also allows the
    ``vllm.general_plugins`` entry, which must load too; list any other plugin you use);
  * `ExtMiddleware` (``--middleware``, added by ``vllm-ext serve``) calls `ensure_routes` on
    the first ASGI event it sees (lifespan start-up), so plain ``vllm serve --middleware
    vllm_ext.server.middleware.ExtMiddleware`` and ``vllm-ext serve`` list them too, with
    no ``VLLM_PLUGINS``.
With the middleware installed, it answers these paths itself by calling the same endpoint
functions, ahead of vLLM's middlewares (as before: the admin token, not vLLM's ``--api-key``,
guards the admin routes). Without it (plugin only) the routes answer, behind vLLM's
``--api-key`` check, which reads the same ``Authorization`` header as the admin token.

Request bodies are read raw and validated by `admin.parse_request` (400 naming the key, as
the middleware always answered); the request model only documents them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from vllm_ext.config import LIVE_FIELDS, POLICIES, ExtConfig
from vllm_ext.server import admin

CONFIG_PATH = "/v1/ext/config"
TELEMETRY_PATH = "/v1/ext/telemetry"  # vllm_ext.telemetry
ADMIN_PATH, STATE_PATH = admin.ADMIN_PATH, admin.STATE_PATH
OTHER_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


class ExtJSONResponse(JSONResponse):
    """``json.dumps`` as the middleware always rendered its bodies (NaN allowed)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode()


# ---- models ---------------------------------------------------------------------------------
def _config_model(name: str, fields, optional: bool, doc: str) -> type[BaseModel]:
    hints = typing.get_type_hints(ExtConfig)
    spec = {}
    for f in fields:
        hint = Literal[POLICIES] if f.name == "policy" else hints[f.name]
        if optional:
            spec[f.name] = (hint, Field(None, description="omitted: unchanged"))
        elif f.default_factory is not dataclasses.MISSING:
            spec[f.name] = (hint, Field(default_factory=f.default_factory))
        else:
            spec[f.name] = (hint, Field(f.default))
    return create_model(name, __doc__=doc, __config__=ConfigDict(extra="forbid"), **spec)


_FIELDS = dataclasses.fields(ExtConfig)
ExtConfigModel = _config_model("ExtConfig", _FIELDS, False, "Every vllm-ext setting.")
LiveConfigChanges = _config_model(
    "LiveConfigChanges", [f for f in _FIELDS if f.name in LIVE_FIELDS], True,
    "Settings to change; only these may change on a live server (400 naming the key "
    "otherwise).")


class _Model(BaseModel):
    """A response: the fields listed are always there; more may be added."""
    model_config = ConfigDict(extra="allow")


class ActiveConfig(ExtConfigModel):
    """The scheduler's config now, with the policy actually running."""
    model_config = ConfigDict(extra="allow")
    active_policy: str | None = Field(None, description="the policy ordering requests now")
    fallback: str | None = Field(None, description="why the policy fell back to FCFS, if it did")


class AdminConfigRequest(BaseModel):
    """Body of ``POST /v1/ext/admin/config`` (other keys: 400)."""
    model_config = ConfigDict(extra="forbid")
    config: LiveConfigChanges
    drain: bool = Field(False, description="let the running requests finish first "
                                           "(new ones queue; none is lost)")
    drain_timeout_s: float = Field(300, gt=0, description="504 and no change if the drain "
                                                           "takes longer")
    reset_prefix_cache: bool = Field(False, description="reset the prefix cache after the switch")


class WorkerApplied(_Model):
    probe_every: int
    probes_running: bool


class AdminConfigResponse(_Model):
    config: ActiveConfig
    previous: dict[str, Any] = Field(description="the live settings before the switch")
    workers: list[WorkerApplied]
    drained: bool
    prefix_cache_reset: bool


class SchedulerState(_Model):
    requests: int
    free_blocks: int
    per_request: dict[str, int] = Field(description="size of every per-request structure")


class WorkerState(_Model):
    per_request: dict[str, int]
    prediction_entries: int
    prediction_capacity: int


class AdminStateResponse(_Model):
    scheduler: SchedulerState
    workers: list[WorkerState]


class ExtConfigResponse(_Model):
    vllm_ext_version: str
    vllm_version: str
    model: str
    scheduler_cls: str
    worker_cls: str
    config: ExtConfigModel = Field(description="the config active now (after live changes)")
    active_policy: str | None
    policy_fallback: str | None
    startup_config: ExtConfigModel = Field(description="the config the engine started with")
    admin: bool = Field(description="whether the admin routes are on (a token is set)")


class ErrorDetail(_Model):
    message: str
    type: str
    code: int


class ErrorResponse(_Model):
    error: ErrorDetail


def _inline_defs(schema: dict) -> dict:
    """A model's JSON schema with its ``$defs`` written in place (for ``openapi_extra``,
    where ``#/$defs/...`` references would not resolve)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(schema)


def _errors(*codes: int) -> dict:
    what = {400: "bad body or setting (nothing changes)", 401: "missing or wrong admin token",
            403: "admin routes off (no token configured)", 504: "drain timed out"}
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


# ---- endpoints ------------------------------------------------------------------------------
def _error(exc: admin.AdminError) -> ExtJSONResponse:
    return ExtJSONResponse({"error": {"message": str(exc), "type": "AdminError",
                                      "code": exc.status}}, status_code=exc.status)


def _headers(request: Request) -> dict[bytes, bytes]:
    return dict(request.scope.get("headers", []))


async def ext_config_payload(app) -> dict:
    """Versions, classes, the config the engine started with and the one active now."""
    import vllm

    import vllm_ext

    vconf = app.state.engine_client.vllm_config
    active = await admin.active_config(app)
    return {
        "vllm_ext_version": vllm_ext.__version__,
        "vllm_version": vllm.__version__,
        "model": vconf.model_config.model,
        "scheduler_cls": str(vconf.scheduler_config.scheduler_cls),
        "worker_cls": vconf.parallel_config.worker_cls,
        "config": admin.config_fields(active),
        "active_policy": active.get("active_policy", active.get("policy")),
        "policy_fallback": active.get("fallback"),
        "startup_config": admin.startup_config(app).to_dict(),
        "admin": bool(os.environ.get(admin.TOKEN_ENV)),
    }


async def get_ext_config(request: Request):
    """The active ExtConfig, the startup one, scheduler/worker classes and versions."""
    return ExtJSONResponse(await ext_config_payload(request.app))


async def post_admin_config(request: Request):
    """Live config switch (``Authorization: Bearer TOKEN``): validated first, optionally
    after draining the running requests, applied between two steps."""
    raw = await request.body()
    try:
        admin.check_token(_headers(request))
        return ExtJSONResponse(await admin.apply(request.app, raw))
    except admin.AdminError as exc:
        return _error(exc)


async def get_admin_state(request: Request):
    """Per-request state sizes of the scheduler and workers and the free KV blocks
    (``Authorization: Bearer TOKEN``)."""
    try:
        admin.check_token(_headers(request))
        return ExtJSONResponse(await admin.engine_state(request.app))
    except admin.AdminError as exc:
        return _error(exc)


async def get_telemetry(request: Request):
    """Top prefixes and tenants in the last W requests, prefix counts over ``range_s`` and
    per-expert load over ``windows`` (docs/telemetry.md); 400 names a bad parameter."""
    from vllm_ext.telemetry.hub import telemetry_response

    status, body = await telemetry_response(request.app, request.query_params)
    return ExtJSONResponse(body, status_code=status)


def _wrong_method(path: str, allowed: str):
    async def wrong_method(request: Request):  # the token first: nothing said without it
        try:
            admin.check_token(_headers(request))
            raise admin.AdminError(405, f"{path} takes {allowed}")
        except admin.AdminError as exc:
            return _error(exc)
    return wrong_method


router = APIRouter(tags=["vllm-ext"])
router.add_api_route(CONFIG_PATH, get_ext_config, methods=["GET"],
                     response_model=ExtConfigResponse, summary="vllm-ext configuration")
router.add_api_route(
    ADMIN_PATH, post_admin_config, methods=["POST"], response_model=AdminConfigResponse,
    responses=_errors(400, 401, 403, 504), summary="Switch live settings",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_defs(AdminConfigRequest.model_json_schema())}}}})
router.add_api_route(STATE_PATH, get_admin_state, methods=["GET"],
                     response_model=AdminStateResponse, responses=_errors(401, 403),
                     summary="Per-request state sizes and free KV blocks")
router.add_api_route(
    TELEMETRY_PATH, get_telemetry, methods=["GET"], summary="Telemetry in small memory",
    responses={400: {"model": ErrorResponse, "description": "bad query parameter"},
               404: {"model": ErrorResponse, "description": "telemetry off"}})
router.add_api_route(ADMIN_PATH, _wrong_method(ADMIN_PATH, "POST"), include_in_schema=False,
                     methods=[m for m in OTHER_METHODS if m != "POST"])
router.add_api_route(STATE_PATH, _wrong_method(STATE_PATH, "GET"), include_in_schema=False,
                     methods=[m for m in OTHER_METHODS if m != "GET"])


def endpoint_for(path: str, method: str):
    """The endpoint function of `router` for (path, method), or None (the middleware's
    dispatch: it serves exactly what the routes serve)."""
    for route in router.routes:
        if route.path == path and method in route.methods:
            return route.endpoint
    return None


_ENDPOINTS = {route.endpoint for route in router.routes}


def ensure_routes(app) -> bool:
    """Attach `router` to `app` unless it is there already; True if it attached it."""
    if not isinstance(app, FastAPI):
        return False
    if any(getattr(r, "endpoint", None) in _ENDPOINTS for r in app.router.routes):
        return False
    app.include_router(router)
    app.openapi_schema = None  # rebuilt with the routes on the next /openapi.json
    return True


class ExtEndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point (loaded only when ``VLLM_PLUGINS`` names
    ``vllm_ext``). The engine-side methods the routes call (``ext_*`` RPCs) come from the
    ``vllm.general_plugins`` entry and the plugin's scheduler and worker classes."""
    name = "vllm_ext"
    required_tasks = ("generate",)  # needs an engine: not on the engine-less render server

    def attach_router(self, app: FastAPI) -> None:
        ensure_routes(app)

    async def init_state(self, engine_client, state, args) -> None:
        return None  # the routes read app.state.engine_client, which vLLM sets
