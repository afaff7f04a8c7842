"""Tenants for the learned sliding-window top-k (LWCSS, arXiv 2409.11516): an ASGI middleware
that reads who sent each generation request and feeds `hub.Hub.tenants`.

Rule: tenant = the ``telemetry_tenant_header`` request header (default ``x-tenant``) if
present, else the JSON body's ``user`` field (OpenAI's end-user id), else ``-``; every
``POST /v1/completions`` / ``/v1/chat/completions`` / ``/v1/responses`` is one arrival. The
body is read only when the header is absent, and handed on unchanged. Added by
``vllm-ext serve --ext-telemetry`` after vLLM's own middlewares
(``--middleware vllm_ext.telemetry.tenants.TenantMiddleware`` on plain ``vllm serve``).
"""
from __future__ import annotations

import json

from vllm_ext.telemetry.hub import hub_for

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


class TenantMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            return await self.app(scope, receive, send)
        hub = hub_for(scope.get("app"))
        if hub is None:
            return await self.app(scope, receive, send)
        header = hub.cfg.telemetry_tenant_header.lower().encode()
        tenant = dict(scope.get("headers", [])).get(header)
        if tenant is not None:
            hub.tenants.on_request(tenant.decode("latin-1"))
            return await self.app(scope, receive, send)
        from vllm_ext.server.middleware import _read_body, _replay

        body = await _read_body(receive)
        try:
            user = json.loads(body).get("user") if body else None
        except (ValueError, AttributeError):
            user = None
        hub.tenants.on_request(user if isinstance(user, str) and user else "-")
        return await self.app(scope, _replay(body, receive), send)
