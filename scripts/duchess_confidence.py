"""Does token confidence rank branches within a prompt where the hidden-state probe cannot?

DUCHESS (arXiv 2509.24957) scores branches with a probe on hidden states; on the embedded
model that probe ranks prompts (difficulty) but not branches of one prompt (within-prompt
AUROC 0.50, docs/duchess.md). This script samples branches through vLLM with the sampled
token's logprob (and the top-5) returned, and measures, at the probe rounds j = i, 2i, ...,
confidence features of the tokens generated so far (DeepConf / Dynasor style): the lowest
sampled-token logprob, the mean, the lowest mean over a sliding window, the number of tokens
sampled below p = 0.5 and the mean top-5 entropy. Reported: AUROC pooled over the rounds and
within prompt (mean over prompts whose branches disagree), on all prompts (no training: each
feature is a score as it is, sign fixed a priori: higher confidence = more likely right).

  .venv/bin/python scripts/duchess_confidence.py --num-prompts 300 --out /tmp/duchess/conf.pt
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

def features_at(logprobs: np.ndarray, entropies: np.ndarray, j: int) -> dict[str, float]:
    """Confidence of the first j sampled tokens (j >= 1); higher = more confident. The first
    three are the server's own (`vllm_ext.branches.confidence`)."""
    from vllm_ext.branches.confidence import confidence_of

    conf = confidence_of(logprobs, j).features(0.5, 0.5)
    return {"min_logprob": conf["min_logprob"], "mean_logprob": conf["mean_logprob"],
            "min_window_mean": conf["min_window_mean"],
            "neg_low_count": -float((logprobs[:j] < math.log(0.5)).sum()),
            "neg_mean_entropy": -float(entropies[:j].mean())}


def sample(model: str, tasks, branches: int, max_tokens: int, seed: int, batch: int):
    from vllm import LLM, SamplingParams

    from vllm_ext.testbed.tasks import check_answer, prompt_text

    llm = LLM(model=model, dtype="bfloat16", seed=seed, enforce_eager=True)
    rows = []
    per_batch = max(1, batch // branches)
    start = time.perf_counter()
    for first in range(0, len(tasks), per_batch):
        jobs = [(p, b) for p in range(first, min(first + per_batch, len(tasks)))
                for b in range(branches)]
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=5,
                                 seed=seed * 1_000_003 + p * branches + b) for p, b in jobs]
        outs = llm.generate([prompt_text(tasks[p]) for p, _ in jobs], params, use_tqdm=False)
        for (p, b), out in zip(jobs, outs):
            piece = out.outputs[0]
            lps, ents = [], []
            for tok, entry in zip(piece.token_ids, piece.logprobs):
                lps.append(entry[tok].logprob)
                top = np.array([e.logprob for e in entry.values()])
                probs = np.exp(top)
                ents.append(float(-(probs * top).sum()))
            rows.append({"prompt": p, "branch": b, "correct": check_answer(tasks[p], piece.text),
                         "logprobs": np.array(lps), "entropies": np.array(ents),
                         "kind": tasks[p].kind, "difficulty": tasks[p].difficulty})
        print(f"{first + per_batch}/{len(tasks)} prompts, {time.perf_counter() - start:.0f} s",
              flush=True)
    return rows


def evaluate(rows, every: int) -> dict:
    from vllm_ext.probes.correctness import auroc

    table: dict[str, dict[str, float]] = {}
    names = list(features_at(np.zeros(1), np.zeros(1), 1))
    for name in names:
        scores, labels, prompts = [], [], []
        for r in rows:
            n = len(r["logprobs"])
            for j in range(every, n + 1, every):
                scores.append(features_at(r["logprobs"], r["entropies"], j)[name])
                labels.append(r["correct"])
                prompts.append(r["prompt"])
        scores, labels, prompts = map(np.asarray, (scores, labels, prompts))
        within = []
        for p in np.unique(prompts):
            m = prompts == p
            if 0 < labels[m].sum() < m.sum():
                within.append(auroc(scores[m], labels[m]))
        first = [i for i, r in enumerate(rows) if len(r["logprobs"]) >= every]
        s1 = [features_at(rows[i]["logprobs"], rows[i]["entropies"], every)[name] for i in first]
        table[name] = {"pooled": auroc(scores, labels),
                       "first_round": auroc(np.array(s1), np.array([rows[i]["correct"]
                                                                    for i in first])),
                       "within_prompt": float(np.mean(within)), "prompts_mixed": len(within),
                       "final": auroc(np.array([features_at(r["logprobs"], r["entropies"],
                                                            len(r["logprobs"]))[name]
                                                for r in rows if len(r["logprobs"])]),
                                      np.array([r["correct"] for r in rows
                                                if len(r["logprobs"])]))}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--branches", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--every", type=int, default=16)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", required=True, help="rows cache (.pt); reused when it exists")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        rows = torch.load(out, weights_only=False)
    else:
        from vllm_ext.probes.correctness import correctness_tasks
        from vllm_ext.testbed.model import default_model_path

        tasks = correctness_tasks(args.num_prompts, args.seed)
        rows = sample(default_model_path(), tasks, args.branches, args.max_tokens, args.seed,
                      args.batch)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rows, out)
    print(f"{len(rows)} branches, accuracy {np.mean([r['correct'] for r in rows]):.3f}")
    table = evaluate(rows, args.every)
    print("| feature | pooled | first round | within prompt | at the end |")
    print("|---|---:|---:|---:|---:|")
    for name, t in table.items():
        print(f"| {name} | {t['pooled']:.3f} | {t['first_round']:.3f} | "
              f"{t['within_prompt']:.3f} (n={t['prompts_mixed']}) | {t['final']:.3f} |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
