"""Evaluate the embedded reasoner through vLLM: accuracy per task kind and difficulty (greedy),
output lengths, tool-call rate, disagreement of sampled answers on hard prompts, and the
per-expert load of plain top-k routing (through HF transformers on the same tokens).

    .venv/bin/python scripts/eval_reasoner.py --per-cell 20 --out docs/testbed
    .venv/bin/python scripts/eval_reasoner.py --model tiny-moe-finegrained --per-cell 20 \
        --out docs/testbed/finegrained
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np


def expert_load(model_path: str, texts: list[str]) -> np.ndarray:
    """[layers, experts] share of top-k selections with plain top-k routing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    k = model.config.num_experts_per_tok
    e = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    counts = np.zeros((model.config.num_hidden_layers, e))
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text).input_ids])
            logits = model(ids, output_router_logits=True).router_logits
            for layer, lg in enumerate(logits):
                top = lg.float().topk(k, dim=-1).indices.flatten().numpy()
                counts[layer] += np.bincount(top, minlength=e)
    return counts / counts.sum(axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="embedded model name (tiny-moe-reasoner, tiny-moe-finegrained) "
                   "or path; default: the embedded model")
    p.add_argument("--eager", action="store_true", help="enforce_eager (skip torch.compile)")
    p.add_argument("--per-cell", type=int, default=20, help="tasks per kind x difficulty")
    p.add_argument("--samples", type=int, default=5, help="sampled answers per hard prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--out", default="docs/testbed")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from vllm_ext.testbed.harness import solve
    from vllm_ext.testbed.model import resolve_model
    from vllm_ext.testbed.tasks import DIFFICULTIES, KINDS, generate_tasks, parse_answer

    model = resolve_model(args.model)
    tasks = [t for kind in KINDS for d in DIFFICULTIES
             for t in generate_tasks(args.per_cell, args.seed + 31 * d + len(kind),
                                     kinds=[kind], difficulties=[d])]
    llm = LLM(model=model, dtype="bfloat16", seed=0, enforce_eager=args.eager)
    greedy = solve(llm, tasks)
    rows, out = [], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'kind':<8}" + "".join(f"{'d' + str(d) + ' acc':>9}" for d in DIFFICULTIES)
          + f"{'tokens (min/mean/max)':>24}{'tool calls':>12}")
    for kind in KINDS:
        cells = {d: [a for a in greedy if a.task.kind == kind and a.task.difficulty == d]
                 for d in DIFFICULTIES}
        acc = {d: float(np.mean([a.correct for a in c])) for d, c in cells.items()}
        lens = [a.output_tokens for c in cells.values() for a in c]
        calls = float(np.mean([a.tool_calls for c in cells.values() for a in c]))
        rows.append({"kind": kind, "acc": acc, "tokens": [min(lens), float(np.mean(lens)),
                                                          max(lens)], "tool_calls": calls})
        print(f"{kind:<8}" + "".join(f"{acc[d]:>9.0%}" for d in DIFFICULTIES)
              + f"{f'{min(lens)}/{np.mean(lens):.0f}/{max(lens)}':>24}{calls:>12.2f}")
    by_d = {d: float(np.mean([a.correct for a in greedy if a.task.difficulty == d]))
            for d in DIFFICULTIES}
    lens_by_d = {d: float(np.mean([a.output_tokens for a in greedy if a.task.difficulty == d]))
                 for d in DIFFICULTIES}
    corr = float(np.corrcoef([a.task.difficulty for a in greedy],
                             [a.output_tokens for a in greedy])[0, 1])
    print("all     " + "".join(f"{by_d[d]:>9.0%}" for d in DIFFICULTIES)
          + f"   mean tokens by difficulty {[round(v) for v in lens_by_d.values()]}, "
            f"corr(difficulty, tokens) {corr:.2f}")

    hard = [t for t in tasks if t.difficulty == max(DIFFICULTIES)]
    runs = [solve(llm, hard, temperature=args.temperature, seed=1000 * s)
            for s in range(args.samples)]  # --samples 0 skips this part
    disagree, vote_ok = 0, 0
    for i, task in enumerate(hard if runs else []):
        answers = [parse_answer(r[i].completion) for r in runs]
        disagree += len(set(answers)) > 1
        top = Counter(a for a in answers if a is not None).most_common(1)
        vote_ok += bool(top) and runs[0][i].task.answer.strip() == top[0][0]
    share, vote_acc = (disagree / len(hard), vote_ok / len(hard)) if runs else (None, None)
    if runs:
        print(f"sampled (T={args.temperature}, {args.samples} samples) on {len(hard)} hard prompts: "
              f"answers disagree on {share:.0%}; majority-vote accuracy {vote_acc:.0%} "
              f"(greedy {by_d[max(DIFFICULTIES)]:.0%})")

    from vllm_ext.testbed.tasks import prompt_text
    load = expert_load(model, [prompt_text(a.task) + a.completion for a in greedy[::3]])
    ratio = load.max(axis=1) / load.mean(axis=1)
    print("top-k expert load, max/mean per layer: " + ", ".join(f"{r:.2f}" for r in ratio))
    result = {"model": model, "per_cell": args.per_cell, "rows": rows, "acc_by_difficulty": by_d,
              "mean_tokens_by_difficulty": lens_by_d, "corr_difficulty_tokens": corr,
              "all_tokens_min_max": [min(a.output_tokens for a in greedy),
                                     max(a.output_tokens for a in greedy)],
              "sampled_disagreement": share, "majority_vote_acc": vote_acc,
              "expert_load": load.tolist(), "expert_max_over_mean": ratio.tolist()}
    (out / "eval_reasoner.json").write_text(json.dumps(result, indent=2))
    plot(out / "eval_reasoner.png", rows, greedy, load)
    print(f"wrote {out}/eval_reasoner.json and .png")


def plot(path, rows, greedy, load) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows:
        ax[0].plot(list(r["acc"]), list(r["acc"].values()), marker="o", label=r["kind"])
    ax[0].set(xlabel="difficulty", ylabel="greedy accuracy", title="accuracy")
    ax[0].legend(fontsize=7)
    for d in sorted({a.task.difficulty for a in greedy}):
        ax[1].hist([a.output_tokens for a in greedy if a.task.difficulty == d], bins=30,
                   alpha=0.5, label=f"difficulty {d}")
    ax[1].set(xlabel="output tokens", ylabel="tasks", title="output length")
    ax[1].legend()
    im = ax[2].imshow(load, aspect="auto", cmap="viridis")
    ax[2].set(xlabel="expert", ylabel="layer", title="top-k load share")
    fig.colorbar(im, ax=ax[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
