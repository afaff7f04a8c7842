"""Wrapping the API server's engine client ``generate`` (vLLM 0.32 ``AsyncLLM.generate``).

The server-side loops (tool calls: `vllm_ext.tools.loop`; branches: `vllm_ext.branches.runner`)
each replace ``engine_client.generate`` once with their own, which serves the requests they
handle and passes every other request to the ``generate`` it found (``plain_generate``). The
wrappers stack: each sees the other's requests pass through untouched.
"""
from __future__ import annotations


def wrap_generate(engine_client, attr: str, make):
    """The wrapper stored as ``engine_client.<attr>``, made by ``make()`` on first use and
    installed as ``engine_client.generate``; later calls return the same object."""
    wrapper = getattr(engine_client, attr, None)
    if wrapper is None:
        wrapper = make()
        setattr(engine_client, attr, wrapper)
        engine_client.generate = wrapper.generate
    return wrapper
