"""`vllm-ext train-probe --kind length --model PATH --prompts FILE --out FILE`.

Collects hidden states through vLLM (capture mode), sweeps the layers, trains the length
probe and the prompt-only baseline, prints the MAE table and writes the probe file (bound to
the model's fingerprint) plus a JSON report next to it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="vllm-ext train-probe")
    p.add_argument("--kind", choices=("length",), required=True)
    p.add_argument("--model", help="model path or name (default: the embedded model)")
    p.add_argument("--prompts", help="JSONL with a 'prompt' field (default: testbed tasks)")
    p.add_argument("--num-prompts", type=int, default=1200, help="testbed prompts to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="probe file to write, or a folder: then <kind>-<model fingerprint>.pt "
                        "inside it (the name `--ext-policy trail` looks for in assets/probes)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to sweep (default: all)")
    p.add_argument("--arch", choices=("linear", "mlp"), default="mlp")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--bin-mode", choices=("quantile", "equal"), default="quantile")
    p.add_argument("--every", type=int, default=8, help="refinement period for the MAE table")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--dataset", help="cache file for the collected hidden states")
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args(argv)
    if args.bins < 2:
        p.error("--bins must be >= 2")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoConfig

    from vllm_ext.probes.base import model_fingerprint, save_probe
    from vllm_ext.probes.collect import LengthDataset, collect, read_prompts, testbed_prompts
    from vllm_ext.probes.length import train_length_probe
    from vllm_ext.testbed.model import default_model_path

    model = args.model or default_model_path()
    config = AutoConfig.from_pretrained(model)
    layers = args.layers or list(range(config.num_hidden_layers))
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
