"""Tools a request may call while it runs in the server (LAMPS's "API calls").

A tool is a plain Python callable ``fn(arg: str) -> str`` plus a latency model: the built-in
testbed tools answer instantly, so the latency is what makes them API calls (LAMPS's point is
the time a request spends waiting on one). Built-ins:
  * ``calc``   - the testbed's integer calculator (`vllm_ext.testbed.tasks`);
  * ``lookup`` - the testbed's fixed name table (a slow API);
  * ``http``   - GET ``<base>/<arg>`` on a loopback URL (``--ext-tool-http-base``), the body
                 is the result (tests point it at a local server).
Extra tools come from ``--ext-tools module:obj`` (a dict name -> callable, or a callable
returning one). Latencies: ``--ext-tool-latency "calc=0.05,lookup=exp:0.8"`` where a value is
``S`` (fixed seconds), ``exp:MEAN`` or ``uniform:LO-HI``; unlisted tools use the testbed's table.
"""
from __future__ import annotations

import importlib
import random
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

from vllm_ext.testbed import tasks

ToolFn = Callable[[str], str]


class ToolSpecError(ValueError):
    """A malformed --ext-tools / --ext-tool-latency value; the message names the flag."""


@dataclass(frozen=True)
class Latency:
    kind: str = "fixed"  # fixed | exp | uniform
    a: float = 0.0
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return self.a

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


def parse_latency(value: str) -> Latency:
    kind, _, rest = value.partition(":")
    try:
        if not rest:
            lat = Latency("fixed", float(kind))
        elif kind == "exp":
            lat = Latency("exp", float(rest))
        elif kind == "uniform":
            lo, _, hi = rest.partition("-")
            lat = Latency("uniform", float(lo), float(hi))
            if lat.b < lat.a:
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise ToolSpecError(f"--ext-tool-latency: bad latency {value!r} (use S, exp:MEAN or "
                            "uniform:LO-HI, seconds)") from None
    if lat.a < 0:
        raise ToolSpecError(f"--ext-tool-latency: negative latency {value!r}")
    return lat


def parse_latencies(spec: str) -> dict[str, Latency]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ToolSpecError(f"--ext-tool-latency: expected NAME=LATENCY, got {item!r}")
        out[name.strip()] = parse_latency(value.strip())
    return out


def http_tool(base: str) -> ToolFn:
    host = urllib.parse.urlparse(base).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ToolSpecError(f"--ext-tool-http-base: only loopback URLs are allowed, got {base!r}")

    def call(arg: str) -> str:
        url = base.rstrip("/") + "/" + urllib.parse.quote(arg.strip())
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 (loopback only)
            return resp.read().decode("utf-8", "replace").strip()
    return call


def load_tools(target: str) -> dict[str, ToolFn]:
    """``module:obj`` -> {name: callable}."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ToolSpecError(f"--ext-tools: expected module:object, got {target!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ToolSpecError(f"--ext-tools: cannot load {target!r}: {exc}") from None
    tools = obj() if callable(obj) and not isinstance(obj, dict) else obj
    if not isinstance(tools, dict) or not all(callable(f) for f in tools.values()):
        raise ToolSpecError(f"--ext-tools: {target!r} must be a dict name -> callable")
    return dict(tools)


@dataclass
class Registry:
    tools: dict[str, ToolFn]
    latencies: dict[str, Latency]
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def build(cls, extra: str = "", latency: str = "", http_base: str = "",
              seed: int = 0) -> "Registry":
        tools: dict[str, ToolFn] = {name: _testbed_tool(name) for name in tasks.TOOLS}
        lats = {name: Latency("fixed", t.latency_s) for name, t in tasks.TOOLS.items()}
        if http_base:
            tools["http"] = http_tool(http_base)
        if extra:
            tools.update(load_tools(extra))
        lats.update(parse_latencies(latency))
        return cls(tools, lats, seed)

    def latency(self, name: str) -> float:
        lat = self.latencies.get(name)
        return lat.sample(self.rng) if lat is not None else 0.0


def _testbed_tool(name: str) -> ToolFn:
    return lambda arg: tasks.run_tool(f"{name} {arg}")
