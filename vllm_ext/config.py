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
POLICIES = ("fcfs", "oracle", "trail", "spjf", "lamps", "hrrn", "difficulty")
MOE_ROUTERS = ("topk", "laser", "least_loaded")
LASER_BANDS = ("early", "middle", "late")  # thirds of the decoder layers
LASER_BAND_KEYS = {"eps_high": float, "entropy_max": float, "pool_threshold": float,
                   "pool_max": int, "rounds": int}
BRANCH_MODES = ("off", "sc", "esc", "duchess")  # n > 1 requests: vllm_ext/branches
# KV of a request paused for a tool call; "swap" needs the swap tier (swap_dir)
TOOL_HANDLINGS = ("preserve", "discard", "swap", "min_waste")
# how a model writes a tool call (vllm_ext/tools/syntax.py); auto: by the tokenizer's tokens
TOOL_SYNTAXES = ("auto", "testbed", "hermes")
PREEMPT_MODES = ("recompute", "swap")  # a preempted request's KV; "swap" needs swap_dir too
# KV of a finished turn of a client session (session_id) until its follow-up arrives
SESSION_KEEPS = ("off", "lamps", "preserve", "swap")
# lamps: offer vLLM the waiting head whose prompt fits (vLLM's way) or whose predicted peak fits
LAMPS_ADMISSIONS = ("vllm", "peak")
KV_BITS = (16, 8, 4, 2)
KV_PARTITIONS = (32, 64, 128)  # HACK: tokens per K quantization partition
# Settings that may change on a live server between steps (`vllm_ext.server.admin`): the
# scheduler rebuilds its policy, the workers re-read the probe cadence. The others (model
# structure: MoE layers, KV format, which probes are loaded) are fixed at engine start.
LIVE_FIELDS = ("policy", "preemption_margin", "max_preemptions_per_request",
               "max_preemptions_per_step", "trail_preempt_fraction", "trail_smoothing",
               "preemption_cost", "trail_tail_factor", "probe_every", "tool_handling",
               "lamps_starvation_steps", "lamps_admission", "lamps_preempt", "preempt_mode",
               "session_keep")


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
    # trail/spjf: count the victim's recompute (prefill of its tokens so far, at the engine's
    # measured step cost) against a preemption (`vllm_ext.sched.step_cost`)
    preemption_cost: bool = True
    # trail/spjf starvation bound: overdue past this slowdown over the predicted service time
    # (`vllm_ext.sched.trail`); 0 = off
    trail_tail_factor: float = 3.0
    # workers load every probe a live policy switch may need, and run them only while the
    # active policy reads them (set by `vllm-ext serve --ext-admin-token`)
    live_config: bool = False
    # Tool calls inside the server (LAMPS: vllm_ext/tools, vllm_ext/sched/lamps.py)
    tools: str = ""                # module:obj with extra tools (dict name -> callable)
    tool_latency: str = ""         # "calc=0.05,lookup=exp:0.8": simulated API durations
    tool_http_base: str = ""       # loopback base URL of the built-in http tool
    tool_timeout_s: float = 30.0
    tool_max_calls: int = 8
    tool_syntax: str = "auto"      # testbed <call>..</call> | hermes <tool_call>{json}</tool_call>
    # KV of a paused request: keep it, free it (recompute on resume; the prefix cache may
    # hit), or the least waste per call (InferCept's rule); policy lamps implies min_waste
    tool_handling: str = "preserve"
    lamps_starvation_steps: int = 100  # lamps: a request waiting this many steps goes first
    lamps_admission: str = "vllm"      # lamps: "peak" admits by predicted peak KV (admission.py)
    lamps_preempt: bool = False        # lamps: the waiting head may preempt (TRAIL's limited rule)
    # KV of a preempted request (vllm_ext/sched/preempt_swap.py): vLLM's recompute, or saved
    # to the swap tier first and loaded back on its return
    preempt_mode: str = "recompute"
    # KV of a finished turn with a session_id (vllm_ext/sched/sessions.py): vLLM's way (off),
    # the least waste over the predicted gap to the follow-up (lamps), or always pin / swap
    session_keep: str = "off"
    # KV swap tier for paused requests (LAMPS Swap: vllm_ext/swap, docs/lamps_swap.md): a
    # directory turns it on (vllm-ext serve then selects vllm_ext.swap.connector:SwapConnector)
    swap_dir: str = ""
    swap_gib: float = 2.0          # disk budget per worker
    swap_depth: int = 8            # I/Os in flight (the MQSSD knee measured on this machine)
    swap_profile: str = ""         # DiskProfile JSON (python -m vllm_ext.swap.disk): its knee
    #                                depth and MB/s replace swap_depth and the cost prior
    # Multi-branch requests (DUCHESS: vllm_ext/branches, docs/duchess.md). `branches` is the
    # mode of an n > 1 request without vllm_xargs ext_branches; "duchess" (default or any
    # request's) needs the correctness probe, which workers load when this is not "off"
    branches: str = "off"
    branch_every: int = 16         # probe round every i generated tokens per branch
    branch_tau: float = 0.25       # terminate a branch whose P(correct) < tau ...
    branch_patience: int = 2       # ... for S consecutive rounds
    branch_dup_tau: float = 0.9    # fork a branch whose P(correct) >= this (> 1: never)
    branch_max: int = 16           # branches a request may run in all, forks included
    branch_max_tokens: int = 0     # per-branch token cap (0: the request's max_tokens)
    branch_agree: int = 3          # stop once this many finished branches share an answer
    branch_start: int = 4          # duchess: branches per window (0: all n at once)
    branch_esc_window: int = 4     # esc: branches per window; stop at a unanimous window
    branch_answer_regex: str = r"answer:[ \t]*([^\n<]*)"  # last match = a branch's answer
    # Prediction channel (ProbeWorker)
    probe_paths: tuple[str, ...] = ()
    probe_every: int = 8
    probe_history: bool = False
    capture_layers: tuple[int, ...] = ()
    # MoE routing (vllm_ext/moe)
    moe_router: str = "topk"
    # LASER load-aware MoE routing (vllm_ext/moe, docs/laser.md)
    laser_eps_high: float = 0.9        # peaked (plain top-k) when top-k mass >= this
    laser_entropy_max: float = 0.0     # ... or normalised gate entropy <= this (0 = off)
    laser_pool_threshold: float = 0.5  # pool: score >= (1 - this) * best score
    laser_pool_max: int = 0            # pool: at most the top-c experts (0 = 2 x top-k)
    laser_load_decay: float = 0.5      # load window across steps: W = decay * W + counts
    laser_rounds: int = 8              # load updates within one forward pass
    laser_bands: dict[str, dict[str, float]] = field(default_factory=dict, hash=False)
    moe_track_load: bool = False       # expert-load counters with moe_router=topk too
    moe_ep_devices: int = 4            # load stats: experts mapped to this many EP devices
    kv_bits: int = 16
    kv_partition: int = 64
    # Telemetry in small memory (vllm_ext/telemetry, docs/telemetry.md): fragmented sketches
    # (DiSketch) of prefix-block hashes and expert load, learned sliding-window top-k (LWCSS)
    telemetry: bool = False
    telemetry_sketch: str = "cm"          # cm (Count-Min) | cs (Count Sketch)
    telemetry_depth: int = 4              # sketch rows
    telemetry_prefix_bytes: int = 65536   # prefix-block fragments, in the engine
    telemetry_history_bytes: int = 1 << 20  # prefix fragments pulled into the API server
    telemetry_expert_bytes: int = 16384   # per-expert load fragments, in the API server
    telemetry_topk_bytes: int = 16384     # each top-k tracker (prefixes; tenants)
    telemetry_window: int = 1024          # W: top prefixes / tenants over the last W requests
    telemetry_learned: bool = False       # learned next-arrival filter + Bloom guard (LWCSS);
    #                                       off: at W ~ 1k it loses to plain WCSS (measured)
    telemetry_rho: float = 4.0            # items per counter before a fragment closes
    telemetry_epoch_s: float = 10.0       # longest sub-epoch of a fragment
    telemetry_prefix_blocks: int = 4      # a top-k "prefix" = the request's first N blocks
    telemetry_tenant_header: str = "x-tenant"  # tenant = this header, else the body's `user`
    telemetry_hot_prefix: int = 0         # consumer: waiting requests whose prefix was seen
    #                                       >= N times in the window go first (0 = off)
    telemetry_hot_prefix_wait_steps: int = 256  # ... but never ahead of a request waiting
    #                                       longer than this many scheduler steps (0 = no bound)

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("moe_router", self.moe_router, MOE_ROUTERS)
        _check_laser(self)
        _check_choice("kv_bits", self.kv_bits, KV_BITS)
        _check_choice("kv_partition", self.kv_partition, KV_PARTITIONS)
        _check_range("preemption_margin", self.preemption_margin, 0.0)
        _check_range("max_preemptions_per_request", self.max_preemptions_per_request, 0)
        _check_range("max_preemptions_per_step", self.max_preemptions_per_step, 0)
        _check_range("probe_every", self.probe_every, 1)
        _check_range("trail_preempt_fraction", self.trail_preempt_fraction, 0.0)
        _check_range("trail_tail_factor", self.trail_tail_factor, 0.0)
        _check_choice("tool_handling", self.tool_handling, TOOL_HANDLINGS)
        _check_choice("tool_syntax", self.tool_syntax, TOOL_SYNTAXES)
        _check_choice("preempt_mode", self.preempt_mode, PREEMPT_MODES)
        _check_choice("session_keep", self.session_keep, SESSION_KEEPS)
        _check_range("tool_timeout_s", self.tool_timeout_s, 0.001)
        _check_range("tool_max_calls", self.tool_max_calls, 0)
        _check_range("lamps_starvation_steps", self.lamps_starvation_steps, 1)
        _check_choice("lamps_admission", self.lamps_admission, LAMPS_ADMISSIONS)
        _check_range("swap_gib", self.swap_gib, 0.001)
        _check_range("swap_depth", self.swap_depth, 1)
        _check_branches(self)
        _check_telemetry(self)

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ExtConfig":
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
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
        out["probe_paths"] = list(self.probe_paths)
        out["capture_layers"] = list(self.capture_layers)
        return out

    def with_live_changes(self, changes: dict[str, Any]) -> "ExtConfig":
        """This config with `changes` applied; only `LIVE_FIELDS` may change (ExtConfigError
        naming the key otherwise), and the result is validated like a startup config."""
        if not isinstance(changes, dict):
            raise ExtConfigError(f"expected a JSON object of settings, got {changes!r}")
        fixed = sorted(k for k in changes if k not in LIVE_FIELDS)
        if fixed:
            raise ExtConfigError(
                f"setting(s) {', '.join(fixed)} cannot change on a live server (restart with "
                f"the flag instead); live: {', '.join(LIVE_FIELDS)}")
        return ExtConfig.from_dict({**self.to_dict(), **changes}).check_swap()

    def check_swap(self) -> "ExtConfig":
        """Swap handling needs the swap tier (checked by `vllm-ext serve` and on a live change;
        an engine configured otherwise discards instead, logged). Returns self."""
        for key in ("tool_handling", "preempt_mode", "session_keep"):
            if getattr(self, key) == "swap" and not self.swap_dir:
                raise ExtConfigError(f"{flag_name(key)} swap needs the swap tier: start the "
                                     f"server with {flag_name('swap_dir')} DIR")
        return self

    def live_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LIVE_FIELDS}

    def needs_probes(self) -> bool:
        """Whether workers run their probes under this config: explicit probe files, a
        policy that refines on the length probe, or branches the correctness probe guides."""
        return bool(self.probe_paths) or self.policy in ("trail", "lamps", "difficulty") or \
            self.branches != "off"

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


def _check_between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ExtConfigError(f"{flag_name(name)}: must be in [{low}, {high}], got {value}")


def _check_branches(cfg: "ExtConfig") -> None:
    import re

    _check_choice("branches", cfg.branches, BRANCH_MODES)
    for name, low in (("branch_every", 1), ("branch_patience", 1), ("branch_max", 1),
                      ("branch_max_tokens", 0), ("branch_agree", 1), ("branch_start", 0),
                      ("branch_esc_window", 1),
                      ("branch_dup_tau", 0.0)):
        _check_range(name, getattr(cfg, name), low)
    _check_between("branch_tau", cfg.branch_tau, 0.0, 1.0)
    try:
        if re.compile(cfg.branch_answer_regex).groups < 1:
            raise ExtConfigError(f"{flag_name('branch_answer_regex')}: needs one capture group "
                                 f"(the answer), got {cfg.branch_answer_regex!r}")
    except re.error as exc:
        raise ExtConfigError(f"{flag_name('branch_answer_regex')}: {exc}") from None


def _check_telemetry(cfg: "ExtConfig") -> None:
    _check_choice("telemetry_sketch", cfg.telemetry_sketch, ("cm", "cs"))
    _check_between("telemetry_depth", cfg.telemetry_depth, 1, 16)
    for name in ("telemetry_prefix_bytes", "telemetry_expert_bytes", "telemetry_history_bytes"):
        _check_range(name, getattr(cfg, name), 1024)
    _check_range("telemetry_topk_bytes", cfg.telemetry_topk_bytes, 8192 if cfg.telemetry_learned
                 else 512)
    for name, low in (("telemetry_window", 16), ("telemetry_rho", 0.01),
                      ("telemetry_epoch_s", 0.01), ("telemetry_prefix_blocks", 1),
                      ("telemetry_hot_prefix", 0), ("telemetry_hot_prefix_wait_steps", 0)):
        _check_range(name, getattr(cfg, name), low)


def _check_laser(cfg: "ExtConfig") -> None:
    for name in ("laser_eps_high", "laser_entropy_max", "laser_pool_threshold"):
        _check_between(name, getattr(cfg, name), 0.0, 1.0)
    _check_between("laser_load_decay", cfg.laser_load_decay, 0.0, 0.999)
    _check_between("laser_rounds", cfg.laser_rounds, 1, 64)
    _check_range("laser_pool_max", cfg.laser_pool_max, 0)
    _check_range("moe_ep_devices", cfg.moe_ep_devices, 1)
    object.__setattr__(cfg, "laser_bands", _normalise_bands(cfg.laser_bands))


def _normalise_bands(bands: Any) -> dict[str, dict[str, float]]:
    """Validate ``{band: {key: value}}`` per-band LASER overrides; values coerced to their type."""
    flag = flag_name("laser_bands")
    if not isinstance(bands, dict):
        raise ExtConfigError(f"{flag}: expected {{band: {{key: value}}}}, got {bands!r}")
    out: dict[str, dict[str, float]] = {}
    for band, values in bands.items():
        _check_choice("laser_bands", band, LASER_BANDS)
        if not isinstance(values, dict):
            raise ExtConfigError(f"{flag}: {band}: expected {{key: value}}, got {values!r}")
        for key in values:
            _check_choice("laser_bands", key, tuple(LASER_BAND_KEYS))
        out[band] = {key: _coerce("laser_bands", value, LASER_BAND_KEYS[key](0))
                     for key, value in values.items()}
        for key, value in out[band].items():
            _check_band_value(band, key, value)
    return out


def _check_band_value(band: str, key: str, value: float) -> None:
    low, high = {"pool_max": (0, 1 << 30), "rounds": (1, 64)}.get(key, (0.0, 1.0))
    if not low <= value <= high:
        raise ExtConfigError(f"{flag_name('laser_bands')}: {band}.{key} must be in "
                             f"[{low}, {high}], got {value}")


def parse_laser_bands(items: list[str]) -> dict[str, dict[str, str]]:
    """``["early:eps_high=0.8,pool_max=3", ...]`` (the CLI form) -> ``{"early": {...}}``."""
    bands: dict[str, dict[str, str]] = {}
    for item in items:
        band, sep, body = item.partition(":")
        pairs = [p.partition("=") for p in body.split(",") if p]
        if not sep or not pairs or any(not eq for _, eq, _ in pairs):
            raise ExtConfigError(f"{flag_name('laser_bands')}: expected BAND:KEY=VALUE[,KEY=VALUE], "
                                 f"got {item!r}")
        bands.setdefault(band.strip(), {}).update({k.strip(): v.strip() for k, _, v in pairs})
    return bands
