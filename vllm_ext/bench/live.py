"""A benchmark's view of a live vllm-ext server: switch its config, read its counters.

`set_config` calls ``POST /v1/ext/admin/config`` (`vllm_ext.server.admin`); `scrape` reads the
counters a run is judged on from ``/metrics``: vllm-ext's preemptions by cause and probe runs
(`vllm_ext.server.metrics`) and vLLM's own ``vllm:num_preemptions_total``. Differences of two
scrapes are what one block cost.
"""
from __future__ import annotations

import httpx

COUNTERS = {  # (prometheus sample name, label, value) -> field in a bench summary row
    ("vllm_ext_preemptions_total", "cause", "policy"): "preemptions_policy",
    ("vllm_ext_preemptions_total", "cause", "kv_pressure"): "preemptions_kv_pressure",
    ("vllm:num_preemptions_total", None, None): "preemptions_vllm",
    ("vllm_ext_probe_runs_total", None, None): "probe_runs",
    ("vllm_ext_probe_seconds_total", None, None): "probe_seconds",
    ("vllm_ext_tool_pauses_total", "handling", "preserve"): "tool_preserve",
    ("vllm_ext_tool_pauses_total", "handling", "discard"): "tool_discard",
    ("vllm_ext_tool_pauses_total", "handling", "swap"): "tool_swap",
    ("vllm_ext_tool_recompute_tokens_total", None, None): "tool_recompute_tokens",
    ("vllm_ext_telemetry_engine_seconds_total", None, None): "telemetry_engine_seconds",
    ("vllm_ext_tool_reused_tokens_total", None, None): "tool_reused_tokens",
    ("vllm_ext_swap_tokens_loaded_total", None, None): "swap_tokens_loaded",
    ("vllm_ext_swap_blocks_saved_total", None, None): "swap_blocks_saved",
    ("vllm_ext_session_turns_total", "handling", "preserve"): "session_preserve",
    ("vllm_ext_session_turns_total", "handling", "discard"): "session_discard",
    ("vllm_ext_session_turns_total", "handling", "swap"): "session_swap",
    ("vllm_ext_session_reused_tokens_total", None, None): "session_reused_tokens",
    ("vllm_ext_session_recompute_tokens_total", None, None): "session_recompute_tokens",
}


def set_config(base_url: str, token: str, config: dict, drain: bool = True,
               reset_prefix_cache: bool = True, timeout_s: float = 600) -> dict:
    resp = httpx.post(base_url + "/v1/ext/admin/config", timeout=timeout_s,
                      headers={"Authorization": f"Bearer {token}"},
                      json={"config": config, "drain": drain,
                            "reset_prefix_cache": reset_prefix_cache})
    if resp.status_code != 200:
        raise RuntimeError(f"admin config failed: HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json()


def reset_prefix_cache(base_url: str, timeout_s: float = 60) -> None:
    """vLLM's own ``POST /reset_prefix_cache`` (served with ``VLLM_SERVER_DEV_MODE=1``), so no
    block reuses the KV of an earlier one."""
    resp = httpx.post(base_url + "/reset_prefix_cache", timeout=timeout_s)
    if resp.status_code != 200:
        raise RuntimeError(f"reset_prefix_cache failed: HTTP {resp.status_code}: "
                           f"{resp.text[:500]} (is VLLM_SERVER_DEV_MODE=1 set for the server?)")


def scrape(base_url: str) -> dict[str, float]:
    return parse_counters(httpx.get(base_url + "/metrics", timeout=30).text)


def parse_counters(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for (name, label, value), field in COUNTERS.items():
                if sample.name == name and (label is None or sample.labels.get(label) == value):
                    out[field] += sample.value
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
