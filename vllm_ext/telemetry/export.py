"""Telemetry out of the process: query parameters of ``GET /v1/ext/telemetry``, the Prometheus
families on vLLM's ``/metrics``, and the merge of several servers' JSON (the replica merge of
DiSketch, arXiv 2503.13515, at the JSON level; `fragments.FragmentedSketch.merge` below it).

Metric names follow Prometheus conventions: ``vllm_ext_telemetry_`` prefix, snake case, base
units in the name (``_bytes``), ``_total`` only on counters (prometheus_client appends it to
a CounterMetricFamily), bounded label sets (top-k rows only):

  vllm_ext_telemetry_memory_bytes{structure}          bytes held now, per structure
  vllm_ext_telemetry_budget_bytes{structure}          the configured budget
  vllm_ext_telemetry_fragments{structure}             fragments held
  vllm_ext_telemetry_fragments_dropped_total{structure}  expired to stay in budget
  vllm_ext_telemetry_items_total{structure}           items fed (blocks, requests, tokens)
  vllm_ext_telemetry_filtered_total{structure}        arrivals the learned filter left out
  vllm_ext_telemetry_error_bound{structure}           stated additive error of a count
  vllm_ext_telemetry_engine_seconds_total             engine-core time in the telemetry hooks
  vllm_ext_telemetry_top_prefix_requests{rank,prefix,blocks}  in the last W requests
  vllm_ext_telemetry_top_tenant_requests{rank,tenant}         in the last W requests
  vllm_ext_telemetry_expert_tokens{layer,expert,window}       routed tokens per window

The merge is associative and commutative: rows are summed by key and never truncated
(`merge_payloads`); fragments, when every payload carries them, are unioned and the range
counts recomputed from the union.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_ext.telemetry.fragments import FragmentedSketch

MAX_TOP_K, MAX_WINDOWS, MAX_SECONDS = 100, 8, 7 * 86400.0
PARAMS = ("top_k", "range_s", "windows", "fragments")


class TelemetryQueryError(ValueError):
    """A bad query parameter: answered with HTTP 400 and this message."""


@dataclass(frozen=True)
class Query:
    top_k: int = 10
    range_s: float = 60.0
    windows: tuple[float, ...] = (10.0, 60.0, 300.0)
    fragments: bool = False


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise TelemetryQueryError(f"{name}: expected seconds, got {raw!r}") from None
    if not 0 < value <= MAX_SECONDS or math.isnan(value):
        raise TelemetryQueryError(f"{name}: must be in (0, {MAX_SECONDS:g}] seconds, got {raw!r}")
    return value


def parse_query(params) -> Query:
    """``GET /v1/ext/telemetry`` parameters (a mapping of str -> str, repeated keys refused)."""
    items = list(params.multi_items()) if hasattr(params, "multi_items") else list(params.items())
    names = [k for k, _ in items]
    unknown = sorted(set(names) - set(PARAMS))
    if unknown:
        raise TelemetryQueryError(f"unknown parameter(s): {', '.join(unknown)}; known: "
                                  f"{', '.join(PARAMS)}")
    repeated = sorted({k for k in names if names.count(k) > 1})
    if repeated:
        raise TelemetryQueryError(f"parameter(s) given more than once: {', '.join(repeated)}")
    raw = dict(items)
    out = {}
    if "top_k" in raw:
        try:
            out["top_k"] = int(raw["top_k"])
        except ValueError:
            raise TelemetryQueryError(f"top_k: expected an integer, got {raw['top_k']!r}") from None
        if not 1 <= out["top_k"] <= MAX_TOP_K:
            raise TelemetryQueryError(f"top_k: must be in [1, {MAX_TOP_K}], got {out['top_k']}")
    if "range_s" in raw:
        out["range_s"] = _seconds("range_s", raw["range_s"])
    if "windows" in raw:
        parts = [p for p in raw["windows"].split(",") if p.strip()]
        if not 1 <= len(parts) <= MAX_WINDOWS:
            raise TelemetryQueryError(f"windows: 1 to {MAX_WINDOWS} comma-separated seconds, "
                                      f"got {raw['windows']!r}")
        out["windows"] = tuple(_seconds("windows", p.strip()) for p in parts)
    if "fragments" in raw:
        value = raw["fragments"].lower()
        if value not in ("0", "1", "true", "false"):
            raise TelemetryQueryError(
                f"fragments: expected 0/1/true/false, got {raw['fragments']!r}")
        out["fragments"] = value in ("1", "true")
    return Query(**out)


# ---- Prometheus ---------------------------------------------------------------------------
def families(snap: dict):
    """Metric families from one telemetry payload (`hub.payload`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def fam(kind, name, doc, labels):
        return (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            name, doc, labels=labels)

    memory = fam("gauge", "vllm_ext_telemetry_memory_bytes", "telemetry memory held",
                 ["structure"])
    budget = fam("gauge", "vllm_ext_telemetry_budget_bytes", "telemetry memory budget",
                 ["structure"])
    frags = fam("gauge", "vllm_ext_telemetry_fragments", "sketch fragments held", ["structure"])
    dropped = fam("counter", "vllm_ext_telemetry_fragments_dropped", "fragments expired to stay "
                  "within the budget", ["structure"])
    items = fam("counter", "vllm_ext_telemetry_items", "items fed", ["structure"])
    filtered = fam("counter", "vllm_ext_telemetry_filtered", "arrivals the learned next-arrival "
                   "filter left out of the top-k tracker", ["structure"])
    bound = fam("gauge", "vllm_ext_telemetry_error_bound", "stated additive error of one count",
                ["structure"])
    top_prefix = fam("gauge", "vllm_ext_telemetry_top_prefix_requests", "requests with this "
                     "prefix among the last W", ["rank", "prefix", "blocks"])
    top_tenant = fam("gauge", "vllm_ext_telemetry_top_tenant_requests", "requests of this "
                     "tenant among the last W", ["rank", "tenant"])
    experts = fam("gauge", "vllm_ext_telemetry_expert_tokens", "tokens routed to the expert in "
                  "the last window", ["layer", "expert", "window"])
    engine_s = fam("counter", "vllm_ext_telemetry_engine_seconds", "engine-core time spent in "
                   "the telemetry's scheduler hooks", [])

    def tracker(name, t):
        memory.add_metric([name], t["memory_bytes"])
        bound.add_metric([name], t["error_bound"])
        filtered.add_metric([name], t.get("filtered", 0))

    pre = snap.get("prefixes")
    if pre and "error" not in pre:
        s = pre["sketch"]
        memory.add_metric(["prefix_sketch"], s["memory_bytes"])
        budget.add_metric(["prefix_sketch"], s["budget_bytes"])
        frags.add_metric(["prefix_sketch"], s["fragments"])
        dropped.add_metric(["prefix_sketch"], s["dropped"])
        items.add_metric(["prefix_sketch"], pre["blocks"])  # monotonic: blocks ever fed
        hist = pre.get("history")
        if hist:
            memory.add_metric(["prefix_history"], hist["memory_bytes"])
            budget.add_metric(["prefix_history"], hist["budget_bytes"])
            frags.add_metric(["prefix_history"], hist["fragments"])
            dropped.add_metric(["prefix_history"], hist["dropped"])
        bound.add_metric(["prefix_sketch"], pre["range_bound"])
        items.add_metric(["prefix_topk"], pre["requests"])
        tracker("prefix_topk", pre["tracker"])
        for rank, row in enumerate(pre["top"], 1):
            top_prefix.add_metric([str(rank), row["prefix"], str(row["blocks"])],
                                  row["window_count"])
        if "engine_cost" in pre:
            engine_s.add_metric([], pre["engine_cost"]["seconds"])
    exp = snap.get("experts")
    if exp:
        memory.add_metric(["expert_sketch"], exp["memory_bytes"])
        budget.add_metric(["expert_sketch"], exp["budget_bytes"])
        frags.add_metric(["expert_sketch"], exp["fragments"])
        dropped.add_metric(["expert_sketch"], exp["dropped"])
        items.add_metric(["expert_sketch"], exp["items"])
        for window, data in exp["windows"].items():
            bound.add_metric([f"expert_sketch_{window}s"], data["bound"])
            for layer, loads in data["layers"].items():
                for e, v in enumerate(loads):
                    experts.add_metric([layer, str(e), f"{window}s"], v)
    ten = snap.get("tenants")
    if ten:
        items.add_metric(["tenant_topk"], ten["requests"])
        tracker("tenant_topk", ten["tracker"])
        for rank, row in enumerate(ten["top"], 1):
            top_tenant.add_metric([str(rank), row["tenant"]], row["window_count"])
    yield from (memory, budget, frags, dropped, items, filtered, bound, top_prefix, top_tenant,
                experts, engine_s)


# ---- merging several servers ---------------------------------------------------------------
def _sum_rows(rows_lists, key: str, fields: tuple[str, ...]) -> list[dict]:
    out: dict[str, dict] = {}
    for rows in rows_lists:
        for row in rows:
            acc = out.setdefault(row[key], {**row, **{f: 0 for f in fields}})
            for f in fields:
                acc[f] += row.get(f, 0)
    return sorted(out.values(), key=lambda r: (-r[fields[0]], r[key]))


def merge_payloads(payloads: list[dict]) -> dict:
    """One payload for several servers (any grouping gives the same result)."""
    payloads = [p for p in payloads if p]
    if not payloads:
        return {}
    out = {"servers": sum(p.get("servers", 1) for p in payloads),
           "time": max(p.get("time", 0.0) for p in payloads),
           "nodes": sorted({n for p in payloads for n in p.get("nodes", [p.get("node", "?")])})}
    pres = [p["prefixes"] for p in payloads if p.get("prefixes") and "top" in p["prefixes"]]
    if pres:
        merged = {"top": _sum_rows([q["top"] for q in pres], "prefix",
                                   ("window_count", "range_count")),
                  "requests": sum(q["requests"] for q in pres),
                  "range_s": pres[0]["range_s"],
                  "range_bound": sum(q["range_bound"] for q in pres)}
        if all("fragments" in q for q in pres):
            union = FragmentedSketch.from_dict(pres[0]["fragments"])
            for q in pres[1:]:
                union = union.merge(FragmentedSketch.from_dict(q["fragments"]))
            now = out["time"]
            keys = [int(r["prefix"], 16) for r in merged["top"]]
            est = union.estimate(keys, now - merged["range_s"], math.inf, now=now)
            for row, value in zip(merged["top"], est.values):
                row["range_count"] = float(value)
            merged["range_bound"] = est.bound
            merged["fragments"] = union.to_dict()
        out["prefixes"] = merged
    exps = [p["experts"] for p in payloads if p.get("experts")]
    if exps:
        windows: dict[str, dict] = {}
        for e in exps:
            for w, data in e["windows"].items():
                acc = windows.setdefault(w, {"layers": {}, "bound": 0.0})
                acc["bound"] += data["bound"]
                for layer, loads in data["layers"].items():
                    cur = acc["layers"].setdefault(layer, [0.0] * len(loads))
                    acc["layers"][layer] = [a + b for a, b in zip(cur, loads)]
        out["experts"] = {"windows": windows}
    tens = [p["tenants"] for p in payloads if p.get("tenants")]
    if tens:
        out["tenants"] = {"top": _sum_rows([t["top"] for t in tens], "tenant", ("window_count",)),
                          "requests": sum(t["requests"] for t in tens)}
    return out
