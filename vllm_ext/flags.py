"""The ``--ext-*`` flags of `vllm-ext serve`: the argparse group and the `ExtConfig` they build.

Every setting of `vllm_ext.config.ExtConfig` has one flag, ``--ext-`` + its name with dashes
(`vllm_ext.config.flag_name`); a bad value is an `ExtConfigError` naming the flag. Used by
`vllm_ext.cli` (serve) and `vllm_ext.bench.same_server` (a config's live settings).
"""
from __future__ import annotations

import argparse
import os

from vllm_ext.config import (BRANCH_MODES, KV_BITS, KV_PARTITIONS, LAMPS_ADMISSIONS,
                             MOE_ROUTERS, POLICIES, PREEMPT_MODES, SESSION_KEEPS, TOOL_HANDLINGS,
                             TOOL_SYNTAXES, ExtConfig)
from vllm_ext.config import parse_laser_bands
from vllm_ext.server.admin import TOKEN_ENV


def ext_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-ext serve", add_help=False,
        usage="vllm-ext serve [MODEL] [vllm serve flags] [--ext-* flags]")
    g = p.add_argument_group("vllm-ext flags (every other flag goes to `vllm serve`)")
    g.add_argument("--ext-policy", choices=POLICIES, default="fcfs",
                   help="scheduling policy (default fcfs = stock vLLM order)")
    g.add_argument("--ext-preemption-margin", type=float, default=0.0,
                   help="a waiting request preempts only if its remaining + margin < the victim's")
    g.add_argument("--ext-max-preemptions-per-request", type=int, default=4)
    g.add_argument("--ext-max-preemptions-per-step", type=int, default=1)
    g.add_argument("--ext-trail-preempt-fraction", type=float, default=0.8, metavar="C",
                   help="trail: a running request is preemptible only while generated <= "
                        "C x its initial prediction")
    g.add_argument("--ext-no-trail-smoothing", action="store_true",
                   help="trail: use each probe output as is (no Bayesian smoothing)")
    g.add_argument("--ext-trail-tail-factor", type=float, default=ExtConfig.trail_tail_factor,
                   metavar="X", help="trail/spjf starvation bound: a request waiting past X x "
                   "its predicted service time goes first and is not preempted (default 3)")
    g.add_argument("--ext-no-trail-tail-bound", action="store_true",
                   help="trail/spjf: no starvation bound (plain SRPT order)")
    g.add_argument("--ext-no-preemption-cost", action="store_true",
                   help="trail/spjf: do not charge the victim's recompute against a preemption")
    _add_tool_flags(g)
    _add_branch_flags(g)
    g.add_argument("--ext-admin-token", metavar="TOKEN",
                   help="enable POST /v1/ext/admin/config (live policy switch) for callers "
                        "sending 'Authorization: Bearer TOKEN' (or set VLLM_EXT_ADMIN_TOKEN)")
    g.add_argument("--ext-probe", action="append", default=[], metavar="FILE",
                   help="probe file to load into the ProbeWorker (repeatable)")
    g.add_argument("--ext-probe-every", type=int, default=8,
                   help="run probes every k steps (always at the end of prefill)")
    g.add_argument("--ext-probe-history", action="store_true",
                   help="keep every probe value per request (capture/debug)")
    g.add_argument("--ext-moe-router", choices=MOE_ROUTERS, default="topk",
                   help="MoE routing: topk = vLLM's own, laser = load-aware LASER, "
                        "least_loaded = evaluation baseline (docs/laser.md)")
    _add_laser_flags(g)
    _add_telemetry_flags(g)
    g.add_argument("--ext-kv-bits", type=int, choices=KV_BITS, default=16,
                   help="KV cache bits; 8/4/2 = HACK attention on quantized KV (16 = stock)")
    g.add_argument("--ext-kv-partition", type=int, choices=KV_PARTITIONS, default=64,
                   metavar="PI", help="HACK: tokens per K quantization partition "
                                      "(must divide --block-size)")
    return p


def _add_tool_flags(g) -> None:
    d = ExtConfig
    g.add_argument("--ext-tool-handling", choices=TOOL_HANDLINGS, default=d.tool_handling,
                   help="KV of a request paused for a tool call (vllm_xargs ext_tools): keep "
                        "it, free it (recompute on resume), swap it to the disk tier "
                        "(needs --ext-swap-dir), or least waste per call (policy lamps "
                        "implies min_waste; swap is a choice only with the tier)")
    g.add_argument("--ext-preempt-mode", choices=PREEMPT_MODES, default=d.preempt_mode,
                   help="KV of a preempted request: recompute it on return (vLLM's way; the "
                        "prefix cache gives back unevicted blocks) or swap it to the disk "
                        "tier first (needs --ext-swap-dir; docs/lamps_swap.md)")
    g.add_argument("--ext-session-keep", choices=SESSION_KEEPS, default=d.session_keep,
                   help="KV of a finished turn that names a session_id, until the session's "
                        "next turn: vLLM's way (off: freed, the prefix cache may keep it), the "
                        "least waste over the predicted gap (lamps), always pinned (preserve) "
                        "or swapped to the disk tier (swap; needs --ext-swap-dir)")
    g.add_argument("--ext-swap-dir", default=d.swap_dir, metavar="DIR",
                   help="turn on the KV swap tier for paused requests: one slot file per "
                        "worker in DIR (adds --kv-transfer-config for vllm_ext's "
                        "SwapConnector; docs/lamps_swap.md)")
    g.add_argument("--ext-swap-gib", type=float, default=d.swap_gib, metavar="GIB",
                   help="swap tier: disk budget per worker")
    g.add_argument("--ext-swap-depth", type=int, default=d.swap_depth, metavar="N",
                   help="swap tier: disk I/Os in flight (MQSSD knee depth)")
    g.add_argument("--ext-swap-profile", default=d.swap_profile, metavar="FILE",
                   help="swap tier: disk profile JSON from `python -m vllm_ext.swap.disk`; "
                        "its knee depth and throughput replace --ext-swap-depth and the "
                        "transfer-cost prior")
    g.add_argument("--ext-tools", default="", metavar="MODULE:OBJ",
                   help="extra server-side tools: a dict name -> callable(arg) -> str")
    g.add_argument("--ext-tool-latency", default="", metavar="NAME=LAT[,...]",
                   help="simulated tool durations, LAT = S | exp:MEAN | uniform:LO-HI seconds "
                        "(default: the testbed's calc 0.05 s, lookup 0.8 s)")
    g.add_argument("--ext-tool-http-base", default="", metavar="URL",
                   help="loopback base URL of the built-in http tool")
    g.add_argument("--ext-tool-timeout", type=float, default=d.tool_timeout_s, metavar="S",
                   help="a tool call running longer returns an error result")
    g.add_argument("--ext-tool-max-calls", type=int, default=d.tool_max_calls,
                   help="tool calls per request; the request then finishes")
    g.add_argument("--ext-tool-syntax", choices=TOOL_SYNTAXES, default=d.tool_syntax,
                   help="how the model writes a call: testbed <call>name arg</call>, hermes "
                        "<tool_call>{json}</tool_call> (Qwen2.5/Qwen3/Hermes chat with OpenAI "
                        "tools), auto: the first whose closing marker is one token")
    g.add_argument("--ext-lamps-starvation-steps", type=int, default=d.lamps_starvation_steps,
                   help="lamps: a request waiting this many steps goes first")
    g.add_argument("--ext-lamps-admission", choices=LAMPS_ADMISSIONS, default=d.lamps_admission,
                   help="lamps: offer vLLM the waiting head whose prompt fits the free KV "
                        "(vllm) or whose predicted peak, with the running requests' predicted "
                        "growth, fits (peak)")
    g.add_argument("--ext-lamps-preempt", action="store_true",
                   help="lamps: the ranked head of the waiting queue may preempt a running "
                        "request by TRAIL's limited rule (shorter predicted remaining + the "
                        "victim's recompute, victim early in its life); LAMPS itself does not")


def _add_branch_flags(g) -> None:
    d = ExtConfig
    g.add_argument("--ext-branches", choices=BRANCH_MODES, default=d.branches,
                   help="how an n > 1 request runs its branches by default (vllm_xargs "
                        "ext_branches per request): off = vLLM's n samples, sc = "
                        "self-consistency vote, esc = early-stopping sc, duchess = probe-guided "
                        "terminate/duplicate; anything but off loads the correctness probe")
    g.add_argument("--ext-branch-every", type=int, default=d.branch_every, metavar="I",
                   help="duchess: probe round every I generated tokens of a branch")
    g.add_argument("--ext-branch-tau", type=float, default=d.branch_tau,
                   help="duchess: terminate a branch scoring below this ...")
    g.add_argument("--ext-branch-patience", type=int, default=d.branch_patience, metavar="S",
                   help="... for S consecutive rounds")
    g.add_argument("--ext-branch-dup-tau", type=float, default=d.branch_dup_tau,
                   help="duchess: fork a branch scoring at least this (> 1: never)")
    g.add_argument("--ext-branch-max", type=int, default=d.branch_max,
                   help="branches one request may run in all, forks included")
    g.add_argument("--ext-branch-max-tokens", type=int, default=d.branch_max_tokens,
                   help="per-branch token cap (0: the request's max_tokens)")
    g.add_argument("--ext-branch-agree", type=int, default=d.branch_agree,
                   help="stop a request once this many finished branches share an answer")
    g.add_argument("--ext-branch-start", type=int, default=d.branch_start,
                   help="duchess: branches per window, refilled by forks of high scorers "
                        "(0: all n at once)")
    g.add_argument("--ext-branch-esc-window", type=int, default=d.branch_esc_window,
                   help="esc: branches per window; stop after a unanimous window")
    g.add_argument("--ext-branch-answer-regex", default=d.branch_answer_regex, metavar="RE",
                   help="a branch's answer: the last match's first group")


def _add_laser_flags(g) -> None:
    d = ExtConfig  # defaults live in ExtConfig
    g.add_argument("--ext-laser-eps-high", type=float, default=d.laser_eps_high,
                   help="LASER: a token whose top-k gate mass is >= this keeps plain top-k")
    g.add_argument("--ext-laser-entropy-max", type=float, default=d.laser_entropy_max,
                   help="LASER: ... or whose normalised gate entropy is <= this (0 = off)")
    g.add_argument("--ext-laser-pool-threshold", type=float, default=d.laser_pool_threshold,
                   help="LASER: pool = experts with score >= (1 - this) * best score")
    g.add_argument("--ext-laser-pool-max", type=int, default=d.laser_pool_max,
                   help="LASER: pool = at most the top-c experts (0, the default: c = 2 x the router's top-k)")
    g.add_argument("--ext-laser-load-decay", type=float, default=d.laser_load_decay,
                   help="LASER: load window across steps, W = decay * W + tokens this step")
    g.add_argument("--ext-laser-rounds", type=int, default=d.laser_rounds,
                   help="LASER: load updates within one forward pass (exact for <= N tokens)")
    g.add_argument("--ext-laser-bands", action="append", default=[],
                   metavar="BAND:KEY=VALUE[,KEY=VALUE]",
                   help="LASER per-band override, repeatable; bands early/middle/late (thirds "
                        "of the layers), keys eps_high, entropy_max, pool_threshold, pool_max, rounds")
    g.add_argument("--ext-moe-track-load", action="store_true",
                   help="expert-load counters (ext_expert_load RPC) with --ext-moe-router topk too")
    g.add_argument("--ext-moe-ep-devices", type=int, default=d.moe_ep_devices,
                   help="load stats: experts mapped onto N expert-parallel devices")


def _add_telemetry_flags(g) -> None:
    d = ExtConfig
    g.add_argument("--ext-telemetry", action="store_true",
                   help="telemetry in small memory: prefix popularity, top tenants and (with "
                        "--ext-moe-track-load or a load-aware router) per-expert load on "
                        "/metrics and GET /v1/ext/telemetry (docs/telemetry.md)")
    g.add_argument("--ext-telemetry-sketch", choices=("cm", "cs"), default=d.telemetry_sketch,
                   help="telemetry: Count-Min or Count Sketch fragments")
    g.add_argument("--ext-telemetry-depth", type=int, default=d.telemetry_depth,
                   help="telemetry: sketch rows (CM fails with probability e^-depth)")
    for name, what in (("prefix", "prefix fragments in the engine (open + not yet pulled)"),
                       ("history", "prefix fragments pulled into the API server"),
                       ("expert", "per-expert load fragments (API server)"),
                       ("topk", "each top-k tracker over the last W requests")):
        g.add_argument(f"--ext-telemetry-{name}-bytes", type=int, metavar="BYTES",
                       default=getattr(d, f"telemetry_{name}_bytes"),
                       help=f"telemetry: memory of the {what}")
    g.add_argument("--ext-telemetry-window", type=int, default=d.telemetry_window, metavar="W",
                   help="telemetry: top prefixes / tenants over the last W requests")
    g.add_argument("--ext-telemetry-learned", action="store_true",
                   help="telemetry: learned next-arrival filter + Bloom guard in front of the "
                        "top-k (LWCSS; pays off for windows much larger than the tracker)")
    g.add_argument("--ext-telemetry-rho", type=float, default=d.telemetry_rho,
                   help="telemetry: items per counter before a fragment closes")
    g.add_argument("--ext-telemetry-epoch-s", type=float, default=d.telemetry_epoch_s,
                   help="telemetry: longest sub-epoch of a fragment, seconds")
    g.add_argument("--ext-telemetry-prefix-blocks", type=int, default=d.telemetry_prefix_blocks,
                   help="telemetry: a top-k prefix is a request's first N KV blocks")
    g.add_argument("--ext-telemetry-tenant-header", default=d.telemetry_tenant_header,
                   help="telemetry: tenant = this request header, else the body's `user`")
    g.add_argument("--ext-telemetry-hot-prefix", type=int, default=d.telemetry_hot_prefix,
                   metavar="N", help="scheduler hint: waiting requests whose prefix arrived >= N "
                                     "times in the window go first (0 = off)")
    g.add_argument("--ext-telemetry-hot-prefix-wait-steps", type=int,
                   default=d.telemetry_hot_prefix_wait_steps, metavar="S",
                   help="... but never ahead of a request waiting more than S steps (0: no bound)")


def _telemetry_settings(ns: argparse.Namespace) -> dict:
    names = ("sketch", "depth", "prefix_bytes", "history_bytes", "expert_bytes", "topk_bytes",
             "window", "rho", "epoch_s", "prefix_blocks", "tenant_header", "hot_prefix",
             "hot_prefix_wait_steps")
    out = {f"telemetry_{n}": getattr(ns, f"ext_telemetry_{n}") for n in names}
    out.update(telemetry=ns.ext_telemetry, telemetry_learned=ns.ext_telemetry_learned)
    return out


def ext_config_from_args(ns: argparse.Namespace) -> ExtConfig:
    return ExtConfig.from_dict({
        "policy": ns.ext_policy,
        "preemption_margin": ns.ext_preemption_margin,
        "max_preemptions_per_request": ns.ext_max_preemptions_per_request,
        "max_preemptions_per_step": ns.ext_max_preemptions_per_step,
        "trail_preempt_fraction": ns.ext_trail_preempt_fraction,
        "trail_smoothing": not ns.ext_no_trail_smoothing,
        "preemption_cost": not ns.ext_no_preemption_cost,
        "trail_tail_factor": 0.0 if ns.ext_no_trail_tail_bound else ns.ext_trail_tail_factor,
        "live_config": bool(getattr(ns, "ext_admin_token", None) or os.environ.get(TOKEN_ENV)),
        "probe_paths": [os.path.abspath(p) for p in ns.ext_probe],
        "probe_every": ns.ext_probe_every,
        "probe_history": ns.ext_probe_history,
        "moe_router": ns.ext_moe_router,
        "laser_eps_high": ns.ext_laser_eps_high,
        "laser_entropy_max": ns.ext_laser_entropy_max,
        "laser_pool_threshold": ns.ext_laser_pool_threshold,
        "laser_pool_max": ns.ext_laser_pool_max,
        "laser_load_decay": ns.ext_laser_load_decay,
        "laser_rounds": ns.ext_laser_rounds,
        "laser_bands": parse_laser_bands(ns.ext_laser_bands),
        "moe_track_load": ns.ext_moe_track_load,
        "moe_ep_devices": ns.ext_moe_ep_devices,
        "kv_bits": ns.ext_kv_bits,
        "kv_partition": ns.ext_kv_partition,
        "tool_handling": ns.ext_tool_handling,
        "preempt_mode": ns.ext_preempt_mode,
        "session_keep": ns.ext_session_keep,
        "tools": ns.ext_tools,
        "tool_latency": ns.ext_tool_latency,
        "tool_http_base": ns.ext_tool_http_base,
        "tool_timeout_s": ns.ext_tool_timeout,
        "tool_max_calls": ns.ext_tool_max_calls,
        "tool_syntax": ns.ext_tool_syntax,
        "lamps_starvation_steps": ns.ext_lamps_starvation_steps,
        "lamps_admission": ns.ext_lamps_admission,
        "lamps_preempt": ns.ext_lamps_preempt,
        "swap_dir": os.path.abspath(ns.ext_swap_dir) if ns.ext_swap_dir else "",
        "swap_gib": ns.ext_swap_gib,
        "swap_depth": ns.ext_swap_depth,
        "swap_profile": os.path.abspath(ns.ext_swap_profile) if ns.ext_swap_profile else "",
        "branches": ns.ext_branches,
        "branch_every": ns.ext_branch_every,
        "branch_tau": ns.ext_branch_tau,
        "branch_patience": ns.ext_branch_patience,
        "branch_dup_tau": ns.ext_branch_dup_tau,
        "branch_max": ns.ext_branch_max,
        "branch_max_tokens": ns.ext_branch_max_tokens,
        "branch_agree": ns.ext_branch_agree,
        "branch_esc_window": ns.ext_branch_esc_window,
        "branch_start": ns.ext_branch_start,
        "branch_answer_regex": ns.ext_branch_answer_regex,
        **_telemetry_settings(ns),
    })
