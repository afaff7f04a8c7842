"""`vllm-ext train-probe --kind length|correctness --model PATH [--prompts FILE] --out FILE`.

Collects hidden states through vLLM (capture mode), sweeps the layers and writes the probe
file (bound to the model's fingerprint) plus a JSON report next to it.
* ``length`` (TRAIL): trains the length probe and the prompt-only baseline, prints the MAE table.
* ``correctness`` (DUCHESS, `probes.correctness`): samples ``--branches`` completions of each
  tool-free testbed task (difficulty 2-3 by default) at ``--temperature``, labels them with the
  testbed checker, trains linear and MLP probes on the rows every ``--every`` tokens (default
  16) and prints the held-out AUROC per layer and per position.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="vllm-ext train-probe")
    p.add_argument("--kind", choices=("length", "correctness"), required=True)
    p.add_argument("--model", help="model path or name (default: the embedded model)")
    p.add_argument("--prompts", help="JSONL with a 'prompt' field (default: testbed tasks)")
    p.add_argument("--num-prompts", type=int,
                   help="testbed prompts to use (default: 1200 length, 300 correctness)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="probe file to write, or a folder: then <kind>-<model fingerprint>.pt "
                        "inside it (the name `--ext-policy trail` looks for in assets/probes)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to sweep (default: all)")
    p.add_argument("--arch", choices=("linear", "mlp"),
                   help="default: mlp (length); the better of both on validation (correctness)")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--bin-mode", choices=("quantile", "equal"), default="quantile")
    p.add_argument("--every", type=int, help="length: refinement period for the MAE table "
                   "(default 8); correctness: probe period in tokens (default 16)")
    c = p.add_argument_group("correctness")
    c.add_argument("--branches", type=int, default=8, help="samples per prompt")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--difficulties", type=int, nargs="+", default=[2, 3])
    c.add_argument("--task-kinds", nargs="+", help="testbed kinds (default: the tool-free ones)")
    c.add_argument("--batch", type=int, default=128, help="requests per generate call")
    c.add_argument("--max-seconds", type=float,
                   help="stop starting new prompts after this long (collection only)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--dataset", help="cache file for the collected hidden states")
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args(argv)
    if args.bins < 2:
        p.error("--bins must be >= 2")
    if args.kind == "correctness":
        if args.prompts:
            p.error("--prompts: --kind correctness labels branches with the testbed checker, "
                    "so it samples testbed tasks (--num-prompts, --difficulties, --task-kinds)")
        if (args.every or 16) < 1 or args.branches < 1:
            p.error("--every and --branches must be >= 1")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoConfig

    from vllm_ext.probes.base import model_fingerprint, save_probe
    from vllm_ext.probes.collect import LengthDataset, collect, read_prompts, testbed_prompts
    from vllm_ext.probes.length import train_length_probe
    from vllm_ext.testbed.model import default_model_path

    model = args.model or default_model_path()
    config = AutoConfig.from_pretrained(model)
    layers = args.layers or list(range(config.num_hidden_layers))
    if args.kind == "correctness":
        return train_correctness(args, model, config, layers)
    args.every = args.every or 8
    args.arch = args.arch or "mlp"
    args.num_prompts = args.num_prompts or 1200
    if args.dataset and Path(args.dataset).exists():
        data = LengthDataset.load(args.dataset)
        print(f"loaded {len(data.output_len)} requests from {args.dataset}")
    else:
        prompts = read_prompts(args.prompts) if args.prompts else testbed_prompts(
            args.num_prompts, args.seed)
        data = collect(model, prompts, layers, max_tokens=args.max_tokens,
                       enforce_eager=args.enforce_eager)
        if args.dataset:
            data.save(args.dataset)
    fingerprint = model_fingerprint(config, model)
    probe, report = train_length_probe(data, fingerprint, args.arch, args.bins,
                                       args.bin_mode, args.every, args.seed)
    out = Path(args.out)
    if out.is_dir():
        out = out / f"{args.kind}-{fingerprint}.pt"
    save_probe(out, probe)
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2))
    mae = report["mae"]
    print(f"\nbest layer {report['best_layer']}; validation MAE (tokens) over "
          f"{report['n_val_requests']} held-out requests:")
    for name, value in mae.items():
        print(f"  {name:<24}{value:8.1f}")
    print(f"prompt-only / per-step probe MAE ratio: {mae['prompt_only'] / mae['per_step_probe']:.2f}x")
    print(f"wrote {out}")


def train_correctness(args, model: str, config, layers: list[int]) -> None:
    from vllm_ext.branches.confidence import META_KEY
    from vllm_ext.probes.base import model_fingerprint, save_probe
    from vllm_ext.probes.confidence import fit_confidence
    from vllm_ext.probes.collect import collect_branches
    from vllm_ext.probes.correctness import (TOOL_FREE_KINDS, BranchDataset, correctness_tasks,
                                             train_correctness_probe)

    every = args.every or 16
    if args.dataset and Path(args.dataset).exists():
        data = BranchDataset.load(args.dataset)
        print(f"loaded {len(data)} branches from {args.dataset}")
    else:
        tasks = correctness_tasks(args.num_prompts or 300, args.seed,
                                  tuple(args.task_kinds or TOOL_FREE_KINDS),
                                  tuple(args.difficulties))
        data = collect_branches(model, tasks, layers, branches=args.branches,
                                max_tokens=args.max_tokens, temperature=args.temperature,
                                batch=args.batch, keep_every=every, seed=args.seed,
                                max_seconds=args.max_seconds, enforce_eager=args.enforce_eager)
        if args.dataset:
            data.save(args.dataset)
    print(json.dumps(data.summary()))
    fingerprint = model_fingerprint(config, model)
    archs = (args.arch,) if args.arch else ("linear", "mlp")
    probe, report = train_correctness_probe(data, fingerprint, every, archs, args.seed)
    combiner, report["confidence"] = fit_confidence(data, probe, every, args.seed)
    if combiner is not None:  # the server's branch score: probe + token confidence
        probe.meta[META_KEY] = combiner.to_meta()
        probe.meta["test_auroc_combined"] = report["confidence"]["test"]["combined"]["auroc"]
    out = Path(args.out)
    if out.is_dir():
        out = out / f"{args.kind}-{fingerprint}.pt"
    save_probe(out, probe)
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2, default=float))
    print(format_auroc_table(report))
    print(f"wrote {out}")


def format_auroc_table(report: dict) -> str:
    """Markdown tables: test AUROC per (arch, layer), and per position for the chosen probe."""
    lines = ["| arch | layer | val AUROC | test AUROC (rounds pooled) | test, first round "
             "| test, within prompt | test, prefill row | test, prefill score held |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, layers in report["sweep"].items():
        for layer, r in layers.items():
            t = r["test"]
            lines.append(f"| {arch} | {layer} | {r['val_auroc']:.3f} | {t['auroc']:.3f} | "
                         f"{t['auroc_first_round']:.3f} | {t['auroc_within_prompt']:.3f} | "
                         f"{t['auroc_prefill_row']:.3f} | "
                         f"{t.get('auroc_prefill_score_held', float('nan')):.3f} |")
    best = report["best_test"]
    lines += ["", f"chosen: {report['best_arch']} layer {report['best_layer']} (every "
              f"{report['every']} tokens); test prompts {report['split_prompts']['test']}; "
              f"kind x difficulty baseline (no probe): "
              f"{report['baseline_kind_difficulty_auroc']:.3f}", "",
              "| tokens generated | test AUROC | rows | positive rate |", "|---|---:|---:|---:|"]
    for name, b in best["by_position"].items():
        lines.append(f"| {name} | {b['auroc']:.3f} | {b['rows']} | {b['positive_rate']:.2f} |")
    return "\n".join(lines)
