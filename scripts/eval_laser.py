#!/usr/bin/env python
"""Evaluate LASER (arXiv 2510.03293) on the testbed: accuracy vs expert-load imbalance, and cost.

For each router setting (``topk`` with load tracking, ``least_loaded``, ``laser`` over a small
threshold sweep) one vLLM engine (``LLM`` with ``worker_cls=ProbeWorker`` and
``additional_config={"vllm_ext": ...}``, each in its own subprocess) runs the testbed task suite
greedily, with the tool loop (a ``<call>...</call>`` is answered by ``run_tool`` and generation
continues), then reads the expert-load counters through ``ProbeWorker.ext_expert_load``. A
second phase times decode steps: a fixed batch, ``ignore_eos``, (t(1+N tokens) - t(1 token)) / N.

Prints a table, writes ``<out>.json`` and ``<out>.png`` (accuracy vs per-step imbalance,
per expert and per expert-parallel device). ``agree`` = share of tasks whose completion equals
the ``topk`` one (what LASER changed; meaningful even for an untrained model).

    .venv/bin/python scripts/eval_laser.py                      # default sweep, eager, CPU
    .venv/bin/python scripts/eval_laser.py --compiled --only topk,laser-b
    .venv/bin/python scripts/eval_laser.py --routing-bench      # routing function alone, CPU + CUDA
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> additional_config["vllm_ext"]
    "topk": {"moe_router": "topk", "moe_track_load": True},
    "least_loaded": {"moe_router": "least_loaded", "laser_pool_max": 4},
    "laser": {"moe_router": "laser"},  # the engine's defaults (eps_high 0.9, pool 0.5)
    "laser-a": {"moe_router": "laser", "laser_eps_high": 0.6, "laser_pool_threshold": 0.3},
    "laser-b": {"moe_router": "laser", "laser_eps_high": 0.8, "laser_pool_threshold": 0.5},
    "laser-c": {"moe_router": "laser", "laser_eps_high": 0.95, "laser_pool_threshold": 0.8},
}


# ---- one engine (runs in a subprocess) -----------------------------------------------------------

def solve(llm, tasks, max_tokens: int, max_calls: int = 4) -> list[str]:
    """Greedy completions with the tool loop; returns each task's assistant text."""
    from vllm import SamplingParams

    from vllm_ext.testbed.tasks import (CALL_CLOSE, RESULT_CLOSE, RESULT_OPEN, pending_call,
                                        prompt_text, run_tool)

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=[CALL_CLOSE],
                            include_stop_str_in_output=True)
    outputs, active = [""] * len(tasks), list(range(len(tasks)))
    for turn in range(max_calls + 1):
        prompts = [prompt_text(tasks[i]) + outputs[i] for i in active]
        results = llm.generate(prompts, params, use_tqdm=False)
        still = []
        for i, result in zip(active, results):
            outputs[i] += result.outputs[0].text
            call = pending_call(outputs[i])
            if call and turn < max_calls:
                outputs[i] += RESULT_OPEN + run_tool(call) + RESULT_CLOSE
                still.append(i)
        active = still
        if not active:
            break
    return outputs


def decode_step_ms(llm, prompts: list[str], steps: int, repeats: int = 2) -> float:
    from vllm import SamplingParams

    def timed(n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        return best
    timed(2)  # warm-up
    return (timed(1 + steps) - timed(1)) / steps * 1000


def run_setting(job: dict) -> dict:
    from vllm import LLM

    from vllm_ext.testbed.tasks import check_answer, generate_tasks, prompt_text

    llm = LLM(model=job["model"], dtype="bfloat16", seed=0, enforce_eager=not job["compiled"],
              max_num_seqs=job["batch"], max_model_len=2048, enable_prefix_caching=False,
              worker_cls="vllm_ext.worker.probe_worker.ProbeWorker",
              additional_config={"vllm_ext": job["ext"]})
    rpc = lambda **kw: llm.collective_rpc("ext_expert_load", kwargs=kw)[0]  # noqa: E731
    tasks = generate_tasks(job["tasks"], seed=job["seed"])
    rpc(reset=True)  # drop warm-up/profile passes
    t0 = time.perf_counter()
    texts = solve(llm, tasks, job["max_tokens"])
    wall = time.perf_counter() - t0
    load = rpc(reset=True, ep_devices=job["ep_devices"])
    step_ms = decode_step_ms(llm, [prompt_text(t) for t in tasks[:job["batch"]]],
                             job["decode_steps"])
    return {"texts": texts, "correct": [check_answer(t, x) for t, x in zip(tasks, texts)],
            "load": load, "decode_step_ms": step_ms, "solve_s": wall}


# ---- the sweep -----------------------------------------------------------------------------------

def run_in_subprocess(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                          capture_output=True, text=True, env={**os.environ})
    for line in proc.stdout.splitlines():
        if line.startswith("EVAL_RESULT "):
            return json.loads(line[len("EVAL_RESULT "):])
    raise RuntimeError(f"{job['name']} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def table(results: dict[str, dict]) -> str:
    base = results.get("topk")
    head = (f"{'setting':<13}{'acc':>6}{'agree':>7}{'step max/mean':>14}{'total max/mean':>15}"
            f"{'cv':>6}{'EP step max/mean':>17}{'moved':>7}{'step ms':>9}{'x topk':>7}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        s = r["load"]["summary"]
        agree = (sum(a == b for a, b in zip(r["texts"], base["texts"])) / len(r["texts"])
                 if base else float("nan"))
        ratio = r["decode_step_ms"] / base["decode_step_ms"] if base else float("nan")
        rows.append(f"{name:<13}{sum(r['correct']) / len(r['correct']):>6.3f}{agree:>7.2f}"
                    f"{s['step_max_over_mean']:>14.3f}{s['max_over_mean']:>15.3f}{s['cv']:>6.3f}"
                    f"{s['device_step_max_over_mean']:>17.3f}{s['moved_fraction']:>7.3f}"
                    f"{r['decode_step_ms']:>9.2f}{ratio:>7.2f}")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path, ep_devices: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [("step_max_over_mean", "per-step expert imbalance (max/mean)"),
              ("device_step_max_over_mean", f"per-step EP imbalance, {ep_devices} devices")]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, r) in enumerate(results.items()):
            x = r["load"]["summary"][key]
            y = sum(r["correct"]) / len(r["correct"])
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 + 11 * i),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task accuracy")
    fig.suptitle("LASER on the testbed: accuracy vs expert-load imbalance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- routing function micro-benchmark -------------------------------------------------------------

def routing_bench(device: str, tokens_list=(1, 32, 256, 2048, 8192),
                  repeats: int = 50) -> list[dict]:
    """Median time of one call: laser_topk (eager, torch.compile) vs plain softmax top-k."""
    import statistics

    import torch

    from vllm_ext.moe.laser import LaserParams, laser_topk

    def plain(logits, k):
        weights, ids = torch.softmax(logits.float(), -1).topk(k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids.int()

    def clock(fn, *args):
        for _ in range(3):
            fn(*args)
        samples = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(*args)
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6

    params = LaserParams()
    compiled = torch.compile(laser_topk, dynamic=True)
    rows = []
    for experts, k in ((8, 2), (64, 6)):
        for tokens in tokens_list:
            logits = torch.randn(tokens, experts, device=device, dtype=torch.bfloat16)
            load = torch.rand(experts, device=device) * 100
            rows.append({"device": device, "experts": experts, "k": k, "tokens": tokens,
                         "topk_us": clock(plain, logits, k),
                         "laser_us": clock(laser_topk, logits, k, load, params),
                         "laser_compiled_us": clock(compiled, logits, k, load, params)})
    return rows


def print_bench(rows: list[dict]) -> None:
    print(f"{'device':<7}{'E':>4}{'k':>3}{'tokens':>8}{'topk us':>10}{'laser us':>10}"
          f"{'compiled us':>13}{'compiled/topk':>15}")
    for r in rows:
        print(f"{r['device']:<7}{r['experts']:>4}{r['k']:>3}{r['tokens']:>8}{r['topk_us']:>10.1f}"
              f"{r['laser_us']:>10.1f}{r['laser_compiled_us']:>13.1f}"
              f"{r['laser_compiled_us'] / r['topk_us']:>15.2f}")


# ---- main ------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded testbed model")
    p.add_argument("--tasks", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--batch", type=int, default=32, help="max_num_seqs (and decode batch)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--ep-devices", type=int, default=4)
    p.add_argument("--compiled", action="store_true", help="torch.compile (default: eager)")
    p.add_argument("--only", default=None, help=f"comma list from {','.join(SETTINGS)}")
    p.add_argument("--out", default=str(ROOT / "docs" / "laser_eval"))
    p.add_argument("--routing-bench", action="store_true",
                   help="micro-benchmark the routing function alone (CPU; CUDA if present)")
    p.add_argument("--replot", action="store_true", help="redraw <out>.png from <out>.json")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.job:
        print("EVAL_RESULT " + json.dumps(run_setting(json.loads(args.job))), flush=True)
        return
    out = Path(args.out)
    if args.replot:
        saved = json.loads(out.with_suffix(".json").read_text())
        plot(saved["results"], out.with_suffix(".png"), saved["meta"]["args"]["ep_devices"])
        return
    if args.routing_bench:
        import torch
        torch.set_num_threads(1)  # a shared 2-core box: more threads only measure contention
        rows = routing_bench("cpu", tokens_list=(1, 32, 256, 2048), repeats=20)
        if torch.cuda.is_available():
            rows += routing_bench("cuda")
        else:
            print("CUDA micro-benchmark skipped: no CUDA device")
        print_bench(rows)
        return

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm_ext.testbed.model import default_model_path
    model = args.model or default_model_path()
    names = args.only.split(",") if args.only else list(SETTINGS)
    results = {}
    for name in names:
        job = {"name": name, "model": model, "ext": SETTINGS[name], "tasks": args.tasks,
               "seed": args.seed, "max_tokens": args.max_tokens, "batch": args.batch,
               "decode_steps": args.decode_steps, "ep_devices": args.ep_devices,
               "compiled": args.compiled}
        t0 = time.time()
        results[name] = run_in_subprocess(job)
        print(f"[{name}] done in {time.time() - t0:.0f} s", flush=True)
    print(f"model {model}; {args.tasks} tasks seed {args.seed}; batch {args.batch}; "
          f"{'compiled' if args.compiled else 'eager'}; EP devices {args.ep_devices}")
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "args": vars(args), "settings": {n: SETTINGS[n] for n in names}}
    compact = {n: {k: v for k, v in r.items() if k != "texts"} for n, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": compact}, indent=1))
    plot(results, out.with_suffix(".png"), args.ep_devices)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
