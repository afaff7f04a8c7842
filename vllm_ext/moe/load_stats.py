"""Expert-load statistics for evaluating LASER (arXiv 2510.03293): imbalance per MoE layer and
per expert-parallel device.

Input: `vllm_ext.moe.router.ExpertLoad.snapshot()` dicts: ``total`` tokens per expert since the
last reset, ``history`` the per-forward-pass counts of the last passes, ``steps``, LASER's
``flat_tokens``/``moved_tokens``. Per layer:

* ``max_over_mean``: busiest expert's tokens / mean tokens per expert over the whole window
  (1 = balanced); ``cv``: coefficient of variation (population std / mean) of those totals.
* ``step_max_over_mean``: sum over passes of the busiest expert's tokens / sum over passes of the
  mean, i.e. the per-step imbalance (what makes experts wait for the busiest one), token-weighted.
* ``device_*``: the same after mapping experts onto N expert-parallel devices, ``linear``
  placement (vLLM's default: contiguous blocks, the first ``E mod N`` devices one expert more)
  or ``round_robin`` (expert e on device e mod N).
* ``flat_fraction`` / ``moved_fraction``: tokens LASER sent through the load-aware pool / whose
  expert set differs from plain top-k (0 for ``topk``).
The summary is the mean of each metric over layers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

PLACEMENTS = ("linear", "round_robin")


def expert_devices(num_experts: int, num_devices: int, placement: str = "linear") -> list[int]:
    """Device of each expert under vLLM's expert placement strategies."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "round_robin":
        return [e % num_devices for e in range(num_experts)]
    base, extra = divmod(num_experts, num_devices)
    devices = []
    for device in range(num_devices):
        devices += [device] * (base + (1 if device < extra else 0))
    return devices


def max_over_mean(loads: torch.Tensor) -> float:
    """Busiest / mean along the last dim, summed over leading dims (token-weighted)."""
    mean = loads.mean(dim=-1).sum()
    return float(loads.amax(dim=-1).sum() / mean) if mean > 0 else 0.0


def coefficient_of_variation(loads: torch.Tensor) -> float:
    mean = loads.mean()
    return float(loads.std(unbiased=False) / mean) if mean > 0 else 0.0


def per_device(loads: torch.Tensor, devices: list[int], num_devices: int) -> torch.Tensor:
    """[..., E] expert loads -> [..., N] device loads."""
    index = torch.tensor(devices, dtype=torch.long)
    out = torch.zeros(*loads.shape[:-1], num_devices, dtype=loads.dtype)
    return out.index_add_(-1, index, loads)


@dataclass
class LayerLoad:
    layer: str
    tokens: float
    steps: int
    max_over_mean: float
    cv: float
    step_max_over_mean: float
    device_tokens: list[float]
    device_max_over_mean: float
    device_step_max_over_mean: float
    flat_fraction: float
    moved_fraction: float


def layer_load(name: str, snap: dict[str, Any], num_devices: int,
               placement: str = "linear") -> LayerLoad:
    total = torch.tensor(snap["total"], dtype=torch.float64)
    history = torch.tensor(snap["history"], dtype=torch.float64).reshape(-1, total.numel())
    devices = expert_devices(total.numel(), num_devices, placement)
    device_total = per_device(total, devices, num_devices)
    routed = snap.get("tokens", 0.0)
    share = (lambda n: n / routed if routed else 0.0)  # noqa: E731
    return LayerLoad(
        layer=name, tokens=routed, steps=snap["steps"],
        max_over_mean=max_over_mean(total), cv=coefficient_of_variation(total),
        step_max_over_mean=max_over_mean(history),
        device_tokens=device_total.tolist(), device_max_over_mean=max_over_mean(device_total),
        device_step_max_over_mean=max_over_mean(per_device(history, devices, num_devices)),
        flat_fraction=share(snap.get("flat_tokens", 0.0)),
        moved_fraction=share(snap.get("moved_tokens", 0.0)))


SUMMARY_KEYS = ("max_over_mean", "cv", "step_max_over_mean", "device_max_over_mean",
                "device_step_max_over_mean", "flat_fraction", "moved_fraction")


def load_report(snapshots: dict[str, dict[str, Any]], num_devices: int,
                placement: str = "linear") -> dict[str, Any]:
    """``{"layers": [LayerLoad as dict], "summary": {metric: mean over layers}, ...}``."""
    layers = [layer_load(name, snap, num_devices, placement) for name, snap in snapshots.items()]
    summary = {key: (sum(getattr(l, key) for l in layers) / len(layers) if layers else 0.0)
               for key in SUMMARY_KEYS}
    return {"layers": [asdict(l) for l in layers], "summary": summary,
            "ep_devices": num_devices, "placement": placement}
