"""Live configuration of a running server: ``POST /v1/ext/admin/config``, ``GET /v1/ext/config``.

Off unless the server was started with ``--ext-admin-token TOKEN`` (``vllm-ext serve``) or the
``VLLM_EXT_ADMIN_TOKEN`` environment variable (plain ``vllm serve``); then every admin call must
carry ``Authorization: Bearer TOKEN`` (401 otherwise). Without a token the route answers 403 on
every bind, loopback or not, so it is never reachable unauthenticated.

``GET /v1/ext/admin/state`` (same token) reports the engine's per-request state sizes and free
KV blocks, for lifetime checks.

Body: ``{"config": {<LIVE_FIELDS key>: value, ...}, "drain": false, "drain_timeout_s": 300,
"reset_prefix_cache": false}``. The change is validated first (400 naming the key on an unknown,
fixed or bad setting; nothing changes), then, if ``drain``, vLLM's own
``pause_generation(mode="wait")`` lets the running set finish while new requests queue (none
is lost), the workers (``collective_rpc("ext_apply_config")``) and the scheduler
(`vllm_ext.engine_rpc`) take the new settings between two steps, the prefix cache is reset if
asked (so a benchmark block does not reuse the previous block's KV), and generation resumes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os

from vllm_ext.config import CONFIG_KEY, LIVE_FIELDS, ExtConfig, ExtConfigError
from vllm_ext.engine_rpc import scheduler_call

TOKEN_ENV = "VLLM_EXT_ADMIN_TOKEN"
ADMIN_PATH = "/v1/ext/admin/config"
STATE_PATH = "/v1/ext/admin/state"
_lock = asyncio.Lock()


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_token(headers: dict[bytes, bytes], token: str | None = None) -> None:
    token = os.environ.get(TOKEN_ENV) if token is None else token
    if not token:
        raise AdminError(403, "the admin route is off: start the server with --ext-admin-token "
                              f"TOKEN (or {TOKEN_ENV})")
    given = headers.get(b"authorization", b"").decode("latin-1")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise AdminError(401, "missing or wrong admin token (Authorization: Bearer TOKEN)")


def parse_request(raw: bytes, current: ExtConfig) -> tuple[ExtConfig, dict]:
    """The validated new config and the call's options; AdminError(400) on bad input."""
    try:
        body = json.loads(raw or b"null")
    except json.JSONDecodeError as exc:
        raise AdminError(400, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        raise AdminError(400, 'expected {"config": {setting: value, ...}, "drain": bool}; '
                              f"live settings: {', '.join(LIVE_FIELDS)}")
    options = {"drain": body.get("drain", False), "drain_timeout_s": body.get("drain_timeout_s", 300),
               "reset_prefix_cache": body.get("reset_prefix_cache", False)}
    unknown = sorted(set(body) - {"config", *options})
    if unknown:
        raise AdminError(400, f"unknown field(s) {', '.join(unknown)}")
    for key in ("drain", "reset_prefix_cache"):
        if not isinstance(options[key], bool):
            raise AdminError(400, f"{key} must be true or false, got {options[key]!r}")
    timeout = options["drain_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise AdminError(400, f"drain_timeout_s must be a number > 0, got {timeout!r}")
    try:
        return current.with_live_changes(body["config"]), options
    except ExtConfigError as exc:
        raise AdminError(400, str(exc)) from None


def startup_config(app) -> ExtConfig:
    vconf = app.state.engine_client.vllm_config
    extra = vconf.additional_config if isinstance(vconf.additional_config, dict) else {}
    return ExtConfig.from_dict(extra.get(CONFIG_KEY))


async def active_config(app) -> dict:
    """The scheduler's config now (after live changes); the startup config if the scheduler
    is not ours."""
    try:
        return await scheduler_call(app.state.engine_client, "ext_get_config")
    except Exception:
        return startup_config(app).to_dict()


def config_fields(active: dict) -> dict:
    """The ExtConfig fields of `active_config`'s answer (without the scheduler's status)."""
    return {k: v for k, v in active.items() if k not in ("active_policy", "fallback")}


async def apply(app, raw: bytes) -> dict:
    engine = app.state.engine_client
    async with _lock:
        current = ExtConfig.from_dict(
            config_fields(await active_config(app)))
        new, options = parse_request(raw, current)
        live = new.live_dict()
        paused = False
        try:
            if options["drain"]:
                paused = True
                try:
                    await asyncio.wait_for(
                        engine.pause_generation(mode="wait", clear_cache=False),
                        options["drain_timeout_s"])
                except asyncio.TimeoutError:
                    raise AdminError(504, f"running requests did not finish within "
                                          f"{options['drain_timeout_s']} s; nothing changed") from None
            workers = await engine.collective_rpc("ext_apply_config", args=(live,))
            active = await scheduler_call(engine, "ext_apply_config", live)
            if options["reset_prefix_cache"]:  # the swap tier too: it is a prefix cache
                await engine.reset_prefix_cache(reset_connector=bool(new.swap_dir))
        finally:
            if paused:
                await engine.resume_generation()
    return {"config": active, "previous": current.live_dict(), "workers": workers,
            "drained": options["drain"], "prefix_cache_reset": options["reset_prefix_cache"]}


async def engine_state(app) -> dict:
    """``GET /v1/ext/admin/state``: the scheduler's and workers' per-request state sizes and
    the free KV blocks (`scripts/soak.py` compares them before and after a load)."""
    engine = app.state.engine_client
    return {"scheduler": await scheduler_call(engine, "ext_get_state"),
            "workers": await engine.collective_rpc("ext_get_state")}
