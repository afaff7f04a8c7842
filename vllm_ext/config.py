"""`ExtConfig`: every vllm-ext switch in one frozen dataclass.

It travels to every vLLM process inside vLLM's own config as
``--additional-config '{"vllm_ext": {...}}'`` so the API server, EngineCore and workers see the
same values without environment variables. Unknown keys and bad values fail at startup with a
message naming the key (and the matching ``--ext-*`` flag).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

CONFIG_KEY = "vllm_ext"
POLICIES = ("fcfs", "oracle", "trail", "spjf")
MOE_ROUTERS = ("topk",)
KV_BITS = (16,)


class ExtConfigError(ValueError):
    """A bad vllm-ext setting; the message names the key and its --ext-* flag."""


def flag_name(key: str) -> str:
    return "--ext-" + key.replace("_", "-")


@dataclass(frozen=True)
class ExtConfig:
    # Scheduling
    policy: str = "fcfs"
    preemption_margin: float = 0.0
    max_preemptions_per_request: int = 4
    max_preemptions_per_step: int = 1
    trail_preempt_fraction: float = 0.8
    trail_smoothing: bool = True
    # Prediction channel (ProbeWorker)
    probe_paths: tuple[str, ...] = ()
    probe_layer: int | None = None
    probe_every: int = 8
    probe_history: bool = False
    capture_layers: tuple[int, ...] = ()
    # Placeholders for the capability issues (validated, so typos fail early)
    moe_router: str = "topk"
    kv_bits: int = 16
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("moe_router", self.moe_router, MOE_ROUTERS)
        _check_choice("kv_bits", self.kv_bits, KV_BITS)
        _check_range("preemption_margin", self.preemption_margin, 0.0)
        _check_range("max_preemptions_per_request", self.max_preemptions_per_request, 0)
        _check_range("max_preemptions_per_step", self.max_preemptions_per_step, 0)
        _check_range("probe_every", self.probe_every, 1)
        _check_range("trail_preempt_fraction", self.trail_preempt_fraction, 0.0)
        if self.probe_layer is not None:
            _check_range("probe_layer", self.probe_layer, 0)

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ExtConfig":
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ExtConfigError(
                f"unknown vllm_ext setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        if "capture_layers" in data:
            layers = data["capture_layers"]
            if not isinstance(layers, (list, tuple)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
                raise ExtConfigError(f"{flag_name('capture_layers')}: expected a list of "
                                     f"layer indices >= 0, got {layers!r}")
            data["capture_layers"] = tuple(layers)
        if "probe_paths" in data:
            paths = data["probe_paths"]
            data["probe_paths"] = tuple([paths] if isinstance(paths, str) else paths)
        for f in dataclasses.fields(cls):
            if f.name in data and f.name not in ("probe_paths", "capture_layers"):
                data[f.name] = _coerce(f.name, data[f.name], f.default)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        out["probe_paths"] = list(self.probe_paths)
        out["capture_layers"] = list(self.capture_layers)
        return out

    def to_additional_config(self) -> str:
        return json.dumps({CONFIG_KEY: self.to_dict()})

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "ExtConfig":
        extra = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(extra, dict):
            return cls()
        return cls.from_dict(extra.get(CONFIG_KEY))


def _coerce(name: str, value: Any, default: Any) -> Any:
    if value is None and default is None:
        return None
    kind = type(default) if default is not None else int
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ExtConfigError(f"{flag_name(name)}: expected true/false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ExtConfigError(f"{flag_name(name)}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ExtConfigError(f"{flag_name(name)}: expected a number, got {value!r}") from None
        if kind is int:
            if number != int(number):
                raise ExtConfigError(f"{flag_name(name)}: expected an integer, got {value!r}")
            return int(number)
        return number
    return value


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ExtConfigError(
            f"{flag_name(name)}: invalid value {value!r}; choose from {', '.join(map(str, choices))}"
        )


def _check_range(name: str, value: float, low: float) -> None:
    if value < low:
        raise ExtConfigError(f"{flag_name(name)}: must be >= {low}, got {value}")
