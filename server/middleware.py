"""`ExtMiddleware`: vllm-ext's additions to vLLM's OpenAI server, as one ASGI middleware.

Added with vLLM's own ``--middleware vllm_ext.server.middleware.ExtMiddleware`` (``vllm-ext
serve`` adds it), so it works on plain ``vllm serve`` too. It
  * serves ``GET /v1/ext/config``: the active ExtConfig, scheduler/worker classes, versions;
  * serves ``POST /v1/ext/admin/config`` (live config switch) and ``GET /v1/ext/admin/state``
    (per-request state sizes, free KV blocks), both token-protected: `admin`. It answers them
    with the endpoints of `routes` (the FastAPI routes in ``/openapi.json``), ahead of vLLM's
    own middlewares, and attaches those routes to the app at start-up if vLLM's endpoint-plugin
    hook has not (``VLLM_PLUGINS`` unset), so the schema lists them either way;
  * refreshes vllm-ext's counters before vLLM renders ``GET /metrics`` (`metrics`);
  * validates the ``ext_*`` keys of ``vllm_xargs`` on completions and chat requests and answers
    HTTP 400 with a message for a malformed one (the request never reaches the engine);
  * with ``vllm_xargs: {"ext_return_predictions": true}`` tags the request, and after vLLM has
    produced the response adds a ``vllm_ext`` object with the request's latest probe values,
    read from the workers with ``collective_rpc("ext_get_predictions")``. For streaming
    responses the object is added to the last chunk before ``[DONE]``;
  * with ``vllm_xargs: {"ext_tools": true}`` runs the request's tool calls in the server
    (`vllm_ext.tools.loop`, installed on the engine client on first use), answers 400 for what
    the loop can't serve, and lists the calls in the response's ``vllm_ext.tool_calls``;
  * runs an n > 1 request with ``vllm_xargs: {"ext_branches": "sc"|"esc"|"duchess"}`` (or
    under ``--ext-branches``) as branches (`vllm_ext.branches.runner`): one completion, the
    votes and branch counts in ``vllm_ext.branches``, ``usage.completion_tokens`` = the tokens
    of all branches; 400 for what the runner can't serve.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.requests import Request

from vllm_ext.branches.runner import BRANCHES_KEY, OVERRIDE_KEYS
from vllm_ext.config import BRANCH_MODES
from vllm_ext.server import metrics, routes
from vllm_ext.tools.loop import TOOLS_KEY
from vllm_ext.worker.channel import TAG_KEY

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
RETURN_KEY = "ext_return_predictions"


class BadExtArgs(ValueError):
    pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


EXT_XARGS = {
    "ext_true_output_len": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    RETURN_KEY: (lambda v: isinstance(v, bool), "true or false"),
    TOOLS_KEY: (lambda v: isinstance(v, bool), "true or false"),
    # the client's expected gap (s) to its session's next turn (vllm_ext.sched.sessions)
    "ext_followup_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                       and v >= 0, "a non-negative number of seconds"),
    BRANCHES_KEY: (lambda v: v in BRANCH_MODES, "one of " + ", ".join(BRANCH_MODES)),
    **{key: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
       for key in OVERRIDE_KEYS},
}


def validate_xargs(body: Any) -> dict | None:
    """Return the request's vllm_xargs (or None); raise BadExtArgs with a message if malformed."""
    if not isinstance(body, dict) or "vllm_xargs" not in body or body["vllm_xargs"] is None:
        return None
    xargs = body["vllm_xargs"]
    if not isinstance(xargs, dict):
        raise BadExtArgs(f"vllm_xargs must be a JSON object, got {type(xargs).__name__}")
    for key, value in xargs.items():
        if key == TAG_KEY:
            raise BadExtArgs(f"vllm_xargs.{TAG_KEY} is reserved for the server")
        if not key.startswith("ext_"):
            continue
        if key not in EXT_XARGS:
            raise BadExtArgs(f"unknown vllm_xargs key {key!r}; known: {', '.join(sorted(EXT_XARGS))}")
        check, expected = EXT_XARGS[key]
        if not check(value):
            raise BadExtArgs(f"vllm_xargs.{key} must be {expected}, got {value!r}")
    return xargs


class ExtMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.routes_checked = False

    async def __call__(self, scope, receive, send) -> None:
        if not self.routes_checked:  # first event: lifespan start-up (or the first request)
            self.routes_checked = True
            routes.ensure_routes(scope.get("app"))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        endpoint = routes.endpoint_for(path, method) if path.startswith("/v1/ext/") else None
        if endpoint is not None:
            response = await endpoint(Request(scope, receive))
            return await response(scope, receive, send)
        if path.rstrip("/") == "/metrics" and method == "GET":
            await metrics.refresh(scope["app"])
            return await self.app(scope, receive, send)
        if path not in GENERATE_PATHS or method != "POST":
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        tag = None
        try:
            body = json.loads(raw) if raw else None
            xargs = validate_xargs(body)
        except json.JSONDecodeError:
            body, xargs = None, None  # vLLM answers malformed JSON itself
        except BadExtArgs as exc:
            return await _send_json(send, 400, {"error": {
                "message": str(exc), "type": "BadRequestError", "param": "vllm_xargs", "code": 400}})
        tools = bool(xargs and xargs.get(TOOLS_KEY))
        if tools:
            try:
                check_tool_request(scope["app"], body)
            except BadExtArgs as exc:
                return await _send_json(send, 400, {"error": {
                    "message": str(exc), "type": "BadRequestError", "param": "vllm_xargs",
                    "code": 400}})
        try:
            branches = check_branch_request(scope["app"], body, xargs, tools)
        except BadExtArgs as exc:
            return await _send_json(send, 400, {"error": {
                "message": str(exc), "type": "BadRequestError", "param": "vllm_xargs",
                "code": 400}})
        if xargs is None and branches:
            xargs = body["vllm_xargs"] = {}
        if xargs is not None and (xargs.get(RETURN_KEY) or tools or branches):
            tag = uuid.uuid4().hex
            xargs[TAG_KEY] = tag
            raw = json.dumps(body).encode()
        replay = _replay(raw, receive)
        if tag is None:
            return await self.app(scope, replay, send)
        await self.app(scope, replay, _PredictionSender(
            scope["app"], send, tag, predictions=bool(xargs.get(RETURN_KEY)), tools=tools,
            branches=branches))


class _PredictionSender:
    """Wraps `send`: adds the `vllm_ext` object to a JSON body or to the last SSE chunk."""

    def __init__(self, app, send, tag: str, predictions: bool = True,
                 tools: bool = False, branches: bool = False) -> None:
        self.app, self.send, self.tag = app, send, tag
        self.predictions, self.tools, self.branches = predictions, tools, branches
        self.start: dict | None = None
        self.streaming = False
        self.body = b""
        self.pending_event: bytes | None = None

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.streaming = b"text/event-stream" in headers.get(b"content-type", b"")
            if message["status"] != 200:
                self.tag = None
            if self.streaming or self.tag is None:
                return await self.send(message)
            self.start = message
            return None
        if message["type"] != "http.response.body" or self.tag is None:
            return await self.send(message)
        if self.streaming:
            return await self._stream_chunk(message)
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return None
        body = await self._augment(self.body)
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _stream_chunk(self, message) -> None:
        self.body += message.get("body", b"")
        events = self.body.split(b"\n\n")
        self.body = events.pop()
        out = b""
        for event in events:
            if event.strip() == b"data: [DONE]" and self.pending_event is not None:
                payload = await self._augment(self.pending_event[len(b"data: "):])
                out += b"data: " + payload + b"\n\n"
                self.pending_event = None
            if event.startswith(b"data: {"):
                if self.pending_event is not None:
                    out += self.pending_event + b"\n\n"
                self.pending_event = event
            else:
                out += event + b"\n\n"
        more = message.get("more_body", False)
        if not more:
            out += (self.pending_event + b"\n\n" if self.pending_event else b"") + self.body
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    async def _augment(self, raw: bytes) -> bytes:
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            return raw
        ext = payload["vllm_ext"] = {}
        if self.predictions:
            ext["predictions"] = await read_predictions(self.app, self.tag)
        if self.tools:
            ext["tool_calls"] = self.app.state.engine_client.ext_tool_loop.take_calls(self.tag)
        if self.branches:
            stats = self.app.state.engine_client.ext_branch_runner.take_stats(self.tag)
            ext["branches"] = stats
            usage = payload.get("usage")
            if stats and isinstance(usage, dict) and "completion_tokens" in usage:
                # every branch's tokens were generated, not just the chosen one's
                usage["completion_tokens"] = stats["tokens"]
                usage["total_tokens"] = usage.get("prompt_tokens", 0) + stats["tokens"]
        return json.dumps(payload).encode()


def check_tool_request(app, body: dict) -> None:
    """Install the tool loop on first use; 400 for a request it cannot serve."""
    from vllm_ext.config import ExtConfig
    from vllm_ext.tools.loop import install

    engine = app.state.engine_client
    loop = install(engine, ExtConfig.from_vllm_config(engine.vllm_config))
    if loop.close_id is None:
        raise BadExtArgs(f"vllm_xargs.{loop.no_pause_token()}")
    from vllm_ext.tools.loop import unsupported

    reason = unsupported(body)
    if reason:
        raise BadExtArgs(f"vllm_xargs.{reason}")
    chat = getattr(app.state, "openai_serving_chat", None)
    if (body.get("tools") and getattr(chat, "enable_auto_tools", False)
            and body.get("tool_choice", "auto") != "none"):
        # vLLM's tool parser would return the calls the loop already ran as tool_calls
        raise BadExtArgs("vllm_xargs.ext_tools: the server runs these tools itself; with "
                         "--enable-auto-tool-choice send tool_choice 'none' (the template still "
                         "lists the tools) or serve without that flag")


def check_branch_request(app, body, xargs, tools: bool) -> bool:
    """Whether the request runs as branches (installing the runner on first use); 400 for
    one the runner cannot serve."""
    from vllm_ext.branches.runner import install

    if not isinstance(body, dict):
        return False
    engine = app.state.engine_client
    ext = _ext_config(engine)
    n = body.get("n") or 1
    mode = (xargs or {}).get(BRANCHES_KEY) or (ext.branches if _is_int(n) and n > 1 else "off")
    if mode == "off":
        return False
    if mode == "duchess" and ext.branches == "off" and not ext.probe_paths:
        raise BadExtArgs(f"vllm_xargs.{BRANCHES_KEY}=duchess needs the correctness probe: "
                         "serve with --ext-branches duchess (or sc / esc)")
    if tools:
        raise BadExtArgs(f"vllm_xargs.{BRANCHES_KEY} and {TOOLS_KEY} cannot be combined")
    for key, bad in (("logprobs", lambda v: v not in (None, False, 0)),
                     ("top_logprobs", lambda v: v not in (None, 0)),
                     ("use_beam_search", lambda v: bool(v)), ("echo", lambda v: bool(v)),
                     ("prompt_logprobs", lambda v: v is not None)):
        if bad(body.get(key)):
            raise BadExtArgs(f"vllm_xargs.{BRANCHES_KEY}: not supported with {key}={body[key]!r}")
    from vllm_ext.branches.runner import request_config
    from vllm_ext.config import ExtConfigError

    try:
        request_config(ext, xargs)
    except ExtConfigError as exc:
        raise BadExtArgs(str(exc)) from None
    install(engine, ext)
    return True


def _ext_config(engine):
    from vllm_ext.config import ExtConfig

    ext = getattr(engine, "ext_config", None)
    if ext is None:
        ext = engine.ext_config = ExtConfig.from_vllm_config(engine.vllm_config)
    return ext


async def read_predictions(app, tag: str) -> dict:
    """The latest probe values of every engine request carrying `tag` (merged over workers)."""
    engine = app.state.engine_client
    merged: dict = {}
    for worker_result in await engine.collective_rpc("ext_get_predictions", args=(tag,)) or []:
        for req_id, entry in (worker_result or {}).items():
            merged.setdefault(req_id, entry)
    return merged


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    """Hand the (possibly rewritten) body to vLLM, then pass real disconnects through."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()
    return replayed


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
