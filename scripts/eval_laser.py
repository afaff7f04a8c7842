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
    .venv/bin/python scripts/eval_laser.py --model tiny-moe-finegrained --val-tasks 100 --tasks 200 \
        --sweep --out docs/laser_eval_finegrained    # thresholds chosen on validation, held-out report

``--model`` takes an embedded model's name (``tiny-moe-reasoner``, ``tiny-moe-finegrained``) or a
path. With ``--val-tasks N`` each engine first solves N validation tasks (``--val-seed``), then
the held-out ones (``--tasks``/``--seed``, a different seed: disjoint draws); the ``chosen``
setting is the laser setting with the lowest validation per-step imbalance whose validation
accuracy is within ``--max-acc-drop`` of top-k's, and the table reports every setting on the
held-out tasks. ``--sweep`` adds a threshold grid whose pool is 2k experts wide (the engine's
default, ``pool_max`` 0, is 2k too; an absolute 4 equals k on a top-4 router). Each engine also reports
per-device load for 2/4/8-way expert parallelism, and an EP MoE step-time estimate from a
measured per-expert cost (``ep_estimate``, an estimate, nothing ran on several devices).
``--gate-stats`` prints the trained gates' score distribution (HF transformers, teacher-forced).
"""
from __future__ import annotations

import argparse
import json
import math
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
EP_SIZES = (2, 4, 8)


def sweep_settings(top_k: int) -> dict[str, dict]:
    """Threshold grid with a 2k-wide pool (``--sweep``), plus least-loaded over the same pool."""
    grid = {"least_loaded-w": {"moe_router": "least_loaded", "laser_pool_max": 2 * top_k}}
    for eps in (0.5, 0.7, 0.9):
        for tau in (0.3, 0.5, 0.7):
            grid[f"laser-w-e{eps}-t{tau}"] = {"moe_router": "laser", "laser_eps_high": eps,
                                             "laser_pool_threshold": tau,
                                             "laser_pool_max": 2 * top_k}
    return grid


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


def set_routing(worker, ext: dict) -> int:
    """Worker RPC (a callable, eager engines only): give every vllm-ext MoE layer the routing of
    ``ext`` (``topk`` = vLLM's routing, counted); returns the number of layers changed."""
    from vllm_ext.config import ExtConfig
    from vllm_ext.moe.router import ExtRouting, laser_params, layer_band

    cfg = ExtConfig.from_dict(ext)
    model = worker.model_runner.get_model()
    hf = worker.vllm_config.model_config.hf_text_config
    changed = 0
    for name, module in model.named_modules():
        routing = getattr(getattr(module, "router", None), "__dict__", {}).get("_compute_routing")
        if isinstance(routing, ExtRouting):
            band = layer_band(getattr(module, "layer_name", name), hf.num_hidden_layers)
            routing.params = None if cfg.moe_router == "topk" else laser_params(cfg, band)
            routing.load.decay = cfg.laser_load_decay
            changed += 1
    return changed


def run_setting(job: dict) -> dict:
    """One engine; each of ``job["settings"]`` in turn (switched by `set_routing` when there
    are several), validation split then held-out split; {setting: result}."""
    from vllm import LLM

    from vllm_ext.testbed.tasks import check_answer, generate_tasks, prompt_text

    settings = job["settings"]
    shared = len(settings) > 1
    engine_ext = {"moe_router": "laser", "moe_track_load": True} if shared else next(iter(settings.values()))
    llm = LLM(model=job["model"], dtype="bfloat16", seed=0, enforce_eager=not job["compiled"],
              max_num_seqs=job["batch"], max_model_len=2048, enable_prefix_caching=False,
              worker_cls="vllm_ext.worker.probe_worker.ProbeWorker",
              additional_config={"vllm_ext": engine_ext})
    rpc = lambda **kw: llm.collective_rpc("ext_expert_load", kwargs=kw)[0]  # noqa: E731
    val = generate_tasks(job["val_tasks"], seed=job["val_seed"]) if job.get("val_tasks") else []
    tasks = generate_tasks(job["tasks"], seed=job["seed"])
    results = {}
    for name, ext in settings.items():
        if shared:
            assert llm.collective_rpc(set_routing, args=(ext,))[0] > 0, "no vllm-ext MoE layers"
        out = {}
        if val:  # validation split first, counters read and reset in between
            rpc(reset=True)
            texts = solve(llm, val, job["max_tokens"])
            out["val"] = {"correct": [check_answer(t, x) for t, x in zip(val, texts)],
                          "load": rpc(reset=True, ep_devices=job["ep_devices"])}
        rpc(reset=True)  # drop warm-up/profile passes
        t0 = time.perf_counter()
        texts = solve(llm, tasks, job["max_tokens"])
        wall = time.perf_counter() - t0
        ep = {n: rpc(ep_devices=n) for n in EP_SIZES if n != job["ep_devices"]}
        load = rpc(reset=True, ep_devices=job["ep_devices"])
        ep[job["ep_devices"]] = load
        step_ms = decode_step_ms(llm, [prompt_text(t) for t in tasks[:job["batch"]]],
                                 job["decode_steps"])
        results[name] = {
            "texts": texts, "correct": [check_answer(t, x) for t, x in zip(tasks, texts)],
            "load": load, "decode_step_ms": step_ms, "solve_s": wall, **out,
            "ep": {str(n): {"summary": r["summary"],
                            "layers": [{k: l[k] for k in ("tokens", "steps")} for l in r["layers"]],
                            "layer_device_step": [l["device_step_max_over_mean"] for l in r["layers"]]}
                   for n, r in sorted(ep.items())}}
        print(f"[{name}] done", file=sys.stderr, flush=True)
    return results


# ---- the sweep -----------------------------------------------------------------------------------

def run_in_subprocess(job: dict) -> dict:
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # set_routing is a callable
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("EVAL_RESULT "):
            return json.loads(line[len("EVAL_RESULT "):])
    raise RuntimeError(f"{job['name']} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def table(results: dict[str, dict]) -> str:
    base = results.get("topk")
    head = (f"{'setting':<22}{'val acc':>8}{'acc':>6}{'agree':>7}{'step max/mean':>14}{'total max/mean':>15}"
            f"{'cv':>6}{'EP step max/mean':>17}{'moved':>7}{'step ms':>9}{'x topk':>7}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        s = r["load"]["summary"]
        agree = (sum(a == b for a, b in zip(r["texts"], base["texts"])) / len(r["texts"])
                 if base else float("nan"))
        ratio = r["decode_step_ms"] / base["decode_step_ms"] if base else float("nan")
        val = acc(r["val"]["correct"]) if "val" in r else float("nan")
        rows.append(f"{name:<22}{val:>8.3f}{acc(r['correct']):>6.3f}{agree:>7.2f}"
                    f"{s['step_max_over_mean']:>14.3f}{s['max_over_mean']:>15.3f}{s['cv']:>6.3f}"
                    f"{s['device_step_max_over_mean']:>17.3f}{s['moved_fraction']:>7.3f}"
                    f"{r['decode_step_ms']:>9.2f}{ratio:>7.2f}")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path, ep_devices: int, chosen: str | None = None,
         title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(results) > 6  # a legend instead of labels next to the points
    fig, axes = plt.subplots(1, 2, figsize=(12 if many else 10, 4.5), sharey=True)
    panels = [("step_max_over_mean", "per-step expert imbalance (max/mean)"),
              ("device_step_max_over_mean", f"per-step EP imbalance, {ep_devices} devices")]
    markers = "os^vD<>ph*Xd"
    for ax, (key, label) in zip(axes, panels):
        for i, (name, r) in enumerate(results.items()):
            x = r["load"]["summary"][key]
            y = acc(r["correct"])
            tag = name + (" (chosen on val.)" if name == chosen else "")
            ax.scatter([x], [y], s=90 if name == chosen else 40, marker=markers[i % len(markers)],
                       label=tag, edgecolors="k" if name == chosen else "none")
            if not many:
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4 + 11 * i),
                            fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("task accuracy (held-out)")
    if many:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "LASER on the testbed: accuracy vs expert-load imbalance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- validation choice, EP estimate, gate statistics ---------------------------------------------

def acc(correct: list) -> float:
    return sum(correct) / max(1, len(correct))


def choose(results: dict[str, dict], max_drop: float) -> str | None:
    """The laser setting with the lowest validation per-step imbalance within ``max_drop`` of
    top-k's validation accuracy (None without a validation split or when none qualifies)."""
    if "topk" not in results or "val" not in results["topk"]:
        return None
    floor = acc(results["topk"]["val"]["correct"]) - max_drop - 1e-9
    ok = [(r["val"]["load"]["summary"]["step_max_over_mean"], n) for n, r in results.items()
          if n.startswith("laser") and acc(r["val"]["correct"]) >= floor]
    return min(ok)[1] if ok else None


def expert_cost(hidden: int, inter: int, sizes=(1, 4, 16, 64, 256), repeats: int = 30):
    """(a ms, b ms/token): one expert MLP (bf16, 1 thread) timed at several token counts,
    least-squares line; the per-expert cost the EP estimate uses."""
    import statistics

    import torch
    torch.set_num_threads(1)
    w1 = torch.randn(hidden, 2 * inter, dtype=torch.bfloat16)
    w2 = torch.randn(inter, hidden, dtype=torch.bfloat16)

    def mlp(x):
        g, u = (x @ w1).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ w2
    xs, ys = [], []
    for n in sizes:
        x = torch.randn(n, hidden, dtype=torch.bfloat16)
        for _ in range(5):
            mlp(x)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mlp(x)
            samples.append((time.perf_counter() - t0) * 1000)
        xs.append(n)
        ys.append(statistics.median(samples))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - b * mx), b


def ep_estimate(result: dict, cost: tuple[float, float], num_experts: int, top_k: int) -> dict:
    """Estimated routed-expert time per step on the busiest of N EP devices (ms, sum over layers):
    a * (experts per device) + b * (busiest device's token-expert pairs), the busiest device's
    pairs = per-step device max/mean x mean pairs per device. An estimate, not a measurement."""
    a, b = cost
    out = {}
    for n, rep in result["ep"].items():
        n = int(n)
        total = 0.0
        for layer, full in zip(rep["layers"], rep["layer_device_step"]):
            mean_pairs = layer["tokens"] * top_k / max(1, layer["steps"]) / n
            total += a * math.ceil(num_experts / n) + b * full * mean_pairs
        out[str(n)] = total
    return out


def gate_stats(model: str, tasks, top_k: int, max_tasks: int = 60) -> dict:
    """Distribution of the trained gates' softmax over teacher-forced prompt + target text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ext.testbed.tasks import prompt_text

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    per_layer: dict[int, list] = {}
    with torch.no_grad():
        for t in tasks[:max_tasks]:
            ids = tok(prompt_text(t) + t.target, return_tensors="pt", add_special_tokens=False)
            out = hf(**ids, output_router_logits=True)
            for i, logits in enumerate(out.router_logits):
                per_layer.setdefault(i, []).append(torch.softmax(logits.float(), -1))
    stats = []
    for i, rows in sorted(per_layer.items()):
        p = torch.cat(rows)
        num_experts = p.shape[-1]
        top = p.topk(min(2 * top_k, num_experts), dim=-1).values
        mass = top[:, :top_k].sum(-1)
        ent = -(p * p.clamp_min(1e-20).log()).sum(-1) / math.log(num_experts)
        q = lambda x: [round(float(v), 3) for v in torch.quantile(x, torch.tensor([.1, .5, .9]))]  # noqa: E731
        stats.append({
            "layer": i, "tokens": p.shape[0], "topk_mass_q10_50_90": q(mass),
            "top1_q10_50_90": q(top[:, 0]), "norm_entropy_q10_50_90": q(ent),
            "kth_over_top1_median": round(float((top[:, top_k - 1] / top[:, 0]).median()), 3),
            "next_over_top1_median": round(float((top[:, top_k] / top[:, 0]).median()), 3),
            "flat_at_eps": {str(e): round(float((mass < e).float().mean()), 3)
                            for e in (0.5, 0.7, 0.9)},
            "pool_size_tau0.5_of_2k": round(float((top >= 0.5 * top[:, :1]).sum(-1).float().mean()), 2),
        })
    return {"layers": stats, "top_k": top_k, "experts": int(p.shape[-1])}


def print_gate_stats(g: dict) -> None:
    print(f"gate scores ({g['experts']} experts, top-{g['top_k']}; quantiles q10/q50/q90):")
    for s in g["layers"]:
        print(f"  layer {s['layer']}: top-k mass {s['topk_mass_q10_50_90']} top-1 {s['top1_q10_50_90']} "
              f"entropy/logE {s['norm_entropy_q10_50_90']} p_k/p_1 {s['kth_over_top1_median']} "
              f"p_(k+1)/p_1 {s['next_over_top1_median']} flat at eps {s['flat_at_eps']} "
              f"pool(tau .5, top-2k) {s['pool_size_tau0.5_of_2k']}")


def ep_table(results: dict[str, dict], est: dict[str, dict]) -> str:
    head = f"{'setting':<22}" + "".join(f"{f'EP{n} step max/mean':>19}" for n in EP_SIZES) + \
        "".join(f"{f'est EP{n} ms':>12}" for n in EP_SIZES) + f"{'x topk (EP4 est)':>18}"
    rows = [head, "-" * len(head)]
    base = est.get("topk", {}).get("4")
    for name, r in results.items():
        dev = [r["ep"][str(n)]["summary"]["device_step_max_over_mean"] for n in EP_SIZES]
        e = [est[name][str(n)] for n in EP_SIZES]
        rows.append(f"{name:<22}" + "".join(f"{d:>19.3f}" for d in dev) + "".join(f"{x:>12.3f}" for x in e)
                    + f"{(e[1] / base if base else float('nan')):>18.2f}")
    return "\n".join(rows)


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
    p.add_argument("--model", default=None,
                   help="embedded model name (tiny-moe-reasoner, tiny-moe-finegrained) or path")
    p.add_argument("--val-tasks", type=int, default=0, help="validation tasks (threshold choice)")
    p.add_argument("--val-seed", type=int, default=4321)
    p.add_argument("--max-acc-drop", type=float, default=0.01,
                   help="chosen setting: validation accuracy within this of top-k's")
    p.add_argument("--sweep", action="store_true", help="add the 2k-wide-pool threshold grid")
    p.add_argument("--engine-per-setting", action="store_true",
                   help="a fresh engine per setting (default in eager: one engine, switched)")
    p.add_argument("--gate-stats", action="store_true", help="gate-score distribution (HF)")
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
        plot(saved["results"], out.with_suffix(".png"), saved["meta"]["args"]["ep_devices"],
             saved["meta"].get("chosen"), f"LASER on {Path(saved['meta']['model']).name}")
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
    from transformers import AutoConfig

    from vllm_ext.testbed.model import resolve_model
    from vllm_ext.testbed.tasks import generate_tasks
    model = resolve_model(args.model)
    cfg = AutoConfig.from_pretrained(model)
    top_k = cfg.num_experts_per_tok
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    settings = {**SETTINGS, **(sweep_settings(top_k) if args.sweep else {})}
    gates = None
    if args.gate_stats:
        gates = gate_stats(model, generate_tasks(max(60, args.val_tasks), seed=args.val_seed), top_k)
        print_gate_stats(gates)
    names = args.only.split(",") if args.only else list(settings)
    cost = expert_cost(cfg.hidden_size, inter)
    print(f"per-expert MLP cost (bf16, 1 thread): {cost[0]:.4f} ms + {cost[1] * 1000:.3f} us/token")
    results = {}
    # eager: one engine, settings switched between runs (set_routing); compiled graphs bake the
    # routing in, so there (or with --engine-per-setting) each setting gets its own engine
    groups = ([names] if not (args.compiled or args.engine_per_setting) else [[n] for n in names])
    for group in groups:
        job = {"name": ",".join(group), "model": model, "settings": {n: settings[n] for n in group},
               "tasks": args.tasks, "seed": args.seed, "max_tokens": args.max_tokens,
               "batch": args.batch, "decode_steps": args.decode_steps, "ep_devices": args.ep_devices,
               "compiled": args.compiled, "val_tasks": args.val_tasks, "val_seed": args.val_seed}
        t0 = time.time()
        results.update(run_in_subprocess(job))
        print(f"[{job['name']}] done in {time.time() - t0:.0f} s", flush=True)
    chosen = choose(results, args.max_acc_drop)
    est = {n: ep_estimate(r, cost, num_experts, top_k) for n, r in results.items()}
    print(f"model {model} ({num_experts} experts, top-{top_k}); held-out {args.tasks} tasks seed "
          f"{args.seed}; validation {args.val_tasks} tasks seed {args.val_seed}; batch {args.batch}; "
          f"{'compiled' if args.compiled else 'eager'}; EP devices {args.ep_devices}")
    print(table(results))
    print(f"chosen on validation (acc within {args.max_acc_drop} of topk, lowest step max/mean): "
          f"{chosen} {settings.get(chosen, '')}")
    print("expert parallelism, held-out (est = estimated routed-expert ms per step on the busiest "
          "device, from the measured per-expert cost; not measured on devices):")
    print(ep_table(results, est))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "args": vars(args), "settings": {n: settings[n] for n in names},
            "chosen": chosen, "expert_cost_ms": cost, "ep_estimate_ms": est, "gate_stats": gates}
    compact = {n: {k: v for k, v in r.items() if k != "texts"} for n, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": compact}, indent=1))
    plot(results, out.with_suffix(".png"), args.ep_devices, chosen, f"LASER on {Path(model).name}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
